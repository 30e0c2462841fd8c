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
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from monai_umed.data.formats import array_sha256, atomic_path, codec_for, copy_atomic, file_sha256
from monai_umed.errors import InputError, KeyMismatchError

__all__ = ["encode_delta", "decode_delta", "write_key", "read_key", "verify_key", "restore_dataset", "KEY_FORMAT"]

KEY_FORMAT = "monai-umed-key/1"


def _int_view(a: np.ndarray) -> np.ndarray:
    """Integer values (int64) whose differences are exact: the values for integer dtypes, bit patterns for floats."""
    if a.dtype.kind == "f":
        return a.view(np.dtype(f"<i{a.dtype.itemsize}") if a.dtype.byteorder in "<=|" else np.dtype(f">i{a.dtype.itemsize}")).astype(np.int64)
    return a.astype(np.int64)


def encode_delta(original: np.ndarray, protected: np.ndarray) -> bytes:
    """Compressed ``protected - original`` (integer view), as ``.npz`` bytes.

    Sparse (flat indices + values) when few elements changed, as for ROI-confined methods; dense when that is
    smaller, as for whole-image noise. Values use the narrowest integer type that holds them.
    """
    if original.shape != protected.shape or original.dtype != protected.dtype:
        raise ValueError("original and protected arrays must share shape and dtype")
    d = (_int_view(protected) - _int_view(original)).ravel()
    idx = np.flatnonzero(d)
    small = next((t for t in (np.int8, np.int16, np.int32) if d.size == 0 or (d.min() >= np.iinfo(t).min and d.max() <= np.iinfo(t).max)), np.int64)
    index_type = np.uint32 if d.size < 2**32 else np.uint64
    header = {"shape": np.asarray(original.shape, np.int64), "dtype": np.frombuffer(original.dtype.str.encode(), np.uint8)}
    buf = io.BytesIO()
    if idx.size * (np.dtype(index_type).itemsize + np.dtype(small).itemsize) < d.size * np.dtype(small).itemsize:
        np.savez_compressed(buf, index=idx.astype(index_type), value=d[idx].astype(small), **header)
    else:
        np.savez_compressed(buf, dense=d.astype(small), **header)
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
        protector_state: ``torch.save`` bytes of the fitted protector's ``state_dict``.
    """
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("key.json", json.dumps({"format": KEY_FORMAT, **record}, indent=1))
            for name, payload in deltas:
                z.writestr(name, payload, compress_type=zipfile.ZIP_STORED)  # already compressed
            if protector_state is not None:
                z.writestr("protector.pt", protector_state)
        os.chmod(tmp, 0o600)  # the key is the owner's secret


def read_key(path: str | os.PathLike) -> dict[str, Any]:
    """The ``key.json`` record of a key file.

    Raises:
        InputError: missing or not a monai-umed key.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError("key file not found", p)
    try:
        with zipfile.ZipFile(p) as z:
            record = json.loads(z.read("key.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as e:
        raise InputError("not a monai-umed key file", p) from e
    if record.get("format") != KEY_FORMAT:
        raise InputError(f"unsupported key format {record.get('format')!r}", p)
    return record


def read_protector_state(path: str | os.PathLike) -> bytes | None:
    """The fitted protector's ``torch.save`` bytes stored in a key, or None."""
    with zipfile.ZipFile(path) as z:
        return z.read("protector.pt") if "protector.pt" in z.namelist() else None


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
    """Check that ``key`` belongs to the protected folder: every file it lists is there with the same sha256.

    Raises:
        KeyMismatchError: naming the first file that is missing or differs.
    """
    root = Path(protected)
    if not root.is_dir():
        raise InputError("protected dataset folder not found", root)
    record = read_key(key)
    for f in _listed_files(record):
        p = root / f["output"]
        if not p.is_file():
            raise KeyMismatchError(f"key does not match this dataset: {f['output']} is missing", key)
        if file_sha256(p) != f["sha256"]:
            raise KeyMismatchError(f"key does not match this dataset: {f['output']} differs from the protected file the key was made for", key)
    return record


def restore_dataset(protected: str | os.PathLike, key: str | os.PathLike, output: str | os.PathLike,
                    progress: bool = True) -> dict[str, Any]:
    """Rebuild the original dataset from a protected copy and its key (the original data is never needed).

    Each restored image has the decoded array of its source, bit for bit, and the protected file's metadata
    (which is the source's). JPEG sources come back as lossless PNG with the original decoded pixels.

    Args:
        protected: protected dataset folder.
        key: its key file.
        output: new folder for the restored dataset (must not exist).
        progress: show a progress bar.

    Returns:
        Summary with ``output``, ``cases`` and ``restored`` (number of images whose perturbation was removed).

    Raises:
        KeyMismatchError: the key does not belong to ``protected``, or a restored array fails its checksum.
        InputError: ``output`` exists or lies inside ``protected``.
    """
    from tqdm.auto import tqdm

    src, out = Path(protected).resolve(), Path(output).resolve()
    if out.exists():
        raise InputError("output folder already exists", out)
    if out.is_relative_to(src):
        raise InputError("output must not lie inside the protected dataset", out)
    record = verify_key(src, key)
    stage = out.with_name(out.name + ".partial")
    if stage.exists():
        shutil.rmtree(stage)
    restored = 0
    with zipfile.ZipFile(key) as z:
        for case in tqdm(record["cases"], desc="restore", disable=not progress, unit="case"):
            if case.get("label"):
                copy_atomic(src / case["label"]["output"], stage / case["label"]["output"])
            outputs = [f["output"] for f in case["files"]]
            if not case["protected"]:
                for f in outputs:
                    copy_atomic(src / f, stage / f)
                continue
            paths = [str(src / f) for f in outputs]
            arg = paths if case["fmt"] == "dicom" else paths[0]
            codec = codec_for(arg)
            image = codec.read(arg)
            if array_sha256(image.array) != case["array_sha256_protected"]:
                raise KeyMismatchError(f"key does not match this dataset: {outputs[0]} decodes differently", key)
            original = decode_delta(image.array, z.read(case["delta"]))
            if array_sha256(original) != case["array_sha256_source"]:
                raise KeyMismatchError(f"restored array of {outputs[0]} fails its checksum", key)
            targets = [str(stage / f) for f in outputs]
            options = {"sop_instance_uids": case["sop_instance_uids"]} if case.get("sop_instance_uids") else {}
            codec.write(arg, targets if case["fmt"] == "dicom" else targets[0], original, **options)
            restored += 1
    shutil.copyfile(src / "dataset.json", stage / "dataset.json")
    os.replace(stage, out)
    return {"output": str(out), "cases": len(record["cases"]), "restored": restored}
