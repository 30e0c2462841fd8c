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

"""``protect_dataset()``: the end-to-end protection job (DESIGN.md, "The one data path").

dataset on disk -> cases -> MONAI loaders -> normalised tensors -> ``protector.fit`` -> per-case perturbation ->
quantised to the source dtype -> written in the source format into a staging folder ``OUT.partial`` -> manifest,
datalist and key -> staging renamed to ``OUT``.

Overlap: while a batch is perturbed on the calling thread, a bounded pool of I/O threads (:mod:`monai_umed.io_pool`)
decodes the next batch and quantises, encodes, hashes and writes the previous one; every case is written by one task,
results are taken in case order, and a batch bigger than half of :data:`IO_MEMORY` is protected alone, so big
volumes cost one batch of memory. The output is the same bytes with any number of threads (0: all on one thread).

Crash safety and resume: each finished case leaves a fragment (``<key>.parts/cases/<n>.json`` plus its delta)
written *after* its files, so ``--resume`` redoes nothing finished and an interrupted run never looks complete.
Per-case randomness comes from ``(seed, case_id)``, so a resumed run writes the same bytes as an uninterrupted one.

Under ``torchrun`` (:mod:`monai_umed.distributed`) every rank protects its share of the unfinished cases into the
same staging and work folders; a fitted method is fitted once (by rank 0 alone, or by every rank with DDP when the
protector supports it) and every rank protects with rank 0's fitted state; rank 0 alone writes manifest, datalist and
key once every fragment exists. A failed rank stops every rank with an error naming it and leaves fragments that
``--resume`` (with any number of processes) completes.

One run at a time: the run holds an advisory lock on ``OUT.lock`` (:class:`RunLock`) from setup to the end, so a
second process on the same output is refused instead of racing. ``--resume`` of a run that already completed checks
that its output and key match the settings and succeeds without redoing anything.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, runs are not guarded against each other
    fcntl = None  # type: ignore[assignment]

from monai_umed import __version__, distributed, protectors
from monai_umed.blocks import BLOCK
from monai_umed.data.datalist import Case, DatasetSpec, load_dataset
from monai_umed.data.formats import ImageData, array_sha256, atomic_path, codec_for, copy_atomic, file_sha256
from monai_umed.errors import InputError, KeyDamagedError
from monai_umed.intensity import IntensityMapping, compute_mapping, parse_epsilon, quantise_blocks
from monai_umed.io_pool import IOPool, OrderedWindow, default_io_threads
from monai_umed.key import check_key, encode_delta, fingerprint, read_key, write_key

__all__ = ["protect_dataset", "default_key_path", "LoadedCase", "load_case", "load_fit_sample", "RunLock"]

_CONFIG_KEYS = ("dataset", "method", "params", "split", "intensity", "new_uids", "cases")
_RESUME_HINT = "finished cases are kept: fix the cause and rerun with --resume"
#: Decoded data (bytes) the I/O threads may hold besides the batch being perturbed: a batch of more than half of it is
#: protected alone (nothing decoded ahead, written before the next is decoded), so a big volume costs one batch.
IO_MEMORY = 1 << 30


def default_key_path(output: str | os.PathLike) -> Path:
    """``OUT`` -> ``OUT.umedkey`` beside it (never inside the released folder)."""
    out = Path(output).resolve()
    return out.with_name(out.name + ".umedkey")


@dataclass
class LoadedCase:
    """A case decoded and normalised: what a protector sees, plus what the writer needs."""

    case: Case
    image: ImageData
    mapping: IntensityMapping
    tensor: torch.Tensor  # C x spatial float32 in [0, 1]
    label: torch.Tensor | None  # 1 x spatial int64
    paths: list[str]  # absolute image paths


def load_case(spec: DatasetSpec, case: Case, intensity: str = "auto") -> LoadedCase:
    """Decode one case through MONAI's readers and map it to the normalised space.

    Raises:
        InputError: missing/corrupt files, NaN/Inf, bad labels (see :func:`monai_umed.data.formats.check_label`).
    """
    paths = [str(spec.abspath(p)) for p in case.image_files]
    for p in paths:
        if not os.path.isfile(p):
            raise InputError("image file not found", p)
    arg: Any = paths if isinstance(case.image, list) else paths[0]
    codec = codec_for(arg)
    image = codec.read(arg)
    modality = image.modality or spec.modality
    try:
        mapping = compute_mapping(image.array, intensity, modality=modality, slope=image.slope, intercept=image.intercept)
    except ValueError as e:
        raise InputError(str(e), paths[0]) from e
    normalised = mapping.to_normalised(image.array)
    tensor = torch.from_numpy(np.clip(normalised, 0.0, 1.0, out=normalised))  # in place: no second float copy
    label = None
    if case.label is not None:
        lpath = spec.abspath(case.label)
        if not lpath.is_file():
            raise InputError("label file not found", lpath)
        label = torch.from_numpy(codec.read_label(str(lpath), image))
    return LoadedCase(case, image, mapping, tensor, label, paths)


def load_fit_sample(spec: DatasetSpec, case: Case, intensity: str, protector: protectors.Protector) -> dict[str, Any]:
    """Decode one training case and keep what ``protector.fit`` needs of it
    (:meth:`~monai_umed.protectors.base.Protector.fit_sample`): the decoded volume is let go as soon as the case is
    reduced, so fitting holds at most one decoded case per I/O thread, whatever the dataset's size."""
    lc = load_case(spec, case, intensity)
    return protector.fit_sample({"image": lc.tensor, "label": lc.label, "case_id": lc.case.case_id,
                                 "meta": lc.image.meta})


