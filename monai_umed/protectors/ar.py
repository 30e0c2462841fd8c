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

"""AR: autoregressive perturbations (Sandoval-Segura et al., "Autoregressive Perturbations for Data Poisoning",
NeurIPS 2022), adapted to segmentation (METHODS.md section 3). Surrogate-free.

One autoregressive (AR) process per label class. A process has fixed random coefficients on a causal window of
``window^d - 1`` neighbours (the ``window x window`` block, or ``window^3`` in 3D, whose last element is the voxel being
generated); a field the size of the image is generated from Gaussian start values on the leading border and unit
Gaussian innovations (ours: keeps the field stationary), channel by channel. The coefficients are normalised to an L1
norm of ``l1`` (< 1, so the process is stable). The field is scaled so its ``quantile`` of ``|value|`` equals
``epsilon`` and clipped to ``[-epsilon, epsilon]`` (the L-inf budget). The background and every foreground class are
filled from their own process.

Generation is vectorised along anti-diagonals (hyperplanes of constant coordinate sum: every neighbour in the causal
window has a smaller sum). Fields depend only on ``(seed, class, channels, image shape)``, so the perturbation of a
case depends only on its label map and its shape, independent of call order.

Example::

    p = ARProtector(epsilon=8 / 255)
    delta = p.perturbation(image, label, case_id="c0")  # image: (C, H, W[, D]); label: (1, H, W[, D])
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
import torch

from monai_umed.protectors.base import Protector
from monai_umed.protectors.pgd import linf_bound

__all__ = ["ARProtector", "ar_field"]


def ar_field(shape: Sequence[int], coefficients: np.ndarray, noise: np.ndarray, window: int = 3) -> np.ndarray:
    """Generate one AR field.

    Args:
        shape: spatial shape of the output.
        coefficients: ``window^d - 1`` coefficients, ordered like ``itertools.product(range(-window+1, 1), repeat=d)``
            without the all-zero offset.
        noise: standard normal array of shape ``shape + (window - 1)`` per axis: the start values on the leading
            border and the innovations elsewhere.
        window: side of the causal window.

    Returns:
        float64 array of ``shape``.
    """
    sd = len(shape)
    w = window - 1
    padded = tuple(int(s) + w for s in shape)
    if noise.shape != padded:
        raise ValueError(f"noise must have shape {padded}, got {noise.shape}")
    field = noise.astype(np.float64).ravel().copy()
    strides = np.array([int(np.prod(padded[d + 1 :])) for d in range(sd)], dtype=np.int64)
    offsets = [o for o in itertools.product(range(-w, 1), repeat=sd) if any(o)]
    flat_off = np.array([int(np.dot(o, strides)) for o in offsets], dtype=np.int64)
    coords = np.indices(tuple(int(s) for s in shape)).reshape(sd, -1) + w
    flat = (coords * strides[:, None]).sum(0)
    level = coords.sum(0)
    order = np.argsort(level, kind="stable")
    flat, level = flat[order], level[order]
    bounds = np.flatnonzero(np.diff(level)) + 1
    for idx in np.split(flat, bounds):
        field[idx] = field[idx[:, None] + flat_off[None, :]] @ coefficients + field[idx]
    out = field.reshape(padded)
    return out[tuple(slice(w, None) for _ in range(sd))]


class ARProtector(Protector):
    """Per-class autoregressive perturbations.

    Args:
        epsilon: L-inf budget in normalised units (default ``8/255``).
        window: causal window side (default 3).
        l1: L1 norm of the coefficients (default 0.9; below 1 for a stable process).
        quantile: the quantile of ``|field|`` mapped to ``epsilon`` before clipping (default 0.99).
        cache_size: generated fields kept in memory (fields depend on the image shape).
        kwargs: see :class:`~monai_umed.protectors.base.Protector` (``epochs`` is ignored).
    """

    name = "ar"
    fits = False

    def __init__(self, epsilon: float = 8 / 255, window: int = 3, l1: float = 0.9, quantile: float = 0.99,
                 cache_size: int = 16, **kwargs: Any) -> None:
        super().__init__(epsilon=epsilon, **kwargs)
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        if not 0.0 < l1 < 1.0:
            raise ValueError(f"l1 must lie in (0, 1) for a stable process, got {l1}")
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must lie in (0, 1], got {quantile}")
        self.window = int(window)
        self.l1 = float(l1)
        self.quantile = float(quantile)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def params(self) -> dict[str, Any]:
        return {**super().params(), "window": self.window, "l1": self.l1, "quantile": self.quantile}

    def coefficients(self, cls: int, spatial_dims: int) -> np.ndarray:
        """The fixed coefficients of class ``cls`` (L1 norm ``l1``)."""
        g = self.generator(f"class{cls}", f"ar|coef|D{spatial_dims}|W{self.window}")
        a = torch.randn(self.window**spatial_dims - 1, generator=g, dtype=torch.float64).numpy()
        return a * (self.l1 / np.abs(a).sum())

    def field(self, cls: int, channels: int, shape: Sequence[int]) -> torch.Tensor:
        """The scaled, clipped field of class ``cls`` for an image of ``channels x shape`` (float32)."""
        shape = tuple(int(s) for s in shape)
        key = (int(cls), int(channels), shape)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        coef = self.coefficients(cls, len(shape))
        g = self.generator(f"class{cls}", f"ar|noise|C{channels}|{shape}|W{self.window}")
        padded = tuple(s + self.window - 1 for s in shape)
        out = np.empty((channels,) + shape, dtype=np.float64)
        for c in range(channels):
            noise = torch.randn(padded, generator=g, dtype=torch.float64).numpy()
            f = ar_field(shape, coef, noise, self.window)
            scale = float(np.quantile(np.abs(f), self.quantile)) or 1.0
            out[c] = np.clip(f * (self.epsilon / scale), -self.epsilon, self.epsilon)
        e = linf_bound(self.epsilon, torch.float32)
        t = torch.from_numpy(out).float().clamp(-e, e)
        self._cache[key] = t
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return t

    def perturbation(
        self, image: torch.Tensor, label: torch.Tensor | None = None, case_id: str | None = None
    ) -> torch.Tensor:
        self._check_inputs(image, label)
        shape = tuple(image.shape[1:])
        lab = torch.as_tensor(label).cpu().long()[0]
        delta = torch.zeros((image.shape[0],) + shape, dtype=torch.float32)
        for c in torch.unique(lab).tolist():
            delta = torch.where((lab == c)[None], self.field(int(c), int(image.shape[0]), shape), delta)
        return delta.to(device=image.device, dtype=image.dtype if image.is_floating_point() else torch.float32)
