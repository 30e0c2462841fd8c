# Copyright (c) monai-umed contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

"""``/umed`` REST endpoints of the MONAI Label server: export a protected release, follow it, restore it.

=========================  ==========================================================================================
``GET  /umed/info``        server options, methods available, labelled studies
``POST /umed/export``      protect every labelled study into a release folder (MSD layout, ``manifest.json``) with
                           the key written outside it; answers 202 with a job
``GET  /umed/jobs/{id}``   a job's state and progress (``done`` of ``total`` cases); ``GET /umed/jobs`` lists them
``POST /umed/restore``     restore a release with its key into a new folder (a job)
``POST /umed/verify``      check that a key belongs to a release (409 naming the first differing file)
=========================  ==========================================================================================

Export, restore and verify need MONAI Label's admin role when authentication is enabled. Relative paths resolve
against the releases folder (``--conf releases DIR``, default ``<studies>-releases``); nothing may be written
inside the studies folder.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

from fastapi import APIRouter, Depends, FastAPI, HTTPException
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance
from pydantic import BaseModel, ConfigDict, Field

from monai_umed.errors import InputError, KeyMismatchError
from monai_umed.label.service import ProtectionService, jsonable

__all__ = ["router", "mount", "ExportRequest", "RestoreRequest", "VerifyRequest"]

router = APIRouter(prefix="/umed", tags=["monai-umed"])


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Optional[str] = Field(None, description="protection method (monai-umed methods)")
    epsilon: Optional[Union[float, str]] = Field(None, description="L-inf budget: 8/255 or a float in [0, 1]")
    epochs: Optional[int] = Field(None, description="bound on fitting")
    seed: Optional[int] = None
    params: Optional[Dict[str, Any]] = Field(None, description="method-specific settings (--param KEY=VALUE)")
    device: Optional[str] = Field(None, description="auto | cpu | cuda")
    intensity: Optional[str] = Field(None, description="auto | dtype | window | minmax | percentile")
    label_tag: Optional[str] = Field(None, description="auto (final, else original) | final | original")
    modality: Optional[str] = Field(None, description="modality hint such as CT (HU window) or MRI")


class ExportRequest(_Options):
    """Body of ``POST /umed/export``; unset options take the server's ``--conf`` values."""

    output: Optional[str] = Field(None, description="new release folder (default releases/release-<time>)")
    key: Optional[str] = Field(None, description="key file (default <output>.umedkey beside the release)")
    resume: bool = Field(False, description="continue an interrupted export with the same settings")
    batch_size: Optional[int] = Field(None, description="cases per perturbation batch")


class RestoreRequest(BaseModel):
    """Body of ``POST /umed/restore``."""

    model_config = ConfigDict(extra="forbid")

    release: str = Field(..., description="protected release folder")
    key: Optional[str] = Field(None, description="its key (default <release>.umedkey)")
    output: Optional[str] = Field(None, description="new folder for the originals (default <release>-restored)")


class VerifyRequest(BaseModel):
    """Body of ``POST /umed/verify``."""

    model_config = ConfigDict(extra="forbid")

    release: str
    key: Optional[str] = None


def _service() -> ProtectionService:
    service = getattr(app_instance(), "service", None)
    if not isinstance(service, ProtectionService):
        raise HTTPException(status_code=404, detail="this MONAI Label server does not run the monai-umed app")
    return service


def _bad_input(e: InputError) -> HTTPException:
    return HTTPException(status_code=409 if isinstance(e, KeyMismatchError) else 400, detail=str(e))


@router.get("/info", summary="monai-umed options, methods and labelled studies")
def api_info(user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))) -> Dict[str, Any]:
    return jsonable(_service().info())


@router.post("/export", status_code=202, summary="Protect every labelled study into a release (a job)")
def api_export(body: ExportRequest, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))) -> Dict[str, Any]:
    try:
        return _service().start_export(body.model_dump(exclude_none=True)).to_dict()
    except InputError as e:
        raise _bad_input(e) from e


@router.get("/jobs", summary="All export and restore jobs of this server")
def api_jobs(user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))) -> List[Dict[str, Any]]:
    return [j.to_dict() for j in _service().jobs.values()]


@router.get("/jobs/{job_id}", summary="State and progress of a job")
def api_job(job_id: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))) -> Dict[str, Any]:
    job = _service().job(job_id)
    if job is None:
        raise HTTPException(status_code=404, detail=f"no job {job_id!r}")
    return job.to_dict()


@router.post("/restore", status_code=202, summary="Restore a release with its key (a job)")
def api_restore(body: RestoreRequest,
                user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))) -> Dict[str, Any]:
    try:
        return _service().start_restore(body.model_dump(exclude_none=True)).to_dict()
    except InputError as e:
        raise _bad_input(e) from e


@router.post("/verify", summary="Check that a key belongs to a release")
def api_verify(body: VerifyRequest, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))) -> Dict[str, Any]:
    try:
        return _service().verify(body.release, body.key)
    except InputError as e:
        raise _bad_input(e) from e


def mount(app: FastAPI) -> bool:
    """Add the ``/umed`` router to a FastAPI app (MONAI Label's) unless it is there already.

    Returns:
        True when the routes were added now.
    """
    if getattr(app.state, "monai_umed", False):
        return False
    app.include_router(router, prefix=settings.MONAI_LABEL_API_STR)
    app.openapi_schema = None  # rebuilt with the new routes on the next request
    app.state.monai_umed = True
    return True
