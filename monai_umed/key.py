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

"""The restoration key: what turns a protected dataset back into the original, bit for bit.

A key is a zip file (written atomically, kept *outside* the released folder) holding ``key.json`` (per case: the
protected files and their sha256, the intensity mapping, array checksums, codec details such as original DICOM
UIDs) and, per protected image, a sparse compressed integer delta ``deltas/<n>.npz``. Float images are keyed by
the difference of their bit patterns, so restoration is exact for every dtype. Fitted protectors also store
their ``state_dict`` (``protector.pt``): the generators are the owner's secret too.

Integrity: ``key.json`` records the sha256 of every delta (``delta_sha256`` per case) and of ``protector.pt``
(``protector_sha256``); every member also carries the zip's CRC-32, the only check of ``key.json`` itself and the
fallback for keys written before the sha256 fields existed. :func:`check_key` checks every part and names each
damaged case; :func:`restore_dataset` refuses a damaged key before writing anything, or with ``skip_damaged``
restores every other case.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from monai_umed.blocks import c_order_blocks
from monai_umed.data.formats import array_sha256, atomic_path, codec_for, copy_atomic, file_sha256
from monai_umed.errors import InputError, KeyDamagedError, KeyMismatchError

if TYPE_CHECKING:
    from monai_umed.protectors.base import Protector

__all__ = ["encode_delta", "decode_delta", "write_key", "read_key", "load_protector", "verify_key", "check_key",
           "KeyReport", "restore_dataset", "KEY_FORMAT"]

KEY_FORMAT = "monai-umed-key/1"


def _int_view(a: np.ndarray) -> np.ndarray:
    """Integer values (int64) whose differences are exact: the values for integer dtypes, bit patterns for floats."""
    if a.dtype.kind == "f":
        return a.view(np.dtype(f"<i{a.dtype.itemsize}") if a.dtype.byteorder in "<=|" else np.dtype(f">i{a.dtype.itemsize}")).astype(np.int64)
    return a.astype(np.int64)


#: zlib level of the key's deltas: level 1 is about 12x faster than ``np.savez_compressed``'s default (6) on an
#: 8-bit perturbation and 12 % larger; the compression was the costliest step of a fast method's protect run
DELTA_COMPRESSLEVEL = 1


def _savez_fast(buf: io.BytesIO, **arrays: np.ndarray) -> None:
    """``np.savez_compressed`` at :data:`DELTA_COMPRESSLEVEL`: a standard ``.npz`` (``np.load`` reads it)."""
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=DELTA_COMPRESSLEVEL) as zf:
        for name, arr in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)


def encode_delta(original: np.ndarray, protected: np.ndarray) -> bytes:
    """Compressed ``protected - original`` (integer view), as ``.npz`` bytes.

    Sparse (flat indices + values) when few elements changed, as for ROI-confined methods; dense when that is
    smaller, as for whole-image noise. Values use the narrowest integer type that holds them. The difference is
    taken block by block in C order (:func:`monai_umed.blocks.c_order_blocks`): a big volume needs its narrow
    delta and a block of int64 temporaries, not int64 copies of both arrays.
    """
    if original.shape != protected.shape or original.dtype != protected.dtype:
        raise ValueError("original and protected arrays must share shape and dtype")
    blocks = list(c_order_blocks(original.shape))

    def diff(i: tuple[int | slice, ...]) -> np.ndarray:
        return (_int_view(np.asarray(protected[i])) - _int_view(np.asarray(original[i]))).ravel()

    kept = [diff(blocks[0])] if len(blocks) == 1 else None  # one block: computed once for both passes

    def diffs() -> Iterable[np.ndarray]:
        return kept if kept is not None else (diff(i) for i in blocks)

    size, lo, hi, changed = int(original.size), 0, 0, 0
    for d in diffs():  # first pass: the value range and the number of changed elements
        if d.size:
            lo, hi = min(lo, int(d.min())), max(hi, int(d.max()))
            changed += int(np.count_nonzero(d))
    small = next((t for t in (np.int8, np.int16, np.int32)
                  if size == 0 or (lo >= np.iinfo(t).min and hi <= np.iinfo(t).max)), np.int64)
    index_type = np.uint32 if size < 2**32 else np.uint64
    header = {"shape": np.asarray(original.shape, np.int64), "dtype": np.frombuffer(original.dtype.str.encode(), np.uint8)}
    buf = io.BytesIO()
    if changed * (np.dtype(index_type).itemsize + np.dtype(small).itemsize) < size * np.dtype(small).itemsize:
        index, value = np.empty(changed, index_type), np.empty(changed, small)
        offset, k = 0, 0
        for d in diffs():  # second pass: flat C-order indices and values of the changed elements
            idx = np.flatnonzero(d)
            index[k: k + idx.size] = idx + offset
            value[k: k + idx.size] = d[idx]
            offset, k = offset + d.size, k + idx.size
        _savez_fast(buf, index=index, value=value, **header)
    else:
        dense, offset = np.empty(size, small), 0
        for d in diffs():
            dense[offset: offset + d.size] = d
            offset += d.size
        _savez_fast(buf, dense=dense, **header)
    return buf.getvalue()


def decode_delta(protected: np.ndarray, payload: bytes) -> np.ndarray:
    """Rebuild the original array from the protected one and an :func:`encode_delta` payload."""
    with np.load(io.BytesIO(payload)) as z:
        shape = tuple(int(s) for s in z["shape"])
        dtype = np.dtype(z["dtype"].tobytes().decode())
        if protected.shape != shape or protected.dtype != dtype:
            raise KeyMismatchError(f"key expects an array {shape} {dtype}, the protected file holds {protected.shape} {protected.dtype}")
        flat = _int_view(protected).ravel().copy()
        if "dense" in z.files:
            flat -= z["dense"].astype(np.int64)
        else:
            flat[z["index"].astype(np.int64)] -= z["value"].astype(np.int64)
    if dtype.kind == "f":
        ints = flat.astype(np.dtype(f"i{dtype.itemsize}")).view(dtype.newbyteorder("=")).astype(dtype)
        return ints.reshape(shape)
    return flat.astype(dtype).reshape(shape)


def write_key(path: str | os.PathLike, record: dict[str, Any], deltas: Iterable[tuple[str, bytes]],
              protector_state: bytes | None = None) -> None:
    """Write a key zip atomically.

    Args:
        path: key file.
        record: the ``key.json`` content (``cases`` list, method, params, ...).
        deltas: ``(member name, encode_delta payload)`` pairs.
        protector_state: ``torch.save`` bytes of the fitted protector's ``state_dict`` (its sha256 goes into
            ``key.json`` as ``protector_sha256``).
    """
    if protector_state is not None:
        record = {**record, "protector_sha256": hashlib.sha256(protector_state).hexdigest()}
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("key.json", json.dumps({"format": KEY_FORMAT, **record}, indent=1))
            for name, payload in deltas:
                z.writestr(name, payload, compress_type=zipfile.ZIP_STORED)  # already compressed
            if protector_state is not None:
                z.writestr("protector.pt", protector_state)
        os.chmod(tmp, 0o600)  # the key is the owner's secret


# Every exception zipfile raises when a member is damaged, caught so that a damaged key is reported, not a traceback:
# bad CRC or header (BadZipFile), bad deflate stream (zlib.error), a member cut short (EOFError), an offset past the
# end (OSError, struct.error), a flipped compression-method bit (zipfile raises NotImplementedError for an unknown
# method) or encryption bit (RuntimeError "encrypted"), a garbled size or name (ValueError, UnicodeDecodeError).
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, struct.error, NotImplementedError, RuntimeError,
               ValueError)


class _Damaged(Exception):
    """A key member that is missing, unreadable or fails its checksum (message: why)."""


def _read_member(z: zipfile.ZipFile, name: str, sha256: str | None = None) -> bytes:
    """The bytes of one key member, checked: the zip's CRC-32 always, and ``sha256`` when the key records one.

    Raises:
        _Damaged: the member is missing, unreadable or fails a checksum.
    """
    try:
        data = z.read(name)
    except KeyError:
        raise _Damaged("missing from the key") from None
    except _ZIP_ERRORS as e:
        raise _Damaged(f"unreadable ({type(e).__name__}: {e})") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise _Damaged("fails its sha256 checksum")
    return data


def _open_key(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise InputError("key file not found", path)
    if path.stat().st_size == 0:
        raise InputError("not a monai-umed key file (the file is empty)", path)
    try:
        return zipfile.ZipFile(path)
    except _ZIP_ERRORS as e:
        raise InputError(f"not a monai-umed key file (not a zip, or truncated or damaged beyond use: {e})", path) from e


def read_key(path: str | os.PathLike) -> dict[str, Any]:
    """The ``key.json`` record of a key file.

    Raises:
        InputError: missing, empty, truncated or not a monai-umed key.
        KeyDamagedError: a zip whose ``key.json`` fails its CRC-32 or cannot be read.
    """
    p = Path(path)
    with _open_key(p) as z:
        if "key.json" not in z.namelist():
            # a truncated key can still open as a zip: the last delta it holds is itself an .npz (zip) file
            raise InputError("not a monai-umed key file (no key.json: truncated, damaged or another kind of zip)", p)
        try:
            raw = _read_member(z, "key.json")
        except _Damaged as e:
            line = f"key.json (the key's own record of every case) is damaged: {e}"
            raise KeyDamagedError(f"{line}; nothing can be restored with this copy: use another copy of the key",
                                  p) from None
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError("not a monai-umed key file (key.json is not JSON)", p) from e
    if not isinstance(record, dict) or record.get("format") != KEY_FORMAT:
        raise InputError(f"unsupported key format {record.get('format') if isinstance(record, dict) else None!r}", p)
    return record


def read_protector_state(path: str | os.PathLike) -> bytes | None:
    """The fitted protector's ``torch.save`` bytes stored in a key (checked), or None.

    Raises:
        KeyDamagedError: ``protector.pt`` fails its checksum.
    """
    record = read_key(path)
    with zipfile.ZipFile(path) as z:
        if "protector.pt" not in z.namelist():
            return None
        try:
            return _read_member(z, "protector.pt", record.get("protector_sha256"))
        except _Damaged as e:
            raise KeyDamagedError(f"protector.pt (the fitted protector) is damaged: {e}", path) from None


def load_protector(key_file: str | os.PathLike, device: str = "auto") -> Protector:
    """Rebuild the fitted protector stored in a restoration key (to reuse it in a MONAI pipeline).

    It lives here, beside :func:`read_protector_state`, rather than in :mod:`monai_umed.bundle` (which re-exports
    it) so that the evaluation protocols can rebuild a key's protector without importing the bundle, which imports
    them.

    Args:
        key_file: a key written by :func:`monai_umed.pipeline.protect_dataset`.
        device: ``auto`` | ``cpu`` | ``cuda``.

    Returns:
        The protector with the method and parameters recorded in the key and, for fitted methods, its weights.

    Raises:
        InputError: not a key, or a fitted method whose key holds no weights.
    """
    # torch and the protector registry are imported here: restoring and verifying a key do not need them
    import torch

    from monai_umed import protectors

    record = read_key(key_file)
    params = {k: v for k, v in dict(record.get("params") or {}).items() if k not in ("spatial_dims",)}
    try:
        protector = protectors.get(record["method"], **{**params, "device": device})
    except ValueError as e:
        raise InputError(str(e), key_file) from e
    state = read_protector_state(key_file)
    if protector.fits:
        if state is None:
            raise InputError(f"the key holds no fitted {record['method']!r} protector", key_file)
        protector.load_state_dict(torch.load(io.BytesIO(state), map_location="cpu", weights_only=False))
    return protector


def _listed_files(record: dict[str, Any]) -> list[dict[str, str]]:
    files = []
    for case in record["cases"]:
        files += case["files"]
        if case.get("label"):
            files.append(case["label"])
    return files


def fingerprint(files: Iterable[dict[str, str]]) -> str:
    """One checksum over the protected dataset's files (relative path and sha256 of each)."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f["output"]):
        h.update(f"{f['output']}\0{f['sha256']}\n".encode())
    return h.hexdigest()


