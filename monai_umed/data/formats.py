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

"""Per-format readers and writers ("codecs") that keep files intact.

Reading goes through MONAI's ``LoadImage`` with the matching reader; the array a codec returns is channel-first
in MONAI's layout and holds the *stored* values in the file's own dtype (NIfTI data before ``scl_slope``, DICOM
stored values before ``RescaleSlope``), so quantised perturbations and restoration are exact integer arithmetic.
Writing takes a *template* file (the source, or the protected copy when restoring) and replaces only the pixel
data; everything else is copied verbatim. Outputs are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from monai_umed.errors import InputError

__all__ = [
    "ImageData", "Codec", "NiftiCodec", "PILCodec", "codec_for", "register_codec", "array_sha256", "file_sha256",
    "atomic_path", "copy_atomic", "load_with_monai", "check_label",
]

# LoadImage instantiates every reader, including the GPU-only nvImageCodec one, which logs and warns on CPU
# machines; that is noise for users of the CPU readers we pick explicitly
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")

PathLike = str | os.PathLike
_UMASK = os.umask(0)
os.umask(_UMASK)


@dataclass
class ImageData:
    """A decoded image in MONAI's channel-first layout.

    Attributes:
        array: channel-first stored values (source dtype).
        fmt: codec name.
        modality: "CT", "MR", "RGB", ... when known.
        slope: stored -> physical slope.
        intercept: stored -> physical intercept.
        meta: MONAI metadata (affine, spacing, ...), used to build ``MetaTensor``s.
        extra: codec-specific information needed to write (kept out of the manifest).
    """

    array: np.ndarray
    fmt: str
    modality: str | None = None
    slope: float = 1.0
    intercept: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spatial_dims(self) -> int:
        return self.array.ndim - 1


def array_sha256(array: np.ndarray) -> str:
    """Checksum of a decoded array: dtype, shape and bytes (C order).

    The bytes are hashed in place when the array is C-contiguous and block by block in C order otherwise (a NIfTI
    volume is Fortran-ordered), never through a whole copy of a big volume.
    """
    from monai_umed.blocks import c_order_blocks

    a = np.asarray(array)
    h = hashlib.sha256(f"{a.dtype.str}|{a.shape}|".encode())
    if a.flags.c_contiguous:
        h.update(memoryview(a.reshape(-1)).cast("B"))
    else:
        for i in c_order_blocks(a.shape):
            h.update(np.ascontiguousarray(a[i]).tobytes())
    return h.hexdigest()


def file_sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class atomic_path:
    """Context manager yielding a temporary path next to ``path``; renamed onto ``path`` only on success."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="".join(self.path.suffixes), dir=self.path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; released files get the usual permissions
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def copy_atomic(src: PathLike, dst: PathLike) -> None:
    """Byte copy (labels, unprotected images) through a temporary name."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def load_with_monai(path: PathLike | Sequence[PathLike], reader: str, **kwargs: Any) -> tuple[np.ndarray, dict]:
    """``monai.transforms.LoadImage`` keeping the file's dtype, channel first; errors name the file."""
    from monai.transforms import LoadImage

    shown = path if isinstance(path, (str, os.PathLike)) else (list(path)[0] if len(path) else "")
    try:
        img = LoadImage(reader=reader, image_only=True, dtype=None, ensure_channel_first=True, **kwargs)(path)
    except FileNotFoundError as e:
        raise InputError("file not found", shown) from e
    except Exception as e:  # readers raise many types on corrupt files
        raise InputError(f"unreadable or corrupt image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", shown) from e
    return np.asarray(img.array), dict(img.meta)