def _psnr(delta_n: np.ndarray) -> float:
    """PSNR (dB) of a perturbation in normalised units (peak 1 = the mapping's range, 255 for uint8)."""
    mse = float(np.mean(np.square(delta_n, dtype=np.float64))) if delta_n.size else 0.0
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def _psnr_of_squares(sq: np.ndarray) -> float:
    """:func:`_psnr` of a perturbation given its element-wise squares (float64): the same float."""
    mse = float(np.mean(sq)) if sq.size else 0.0
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, (np.ndarray, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _digest(obj: Any) -> str:
    """Short stable digest of a JSON-serialisable object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()[:32]


def _write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=_json_default, allow_nan=True))


def _config_diff(old: dict[str, Any], new: dict[str, Any], keys: Sequence[str] = _CONFIG_KEYS) -> list[str]:
    """The settings among ``keys`` in which two run configurations differ."""
    def text(config: dict[str, Any], k: str) -> str:
        return json.dumps(config.get(k), default=_json_default)

    return [k for k in keys if text(old, k) != text(new, k)]


class RunLock:
    """Advisory lock of one protection run: ``fcntl.flock`` on ``OUT.lock``, beside the staging folder ``OUT.partial``.

    Taken (exclusive, without waiting) before anything of the run is written and held to its end; a second process
    on the same output gets a one-line :class:`InputError` naming the holder. The kernel drops the lock when its
    process exits or crashes, so a lock file left by a killed run does not block ``--resume``. The file lies beside
    the staging folder, not in it, so that it never moves into ``OUT/``; :meth:`release` removes it, and
    :meth:`acquire` checks that the file it locked is still the one at the path (a holder may remove it between
    another process's ``open`` and ``flock``), retrying otherwise. Linux NFS clients map ``flock`` onto NFS byte-range
    locks, so the lock also holds between machines that share the output folder.

    Under ``torchrun`` the ranks of one run are one run: rank 0 alone takes the lock, in the setting-up phase, which
    ends with a status exchange among all ranks (:func:`monai_umed.distributed.stage`). The other ranks therefore
    write nothing until rank 0 holds it, and all of them stop, with rank 0's error, when another run holds it; rank 0
    holds it until the key is written. Shared locks taken by every rank would not do: two different jobs would both
    get them.

    Args:
        output: the run's output folder ``OUT``.
    """

    def __init__(self, output: str | os.PathLike) -> None:
        self.output = Path(output)
        self.path = self.output.with_name(self.output.name + ".lock")
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock (non-blocking) and record this process in the file.

        Raises:
            InputError: another process holds it.
        """
        if fcntl is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # BlockingIOError: held by another process
                holder = os.read(fd, 200).decode(errors="replace").strip()
                os.close(fd)
                raise InputError(f"another process ({holder or 'unknown'}) is running a protection into this output; "
                                 f"wait for it to end or stop it (it holds {self.path.name})", self.output) from None
            if self._is_current(fd):
                break
            os.close(fd)  # locked a file its holder had just removed: lock the one now at the path
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd
        return self

    def _is_current(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)

    def release(self) -> None:
        """Remove the lock file and drop the lock (removing first: a waiter then sees a stale file and retries)."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class _Job:
    """Paths and bookkeeping of one protection run (staging folder, work folder with fragments)."""

    def __init__(self, spec: DatasetSpec, output: Path, key: Path, config: dict[str, Any], resume: bool,
                 create: bool = True) -> None:
        self.spec, self.output, self.key, self.config = spec, output, key, config
        self.stage = output.with_name(output.name + ".partial")
        self.work = key.with_name(key.name + ".parts")
        self.cases_dir = self.work / "cases"
        self.writer: _Writer | None = None  # the run's I/O threads for writes (None: written where perturbed)
        cfg_path = self.work / "config.json"
        if not create:  # another rank of a torchrun job set the folders up
            return
        if self.work.exists() or self.stage.exists():
            if not resume:
                raise InputError(f"an interrupted run exists ({self.stage.name}, {self.work.name}); pass --resume to continue it or delete them", output)
            if not cfg_path.is_file():
                raise InputError("cannot resume: the work folder has no config.json", self.work)
            diff = _config_diff(json.loads(cfg_path.read_text()), config)
            if diff:
                raise InputError(f"cannot resume: the interrupted run used different {', '.join(diff)}", self.work)
        self.stage.mkdir(parents=True, exist_ok=True)
        self.cases_dir.mkdir(parents=True, exist_ok=True)
        _write_json(cfg_path, config)

    def fragment(self, n: int) -> Path:
        return self.cases_dir / f"{n:06d}.json"

    def done(self, n: int) -> bool:
        return self.fragment(n).is_file()


def _check_paths(spec: DatasetSpec, output: Path, key: Path, resume: bool) -> None:
    root = spec.root.resolve()
    if output == root or output.is_relative_to(root):
        raise InputError("output must not lie inside the input dataset", output)
    if root.is_relative_to(output):
        raise InputError("output must not contain the input dataset", output)
    if output.exists() and not resume:  # --resume: rank 0 checks the finished run under the lock (_finished_run)
        raise InputError("output folder already exists", output)
    if key.is_relative_to(output) or key.is_relative_to(root):
        raise InputError("the key must lie outside both the input dataset and the output folder", key)
    if key.exists() and not resume:
        raise InputError("key file already exists", key)


def _finished_run(out: Path, key: Path, config: dict[str, Any], resume: bool, t0: float) -> dict[str, Any] | None:
    """The summary of the complete run that ``--resume`` meets again, or None while ``out`` does not exist.

    The run must have used the same settings (``config``) and its key must check out against ``out`` in full.

    Raises:
        InputError: ``out`` exists without ``--resume``, the run used other settings, or its key is missing.
        KeyMismatchError: the key does not match the output, or is damaged (one line per problem).
    """
    if not out.exists():
        return None
    if not resume:
        raise InputError("output folder already exists", out)
    done = "output folder already exists (the run it came from is complete"
    if not key.is_file():
        raise InputError(f"{done}, but its key {key} is not there)", out)
    record = read_key(key)
    old = record.get("config")
    if old is None:  # a key written before key.json recorded the run's settings
        old = {**{k: record.get(k) for k in ("dataset", "method", "params", "split", "intensity")},
               "cases": [c.get("case_id") for c in record["cases"]]}
    diff = _config_diff(old, config, [k for k in _CONFIG_KEYS if k in old])
    if diff:
        raise InputError(f"{done}, with different {', '.join(diff)})", out)
    check_key(out, key).raise_for_problems(key)
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    return {**_run_summary(summary, record.get("fit"), out, key, t0), "already_complete": True}


def _select(spec: DatasetSpec, split: str) -> tuple[list[int], list[int]]:
    if split not in ("all", "training"):
        raise InputError(f"--split must be 'all' or 'training', got {split!r}")
    protect = [i for i, c in enumerate(spec.cases) if split == "all" or c.split == "training"]
    if not protect:
        raise InputError(f"the dataset has no cases in split {split!r}", spec.root)
    return protect, [i for i in range(len(spec.cases)) if i not in set(protect)]


def _batches(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclass
class _CaseOutput:
    """What writing one perturbed case needs; :func:`_finish_case` drops each array as soon as it is used, so a
    big volume's label and float perturbation do not stay in memory while its files are written."""

    n: int
    case: Case
    image: ImageData
    mapping: IntensityMapping
    paths: list[str]
    label: torch.Tensor | None
    delta: np.ndarray | None


class _DeltaStats:
    """The manifest's per-case figures: PSNR of the whole image and of the ROI, max |delta|, fraction changed.

    Fed the blocks of :func:`quantise_blocks`. A volume of more than :data:`~monai_umed.blocks.BLOCK` elements is
    summed block by block (no full-size float64 copies of it); a smaller one is kept whole, in its source's memory
    layout, and reduced exactly as on the whole array, so its figures are the same floats as before blocks existed.

    Args:
        mapping: the case's intensity mapping.
        roi: spatial bool ROI mask (no channel axis), or None.
        source: the stored array (its shape, dtype and layout).
    """

    def __init__(self, mapping: IntensityMapping, roi: np.ndarray | None, source: np.ndarray) -> None:
        self.mapping = mapping
        self.scale = mapping.scale(1).reshape(-1)  # stored units per normalised unit, per channel
        self.roi = roi
        kind = np.int64 if source.dtype.kind in "uib" else np.float64
        self.whole = np.empty_like(source, dtype=kind) if source.size <= BLOCK else None
        self.sq = self.sq_roi = 0.0
        self.n = self.n_roi = self.changed = 0
        self.max_abs = 0.0

    def add(self, index: tuple[int | slice, ...], delta_q: np.ndarray) -> None:
        """Add one block (``index`` as yielded by :func:`quantise_blocks`: channel first)."""
        if self.whole is not None:
            self.whole[index] = delta_q
            return
        if not delta_q.size:
            return
        sq = np.square(delta_q / self.scale[int(index[0]) % self.scale.size])
        self.sq += float(sq.sum())
        self.n += sq.size
        if self.roi is not None:
            inside = sq[self.roi[index[1:]]]
            self.sq_roi += float(inside.sum())
            self.n_roi += inside.size
        self.changed += int(np.count_nonzero(delta_q))
        self.max_abs = max(self.max_abs, float(np.abs(delta_q).max()))

    def record(self) -> dict[str, Any]:
        """The manifest fields ``psnr``, ``psnr_roi``, ``max_abs_delta`` and ``changed_fraction``."""
        slope = abs(self.mapping.slope)
        if self.whole is not None:
            dq = self.whole
            sq = dq / self.mapping.scale(dq.ndim)
            np.square(sq, out=sq)  # the squares of the normalised delta, reduced in its own layout as before
            roi = None if self.roi is None else np.broadcast_to(self.roi, dq.shape)
            return {
                "psnr": _psnr_of_squares(sq),
                "psnr_roi": _psnr_of_squares(sq[roi]) if roi is not None and roi.any() else None,
                "max_abs_delta": float(np.abs(dq).max()) * slope if dq.size else 0.0,
                "changed_fraction": float(np.count_nonzero(dq) / max(1, dq.size)),
            }

        def psnr(sq: float, n: int) -> float:
            mse = sq / n if n else 0.0
            return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))

        return {
            "psnr": psnr(self.sq, self.n),
            "psnr_roi": psnr(self.sq_roi, self.n_roi) if self.n_roi else None,
            "max_abs_delta": self.max_abs * slope,  # max(|d| * s) = max|d| * s: rounding is monotonic
            "changed_fraction": float(self.changed / max(1, self.n)),
        }


