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

"""Label-derived masks and texture maps, 2D and 3D (METHODS.md sections 0 and 1.3).

- :func:`roi_mask`: ``M_roi = (y > 0)``.
- :func:`contour_band`: ``M_c = dilate(M_roi, r) AND NOT erode(M_roi, r)``, computed per class for multi-class
  labels (so the boundary between two touching classes is a contour too), with an ellipsoidal structuring element
  whose radius is given in voxels or, with ``radius_mm`` and the voxel ``spacing``, in millimetres.
- :func:`texture_energy`: local standard deviation in a ``k``-window, per channel (box filter).
- :func:`texture_bound`: the texture-aware adaptive bound ``B(x)``: texture energy normalised to ``[b_min, 1]``
  inside the ROI, 0 outside.

All functions take channel-first arrays or tensors (``1 x spatial`` labels, ``C x spatial`` images) and return
torch tensors on the input's device (masks are ``bool``, ``1 x spatial``). Morphology runs in ``scipy.ndimage`` on
the label grid, which is exact and deterministic.

Example::

    band = contour_band(label, radius=2)                       # (1, H, W) bool
    band = contour_band(label, radius_mm=2.0, spacing=(0.8, 0.8, 2.5))  # spacing-aware, 3D
    bound = texture_bound(image, label, window=5, b_min=0.25)  # (C, H, W) in {0} U [0.25, 1]
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = [
    "roi_mask",
    "structuring_element",
    "contour_band",
    "texture_energy",
    "texture_stats",
    "texture_bound",
    "spacing_of",
    "sample_spacing",
]


def _as_label_array(label: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = label.detach().cpu().numpy() if torch.is_tensor(label) else np.asarray(label)
    if arr.ndim not in (3, 4):
        raise ValueError(f"expected a channel-first 2D or 3D label map (1 x spatial), got shape {arr.shape}")
    if arr.shape[0] != 1:
        raise ValueError(f"expected a single-channel label map, got {arr.shape[0]} channels")
    return arr[0]


def _device_of(x: torch.Tensor | np.ndarray) -> torch.device:
    return x.device if torch.is_tensor(x) else torch.device("cpu")


def spacing_of(image: torch.Tensor | np.ndarray) -> tuple[float, ...] | None:
    """Voxel spacing of a MONAI ``MetaTensor`` (its ``pixdim``), or None for plain arrays/tensors."""
    pixdim = getattr(image, "pixdim", None)
    if pixdim is None:
        return None
    try:
        sp = [float(v) for v in (pixdim.tolist() if hasattr(pixdim, "tolist") else pixdim)]
    except (TypeError, ValueError):
        return None
    return tuple(sp) if sp and all(v > 0 for v in sp) else None


def sample_spacing(sample: Mapping[str, Any], sd: int) -> tuple[float, ...] | None:
    """Voxel spacing of a training sample: its ``spacing`` entry, its image's ``pixdim`` (``MetaTensor``) or the
    affine in its ``meta`` dictionary; None when unknown."""
    if sample.get("spacing") is not None:
        return tuple(float(v) for v in sample["spacing"])[:sd]
    sp = spacing_of(sample["image"])
    if sp is not None:
        return sp[:sd]
    meta = sample.get("meta") or {}
    affine = meta.get("affine") if isinstance(meta, Mapping) else None
    if affine is not None:
        a = np.asarray(affine, dtype=np.float64)
        if a.ndim == 2 and a.shape[0] >= sd + 1:
            return tuple(float(v) for v in np.sqrt((a[:sd, :sd] ** 2).sum(axis=0)))
    return None


def roi_mask(label: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``M_roi = (y > 0)`` as a ``1 x spatial`` bool tensor."""
    if torch.is_tensor(label):
        if label.ndim not in (3, 4) or label.shape[0] != 1:
            raise ValueError(f"expected a channel-first 1 x spatial label map, got shape {tuple(label.shape)}")
        return label > 0
    return torch.from_numpy(_as_label_array(label)[None] > 0)