def verify_key(protected: str | os.PathLike, key: str | os.PathLike) -> dict[str, Any]:
    """Quick check that ``key`` belongs to the protected folder: every file it lists is there with the same sha256.

    Only ``key.json`` is read: a damaged delta or ``protector.pt`` goes unnoticed (see :func:`check_key`).

    Raises:
        KeyMismatchError: naming the first file that is missing or differs.
        KeyDamagedError: ``key.json`` itself is damaged.
    """
    root = Path(protected)
    if not root.is_dir():
        raise InputError("protected dataset folder not found", root)
    record = read_key(key)
    for f in _listed_files(record):
        problem = _file_problem(root, f)
        if problem:
            raise KeyMismatchError(f"key does not match this dataset: {problem}", key)
    return record


def _file_problem(root: Path, f: dict[str, str]) -> str | None:
    """Why the protected file ``f`` (``output``, ``sha256``) does not match the key, or None."""
    p = root / f["output"]
    if not p.is_file():
        return f"{f['output']} is missing"
    if file_sha256(p) != f["sha256"]:
        return f"{f['output']} differs from the protected file the key was made for"
    return None


def _case_name(case: dict[str, Any]) -> str:
    return f"case {case.get('case_id')!r}"


def _delta_problem(z: zipfile.ZipFile, case: dict[str, Any]) -> str | None:
    """Why a protected case's delta cannot be used (missing, unreadable, failed checksum), or None."""
    try:
        _read_member(z, case["delta"], case.get("delta_sha256"))  # keys without delta_sha256: the CRC-32 alone
    except _Damaged as e:
        return f"{_case_name(case)} ({case['delta']}) is damaged: {e}"
    return None