def _protect_batch(job: _Job, protector: protectors.Protector, loaded: list[tuple[int, LoadedCase]],
                   new_uids: bool) -> None:
    """Perturb one batch on this thread and hand each case to the run's I/O threads (``job.writer``; written here
    when there is none) to be quantised, written, hashed and recorded."""
    deltas = protector.perturbation_batch(
        [lc.tensor.to(protector.device) for _, lc in loaded],
        [None if lc.label is None else lc.label.to(protector.device) for _, lc in loaded],
        [lc.case.case_id for _, lc in loaded],
    )
    budget = float(getattr(protector, "max_epsilon", protector.epsilon))
    floor = getattr(protector, "min_psnr", None)
    for (n, lc), delta in zip(loaded, deltas):
        out = _CaseOutput(n, lc.case, lc.image, lc.mapping, lc.paths, lc.label, delta.detach().float().cpu().numpy())
        if job.writer is None:
            _finish_case(job, out, budget, new_uids, floor)
        else:
            job.writer.submit(_finish_case, job, out, budget, new_uids, floor)
    del deltas


def _quantise_case(src: np.ndarray, delta: np.ndarray, mapping: IntensityMapping, budget: float,
                   roi: np.ndarray | None, source: str, floor: float | None) -> tuple[np.ndarray, dict[str, Any]]:
    """The protected array in the stored dtype and its manifest figures (:class:`_DeltaStats`).

    With a PSNR ``floor`` (the protector's ``min_psnr``), a perturbation whose written PSNR falls below it is scaled
    down and quantised again until it holds: rounding to the stored grey levels (steps the protector may not know,
    e.g. 8-bit cases among float ones, or a window wider than 255 levels) adds energy, and the floor is a promise about
    the file, not about the float perturbation.
    """
    for _ in range(16):
        stats = _DeltaStats(mapping, roi, src)
        protected = np.empty(src.shape, src.dtype)
        for index, block, delta_q in quantise_blocks(src, delta, mapping, budget, source=source):
            protected[index] = block
            stats.add(index, delta_q)
        record = stats.record()
        if floor is None or record["psnr"] >= floor:
            break
        # MSE scales with the square of the factor; the margin absorbs the rounding of the scaled perturbation
        delta = delta * (10.0 ** ((record["psnr"] - floor) / 20.0) * 0.98)
    return protected, record


