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
from pathlib import Path
from typing import Any

import numpy as np

# the codec interface and shared helpers live in ``codec`` so that the DICOM codec can use them without importing
# this module, which loads it; they are re-exported here, where the rest of the package has always found them
from monai_umed.data.codec import (
    Codec,
    ImageData,
    PathLike,
    atomic_path,
    check_image,
    check_label,
    copy_atomic,
    load_with_monai,
)
from monai_umed.errors import InputError

__all__ = [
    "ImageData", "Codec", "NiftiCodec", "PILCodec", "codec_for", "register_codec", "array_sha256", "file_sha256",
    "atomic_path", "copy_atomic", "load_with_monai", "check_label",
]


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
    """Make a codec available to :func:`codec_for`; it takes precedence over those registered before it."""
    _CODECS.insert(0, codec)


def _dicom_codec() -> Codec:
    """The DICOM codec, registered on first use.

    The DICOM codec does not register itself when imported: then ``dicom`` would import this module while this
    module imports ``dicom`` (an import circle). This module loads it instead, when the first DICOM image comes.
    """
    for c in _CODECS:
        if c.fmt == "dicom":
            return c
    from monai_umed.data.dicom import DicomCodec

    codec = DicomCodec()
    register_codec(codec)
    return codec


def codec_for(path: Any) -> Codec:
    """The codec for a path (by extension), or for a list of DICOM files.

    Raises:
        InputError: unsupported format.
    """
    if isinstance(path, (list, tuple)):
        return _dicom_codec()
    name = str(path).lower()
    for c in _CODECS:
        if name.endswith(c.extensions):
            return c
    if name.endswith((".dcm", ".dicom")):
        return _dicom_codec()
    raise InputError("unsupported image format (NIfTI, PNG, JPEG, DICOM)", path)
