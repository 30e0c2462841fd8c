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

"""The monai-umed MONAI Label app: protect what annotators labelled, from the MONAI Label server.

Start it on a studies folder (MONAI Label's local datastore: images in the folder, labels under
``labels/final`` and ``labels/original``)::

    python -m monai_umed.label umed_app          # an app folder whose main.py is this app
    monailabel start_server --app umed_app --studies studies \\
        --uvicorn_app monai_umed.label.server:app --conf method noise --conf epsilon 8/255

It registers the infer task ``protect`` (the protected version of one study, for viewing in the client) and the
``/umed`` REST endpoints (export a protected release, its progress, restore a release with its key).
``--conf`` options: ``method``, ``epsilon``, ``epochs``, ``seed``, ``params`` (JSON object), ``device``,
``intensity``, ``label_tag``, ``modality``, ``model`` (fitted protector: a state_dict file or a bundle folder with
``models/``; relative to the app folder) and ``releases`` (where relative release paths go).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Dict

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask

from monai_umed import __version__
from monai_umed.errors import InputError
from monai_umed.label.infer import ProtectInfer
from monai_umed.label.service import ProtectionService

__all__ = ["MONAIUmedApp"]

logger = logging.getLogger(__name__)


class MONAIUmedApp(MONAILabelApp):
    """MONAI Label app serving a studies folder with the ``protect`` infer task and the ``/umed`` endpoints.

    Args:
        app_dir: the app folder.
        studies: the studies folder (local datastore).
        conf: ``--conf`` options (see the module docstring).

    Raises:
        MONAILabelException: a ``--conf`` option that does not parse.
    """

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]) -> None:
        self._umed_conf = dict(conf or {})
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="monai-umed",
            description="Protect labelled studies with imperceptible label-aware perturbations (unlearnable "
            "examples) and export them as a release with a restoration key",
            version=__version__,
        )

    @property
    def service(self) -> ProtectionService:
        """The app's previews, exports and restores (created with the datastore)."""
        return self._umed_service

    def init_infers(self) -> Dict[str, InferTask]:
        # called by MONAILabelApp.__init__ right after the datastore exists
        try:
            self._umed_service = ProtectionService(self.datastore(), self.studies, self._umed_conf, self.app_dir)
        except InputError as e:
            raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, f"monai-umed: {e}") from e
        return {"protect": ProtectInfer(self._umed_service)}

    def infer(self, request: Dict[str, Any], datastore: Any = None) -> Dict[str, Any]:
        """Run an infer task; for ``protect`` the study id is kept and the result is never saved as a label.

        Raises:
            HTTPException: 400 with the reason for invalid input of ``protect``.
        """
        if request.get("model") != "protect":
            return super().infer(request, datastore)
        request = dict(request)
        image = request.get("image")
        store = datastore or self.datastore()
        request["image_id"] = image if isinstance(image, str) and store.get_image_uri(image) else None
        request["save_label"] = False  # the result is an image, not a label
        try:
            return super().infer(request, datastore)
        except MONAILabelException as e:
            if e.error == MONAILabelError.INVALID_INPUT:
                raise HTTPException(status_code=400, detail=e.msg) from e
            raise

    def on_init_complete(self) -> None:
        super().on_init_complete()
        # `--uvicorn_app monai_umed.label.server:app` adds the /umed router at import; when the server was started
        # without it, add it to MONAI Label's FastAPI app now
        server = sys.modules.get("monailabel.app")
        if server is not None and hasattr(server, "app"):
            from monai_umed.label.endpoints import mount

            if mount(server.app):
                logger.info("monai-umed: /umed endpoints added to the MONAI Label server")