def structuring_element(
    radius: float | Sequence[float], spatial_dims: int, spacing: Sequence[float] | None = None
) -> np.ndarray:
    """An ellipsoidal structuring element (disk in 2D, ball in 3D).

    Args:
        radius: radius in voxels, or in the units of ``spacing`` (mm) when ``spacing`` is given; one value or one
            per spatial dim.
        spatial_dims: 2 or 3.
        spacing: voxel size per spatial dim; the element then contains the voxels within ``radius`` mm.

    Returns:
        A bool array; a single ``True`` voxel when the radius is below one voxel on every axis.
    """
    r = np.broadcast_to(np.asarray(radius, dtype=np.float64), (spatial_dims,))
    sp = np.ones(spatial_dims) if spacing is None else np.asarray(spacing, dtype=np.float64)[:spatial_dims]
    if sp.shape[0] != spatial_dims:
        raise ValueError(f"spacing {spacing} does not have {spatial_dims} entries")
    if np.any(r < 0):
        raise ValueError(f"radius must be >= 0, got {radius}")
    half = np.floor(r / sp + 1e-9).astype(int)
    grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, sp)], indexing="ij")
    with np.errstate(divide="ignore", invalid="ignore"):
        d2 = sum(np.where(rr > 0, (g / max(rr, 1e-12)) ** 2, np.where(g == 0, 0.0, np.inf)) for g, rr in zip(grids, r))
    return d2 <= 1.0 + 1e-9


def contour_band(
    label: torch.Tensor | np.ndarray,
    radius: float = 2,
    spacing: Sequence[float] | None = None,
    radius_mm: float | None = None,
    per_class: bool = True,
) -> torch.Tensor:
    """Contour band ``dilate(M, r) AND NOT erode(M, r)`` around the labelled structures.

    The image border is not a contour: erosion treats voxels outside the image as foreground, so a structure that
    touches the border has no band along it.

    Args:
        label: ``1 x spatial`` integer label map (0 background).
        radius: band radius in voxels (the band is about ``2 * radius + 1`` voxels wide across a boundary).
        spacing: voxel spacing per spatial dim (mm), used with ``radius_mm``.
        radius_mm: band radius in millimetres; overrides ``radius`` when ``spacing`` is known, so anisotropic
            volumes get a band of the same physical width along every axis.
        per_class: union of the bands of every class (boundaries between touching classes included); False gives
            the band of the binary ROI only.

    Returns:
        ``1 x spatial`` bool tensor on the label's device.
    """
    arr = _as_label_array(label)
    sd = arr.ndim
    if radius_mm is not None and spacing is not None:
        se = structuring_element(float(radius_mm), sd, spacing)
    else:
        se = structuring_element(float(radius), sd)
    band = np.zeros(arr.shape, dtype=bool)
    classes = [c for c in _classes(arr) if c > 0] if per_class else [None]
    if se.sum() <= 1:
        return torch.zeros((1,) + arr.shape, dtype=torch.bool, device=_device_of(label))
    for c in classes:
        m = arr > 0 if c is None else arr == c
        if not m.any():
            continue
        dilated = ndimage.binary_dilation(m, structure=se)
        eroded = ndimage.binary_erosion(m, structure=se, border_value=1)
        del m
        band |= np.logical_and(dilated, np.logical_not(eroded, out=eroded), out=dilated)  # in place: big volumes
    return torch.from_numpy(band[None]).to(_device_of(label))


def _classes(arr: np.ndarray) -> np.ndarray:
    """The sorted values of a label map: counted (no sorted copy of a big volume) for small non-negative integer
    labels, ``np.unique`` otherwise."""
    if arr.dtype.kind in "ui" and arr.size and 0 <= arr.min() and arr.max() < (1 << 16):
        return np.flatnonzero(np.bincount(arr.ravel(order="K")))
    return np.unique(arr)


#: Elements per slab of the slab-wise texture maps (1 Mi: 8 MB per float64 temporary).
_SLAB = 1 << 20