def check_label(label: np.ndarray, image: ImageData, path: PathLike) -> np.ndarray:
    """Validate a channel-first label against its image; return it as int64.

    Raises:
        InputError: NaN/Inf or non-integer values, more than one channel, or a spatial shape that differs.
    """
    lab = np.asarray(label)
    if lab.ndim == image.array.ndim and lab.shape[0] != 1:
        raise InputError(f"label has {lab.shape[0]} channels; expected one integer label map", path)
    if lab.ndim != image.array.ndim:
        raise InputError(f"label is {lab.ndim - 1}D but the image is {image.spatial_dims}D", path)
    if tuple(lab.shape[1:]) != tuple(image.array.shape[1:]):
        raise InputError(f"label shape {tuple(lab.shape[1:])} does not match image shape {tuple(image.array.shape[1:])}", path)
    if lab.dtype.kind == "f":
        if not np.all(np.isfinite(lab)):
            raise InputError("label contains NaN or Inf", path)
        if not np.array_equal(lab, np.round(lab)):
            raise InputError("label has non-integer values (expected 0 = background, 1..K = classes)", path)
    if lab.dtype.kind not in "uifb":
        raise InputError(f"unsupported label dtype {lab.dtype}", path)
    if lab.min() < 0:
        raise InputError("label has negative values", path)
    return lab.astype(np.int64)


def check_image(array: np.ndarray, path: PathLike) -> None:
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise InputError("image contains NaN or Inf values", path)
    if array.dtype.kind not in "uif":
        raise InputError(f"unsupported image dtype {array.dtype}", path)
    if array.ndim - 1 not in (2, 3):
        raise InputError(f"image is {array.ndim - 1}D after adding a channel; only 2D and 3D are supported", path)


class Codec(ABC):
    """Reads one image (a file or, for DICOM, a series of files) and writes a pixel-replaced copy of a template.

    ``path`` is a single path for file formats and a list of slice files for DICOM series.
    """

    fmt: str = ""
    extensions: tuple[str, ...] = ()

    @abstractmethod
    def read(self, path: Any) -> ImageData:
        """Decode an image into :class:`ImageData` (stored values, MONAI channel-first layout)."""

    @abstractmethod
    def write(self, template: Any, out: Any, array: np.ndarray, **options: Any) -> None:
        """Write ``array`` (channel-first stored values, the template's dtype and shape) with all of ``template``'s
        metadata to ``out``, atomically."""

    def output_relpath(self, rel: str) -> str:
        """Relative output path for a relative input path (JPEG -> PNG changes the suffix)."""
        return rel

    def read_label(self, path: Any, image: ImageData) -> np.ndarray:
        """Decode a label aligned with ``image`` (channel-first); validated by :func:`check_label`."""
        reader = "NibabelReader" if str(path).lower().endswith((".nii", ".nii.gz")) else (
            "PILReader" if str(path).lower().endswith((".png", ".jpg", ".jpeg", ".bmp")) else "ITKReader")
        arr, _ = load_with_monai(path, reader)
        return check_label(arr, image, path)


class NiftiCodec(Codec):
    """NIfTI-1/2 single files (``.nii``/``.nii.gz``), read with MONAI's ``NibabelReader``.

    The written file has the template's header block and extensions byte for byte (affine, ``scl_slope``,
    descriptions, dtype); only the voxel data differ.
    """

    fmt = "nifti"
    extensions = (".nii", ".nii.gz")

    def read(self, path: PathLike) -> ImageData:
        import nibabel as nib

        arr, meta = load_with_monai(path, "NibabelReader")
        try:
            img = nib.load(str(path))
            raw = np.asanyarray(img.dataobj.get_unscaled())
        except Exception as e:
            raise InputError(f"unreadable NIfTI ({type(e).__name__})", path) from e
        slope, inter = img.dataobj.slope, img.dataobj.inter
        stored = self._to_monai(raw)
        if stored.shape != arr.shape:
            raise InputError(f"unsupported NIfTI layout {raw.shape}", path)
        check_image(stored, path)
        return ImageData(stored, self.fmt, slope=float(slope), intercept=float(inter), meta=meta,
                         extra={"raw_shape": raw.shape})

    @staticmethod
    def _to_monai(raw: np.ndarray) -> np.ndarray:
        # MONAI: 2D/3D -> add a channel axis; 4D (x, y, z, c) -> channel first
        return raw[None] if raw.ndim <= 3 else np.moveaxis(raw, -1, 0)

    @staticmethod
    def _from_monai(arr: np.ndarray, raw_ndim: int) -> np.ndarray:
        return arr[0] if raw_ndim <= 3 else np.moveaxis(arr, 0, -1)

    def write(self, template: PathLike, out: PathLike, array: np.ndarray, **options: Any) -> None:
        import nibabel as nib
        from nibabel.openers import ImageOpener
        from nibabel.volumeutils import array_to_file

        src = nib.load(str(template))
        hdr = src.header.copy()
        raw = self._from_monai(np.asarray(array), len(src.shape))
        if raw.shape != src.shape or raw.dtype != hdr.get_data_dtype():
            raise ValueError(f"{out}: array {raw.shape} {raw.dtype} does not match template {src.shape} {hdr.get_data_dtype()}")
        with atomic_path(out) as tmp, ImageOpener(str(tmp), "wb") as f:
            hdr.write_to(f)
            array_to_file(raw, f, hdr.get_data_dtype(), offset=int(hdr["vox_offset"]), order="F")