def _protector_problem(z: zipfile.ZipFile, record: dict[str, Any]) -> str | None:
    """Why the stored fitted protector is damaged, or None (also when the key holds none)."""
    if "protector.pt" not in z.namelist() and "protector_sha256" not in record:
        return None
    try:
        _read_member(z, "protector.pt", record.get("protector_sha256"))
    except _Damaged as e:
        return f"protector.pt (the fitted protector) is damaged: {e}"
    return None


@dataclass
class KeyReport:
    """What :func:`check_key` found; every line names the case or part of the key it is about.

    Attributes:
        record: the key's ``key.json``.
        damaged: one line per damaged part: a case's delta (the case cannot be restored) or ``protector.pt``.
        mismatched: one line per case (or ``manifest.json``) whose protected file is missing or differs.
        damaged_cases: indices (in ``record["cases"]``) of the cases whose delta is damaged.
        mismatched_cases: indices of the cases with a missing or different protected file.
    """

    record: dict[str, Any]
    damaged: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    damaged_cases: set[int] = field(default_factory=set)
    mismatched_cases: set[int] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        """True when every part of the key is intact and every protected file matches."""
        return not self.damaged and not self.mismatched

    def raise_for_problems(self, key: str | os.PathLike) -> None:
        """Raise the error that describes every problem (nothing when :attr:`ok`).

        Raises:
            KeyDamagedError: some part is damaged (the lines name every damaged and mismatching part).
            KeyMismatchError: only mismatches; a key none of whose cases matches is reported on one line.
        """
        n = len(self.record["cases"])
        if self.mismatched_cases and len(self.mismatched_cases) == n:  # the key of another run or dataset
            raise KeyMismatchError(f"key does not match this dataset: none of its {n} cases matches the protected "
                                   f"files (first: {self.mismatched[0]}); is it the key of another run?", key,
                                   problems=self.damaged)
        if self.damaged:
            others = len(self.damaged) - len(self.damaged_cases)
            raise KeyDamagedError(
                f"the key is damaged: {len(self.damaged_cases)} of {n} cases cannot be restored"
                + (f", {others} other part damaged" if others else "")
                + (f", {len(self.mismatched)} protected file(s) do not match" if self.mismatched else "")
                + "; use another copy of the key", key, problems=self.damaged + self.mismatched)
        if self.mismatched:
            raise KeyMismatchError(f"key does not match this dataset: {len(self.mismatched)} case(s) or file(s) differ",
                                   key, problems=self.mismatched)