def _finish_case(job: _Job, out: _CaseOutput, budget: float, new_uids: bool, floor: float | None = None) -> int:
    """Quantise one perturbed case (keeping its written PSNR at or above ``floor`` when given), write it in its
    format, copy its label, store its delta and, last, its fragment (what marks it finished for ``--resume``). Runs
    on an I/O thread; touches only this case's files.

    Returns:
        1 (one case protected), for the progress bar.
    """
    src, case, mapping = out.image.array, out.case, out.mapping
    roi = None if out.label is None else out.label.numpy()[0] > 0
    out.label = None
    protected, figures = _quantise_case(src, out.delta, mapping, budget, roi, out.paths[0], floor)
    out.delta = None
    del roi
    codec = codec_for(out.paths if isinstance(case.image, list) else out.paths[0])
    outs = [codec.output_relpath(p) for p in case.image_files]
    targets = [str(job.stage / o) for o in outs]
    options: dict[str, Any] = {}
    if new_uids and codec.fmt == "dicom":
        # new UIDs differ between runs with different settings, and repeat exactly on resume
        options = {"new_uids": True, "uid_salt": _digest(job.config)}
    written = codec.write(out.paths if codec.fmt == "dicom" else out.paths[0],
                          targets if codec.fmt == "dicom" else targets[0], protected, **options)
    label = None
    if case.label is not None:
        copy_atomic(job.spec.abspath(case.label), job.stage / case.label)
        label = {"source": case.label, "output": case.label, "sha256": file_sha256(job.stage / case.label)}
    delta_name = f"deltas/{out.n:06d}.npz"
    payload = encode_delta(src, protected)
    with atomic_path(job.cases_dir / f"{out.n:06d}.npz") as tmp:
        tmp.write_bytes(payload)
    record = {
        "case_id": case.case_id, "split": case.split, "protected": True, "fmt": out.image.fmt,
        "source": case.image_files, "output": outs,
        "source_sha256": [file_sha256(p) for p in out.paths],
        "files": [{"output": o, "sha256": file_sha256(job.stage / o)} for o in outs],
        "label": label,
        "array_sha256_source": array_sha256(src), "array_sha256_protected": array_sha256(protected),
        "dtype": str(src.dtype), "shape": list(src.shape), "spatial_dims": out.image.spatial_dims,
        "mapping": mapping.to_dict(),
        **figures,
        "delta": delta_name, "delta_sha256": hashlib.sha256(payload).hexdigest(),
    }
    if written and written.get("sop_instance_uids") and new_uids:
        record["sop_instance_uids"] = [out.image.extra.get("sop_instance_uids", [None])[i] for i in range(len(outs))]
    _write_json(job.fragment(out.n), record)
    return 1


