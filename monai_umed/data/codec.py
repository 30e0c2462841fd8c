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

"""The codec interface and what every codec shares: the decoded image, input checks, MONAI reading, atomic writes.

A codec (:class:`Codec`) reads one image -- a file, or for DICOM a series of files -- into :class:`ImageData` and
writes a pixel-replaced copy of a template file. The concrete codecs live beside their format:
:mod:`monai_umed.data.formats` (NIfTI, PNG/JPEG, and the registry :func:`~monai_umed.data.formats.codec_for`) and
:mod:`monai_umed.data.dicom`. This module sits below both, so that each of them imports it and neither imports the
other for these shared pieces; :mod:`monai_umed.data.formats` re-exports every name here.
"""

from __future__ import annotations

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

__all__ = ["ImageData", "Codec", "atomic_path", "copy_atomic", "load_with_monai", "check_label", "check_image"]

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
    """Validate a decoded channel-first image.

    Raises:
        InputError: NaN/Inf values, a non-numeric dtype, or other than 2 or 3 spatial dimensions.
    """
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
