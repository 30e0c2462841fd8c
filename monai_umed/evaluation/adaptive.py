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

"""An adaptive attacker: estimate a pattern that the released images share, and subtract it before training.

Our methods are public. Someone who has read how UMed's release stage works knows that, in 2D, one small tile per
class is repeated over a work grid whose longest side is 128 pixels, laid on the labelled structures and their band,
and scaled case by case. Such a pattern can be estimated from the released files themselves, with the labels that
come with them:

1. **Residuals.** Every training image minus a Gaussian smoothing of itself (``sigma`` pixels): the fine texture,
   where the tile lives.
2. **Aligned grid.** The residual is resized (anti-aliased, linear) to the grid whose longest side is ``grid``
   (images smaller than it are kept), the label with nearest neighbours.
3. **Periodicity search.** For each period ``p`` in ``2..max_period``, the residuals of all cases are folded modulo
   ``p`` along every axis, one ``p x p`` tile per class and channel (``classwise``; one for all otherwise). The
   energy the folded tiles explain grows with the true period and its multiples; the smallest period that explains
   at least 90 % of the best one's energy wins. The result is a :class:`SharedPattern`, with the explained fraction
   and its ratio to the same statistic of the period one above (a null reference).
4. **Demodulation and subtraction.** Per case, the tiled pattern (each pixel its class's tile) is resized back to
   the native grid; its local amplitude is estimated as ``blur(r * P) / blur(P * P)`` (Gaussian, ``amp_sigma``
   native pixels; negative amplitudes are set to 0) and ``amplitude * P`` is subtracted from the image.

The judge applies it as the defence ``pattern_subtract`` to the clean and the protected training list alike (each
victim gets the same treatment of its own files); the test images are untouched. Example::

    pattern = estimate_shared_pattern(images, labels)          # channel-first arrays
    cleaned = [subtract_shared_pattern(x, y, pattern) for x, y in zip(images, labels)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "PATTERN_DEFAULTS",
    "SharedPattern",
    "check_pattern_params",
    "highpass",
    "estimate_shared_pattern",
    "subtract_shared_pattern",
    "subtract_pattern_list",
]

#: Parameters of the attacker (the defence ``pattern_subtract``).
PATTERN_DEFAULTS: dict[str, Any] = {"grid": 128, "max_period": 16, "sigma": 2.0, "amp_sigma": 8.0, "classwise": True}


def check_pattern_params(params: dict[str, Any]) -> None:
    """Raise ``ValueError`` for attacker parameters outside their ranges."""
    if int(params["grid"]) < 8 or int(params["max_period"]) < 2:
        raise ValueError(f"pattern_subtract needs grid >= 8 and max_period >= 2, got {params}")
    if float(params["sigma"]) <= 0 or float(params["amp_sigma"]) <= 0:
        raise ValueError(f"pattern_subtract needs sigma > 0 and amp_sigma > 0, got {params}")


@dataclass
class SharedPattern:
    """A pattern estimated by :func:`estimate_shared_pattern`.

    Attributes:
        tiles: ``K x C x p x ... x p`` float32, one tile per class (``K == 1`` when not class-wise).
        period: ``p``, in grid cells.
        grid: the longest side of the aligned grid.
        explained: the fraction of the grid residuals' energy the tiles explain.
        null_ratio: ``explained`` over the same statistic at period ``p + 1`` (about 1 when nothing is shared).
    """

    tiles: np.ndarray
    period: int
    grid: int
    explained: float
    null_ratio: float

    @property
    def classwise(self) -> bool:
        return self.tiles.shape[0] > 1


def highpass(image: np.ndarray, sigma: float) -> np.ndarray:
    """``image - gaussian(image, sigma)`` per channel (channel-first, float64)."""
    x = np.asarray(image, dtype=np.float64)
    sig = (0.0,) + (float(sigma),) * (x.ndim - 1)
    return x - ndimage.gaussian_filter(x, sig, mode="reflect")


def _grid_shape(shape: Sequence[int], grid: int) -> tuple[int, ...]:
    f = min(1.0, grid / max(shape))
    return tuple(max(1, int(round(s * f))) for s in shape)


def _resize(a: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Channel-first resize; ``order=1`` smooths first when shrinking (as an anti-aliased resize does)."""
    if tuple(a.shape[1:]) == tuple(shape):
        return a
    zoom = [n / s for n, s in zip(shape, a.shape[1:])]
    if order == 1:
        sig = [0.0] + [max(0.0, (1 / z - 1) / 2) for z in zoom]
        a = ndimage.gaussian_filter(a, sig, mode="reflect") if any(sig) else a
    out = np.stack([ndimage.zoom(c, zoom, order=order, mode="nearest", grid_mode=True) for c in a])
    # zoom may be off by one voxel: crop or pad to the exact shape
    sl = tuple(slice(0, n) for n in shape)
    out = out[(slice(None),) + sl]
    pad = [(0, 0)] + [(0, n - s) for n, s in zip(shape, out.shape[1:])]
    return np.pad(out, pad, mode="edge") if any(p[1] for p in pad) else out


def _cell_index(shape: Sequence[int], period: int) -> np.ndarray:
    """Each grid position's cell in a ``period ** sd`` tile, flattened."""
    idx = np.zeros(tuple(shape), dtype=np.int64)
    for d, n in enumerate(shape):
        ax = (np.arange(n) % period).reshape([-1 if i == d else 1 for i in range(len(shape))])
        idx = idx * period + ax
    return idx