def check_key(protected: str | os.PathLike, key: str | os.PathLike) -> KeyReport:
    """Check a whole key against its protected folder: every zip member's integrity, every case's delta checksum
    (``delta_sha256``; the zip CRC-32 for keys written without it), ``protector.pt`` and every protected file.

    Args:
        protected: the protected dataset folder.
        key: its key file.

    Returns:
        A :class:`KeyReport` naming each damaged or mismatching case; call ``raise_for_problems`` to fail on any.

    Raises:
        InputError: no such folder, or a key file that is missing, empty, truncated or not a monai-umed key.
        KeyDamagedError: ``key.json`` is damaged (then nothing else can be checked).
    """
    root = Path(protected)
    if not root.is_dir():
        raise InputError("protected dataset folder not found", root)
    report = KeyReport(read_key(key))
    with zipfile.ZipFile(key) as z:
        for i, case in enumerate(report.record["cases"]):
            files = case["files"] + ([case["label"]] if case.get("label") else [])
            wrong = [p for p in (_file_problem(root, f) for f in files) if p]
            if wrong:
                more = f" (and {len(wrong) - 1} more file(s))" if len(wrong) > 1 else ""
                report.mismatched.append(f"{_case_name(case)}: {wrong[0]}{more}")
                report.mismatched_cases.add(i)
            problem = _delta_problem(z, case) if case.get("protected") else None
            if problem:
                report.damaged.append(problem)
                report.damaged_cases.add(i)
        problem = _protector_problem(z, report.record)
        if problem:
            report.damaged.append(problem)
    manifest = report.record.get("manifest")
    problem = _file_problem(root, manifest) if manifest else None
    if problem:
        report.mismatched.append(problem)
    return report