class _Writer:
    """The run's writes, on its I/O threads, at most ``keep`` behind the perturbation.

    Args:
        pool: the run's I/O pool.
        keep: cases whose writing may still be running when the next batch is perturbed.
        on_done: called with each finished task's result, in submission order (progress).
    """

    def __init__(self, pool: IOPool, keep: int, on_done: Callable[[Any], None]) -> None:
        self.pool, self.keep, self.on_done = pool, keep, on_done
        self.window = OrderedWindow()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self.window.append(self.pool.submit(fn, *args))
        self.collect(self.keep)

    def collect(self, keep: int = 0) -> None:
        """Wait until at most ``keep`` writes are running; raises the first failed write's error (in case order)."""
        for result in self.window.pop_ready(keep):
            self.on_done(result)

    def settle(self) -> None:
        """After an error or an interrupt: let the running and queued writes finish, so every case that was
        perturbed is kept for ``--resume``; their own errors are dropped (the first error is the one reported)."""
        while len(self.window):
            try:
                self.collect(0)
            except Exception:  # noqa: BLE001 - a failed write leaves no fragment: --resume redoes the case
                continue


def _case_bytes(lc: LoadedCase) -> int:
    """Memory a decoded case holds (stored array, normalised tensor, label)."""
    n = lc.image.array.nbytes + lc.tensor.element_size() * lc.tensor.numel()
    return n + (0 if lc.label is None else lc.label.element_size() * lc.label.numel())


def _protect_share(job: _Job, protector: protectors.Protector, chunks: list[list[int]], intensity: str,
                   new_uids: bool, pool: IOPool, io_memory: int, after_batch: Callable[[list[int]], None],
                   hint: str) -> None:
    """Protect this rank's batches: decode batch ``k + 1`` on the I/O threads while batch ``k`` is perturbed here and
    batch ``k - 1`` is written. A batch whose decoded data exceed half of ``io_memory`` is perturbed and written
    alone (nothing decoded ahead, its writes finished before the next batch is decoded), so big volumes cost the
    memory of one batch.

    The first case is decoded alone first: when a whole batch of cases of its size would exceed half of
    ``io_memory`` (CT volumes: about 1.1 GB each, decoded), every batch is cut into one-case batches, so that a batch
    of eight CTs is never decoded at once. The decision depends on the data only, and a case's perturbation does not
    depend on its batch, so the bytes written are the same either way."""
    spec = job.spec
    loads: deque[tuple[list[int], list[Future]]] = deque()
    nxt = 0
    first: Future | None = None
    if chunks:
        first = pool.submit(load_case, spec, spec.cases[chunks[0][0]], intensity)
        if first.exception() is None and 2 * _case_bytes(first.result()) * len(chunks[0]) > io_memory:
            chunks = [[i] for chunk in chunks for i in chunk]

    def load_next() -> None:
        nonlocal nxt, first
        chunk = chunks[nxt]
        nxt += 1
        futures = [pool.submit(load_case, spec, spec.cases[i], intensity) for i in chunk[1 if first else 0:]]
        loads.append((chunk, ([first] if first else []) + futures))
        first = None  # the first case's decoding is used once

    try:
        for _ in range(len(chunks)):
            distributed.check_abort(job.work, "protecting", hint)
            if not loads:
                load_next()
            chunk, futures = loads.popleft()
            loaded = [(i, f.result()) for i, f in zip(chunk, futures)]  # the first unreadable case, in order
            overlap = pool.threads > 0 and 2 * sum(_case_bytes(lc) for _, lc in loaded) <= io_memory
            if overlap and nxt < len(chunks):
                load_next()
            _protect_batch(job, protector, loaded, new_uids)
            del loaded
            if not overlap and job.writer is not None:
                job.writer.collect(0)
            after_batch(chunk)
    finally:
        for _, futures in loads:  # decoded ahead and not needed any more
            for f in futures:
                f.cancel()


