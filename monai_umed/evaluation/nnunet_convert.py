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

"""A judge's training and test lists as an nnU-Net v2 raw dataset (``nnUNet_raw/DatasetNNN_Name``).

nnU-Net's conventions (its ``dataset_format.md``), as the judge writes them:

- ``imagesTr/CASE_0000.ext``, ``CASE_0001.ext``, ... (the channel index in four digits), ``labelsTr/CASE.ext``,
  ``imagesTs/CASE_0000.ext``, ...; cases are
  ``train_NNNNN`` and ``test_NNNNN`` in list order.
- 2D images become PNG read by nnU-Net's ``NaturalImage2DIO``: an RGB(A) image is ONE ``CASE_0000.png`` holding
  all its colour channels, with ``channel_names`` ``{"0": "R", "1": "G", "2": "B"}`` (nnU-Net's Dataset120 road
  segmentation example); grayscale is one 8- or 16-bit PNG. JPEG sources are written as PNG (nnU-Net refuses
  lossy files). Labels are 8-bit PNG.
- 3D images become one NIfTI ``CASE_000c.nii.gz`` per channel, in the source's dtype and affine; the label gets the
  image's affine (nnU-Net checks that image and label grids agree). ``channel_names`` come from dataset.json's
  ``channel_names`` or ``modality`` when they name every channel (``CT`` selects nnU-Net's CT normalisation).
- ``dataset.json``: ``channel_names``, ``labels`` (name -> int, ``background`` 0, consecutive), ``numTraining``,
  ``file_ending`` (``.png`` or ``.nii.gz``), and what monai-umed wrote (``monai_umed``: sources per case).

Arrays are read through MONAI ``LoadImage`` as the judge reads them (:func:`~monai_umed.evaluation.metrics.read_native`,
channel first), so a prediction written by nnU-Net and read back the same way lies on the test label's grid. The
conversion checks what nnU-Net would refuse later, with one line naming the file: a label that is not one integer
channel, a label whose grid differs from its image's, a class that ``labels`` does not name, images whose channels
differ. ``image_size`` resamples 2D images before conversion as the MONAI victims do (bilinear with anti-aliasing,
labels nearest), rounded back to the file's dtype.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from monai_umed.errors import InputError
from monai_umed.evaluation.metrics import read_native

__all__ = ["CONVERT_FORMAT", "nnunet_labels", "channel_names", "file_ending", "grid_size", "write_raw_dataset"]

#: bump when the conversion changes, so that runs on older conversions are not reused
CONVERT_FORMAT = 1

_NIFTI_DTYPES = ("uint8", "int8", "int16", "uint16", "int32", "uint32", "float32", "float64")


def nnunet_labels(meta_labels: Any, num_classes: int) -> dict[str, int]:
    """nnU-Net's ``labels`` (name -> int) from a dataset.json ``labels`` map.

    Accepts the MSD form (``{"0": "background", "1": "tumour"}``) and nnU-Net's own (``{"background": 0, ...}``);
    without one, ``class_1`` ... ``class_{K-1}``. Class 0 is always ``background``; a repeated name, or a name that
    nnU-Net reserves (``background``, ``ignore``), gets its number appended.

    Raises:
        InputError: a map that is neither form, or classes that are not ``0, 1, ..., K-1``.
    """
    if isinstance(meta_labels, Mapping) and meta_labels:
        if all(str(k).strip().isdigit() for k in meta_labels):
            pairs = sorted((int(k), str(v)) for k, v in meta_labels.items())
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in meta_labels.values()):
            pairs = sorted((int(v), str(k)) for k, v in meta_labels.items())
        else:
            raise InputError(f"dataset.json's labels must map class numbers to names (or names to numbers), got "
                             f"{dict(meta_labels)}")
    else:
        pairs = [(k, f"class_{k}") for k in range(int(num_classes))]
    numbers = [k for k, _ in pairs]
    if numbers != list(range(len(numbers))):
        raise InputError(f"nnU-Net needs consecutive classes 0, 1, ..., K-1; dataset.json's labels are {numbers}")
    out: dict[str, int] = {"background": 0}
    for k, name in pairs[1:]:
        name = name.strip() or f"class_{k}"
        out[name if name not in out and name != "ignore" else f"{name}_{k}"] = k
    return out


def channel_names(meta: Mapping[str, Any], spatial_dims: int, channels: int) -> dict[str, str]:
    """nnU-Net's ``channel_names``: ``R``, ``G``, ``B`` (``A``) for 2D colour images, otherwise dataset.json's
    ``channel_names`` or ``modality`` when they name every channel, else ``channel_0``, ...."""
    if spatial_dims == 2 and channels in (3, 4):
        return {str(i): c for i, c in enumerate("RGBA"[:channels])}
    for key in ("channel_names", "modality"):
        names = meta.get(key)
        if isinstance(names, Mapping) and {str(k) for k in names} == {str(i) for i in range(channels)}:
            by_str = {str(k): str(v) for k, v in names.items()}
            return {str(i): by_str[str(i)] for i in range(channels)}
    return {str(i): ("gray" if spatial_dims == 2 else f"channel_{i}") for i in range(channels)}


def file_ending(spatial_dims: int) -> str:
    """``.png`` for 2D datasets (nnU-Net's natural images), ``.nii.gz`` for volumes."""
    return ".png" if spatial_dims == 2 else ".nii.gz"


def grid_size(image_size: int | Sequence[int] | None, spatial_dims: int) -> tuple[int, ...] | None:
    """The 2D grid that ``image_size`` asks for (an int for both axes, or one per axis), None for the native grid.

    Raises:
        InputError: a size for volumes (nnU-Net resamples them itself, to the median spacing), or a bad size.
    """
    if image_size is None:
        return None
    if spatial_dims != 2:
        raise InputError("nnU-Net resamples volumes itself (to the median spacing): image_size applies to 2D data "
                         "only")
    s = [int(image_size)] if np.ndim(image_size) == 0 else [int(v) for v in image_size]
    size = tuple(s * 2 if len(s) == 1 else s)
    if len(size) != 2 or min(size) < 1:
        raise InputError(f"image_size {image_size} does not fit 2D images")
    return size


def _read_with_affine(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A volume as :func:`read_native` reads it, with its affine (RAS, MONAI's convention).

    Raises:
        InputError: missing or unreadable file.
    """
    from monai.transforms import LoadImage

    if not os.path.exists(path):
        raise InputError("file not found", path)
    try:
        img = LoadImage(image_only=True, dtype=None, ensure_channel_first=True)(str(path))
    except Exception as e:  # readers raise many exception types on corrupt files
        raise InputError(f"unreadable image ({type(e).__name__}: {e})", path) from e
    return np.asarray(img.array), np.asarray(img.affine, dtype=np.float64)


def _resize(array: np.ndarray, size: Sequence[int], label: bool) -> np.ndarray:
    """Resize a channel-first 2D array as the MONAI victims do, back in its own dtype."""
    import torch
    from monai.transforms import Resize

    if tuple(array.shape[1:]) == tuple(size):
        return array
    r = Resize(spatial_size=tuple(size), mode="nearest" if label else "bilinear", anti_aliasing=not label)
    out = np.asarray(r(torch.as_tensor(array.astype(np.float32))))
    if array.dtype.kind in "ui":
        info = np.iinfo(array.dtype)
        out = np.clip(np.round(out), info.min, info.max)
    return out.astype(array.dtype)


def _png(array: np.ndarray) -> np.ndarray:
    """A channel-first array as read by MONAI (``C x W x H`` for a PNG: PIL's x axis first) in PIL's layout
    (``H x W (x C)``), so that writing it and reading it back gives the same array."""
    a = np.moveaxis(array, 0, -1).swapaxes(0, 1)
    return a[..., 0] if a.shape[-1] == 1 else a


def _check_png_image(img: np.ndarray, path: str) -> None:
    channels, dtype = img.shape[0], img.dtype
    if not ((dtype == np.uint8 and channels in (1, 3, 4)) or (dtype == np.uint16 and channels == 1)):
        raise InputError(f"nnU-Net's 2D conversion writes 8-bit PNG with 1, 3 or 4 channels or 16-bit grayscale "
                         f"PNG; this image is {dtype} with {channels} channel(s)", path)


def _check_label(label: np.ndarray, shape: tuple[int, ...], labels: Mapping[str, int], path: str) -> np.ndarray:
    """A label map checked against its image's grid and the classes; returned as uint8 (uint16 past 255 classes).

    Raises:
        InputError: not one channel, another grid, non-integer values, or a class ``labels`` does not name.
    """
    if label.shape[0] != 1:
        raise InputError(f"label has {label.shape[0]} channels; nnU-Net needs a 1-channel label map", path)
    if tuple(label.shape[1:]) != tuple(shape):
        raise InputError(f"label shape {tuple(label.shape[1:])} differs from its image's {tuple(shape)}", path)
    if label.dtype.kind == "f" and not np.array_equal(label, np.round(label)):
        raise InputError("label holds non-integer values", path)
    values = np.unique(label).astype(np.int64)
    known = set(labels.values())
    missing = [int(v) for v in values if int(v) not in known]
    if missing:
        names = ", ".join(f"{v}={k}" for k, v in sorted(labels.items(), key=lambda kv: kv[1]))
        raise InputError(f"label holds class(es) {missing} that dataset.json's labels do not name ({names}); "
                         "nnU-Net needs every class in 'labels'", path)
    return label.astype(np.uint8 if max(known) < 256 else np.uint16)


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype.name not in _NIFTI_DTYPES:
        array = array.astype(np.float32)
    img = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _write_case(case: str, image_path: str, label_path: str | None, images_dir: Path, labels_dir: Path | None,
                spatial_dims: int, channels: int, labels: Mapping[str, int],
                image_size: tuple[int, ...] | None) -> list[str]:
    """Convert one case (image channels, and its label when given); returns the image files written."""
    from PIL import Image

    if spatial_dims == 2:
        img, affine = read_native(image_path), None
    else:
        img, affine = _read_with_affine(image_path)
    if img.ndim - 1 != spatial_dims or img.shape[0] != channels:
        raise InputError(f"image shape {img.shape} differs from the dataset's {spatial_dims}D images with {channels} "
                         "channel(s)", image_path)
    label = None
    if label_path is not None:
        label = _check_label(read_native(label_path), tuple(img.shape[1:]), labels, label_path)
    if spatial_dims == 2:
        _check_png_image(img, image_path)
        if image_size is not None:
            img = _resize(img, image_size, label=False)
            label = None if label is None else _resize(label, image_size, label=True)
        out = images_dir / f"{case}_0000.png"
        Image.fromarray(_png(img)).save(out)
        if label is not None:
            Image.fromarray(_png(label)).save(labels_dir / f"{case}.png")
        return [str(out)]
    files = []
    for c in range(channels):
        out = images_dir / f"{case}_{c:04d}.nii.gz"
        _write_nifti(img[c], affine, out)
        files.append(str(out))
    if label is not None:
        _write_nifti(label[0], affine, labels_dir / f"{case}.nii.gz")
    return files


def write_raw_dataset(
    folder: str | os.PathLike,
    train: Sequence[Mapping[str, str]],
    test: Sequence[Mapping[str, str]],
    labels: Mapping[str, int],
    names: Mapping[str, str],
    spatial_dims: int,
    image_size: int | Sequence[int] | None = None,
    description: str = "",
) -> dict[str, Any]:
    """Write ``folder`` (``nnUNet_raw/DatasetNNN_Name``) from a training list and a test list.

    Args:
        folder: the dataset folder; replaced when it exists.
        train: ``{"image", "label"}`` entries with absolute paths (the labels go to ``labelsTr``).
        test: ``{"image", ...}`` entries; only the images are written (``imagesTs``).
        labels: nnU-Net's ``labels`` (:func:`nnunet_labels`).
        names: nnU-Net's ``channel_names`` (:func:`channel_names`); their number is the images' channels.
        spatial_dims: 2 or 3.
        image_size: 2D only: resample every image (and training label) to this size first (an int for both axes,
            or one per axis in MONAI's axis order); None keeps the native grid.
        description: dataset.json's ``description``.

    Returns:
        ``folder``, ``file_ending``, ``image_size`` and, per list, the cases (``case``, ``files`` written and the
        ``source`` image).

    Raises:
        InputError: an unreadable file, a label or image nnU-Net would refuse (see the module docstring), an
            ``image_size`` for volumes.
    """
    folder = Path(folder)
    channels = len(names)
    size = grid_size(image_size, spatial_dims)
    if folder.exists():
        shutil.rmtree(folder)
    dirs = {k: folder / k for k in ("imagesTr", "labelsTr", "imagesTs")}
    for d in dirs.values():
        d.mkdir(parents=True)
    cases: dict[str, list[dict[str, Any]]] = {"training": [], "test": []}
    for n, it in enumerate(train):
        case = f"train_{n:05d}"
        files = _write_case(case, it["image"], it["label"], dirs["imagesTr"], dirs["labelsTr"], spatial_dims,
                            channels, labels, size)
        cases["training"].append({"case": case, "files": files, "source": it["image"], "label": it["label"]})
    for n, it in enumerate(test):
        case = f"test_{n:05d}"
        files = _write_case(case, it["image"], None, dirs["imagesTs"], None, spatial_dims, channels, labels, size)
        cases["test"].append({"case": case, "files": files, "source": it["image"]})
    ending = file_ending(spatial_dims)
    meta = {
        "name": folder.name.partition("_")[2] or folder.name,
        "description": description,
        "channel_names": dict(names),
        "labels": dict(labels),
        "numTraining": len(cases["training"]),
        "file_ending": ending,
        "monai_umed": {"format": CONVERT_FORMAT, "image_size": None if size is None else list(size),
                       "training": [{"case": c["case"], "image": c["source"], "label": c["label"]}
                                    for c in cases["training"]],
                       "test": [{"case": c["case"], "image": c["source"]} for c in cases["test"]]},
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=1) + "\n")
    return {"folder": str(folder), "file_ending": ending, "image_size": None if size is None else list(size), **cases}