class PILCodec(Codec):
    """PNG (kept as PNG, same mode) and JPEG (written as lossless PNG: JPEG would destroy the perturbation),
    read with MONAI's ``PILReader``. Modes L, RGB, RGBA, I;16 and I are supported."""

    fmt = "png"
    extensions = (".png", ".jpg", ".jpeg", ".bmp")
    modes = {"L": np.uint8, "RGB": np.uint8, "RGBA": np.uint8, "I;16": np.uint16, "I": np.int32, "1": np.bool_}

    def read(self, path: PathLike) -> ImageData:
        from PIL import Image

        arr, meta = load_with_monai(path, "PILReader")
        try:
            with Image.open(path) as im:
                mode = im.mode
        except Exception as e:
            raise InputError(f"unreadable image ({type(e).__name__})", path) from e
        if mode not in self.modes:
            raise InputError(f"unsupported image mode {mode!r} (L, RGB, RGBA, I;16, I)", path)
        check_image(arr, path)
        modality = "RGB" if mode in ("RGB", "RGBA") else None
        return ImageData(arr, "jpeg" if str(path).lower().endswith((".jpg", ".jpeg")) else self.fmt,
                         modality=modality, meta=meta, extra={"mode": mode})

    def output_relpath(self, rel: str) -> str:
        p = Path(rel)
        return str(p.with_suffix(".png")) if p.suffix.lower() in (".jpg", ".jpeg", ".bmp") else rel

    def write(self, template: PathLike, out: PathLike, array: np.ndarray, **options: Any) -> None:
        from PIL import Image

        with Image.open(template) as im:
            mode = im.mode
            info = {k: v for k, v in im.info.items() if k in ("dpi", "gamma", "icc_profile", "transparency")}
        # MONAI's PILReader gives (C, W, H): back to PIL's (H, W[, C])
        a = np.asarray(array)
        hw = a.transpose(2, 1, 0) if a.shape[0] > 1 else a[0].T
        img = Image.fromarray(np.ascontiguousarray(hw), mode=mode if mode != "I;16" else None)
        if mode == "I;16" and img.mode != "I;16":
            img = img.convert("I;16")
        with atomic_path(out) as tmp:
            img.save(tmp, format="PNG", **info)


_CODECS: list[Codec] = [NiftiCodec(), PILCodec()]


def register_codec(codec: Codec) -> None:
    """Make a codec available to :func:`codec_for` (the DICOM codec registers itself)."""
    _CODECS.insert(0, codec)


def codec_for(path: Any) -> Codec:
    """The codec for a path (by extension), or for a list of DICOM files.

    Raises:
        InputError: unsupported format.
    """
    if isinstance(path, (list, tuple)):
        from monai_umed.data import dicom  # noqa: F401  (registers the DICOM codec)

        return next(c for c in _CODECS if c.fmt == "dicom")
    name = str(path).lower()
    for c in _CODECS:
        if name.endswith(c.extensions):
            return c
    if name.endswith((".dcm", ".dicom")):
        from monai_umed.data import dicom  # noqa: F401

        return next(c for c in _CODECS if c.fmt == "dicom")
    raise InputError("unsupported image format (NIfTI, PNG, JPEG, DICOM)", path)