def _copy_case(job: _Job, n: int, case: Case) -> None:
    outs = list(case.image_files)
    for p in outs:
        src = job.spec.abspath(p)
        if not src.is_file():
            raise InputError("image file not found", src)
        copy_atomic(src, job.stage / p)
    label = None
    if case.label is not None:
        if not job.spec.abspath(case.label).is_file():
            raise InputError("label file not found", job.spec.abspath(case.label))
        copy_atomic(job.spec.abspath(case.label), job.stage / case.label)
        label = {"source": case.label, "output": case.label, "sha256": file_sha256(job.stage / case.label)}
    _write_json(job.fragment(n), {
        "case_id": case.case_id, "split": case.split, "protected": False, "source": outs, "output": outs,
        "files": [{"output": o, "sha256": file_sha256(job.stage / o)} for o in outs], "label": label,
    })


def protect_dataset(
    dataset: str | os.PathLike,
    output: str | os.PathLike,
    method: str = "noise",
    *,
    key: str | os.PathLike | None = None,
    epsilon: float | str = 8 / 255,
    epochs: int | None = None,
    params: dict[str, Any] | None = None,
    split: str = "all",
    device: str = "auto",
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    protector: protectors.Protector | None = None,
    intensity: str = "auto",
    new_uids: bool = False,
    batch_size: int = 8,
    io_threads: int | None = None,
) -> dict[str, Any]:
    """Protect a dataset and write the protected copy, its manifest and its restoration key.

    Args:
        dataset: an MSD ``dataset.json`` (or its folder), an ``images/`` + ``labels/`` folder, or DICOM series.
        output: new folder for the protected copy (must not exist, must not lie inside ``dataset``).
        method: protector name (see :func:`monai_umed.protectors.names`).
        key: key file; defaults to ``OUT.umedkey`` beside ``output``.
        epsilon: L-inf budget, a float in normalised units or a fraction such as ``"8/255"``.
        epochs: bound on any fitting (ignored by methods that fit nothing).
        params: method-specific parameters.
        split: ``all`` protects every listed image; ``training`` protects the training list and copies the rest.
        device: ``auto`` | ``cpu`` | ``cuda``.
        seed: run seed.
        resume: continue an interrupted run with the same settings.
        progress: show progress bars.
        protector: an already fitted protector to use instead of building ``method`` (not refitted).
        intensity: normalisation policy (``auto``, ``dtype``, ``window``, ``minmax``, ``percentile``).
        new_uids: give written DICOM files new SOPInstanceUIDs (the originals are kept in the key).
        batch_size: cases per perturbation batch.
        io_threads: threads that decode the next batch and write the previous one while a batch is perturbed
            (``None``: one per core, at most 4; 0: everything on the calling thread). The output is the same bytes
            whatever the number.

    Returns:
        Summary: ``output``, ``key``, ``manifest``, ``cases``, ``protected``, ``seconds``, ``psnr_mean``; under
        ``torchrun`` every rank returns rank 0's summary with its own ``rank`` and the ``world_size``.

    Raises:
        InputError: any bad input (named file, one line); nothing is left that looks complete.
        RankFailedError: under ``torchrun``, another rank failed (an :class:`InputError` naming it).
    """
    t0 = time.time()
    distributed.init_process_group(device)  # torchrun: join the job (gloo on CPU, NCCL on CUDA)
    rank, world = distributed.rank(), distributed.world_size()
    main = rank == 0
    lock: RunLock | None = None
    try:
        with distributed.stage("setting up"):
            spec, out, key_path, protector, protect_idx, copy_idx, config = _setup(
                dataset, output, method, key, epsilon, epochs, params, split, device, seed, resume, protector,
                intensity, new_uids)
            finished, job = None, None
            if main:
                # rank 0 alone holds the run's lock, before any rank writes: see RunLock for why that is enough
                lock = RunLock(out).acquire()
                finished = _finished_run(out, key_path, config, resume, t0)
                if finished is None:
                    job = _Job(spec, out, key_path, config, resume)
                    distributed.clear_abort(job.work)
        finished = distributed.broadcast_object(finished)
        if finished is not None:
            return finished if world == 1 else {**finished, "rank": rank, "world_size": world}
        if job is None:
            job = _Job(spec, out, key_path, config, resume, create=False)
        return _run(job, protector, protect_idx, copy_idx, intensity, new_uids, batch_size, progress and main, t0,
                    io_threads)
    finally:
        if lock is not None:
            lock.release()


def _run(job: _Job, protector: protectors.Protector, protect_idx: list[int], copy_idx: list[int], intensity: str,
         new_uids: bool, batch_size: int, progress: bool, t0: float, io_threads: int | None = None) -> dict[str, Any]:
    """Fit (once), protect this rank's share of the unfinished cases, and finalise (rank 0): the job after setup."""
    threads = default_io_threads() if io_threads is None else max(0, int(io_threads))
    if threads:
        _warm_up_readers()
    with IOPool(threads) as pool:
        _fit_and_protect(job, protector, protect_idx, copy_idx, intensity, new_uids, batch_size, progress, pool,
                         IO_MEMORY)
    return _finish_run(job, protector, t0)


