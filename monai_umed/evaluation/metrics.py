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

"""Figures that judge a protection (METHODS.md section 4, items 3 and 4).

Imperceptibility compares each protected file with its clean original *as read from disk*, in native units:

- ``psnr``: ``10 log10(R^2 / MSE)`` over every voxel and channel, with ``R`` the dtype's range for integer images
  (255 for uint8) and the clean image's ``max - min`` otherwise; ``inf`` for identical images.
- ``psnr_roi``: the same inside the region of interest (label > 0); ``nan`` when the label is empty.
- ``ssim``: Wang et al. (2004) SSIM, Gaussian window (sigma 1.5, 11 taps; scikit-image when installed, MONAI
  ``SSIMMetric`` otherwise: the two agree to 1e-4), averaged over channels, 2D or 3D, with the same ``R``.
- ``max_abs_delta``: ``max |protected - clean|`` in native units; ``max_abs_delta_rel`` divides it by ``R`` (a
  dataset can mix dtypes and scales: MSD Hippocampus holds uint8 and float32 volumes).

Dataset means average the per-case values (the papers' "average PSNR"); identical cases (infinite PSNR) are
counted and left out of the PSNR means. Segmentation quality is the mean Dice over cases and foreground classes
(MONAI ``DiceMetric``, classes absent from a case's ground truth are ignored).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Sequence

import numpy as np
import torch

__all__ = [
    "data_range",
    "psnr",
    "ssim",
    "max_abs_delta",
    "case_imperceptibility",
    "summarise_imperceptibility",
    "dice_per_class",
    "summarise_dice",
    "read_native",
]

# MONAI's optional nvImageCodec probe logs each time a reader is built; it is noise here
for _name in ("monai.data.image_reader", "monai.data.nvimgcodec_pydicom_plugin"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def read_native(path: str | os.PathLike) -> np.ndarray:
    """Read an image file through MONAI ``LoadImage`` as stored: channel-first, in the file's own dtype.

    Raises:
        monai_umed.errors.InputError: missing or unreadable file (named).
    """
    from monai.transforms import LoadImage

    from monai_umed.errors import InputError

    if not os.path.exists(path):
        raise InputError("file not found", str(path))
    try:
        img = LoadImage(image_only=True, dtype=None, ensure_channel_first=True)(str(path))
    except Exception as e:  # readers raise many exception types on corrupt files
        raise InputError(f"unreadable image ({type(e).__name__}: {e})", str(path)) from e
    return np.asarray(img.array if hasattr(img, "array") else img)


def data_range(clean: np.ndarray) -> float:
    """PSNR/SSIM range ``R``: the dtype range for integer images, the clean image's ``max - min`` otherwise."""
    a = np.asarray(clean)
    if a.dtype.kind in "ui":
        info = np.iinfo(a.dtype)
        return float(info.max) - float(info.min)
    if a.dtype.kind == "b":
        return 1.0
    r = float(np.max(a)) - float(np.min(a))
    return r if r > 0 else 1.0