def _fold(residuals: list[np.ndarray], classes: list[np.ndarray], period: int, k: int) -> tuple[np.ndarray, float]:
    """Tiles (``K x C x period**sd``, flat) folded modulo ``period`` and the energy they explain."""
    c = residuals[0].shape[0]
    size = period ** (residuals[0].ndim - 1)
    sums = np.zeros((k, c, size))
    counts = np.zeros((k, size))
    for r, y in zip(residuals, classes):
        cell = (y * size + _cell_index(r.shape[1:], period)).ravel()
        counts += np.bincount(cell, minlength=k * size).reshape(k, size)
        for ch in range(c):
            sums[:, ch] += np.bincount(cell, weights=r[ch].ravel(), minlength=k * size).reshape(k, size)
    tiles = sums / np.maximum(counts, 1)[:, None]
    return tiles, float((tiles**2 * counts[:, None]).sum())


def _grid_case(image: np.ndarray, label: np.ndarray, p: dict[str, Any], k: int) -> tuple[np.ndarray, np.ndarray]:
    shape = _grid_shape(image.shape[1:], int(p["grid"]))
    r = _resize(highpass(image, float(p["sigma"])), shape, order=1)
    y = _resize(np.asarray(label, dtype=np.float64)[:1], shape, order=0)[0].astype(np.int64)
    return r, (np.clip(y, 0, k - 1) if k > 1 else np.zeros_like(y))


def estimate_shared_pattern(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    num_classes: int | None = None,
    **params: Any,
) -> SharedPattern:
    """Estimate the tile a set of images shares (steps 1-3 of the module's docstring).

    Args:
        images: channel-first arrays (``C x spatial``), in the files' intensities.
        labels: their labels (``1 x spatial``), on the same grids.
        num_classes: classes including background (default: the largest label + 1).
        params: overrides of :data:`PATTERN_DEFAULTS`.

    Raises:
        ValueError: no images, or mismatched lists.
    """
    p = {**PATTERN_DEFAULTS, **params}
    check_pattern_params(p)
    if not images or len(images) != len(labels):
        raise ValueError(f"need as many labels as images (at least one), got {len(images)} and {len(labels)}")
    k = int(num_classes or max(int(np.max(y)) for y in labels) + 1) if p["classwise"] else 1
    cases = [_grid_case(np.asarray(x), np.asarray(y), p, k) for x, y in zip(images, labels)]
    residuals, classes = [r for r, _ in cases], [y for _, y in cases]
    total = float(sum((r**2).sum() for r in residuals)) or 1.0
    explained = {q: _fold(residuals, classes, q, k) for q in range(2, int(p["max_period"]) + 2)}
    best = max(e for q, (_, e) in explained.items() if q <= int(p["max_period"]))
    period = min(q for q, (_, e) in explained.items() if q <= int(p["max_period"]) and e >= 0.9 * best)
    tiles, energy = explained[period]
    null = explained[period + 1][1]
    sd = residuals[0].ndim - 1
    shaped = tiles.reshape((k, residuals[0].shape[0]) + (period,) * sd).astype(np.float32)
    return SharedPattern(shaped, period, int(p["grid"]), energy / total, energy / max(null, 1e-30))


def subtract_shared_pattern(image: np.ndarray, label: np.ndarray, pattern: SharedPattern, **params: Any) -> np.ndarray:
    """``image`` minus its locally scaled copy of ``pattern`` (step 4), float32 in the image's range.

    Args:
        image: ``C x spatial``.
        label: ``1 x spatial`` on the same grid.
        pattern: from :func:`estimate_shared_pattern`.
        params: overrides of :data:`PATTERN_DEFAULTS` (``sigma``, ``amp_sigma``).
    """
    p = {**PATTERN_DEFAULTS, **params}
    x = np.asarray(image, dtype=np.float64)
    k = pattern.tiles.shape[0]
    shape = _grid_shape(x.shape[1:], pattern.grid)
    y = _resize(np.asarray(label, dtype=np.float64)[:1], shape, order=0)[0].astype(np.int64)
    y = np.clip(y, 0, k - 1) if k > 1 else np.zeros_like(y)
    size = pattern.period ** (x.ndim - 1)
    flat = pattern.tiles.reshape(k, x.shape[0], size)
    cell = _cell_index(shape, pattern.period)
    on_grid = np.stack([flat[y, ch, cell] for ch in range(x.shape[0])])
    tiled = _resize(on_grid, x.shape[1:], order=1)
    r = highpass(x, float(p["sigma"]))
    sig = (0.0,) + (float(p["amp_sigma"]),) * (x.ndim - 1)
    num = ndimage.gaussian_filter((r * tiled).sum(0, keepdims=True), sig)
    den = ndimage.gaussian_filter((tiled * tiled).sum(0, keepdims=True), sig)
    amp = np.clip(num / np.maximum(den, 1e-12), 0, None)
    out = np.clip(x - amp * tiled, x.min(), x.max())
    return out.astype(np.float32)


def subtract_pattern_list(
    items: Sequence[dict[str, Any]],
    num_classes: int | None = None,
    **params: Any,
) -> tuple[list[dict[str, Any]], SharedPattern]:
    """Read a training list (file paths, as the judge reads them), estimate its shared pattern and subtract it.

    Returns:
        ``(items with channel-first float32 arrays, the pattern)``: the arrays are what the victim then trains on.
    """
    from monai.transforms import LoadImaged

    load = LoadImaged(["image", "label"], image_only=True, dtype=None, ensure_channel_first=True)
    loaded = [load({"image": it["image"], "label": it["label"]}) for it in items]
    images = [np.asarray(d["image"]) for d in loaded]
    labels = [np.asarray(d["label"]) for d in loaded]
    pattern = estimate_shared_pattern(images, labels, num_classes=num_classes, **params)
    out = [{**it, "image": subtract_shared_pattern(x, y, pattern, **params),
            "label": y.astype(np.uint8 if y.max() < 256 else np.int64)}
           for it, x, y in zip(items, images, labels)]
    return out, pattern