def _slabs(shape: Sequence[int], dim: int) -> list[slice]:
    """Ranges along ``dim`` cutting a tensor of ``shape`` into slabs of about :data:`_SLAB` elements."""
    per = max(1, int(np.prod([n for d, n in enumerate(shape) if d != dim], dtype=np.int64)))
    step = max(1, _SLAB // per)
    return [slice(a, min(a + step, shape[dim])) for a in range(0, shape[dim], step)]


def _box_pass(x: torch.Tensor, dim: int, window: int) -> torch.Tensor:
    """Mean over the in-image part of a ``window``-long run along ``dim`` (running sums, float64): one axis of
    :func:`_box_mean`. Every line along ``dim`` is computed on its own, so a slab cut along another axis gives
    the same values as the whole tensor."""
    h = window // 2
    n = x.shape[dim]
    pad = [0, 0] * (x.ndim - 1 - dim) + [h + 1, h]
    c = F.pad(x, pad).cumsum(dim)
    idx = torch.arange(n, device=x.device)
    out = c.narrow(dim, 2 * h + 1, n) - c.narrow(dim, 0, n)
    count = (torch.clamp(idx + h, max=n - 1) - torch.clamp(idx - h, min=0) + 1).to(torch.float64)
    return out / count.reshape([-1] + [1] * (out.ndim - 1 - dim))


def _box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over the in-image part of a ``window``-sized box around each voxel (separable running sums, float64)."""
    out = x.to(torch.float64)
    for dim in range(1, x.ndim):
        out = _box_pass(out, dim, window)
    return out


def _first_axis_means(x: torch.Tensor, window: int, rows: Sequence[slice]) -> Iterator[tuple[torch.Tensor, ...]]:
    """:func:`_box_pass` along the first spatial axis (dim 1) of ``x`` and of ``x * x`` (float64), one slab of
    consecutive ``rows`` at a time, in order.

    The running sums are carried from slab to slab: each slab's padded rows are summed after the last running sum
    of the previous one, exactly as one cumulative sum over the whole padded line adds them (element after element),
    so the values are those of the whole-tensor pass while only a slab (and ``window`` rows) is in memory.
    """
    h, n = window // 2, x.shape[1]
    idx = torch.arange(n, device=x.device)
    count = (torch.clamp(idx + h, max=n - 1) - torch.clamp(idx - h, min=0) + 1).to(torch.float64)
    rest = [1] * (x.ndim - 2)
    carry = torch.zeros((x.shape[0], 1) + tuple(x.shape[2:]), dtype=torch.float64, device=x.device)
    kept_m, kept_s, lo, done = carry[:, :0], carry[:, :0], 0, 0  # running sums of padded rows [lo, done)
    last_m, last_s = carry, carry
    for sl in rows:
        i0, i1 = sl.start, sl.stop
        need = i1 + 2 * h + 1  # padded rows [i, i + 2h + 1) make output row i
        piece = torch.zeros((x.shape[0], need - done) + tuple(x.shape[2:]), dtype=torch.float64, device=x.device)
        a, b = max(done, h + 1), min(need, n + h + 1)  # padded rows that hold image rows (h + 1 zeros first)
        if b > a:
            piece[:, a - done: b - done] = x[:, a - h - 1: b - h - 1].to(torch.float64)
        new_m = torch.cat([last_m, piece], 1).cumsum(1)[:, 1:]
        new_s = torch.cat([last_s, piece * piece], 1).cumsum(1)[:, 1:]
        del piece
        last_m, last_s = new_m[:, -1:], new_s[:, -1:]
        kept_m, kept_s, done = torch.cat([kept_m, new_m], 1), torch.cat([kept_s, new_s], 1), need
        del new_m, new_s
        c = count[i0:i1].reshape([-1] + rest)
        m = (kept_m[:, i0 + 2 * h + 1 - lo: i1 + 2 * h + 1 - lo] - kept_m[:, i0 - lo: i1 - lo]) / c
        sq = (kept_s[:, i0 + 2 * h + 1 - lo: i1 + 2 * h + 1 - lo] - kept_s[:, i0 - lo: i1 - lo]) / c
        kept_m, kept_s, lo = kept_m[:, i1 - lo:], kept_s[:, i1 - lo:], i1
        yield m, sq


def texture_energy(image: torch.Tensor | np.ndarray, window: int = 5) -> torch.Tensor:
    """Local standard deviation of each channel in a ``window``-sized box (2D or 3D), same shape as the image.

    Computed in float64 slab by slab along the first spatial axis (running sums along it carried from slab to slab,
    the other axes' whole lines inside each slab), with the same values as on the whole tensor: a 512 x 512 x 300
    volume needs its float32 result and a few slabs instead of about eight float64 copies of itself.

    Args:
        image: ``C x spatial`` float image.
        window: odd box size ``k`` (default 5).
    """
    x = torch.as_tensor(image)
    if x.ndim not in (3, 4):
        raise ValueError(f"expected a channel-first 2D or 3D image, got shape {tuple(x.shape)}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd integer, got {window}")
    x = x.detach()
    energy = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    rows = _slabs(x.shape, 1)
    for sl, (mean, sq) in zip(rows, _first_axis_means(x, window, rows)):
        for dim in range(2, x.ndim):
            mean, sq = _box_pass(mean, dim, window), _box_pass(sq, dim, window)
        energy[:, sl] = (sq - mean * mean).clamp_min(0.0).sqrt().to(torch.float32)
    return energy


def texture_stats(
    image: torch.Tensor | np.ndarray,
    label: torch.Tensor | np.ndarray,
    window: int = 5,
    quantiles: tuple[float, float] = (0.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel texture-energy levels inside the ROI that :func:`texture_bound` maps to ``b_min`` and 1.

    Computing them once per case lets :func:`texture_bound` run on crops (with a margin of ``window // 2``) and
    still give exactly the whole-image bound.

    Returns:
        ``(low, high)``, each a float tensor with one entry per channel (zeros when the ROI is empty).
    """
    lo_q, hi_q = float(quantiles[0]), float(quantiles[1])
    if not 0.0 <= lo_q < hi_q <= 1.0:
        raise ValueError(f"quantiles must satisfy 0 <= low < high <= 1, got {quantiles}")
    x = torch.as_tensor(image)
    roi = roi_mask(torch.as_tensor(label) if not torch.is_tensor(label) else label).to(x.device)
    if tuple(roi.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(f"label shape {tuple(roi.shape)} does not match image shape {tuple(x.shape)}")
    energy = texture_energy(x, window)
    m = roi[0]
    lo = torch.zeros(energy.shape[0], dtype=torch.float32, device=energy.device)
    hi = torch.zeros_like(lo)
    if bool(m.any()):
        for c in range(energy.shape[0]):
            vals = energy[c][m]
            if vals.numel() > 1_000_000:  # torch.quantile's size limit: an evenly strided subsample
                vals = vals[:: -(-vals.numel() // 1_000_000)]
            lo[c] = torch.quantile(vals, lo_q) if lo_q > 0 else vals.min()
            hi[c] = torch.quantile(vals, hi_q) if hi_q < 1 else vals.max()
    return lo, hi


def texture_bound(
    image: torch.Tensor | np.ndarray,
    label: torch.Tensor | np.ndarray,
    window: int = 5,
    b_min: float = 0.25,
    quantiles: tuple[float, float] = (0.0, 1.0),
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The texture-aware adaptive bound ``B(x)`` (METHODS.md section 1.3).

    The texture energy of each channel is mapped linearly to ``[b_min, 1]`` between its ``quantiles`` inside the
    ROI (clipped outside them), so the most textured ROI voxels get the full budget and the flattest ``b_min`` of
    it. Outside the ROI the bound is 0. A channel whose ROI energy is constant gets the full bound.

    Args:
        image: ``C x spatial`` float image (normalised units).
        label: ``1 x spatial`` label map (ROI = ``label > 0``).
        window: texture window ``k``.
        b_min: bound in the flattest regions, in ``[0, 1]``.
        quantiles: lower and upper quantile of the ROI's texture energy mapped to ``b_min`` and 1 (``(0, 1)``: min
            and max; e.g. ``(0.05, 0.95)`` is robust to a few specular highlights).
        stats: precomputed ``(low, high)`` from :func:`texture_stats` (e.g. of the whole image when ``image`` is a
            crop of it); ``quantiles`` is then ignored.

    Returns:
        ``C x spatial`` float32 tensor, 0 outside the ROI and in ``[b_min, 1]`` inside it.
    """
    if not 0.0 <= b_min <= 1.0:
        raise ValueError(f"b_min must lie in [0, 1], got {b_min}")
    x = torch.as_tensor(image)
    roi = roi_mask(torch.as_tensor(label) if not torch.is_tensor(label) else label).to(x.device)
    if tuple(roi.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(f"label shape {tuple(roi.shape)} does not match image shape {tuple(x.shape)}")
    if not bool(roi.any()):
        return torch.zeros(tuple(x.shape), dtype=torch.float32, device=x.device)
    lo, hi = stats if stats is not None else texture_stats(x, label, window, quantiles)
    energy = texture_energy(x, window)
    shape = (-1,) + (1,) * (energy.ndim - 1)
    lo = torch.as_tensor(lo, dtype=torch.float32, device=energy.device).reshape(shape)
    hi = torch.as_tensor(hi, dtype=torch.float32, device=energy.device).reshape(shape)
    span = hi - lo
    # element-wise, slab by slab into the energy's own storage: a big volume needs no full-size temporaries
    for sl in _slabs(energy.shape, 1):
        e = energy[:, sl]
        norm = torch.where(span > 1e-12, (e - lo) / span.clamp_min(1e-12), torch.ones_like(e)).clamp(0.0, 1.0)
        e.copy_(torch.where(roi[:, sl], b_min + (1.0 - b_min) * norm, torch.zeros_like(norm)))
    return energy
