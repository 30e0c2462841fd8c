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

"""What the MONAI Label app does with a datastore: preview one protected study, export a protected release,
restore a release with its key.

The datastore (MONAI Label's ``LocalDatastore``: images in the studies folder, labels under ``labels/final`` and
``labels/original``) is seen through a *release view*: a small folder with an MSD ``dataset.json`` whose
``imagesTr/`` and ``labelsTr/`` entries are links to the studies' images and saved labels. The export runs
:func:`monai_umed.pipeline.protect_dataset` on that view, so the release has the MSD layout, the manifest and a key
written outside it; a preview computes the very same image for one study (same case id, same seed, same fitted
protector), so what an annotator views is what the release will hold.

Nothing here imports MONAI Label: the datastore is used through its public methods (``list_images``,
``get_image_uri``, ``get_label_by_image_id``, ``get_label_uri``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from monai_umed import protectors
from monai_umed.data.datalist import load_dataset
from monai_umed.data.formats import codec_for
from monai_umed.errors import InputError
from monai_umed.intensity import quantise
from monai_umed.key import read_key, restore_dataset, verify_key
from monai_umed.label.options import ProtectOptions, load_protector
from monai_umed.pipeline import load_case, protect_dataset

__all__ = ["Study", "Job", "ProtectionService", "build_release_view", "jsonable"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Study:
    """A datastore image with the saved label used as its ROI."""

    image_id: str
    image: str
    label: str
    tag: str


def _link(src: str | os.PathLike, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(os.path.realpath(src), dst)
    except OSError:  # file systems without symlinks
        shutil.copyfile(src, dst)


def build_release_view(studies: list[Study], root: str | os.PathLike, name: str = "studies",
                       modality: str | None = None) -> Path:
    """Write an MSD folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``) whose files link to the studies.

    Every study is a ``training`` case named after its image file; its case id is ``imagesTr/<file>``.

    Args:
        studies: labelled studies.
        root: new folder (replaced if it exists).
        name: dataset name written into ``dataset.json``.
        modality: modality hint written into ``dataset.json``.

    Returns:
        ``root``.
    """
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    entries = []
    for s in studies:
        image_name = Path(s.image).name
        label_name = Path(s.label).name
        _link(s.image, root / "imagesTr" / image_name)
        _link(s.label, root / "labelsTr" / label_name)
        entries.append({"image": f"imagesTr/{image_name}", "label": f"labelsTr/{label_name}"})
    datalist: dict[str, Any] = {
        "name": name,
        "description": "MONAI Label studies with their saved labels, protected by monai-umed",
        "labels_from": sorted({s.tag for s in studies}),
        "numTraining": len(entries),
        "training": entries,
    }
    if modality:
        datalist["modality"] = {"0": modality}
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(datalist, indent=1))
    return root


@dataclass
class Job:
    """A background export or restore, with its progress.

    Attributes:
        id: job identifier.
        kind: ``export`` | ``restore``.
        state: ``queued`` | ``running`` | ``done`` | ``failed``.
        phase: what it is doing (``waiting``, ``fitting``, ``protecting``, ``finalising``, ``restoring``, ``done``).
        total: number of cases.
        request: the resolved request (paths, options).
        result: the summary returned by the pipeline or the restore.
        error: one-line error of a failed job.
    """

    id: str
    kind: str
    request: dict[str, Any]
    total: int = 0
    state: str = "queued"
    phase: str = "waiting"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    counter: Callable[[], int] | None = None
    fitting: bool = False

    def done_count(self) -> int:
        if self.state == "done":
            return self.total
        if self.state != "running" or self.counter is None:
            return 0
        try:
            return min(self.total, self.counter())
        except OSError:
            return 0

    def to_dict(self) -> dict[str, Any]:
        done = self.done_count()
        phase = self.phase
        if self.state == "running" and self.kind == "export":
            phase = "fitting" if self.fitting and done == 0 else ("protecting" if done < self.total else "finalising")
        end = self.finished or time.time()
        return jsonable({
            "id": self.id, "kind": self.kind, "state": self.state, "phase": phase, "done": done, "total": self.total,
            "progress": 1.0 if self.state == "done" else (done / self.total if self.total else 0.0),
            "seconds": None if self.started is None else round(end - self.started, 3),
            "request": self.request, "result": self.result, "error": self.error,
        })


def jsonable(obj: Any) -> Any:
    """``obj`` with non-finite floats (an unperturbed image's infinite PSNR) replaced by None, for strict JSON."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, (np.floating, np.integer)):
        return jsonable(obj.item())
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def _count(folder: Path, pattern: str) -> int:
    return sum(1 for _ in folder.glob(pattern)) if folder.is_dir() else 0


def _psnr(delta_n: np.ndarray) -> float:
    mse = float(np.mean(np.square(delta_n, dtype=np.float64))) if delta_n.size else 0.0
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


class ProtectionService:
    """Previews, exports and restores for one datastore; one background job runs at a time.

    Args:
        datastore: a MONAI Label datastore (local studies folder).
        studies: the studies folder (releases and keys may not be written inside it).
        conf: the server's ``--conf`` options (defaults of every request).
        app_dir: the app folder (relative ``model`` paths resolve against it).
        releases: folder against which relative release, key and restore paths resolve; default
            ``<studies>-releases`` beside the studies folder.
    """

    def __init__(self, datastore: Any, studies: str | os.PathLike, conf: Mapping[str, Any] | None = None,
                 app_dir: str | os.PathLike | None = None, releases: str | os.PathLike | None = None) -> None:
        self.datastore = datastore
        self.studies = Path(studies).resolve()
        self.conf = dict(conf or {})
        self.app_dir = None if app_dir is None else Path(app_dir)
        rel = releases or self.conf.get("releases")
        default = self.studies.with_name(self.studies.name + "-releases")
        self.releases = Path(rel).expanduser().resolve() if rel else default
        self.defaults = ProtectOptions.from_sources(self.conf, None, self.app_dir)  # fail fast on a bad --conf
        self.jobs: dict[str, Job] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="umed-job")
        self._fit_lock = threading.Lock()
        self._fitted: dict[str, protectors.Protector] = {}

    # -- options and studies ------------------------------------------------------------------------------------
    def options(self, request: Mapping[str, Any] | None = None) -> ProtectOptions:
        """The server options overridden by a request's."""
        return ProtectOptions.from_sources(self.conf, request, self.app_dir)

    def label_of(self, image_id: str, tag: str = "auto") -> tuple[str, str] | None:
        """``(label path, tag)`` of a study's saved label (``auto``: final, else original), or None."""
        for t in (("final", "original") if tag == "auto" else (tag,)):
            label_id = self.datastore.get_label_by_image_id(image_id, t)
            if label_id:
                uri = self.datastore.get_label_uri(label_id, t)
                if uri and os.path.isfile(uri):
                    return uri, t
        return None

    def labelled_studies(self, tag: str = "auto") -> list[Study]:
        """Every datastore image that has a saved label of the requested tag, sorted by image id."""
        out = []
        for image_id in sorted(self.datastore.list_images()):
            found = self.label_of(image_id, tag)
            image = self.datastore.get_image_uri(image_id)
            if found and image and os.path.isfile(image):
                out.append(Study(image_id, image, found[0], found[1]))
        return out

    def _resolve(self, value: str | None, default: Path, what: str) -> Path:
        p = Path(value).expanduser() if value else default
        p = (p if p.is_absolute() else self.releases / p).resolve()
        if p == self.studies or p.is_relative_to(self.studies):
            raise InputError(f"the {what} must lie outside the studies folder (annotators would see it)", p)
        return p

    # -- fitted protectors --------------------------------------------------------------------------------------
    def _fit_key(self, options: ProtectOptions, studies: list[Study]) -> str:
        sig = [(s.image_id, s.label, os.stat(s.label).st_mtime_ns, os.stat(s.image).st_mtime_ns) for s in studies]
        opts = options.to_dict()
        opts.pop("explicit")
        return json.dumps([opts, sig], sort_keys=True, default=str)

    def protector(self, options: ProtectOptions, studies: list[Study] | None = None,
                  fit: bool = True) -> protectors.Protector:
        """The protector for ``options``: loaded from ``model``, built, or fitted on the labelled studies.

        A method that learns is fitted once on the release view of all labelled studies (exactly what an export
        fits on) and kept for later previews and exports, until a study or label changes.

        Args:
            options: protection options.
            studies: the labelled studies (listed from the datastore when None).
            fit: fit a learning method now (else return it unfitted when no fitted one is kept).
        """
        p = load_protector(options)
        if p.fitted:
            return p
        studies = self.labelled_studies(options.label_tag) if studies is None else studies
        key = self._fit_key(options, studies)
        with self._fit_lock:
            if key in self._fitted:
                return self._fitted[key]
            if not fit:
                return p
            if not studies:
                raise InputError(f"method {p.name!r} learns from labelled studies and the datastore has none",
                                 self.studies)
            with tempfile.TemporaryDirectory(prefix="umed-fit-") as tmp:
                spec = load_dataset(build_release_view(studies, Path(tmp) / "view", modality=options.modality))
                items = [load_case(spec, c, options.intensity) for c in spec.cases]
                samples = [{"image": it.tensor, "label": it.label, "case_id": it.case.case_id, "meta": it.image.meta}
                           for it in items]
                logger.info("fitting %s on %d labelled studies", p.name, len(samples))
                p.fit(samples, progress=False)
            self._fitted[key] = p
            return p

    def keep_fitted(self, options: ProtectOptions, studies: list[Study], protector: protectors.Protector) -> None:
        """Keep a protector fitted by an export for the previews that follow."""
        if protector.fits and protector.fitted and options.model is None:
            with self._fit_lock:
                self._fitted[self._fit_key(options, studies)] = protector

    # -- preview of one study -----------------------------------------------------------------------------------
    def protect_study(self, image: str, image_id: str | None = None, label: str | None = None,
                      request: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Write the protected version of one study's image to a temporary file (the caller removes it).

        Args:
            image: the image file.
            image_id: its datastore id (its saved label is the ROI), or None for an uploaded image.
            label: a label file to use instead of the saved one (an uploaded label).
            request: per-request options.

        Returns:
            ``(path of the protected image, details)``; details hold the method, its parameters, the label used,
            PSNR and the largest change in native units.

        Raises:
            InputError: no label for the study, unreadable files, bad options.
        """
        options = self.options(request)
        tag = "upload"
        if not label:
            found = self.label_of(image_id, options.label_tag) if image_id else None
            if found is None:
                raise InputError(f"study {image_id!r} has no saved label ({options.label_tag}); save one first or "
                                 "send a label file", image)
            label, tag = found
        study = Study(image_id or Path(image).name, image, label, tag)
        in_store = image_id is not None and tag != "upload"
        protector = self.protector(options) if in_store else self.protector(options, [study])
        with tempfile.TemporaryDirectory(prefix="umed-preview-") as tmp:
            spec = load_dataset(build_release_view([study], Path(tmp) / "view", modality=options.modality))
            lc = load_case(spec, spec.cases[0], options.intensity)
            with torch.no_grad():
                delta = protector.perturbation_batch([lc.tensor.to(protector.device)],
                                                     [lc.label.to(protector.device)], [lc.case.case_id])[0]
            budget = float(getattr(protector, "max_epsilon", protector.epsilon))
            protected, delta_q = quantise(lc.image.array, delta.detach().float().cpu().numpy(), lc.mapping, budget,
                                          source=lc.paths[0])
            codec = codec_for(lc.paths[0])
            suffix = "".join(Path(codec.output_relpath(Path(image).name)).suffixes) or ".nii.gz"
            fd, out = tempfile.mkstemp(prefix="umed-protected-", suffix=suffix)
            os.close(fd)
            codec.write(lc.paths[0], out, protected)
        delta_n = delta_q / lc.mapping.scale(delta_q.ndim)
        roi = np.broadcast_to(lc.label.numpy() > 0, delta_q.shape)
        info = {
            "image": image_id, "case_id": lc.case.case_id, "label": label, "label_tag": tag,
            "method": protector.name, "params": protector.params(),
            "psnr": _psnr(delta_n), "psnr_roi": _psnr(delta_n[roi]) if roi.any() else None,
            "max_abs_delta": float(np.abs(delta_q).max() * abs(lc.mapping.slope)) if delta_q.size else 0.0,
            "changed_fraction": float(np.count_nonzero(delta_q) / max(1, delta_q.size)),
            "dtype": str(protected.dtype), "shape": list(protected.shape),
        }
        return out, jsonable(info)

    # -- jobs ---------------------------------------------------------------------------------------------------
    def _submit(self, job: Job, work: Callable[[Job], dict[str, Any]]) -> Job:
        def run() -> None:
            job.state, job.started = "running", time.time()
            try:
                job.result = work(job)
                job.state, job.phase = "done", "done"
            except Exception as e:  # reported to the client through the job; the server keeps running
                job.state, job.error = "failed", str(e).splitlines()[0] if str(e) else type(e).__name__
                logger.error("monai-umed %s job %s failed: %s\n%s", job.kind, job.id, job.error, traceback.format_exc())
            finally:
                job.finished = time.time()

        self.jobs[job.id] = job
        self._executor.submit(run)
        return job

    def start_export(self, request: Mapping[str, Any] | None = None) -> Job:
        """Queue the protection of every labelled study into a release folder.

        Request keys: ``output`` (release folder; relative to the releases folder; default
        ``release-<time>``), ``key`` (default ``<output>.umedkey`` beside it), ``resume`` (continue an
        interrupted export with the same settings), ``batch_size``, and the protection options.

        Raises:
            InputError: bad options, no labelled study, an output or key inside the studies folder or existing.
        """
        request = dict(request or {})
        options = self.options(request)
        studies = self.labelled_studies(options.label_tag)
        if not studies:
            raise InputError(f"no study has a saved label ({options.label_tag}); nothing to export", self.studies)
        output = self._resolve(request.get("output"), Path(time.strftime("release-%Y%m%d-%H%M%S")), "release folder")
        key = self._resolve(request.get("key"), output.with_name(output.name + ".umedkey"), "key")
        resume = bool(request.get("resume", False))
        if output.exists():
            raise InputError("release folder already exists", output)
        if key.exists() and not resume:
            raise InputError("key file already exists", key)
        batch_size = int(request.get("batch_size") or 8)
        load_protector(options)  # fail now, not in the background, on a bad method, parameter or model
        job = Job(uuid.uuid4().hex[:12], "export", {
            "output": str(output), "key": str(key), "resume": resume, "studies": len(studies),
            "options": options.to_dict(),
            "labels": {t: sum(s.tag == t for s in studies) for t in ("final", "original")},
        }, total=len(studies))
        work_cases = key.with_name(key.name + ".parts") / "cases"
        job.counter = lambda: _count(work_cases, "*.json")

        def work(job: Job) -> dict[str, Any]:
            view = output.with_name(output.name + ".studies")
            try:
                build_release_view(studies, view, name=self.studies.name, modality=options.modality)
                protector = self.protector(options, studies, fit=False)
                job.fitting = protector.fits and not protector.fitted
                summary = protect_dataset(view, output, key=key, split="all", resume=resume, progress=False,
                                          protector=protector, intensity=options.intensity, batch_size=batch_size)
                self.keep_fitted(options, studies, protector)
            finally:
                shutil.rmtree(view, ignore_errors=True)
            summary["studies"] = [s.image_id for s in studies]
            return summary

        return self._submit(job, work)

    def start_restore(self, request: Mapping[str, Any]) -> Job:
        """Queue the restoration of a release with its key (``release``, ``key``, optional ``output``, default
        ``<release>-restored``).

        Raises:
            InputError: missing release or key, an existing output.
        """
        if not request.get("release"):
            raise InputError("restore needs 'release' (the protected release folder)")
        release = self._resolve(request["release"], Path(), "release folder")
        if not release.is_dir():
            raise InputError("release folder not found", release)
        key = self._resolve(request.get("key"), release.with_name(release.name + ".umedkey"), "key")
        record = read_key(key)
        output = self._resolve(request.get("output"), release.with_name(release.name + "-restored"), "restored folder")
        if output.exists():
            raise InputError("output folder already exists", output)
        cases = record.get("cases", [])
        job = Job(uuid.uuid4().hex[:12], "restore", {"release": str(release), "key": str(key), "output": str(output)},
                  total=len(cases), phase="restoring")
        stage = output.with_name(output.name + ".partial")
        outputs = [[f["output"] for f in c["files"]] for c in cases]
        job.counter = lambda: sum(all((stage / f).is_file() for f in fs) for fs in outputs)

        def work(job: Job) -> dict[str, Any]:
            return restore_dataset(release, key, output, progress=False)

        return self._submit(job, work)

    def verify(self, release: str, key: str | None = None) -> dict[str, Any]:
        """Check that a key belongs to a release (every file it lists is there, unchanged).

        Raises:
            KeyMismatchError: naming the first file that differs.
        """
        rel = self._resolve(release, Path(), "release folder")
        k = self._resolve(key, rel.with_name(rel.name + ".umedkey"), "key")
        record = verify_key(rel, k)
        return {"release": str(rel), "key": str(k), "cases": len(record["cases"]), "method": record.get("method"),
                "fingerprint": record.get("fingerprint")}

    def job(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def info(self) -> dict[str, Any]:
        """Server options, methods available and the labelled studies (for ``GET /umed/info``)."""
        studies = self.labelled_studies(self.defaults.label_tag)
        return {"options": self.defaults.to_dict(), "methods": protectors.names(), "studies": str(self.studies),
                "releases": str(self.releases), "labelled": [s.image_id for s in studies],
                "images": len(self.datastore.list_images())}