def psnr(clean: np.ndarray, protected: np.ndarray, mask: np.ndarray | None = None,
         value_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB.

    Args:
        clean: the clean image (channel-first or any shape).
        protected: the protected image, same shape.
        mask: optional boolean mask broadcastable to the images (e.g. ``label > 0`` of shape ``1 x spatial``).
        value_range: ``R``; :func:`data_range` of ``clean`` when None.

    Returns:
        PSNR (``inf`` for identical images, ``nan`` for an empty mask).
    """
    a, b = np.asarray(clean, np.float64), np.asarray(protected, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: clean {a.shape} vs protected {b.shape}")
    r = data_range(clean) if value_range is None else float(value_range)
    sq = (a - b) ** 2
    if mask is not None:
        m = np.broadcast_to(np.asarray(mask, bool), sq.shape)
        if not m.any():
            return float("nan")
        sq = sq[m]
    mse = float(sq.mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(r * r / mse)


def ssim(clean: np.ndarray, protected: np.ndarray, value_range: float | None = None) -> float:
    """Structural similarity of two channel-first images (2D or 3D), averaged over channels.

    Uses scikit-image when installed and MONAI's ``SSIMMetric`` otherwise (same definition, 11-tap window). The
    window shrinks to the largest odd size that fits images smaller than 11 voxels along an axis.
    """
    a, b = np.asarray(clean, np.float64), np.asarray(protected, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: clean {a.shape} vs protected {b.shape}")
    r = data_range(clean) if value_range is None else float(value_range)
    smallest = min(a.shape[1:])
    win = max(3, min(11, smallest if smallest % 2 else smallest - 1))
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        structural_similarity = None
    if structural_similarity is not None:
        vals = [
            structural_similarity(a[c], b[c], data_range=r, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, win_size=win)
            for c in range(a.shape[0])
        ]
        return float(np.mean(vals))
    from monai.metrics import SSIMMetric

    metric = SSIMMetric(spatial_dims=a.ndim - 1, data_range=r, win_size=win)
    return float(metric(torch.as_tensor(b)[None], torch.as_tensor(a)[None]).mean())


def max_abs_delta(clean: np.ndarray, protected: np.ndarray) -> float:
    """``max |protected - clean|`` in native units."""
    a, b = np.asarray(clean, np.float64), np.asarray(protected, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: clean {a.shape} vs protected {b.shape}")
    return float(np.abs(b - a).max()) if a.size else 0.0


def case_imperceptibility(
    clean: np.ndarray, protected: np.ndarray, label: np.ndarray | None = None
) -> dict[str, Any]:
    """All imperceptibility figures of one case (native arrays, channel-first; ``label`` 1 x spatial)."""
    r = data_range(clean)
    roi = None if label is None else np.asarray(label) > 0
    m = max_abs_delta(clean, protected)
    return {
        "psnr": psnr(clean, protected, value_range=r),
        "psnr_roi": psnr(clean, protected, mask=roi, value_range=r) if roi is not None else float("nan"),
        "ssim": ssim(clean, protected, value_range=r),
        "max_abs_delta": m,
        "max_abs_delta_rel": m / r,
        "data_range": r,
        "dtype": np.asarray(clean).dtype.name,
    }


def _finite_mean(values: Sequence[float]) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else None


def summarise_imperceptibility(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Dataset figures from per-case ones: means of finite PSNRs, mean SSIM, overall max |delta|.

    Returns:
        ``psnr``, ``psnr_min`` (the lowest finite case PSNR), ``psnr_roi``, ``ssim`` (None when no case has a finite
        value), ``max_abs_delta`` (native units,
        the largest over cases: only comparable across cases of one dtype and scale), ``max_abs_delta_rel`` (the
        largest ``max |delta| / R``, unit-free), ``dtypes`` (cases per clean dtype), ``identical_cases`` (cases with
        no change at all) and ``cases`` (how many were compared).
    """
    dtypes: dict[str, int] = {}
    for c in cases:
        if c.get("dtype"):
            dtypes[c["dtype"]] = dtypes.get(c["dtype"], 0) + 1
    return {
        "psnr": _finite_mean([c["psnr"] for c in cases]),
        "psnr_min": min((c["psnr"] for c in cases if c["psnr"] is not None and math.isfinite(c["psnr"])),
                        default=None),
        "psnr_roi": _finite_mean([c["psnr_roi"] for c in cases]),
        "ssim": _finite_mean([c["ssim"] for c in cases]),
        "max_abs_delta": float(max((c["max_abs_delta"] for c in cases), default=0.0)),
        "max_abs_delta_rel": float(max((c.get("max_abs_delta_rel") or 0.0 for c in cases), default=0.0)),
        "dtypes": dtypes,
        "identical_cases": int(sum(1 for c in cases if c["max_abs_delta"] == 0)),
        "cases": len(cases),
    }


def dice_per_class(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> np.ndarray:
    """Dice of each foreground class for one case, with MONAI ``DiceMetric``.

    Args:
        pred: integer prediction, channel-first ``1 x spatial``.
        label: integer ground truth, same shape.
        num_classes: classes including background.

    Returns:
        ``num_classes - 1`` values; ``nan`` for a class absent from the ground truth.
    """
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    p, y = torch.as_tensor(pred).long(), torch.as_tensor(label).long()
    if p.shape != y.shape or p.shape[0] != 1:
        raise ValueError(f"prediction {tuple(p.shape)} and label {tuple(y.shape)} must both be 1 x spatial")
    p, y = p[None], y[None]
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    return metric(one_hot(p, num_classes), one_hot(y, num_classes)).reshape(-1).cpu().numpy().astype(np.float64)


def summarise_dice(per_case: np.ndarray) -> dict[str, Any]:
    """Mean Dice over cases and foreground classes from a ``cases x classes`` array (``nan`` entries skipped).

    Returns:
        ``dice`` (the mean over every finite entry), ``dice_per_class`` (mean over cases per class).
    """
    a = np.asarray(per_case, np.float64).reshape(len(per_case), -1)
    finite = np.isfinite(a)
    mean = float(a[finite].mean()) if finite.any() else None
    per_class = [float(a[finite[:, k], k].mean()) if finite[:, k].any() else None for k in range(a.shape[1])]
    return {"dice": mean, "dice_per_class": per_class}