def _restore_case(z: zipfile.ZipFile, src: Path, stage: Path, case: dict[str, Any], key: str | os.PathLike) -> int:
    """Write one case into ``stage``; returns 1 when a perturbation was removed, 0 for a copied case.

    Nothing of the case is written when its delta is damaged.

    Raises:
        _Damaged: the case's delta is missing, unreadable, fails its checksum or restores a wrong array.
        KeyMismatchError: the protected image decodes differently from what the key was made for.
    """
    outputs = [f["output"] for f in case["files"]]
    if not case["protected"]:
        for f in outputs:
            copy_atomic(src / f, stage / f)
    else:
        payload = _read_member(z, case["delta"], case.get("delta_sha256"))
        paths = [str(src / f) for f in outputs]
        arg = paths if case["fmt"] == "dicom" else paths[0]
        codec = codec_for(arg)
        image = codec.read(arg)
        if array_sha256(image.array) != case["array_sha256_protected"]:
            raise KeyMismatchError(f"key does not match this dataset: {outputs[0]} decodes differently", key)
        try:
            original = decode_delta(image.array, payload)
        except KeyMismatchError:
            raise
        except Exception as e:  # noqa: BLE001 - a payload that passed the CRC of a key without sha256, yet is garbage
            raise _Damaged(f"undecodable ({type(e).__name__}: {e})") from None
        if array_sha256(original) != case["array_sha256_source"]:
            raise _Damaged(f"restores an array of {outputs[0]} that fails its checksum")
        targets = [str(stage / f) for f in outputs]
        options = {"sop_instance_uids": case["sop_instance_uids"]} if case.get("sop_instance_uids") else {}
        codec.write(arg, targets if case["fmt"] == "dicom" else targets[0], original, **options)
    if case.get("label"):
        copy_atomic(src / case["label"]["output"], stage / case["label"]["output"])
    return int(bool(case["protected"]))