def _warm_up_readers() -> None:
    """Import MONAI's readers on this thread before the I/O threads decode: first imports of a package in several
    threads at once can fail on its import cycles."""
    from monai.transforms import LoadImage

    LoadImage(image_only=True)


def _fit_and_protect(job: _Job, protector: protectors.Protector, protect_idx: list[int], copy_idx: list[int],
                     intensity: str, new_uids: bool, batch_size: int, progress: bool, pool: IOPool,
                     io_memory: int) -> None:
    """Fit (once) and protect this rank's share of the unfinished cases, decoding and writing on ``pool``."""
    from tqdm.auto import tqdm

    spec = job.spec
    rank, world = distributed.rank(), distributed.world_size()
    main = rank == 0
    hint = _RESUME_HINT

    # fit on the training cases being protected (never on test), once; the state survives an interruption
    state_path = job.work / "protector.pt"
    if protector.fits and not protector.fitted:
        together = distributed.is_distributed() and distributed.supports_distributed_fit(protector)
        # a DDP fit that fails on one rank leaves the others inside DDP collectives: no status exchange then,
        # torchrun stops them when the failed process exits
        with distributed.stage("fitting", job.work, sync=not together, hint=hint):
            if state_path.is_file():
                protector.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=False))
            else:
                if main or together:
                    fit_idx = [i for i in protect_idx if spec.cases[i].split == "training"] or protect_idx
                    futures = [pool.submit(load_fit_sample, spec, spec.cases[i], intensity, protector)
                               for i in fit_idx]
                    items = [f.result() for f in tqdm(futures, desc="load", disable=not progress, unit="case")]
                    del futures
                    protector.fit(items, progress=progress, checkpoint=job.work / "fit.ckpt")
                    del items
                if main:
                    buf = io.BytesIO()
                    torch.save(protector.state_dict(), buf)
                    with atomic_path(state_path) as tmp:
                        tmp.write_bytes(buf.getvalue())
                else:  # protect with exactly rank 0's fitted state
                    distributed.wait_for(state_path.is_file, job.work, "fitting", hint=hint)
                    protector.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=False))

    # every rank protects every world-th batch of the unfinished cases (rank 0 decides which are unfinished): each
    # case lands in the batch it has in a one-process run, so batched numerics do not depend on the world size
    todo = distributed.broadcast_object([i for i in protect_idx if not job.done(i)] if main else None)
    mine = list(_batches(todo, max(1, batch_size)))[rank::world]
    with distributed.stage("protecting", job.work, hint=hint), torch.no_grad(), tqdm(
            total=len(protect_idx), initial=len(protect_idx) - len(todo), desc=f"protect ({protector.name})",
            disable=not progress, unit="case") as bar:

        def count_case(protected: int | None) -> None:  # a write finished on an I/O thread
            if world == 1 and protected:
                bar.update(protected)

        def count_batch(chunk: list[int]) -> None:
            if world > 1:  # the bar counts every rank's cases
                bar.update(sum(job.done(i) for i in protect_idx) - bar.n)
            elif job.writer is None:  # written where perturbed
                bar.update(len(chunk))

        job.writer = _Writer(pool, keep=max(1, batch_size), on_done=count_case) if pool.threads else None
        try:
            _protect_share(job, protector, mine, intensity, new_uids, pool, io_memory, count_batch, hint)
            for i in copy_idx[rank::world]:
                if not job.done(i):
                    if job.writer is None:
                        _copy_case(job, i, spec.cases[i])
                    else:
                        job.writer.submit(_copy_case, job, i, spec.cases[i])
            if job.writer is not None:
                job.writer.collect(0)
        finally:
            if job.writer is not None:
                job.writer.settle()
            job.writer = None


def _finish_run(job: _Job, protector: protectors.Protector, t0: float) -> dict[str, Any]:
    """Finalise (rank 0, once every rank's fragments exist); every rank returns rank 0's summary."""
    spec = job.spec
    rank, world = distributed.rank(), distributed.world_size()
    main = rank == 0
    hint = _RESUME_HINT
    if world == 1:
        return _finalise(job, protector, t0)
    summary = None
    if main:
        with distributed.stage("finalising", job.work, sync=False, hint=hint):
            missing = [spec.cases[i].case_id for i in range(len(spec.cases)) if not job.done(i)]
            if missing:
                raise InputError(f"cannot finalise: no fragment for {len(missing)} case(s), e.g. {missing[0]!r}", job.cases_dir)
            summary = _finalise(job, protector, t0)
    else:
        distributed.wait_for(job.output.is_dir, job.work, "finalising", hint=hint)
    summary = distributed.broadcast_object(summary)
    return {**summary, "rank": rank, "world_size": world}