def _damaged_parts(key: str | os.PathLike, record: dict[str, Any]) -> tuple[dict[int, str], list[str]]:
    """Damaged cases (index -> line naming it) and other damaged parts (lines) of a key, read before restoring."""
    cases: dict[int, str] = {}
    with zipfile.ZipFile(key) as z:
        for i, case in enumerate(record["cases"]):
            problem = _delta_problem(z, case) if case.get("protected") else None
            if problem:
                cases[i] = problem
        problem = _protector_problem(z, record)
    return cases, [problem] if problem else []


def restore_dataset(protected: str | os.PathLike, key: str | os.PathLike, output: str | os.PathLike,
                    progress: bool = True, skip_damaged: bool = False) -> dict[str, Any]:
    """Rebuild the original dataset from a protected copy and its key (the original data is never needed).

    Each restored image has the decoded array of its source, bit for bit, and the protected file's metadata
    (which is the source's). JPEG sources come back as lossless PNG with the original decoded pixels. Every part
    of the key is checked before anything is written; a damaged key is refused with a line per damaged case
    (``KeyDamagedError.problems``) unless ``skip_damaged``.

    Args:
        protected: protected dataset folder.
        key: its key file.
        output: new folder for the restored dataset (must not exist).
        progress: show a progress bar.
        skip_damaged: restore every case whose delta is intact and leave out (image and label) each case whose
            delta is damaged, instead of refusing the key.

    Returns:
        Summary with ``output``, ``cases``, ``restored`` (number of images whose perturbation was removed),
        ``skipped`` (case ids left out), ``problems`` (a line per case left out) and ``warnings`` (a line per
        other damaged part, such as ``protector.pt``, which restoring does not need).

    Raises:
        KeyMismatchError: the key does not belong to ``protected``, or a restored array fails its checksum.
        KeyDamagedError: the key is damaged (and ``skip_damaged`` is not set, or ``key.json`` is the damaged part).
        InputError: ``output`` exists or lies inside ``protected``; a key that is not a monai-umed key.
    """
    from tqdm.auto import tqdm

    src, out = Path(protected).resolve(), Path(output).resolve()
    if out.exists():
        raise InputError("output folder already exists", out)
    if out.is_relative_to(src):
        raise InputError("output must not lie inside the protected dataset", out)
    record = verify_key(src, key)
    damaged, others = _damaged_parts(key, record)
    if (damaged or others) and not skip_damaged:
        raise KeyDamagedError(
            f"the key is damaged: {len(damaged)} of {len(record['cases'])} cases cannot be restored"
            + (" (and protector.pt, which restoring does not need)" if others else "")
            + "; nothing was written: use another copy of the key, or --skip-damaged to restore every other case",
            key, problems=[*damaged.values(), *others])
    stage = out.with_name(out.name + ".partial")
    if stage.exists():
        shutil.rmtree(stage)
    restored = 0
    try:
        with zipfile.ZipFile(key) as z:
            for i, case in enumerate(tqdm(record["cases"], desc="restore", disable=not progress, unit="case")):
                if i in damaged:
                    continue
                try:
                    restored += _restore_case(z, src, stage, case, key)
                except _Damaged as e:
                    damaged[i] = f"{_case_name(case)} ({case['delta']}) is damaged: {e}"
                    if not skip_damaged:
                        raise KeyDamagedError("the key is damaged; nothing was written: use another copy of the key, "
                                              "or --skip-damaged to restore every other case", key,
                                              problems=[damaged[i]]) from None
        stage.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "dataset.json", stage / "dataset.json")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)  # nothing half-written that looks like a restore
        raise
    os.replace(stage, out)
    return {"output": str(out), "cases": len(record["cases"]), "restored": restored,
            "skipped": [record["cases"][i]["case_id"] for i in sorted(damaged)],
            "problems": [damaged[i] for i in sorted(damaged)], "warnings": others}