def _setup(dataset: Any, output: Any, method: str, key: Any, epsilon: float | str, epochs: int | None,
           params: dict[str, Any] | None, split: str, device: str, seed: int, resume: bool,
           protector: protectors.Protector | None, intensity: str, new_uids: bool) -> tuple[Any, ...]:
    """Validate the inputs and build the protector; the same on every rank of a torchrun job."""
    spec = load_dataset(dataset)
    out = Path(output).resolve()
    key_path = Path(key).resolve() if key is not None else default_key_path(out)
    _check_paths(spec, out, key_path, resume)
    eps = parse_epsilon(epsilon) if not isinstance(epsilon, float) else epsilon
    if protector is None:
        kwargs = dict(params or {})
        kwargs.update(epsilon=eps, seed=seed, device=device)
        if epochs is not None:
            kwargs["epochs"] = epochs
        try:
            protector = protectors.get(method, **kwargs)
        except ValueError as e:
            raise InputError(str(e)) from e
    protect_idx, copy_idx = _select(spec, split)
    if protector.requires_label:
        for i in protect_idx:
            if spec.cases[i].label is None:
                raise InputError(f"method {protector.name!r} needs labels; case {spec.cases[i].case_id!r} has none", spec.abspath(spec.cases[i].case_id))
    config = {
        "version": __version__, "dataset": str(spec.root), "method": protector.name, "params": protector.params(),
        "split": split, "intensity": intensity, "new_uids": new_uids,
        "cases": [c.case_id for c in spec.cases],
    }
    return spec, out, key_path, protector, protect_idx, copy_idx, config


def _fragment_delta(job: _Job, record: dict[str, Any]) -> bytes:
    """A finished case's delta from the work folder, checked against the sha256 taken when it was written (fragments
    of an older version have none: it is added to the record here).

    Raises:
        KeyDamagedError: the fragment's delta changed on disk since it was written.
    """
    path = job.cases_dir / Path(record["delta"]).name
    payload = path.read_bytes()
    digest = hashlib.sha256(payload).hexdigest()
    if record.setdefault("delta_sha256", digest) != digest:
        raise KeyDamagedError(f"the delta of case {record['case_id']!r} is damaged on disk; delete "
                              f"{path.with_suffix('.json').name} and rerun with --resume to protect it again", path)
    return payload


def _finalise(job: _Job, protector: protectors.Protector, t0: float) -> dict[str, Any]:
    records = [json.loads(job.fragment(i).read_text()) for i in range(len(job.spec.cases))]
    new_paths = {s: o for r in records for s, o in zip(r["source"], r["output"])}
    datalist = job.spec.rewrite_datalist(new_paths)
    _write_json(job.stage / "dataset.json", datalist)
    protected = [r for r in records if r["protected"]]
    psnrs = [r["psnr"] for r in protected if np.isfinite(r["psnr"])]
    summary = {
        "method": protector.name, "params": protector.params(), "version": __version__,
        "dataset": str(job.spec.root), "split": job.config["split"], "intensity": job.config["intensity"],
        "cases": len(records), "protected": len(protected),
        "psnr_mean": float(np.mean(psnrs)) if psnrs else float("inf"),
        "psnr_min": float(np.min(psnrs)) if psnrs else float("inf"),
        "max_abs_delta": max((r["max_abs_delta"] for r in protected), default=0.0),
        "jpeg_as_png": sum(1 for r in protected if r["fmt"] == "jpeg"),
    }
    manifest_cases = [{k: v for k, v in r.items() if k not in ("delta", "delta_sha256", "mapping")}
                      | {"method": protector.name, "params": summary["params"]} for r in records]
    _write_json(job.stage / "manifest.json", {"summary": summary, "cases": manifest_cases})
    files = [f for r in records for f in r["files"]] + [r["label"] for r in records if r["label"]]
    files.append({"output": "manifest.json", "sha256": file_sha256(job.stage / "manifest.json")})
    state = None
    if protector.fits:
        state = (job.work / "protector.pt").read_bytes() if (job.work / "protector.pt").is_file() else None
        if state is None:
            buf = io.BytesIO()
            torch.save(protector.state_dict(), buf)
            state = buf.getvalue()
    # how the fit went goes to the owner (key and summary), not into the published manifest
    fit = protector.fit_report()
    record = {**summary, "fit": fit, "fingerprint": fingerprint(files), "datalist": datalist,
              "cases": records, "manifest": files[-1], "config": job.config}
    for r in protected:  # every delta checked (and its sha256 recorded) before key.json is written
        _fragment_delta(job, r)
    write_key(job.key, record, ((r["delta"], _fragment_delta(job, r)) for r in protected), state)
    os.replace(job.stage, job.output)
    shutil.rmtree(job.work, ignore_errors=True)
    return _run_summary(summary, fit, job.output, job.key, t0)


def _run_summary(
    summary: dict[str, Any], fit: dict[str, Any] | None, out: Path, key: Path, t0: float
) -> dict[str, Any]:
    """What ``protect_dataset`` returns: the manifest's summary, the release stage's fit report (owner only) and
    where the copy, its manifest and its key are."""
    return {**summary, "fit": fit, "output": str(out), "key": str(key), "manifest": str(out / "manifest.json"),
            "seconds": time.time() - t0}
