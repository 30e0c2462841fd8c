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

"""LSP: linearly separable synthetic perturbations (Yu et al., "Availability Attacks Create Shortcuts", KDD 2022),
adapted to segmentation (METHODS.md section 3). Surrogate-free.

One fixed random pattern per label class. As in the paper, a pattern is a grid of constant patches: the patch values
(``grid^d`` patches per channel) are a point of a class cluster drawn like scikit-learn's ``make_classification``
with ``class_sep`` (a random hypercube vertex scaled by ``class_sep`` plus unit Gaussian noise), upsampled to
``patch_size`` pixels per patch (``patch_size^3`` voxels in 3D). Each pattern is scaled to the paper's L2 norm,
``sqrt(d) * epsilon`` over its ``d`` entries (root mean square ``epsilon``), then clipped to the L-inf budget
``epsilon``. The pattern of a class tiles the image; each voxel takes the pattern of its own label class (UMed's
adaptation: the ROI and the background carry different patterns).

The patterns depend only on ``(seed, class, channels)``, so the perturbation of a case depends only on its label map
and its shape, identical for every case and independent of call order.

Example::

    p = LSPProtector(epsilon=8 / 255, patch_size=8)
    delta = p.perturbation(image, label, case_id="c0")  # image: (C, H, W[, D]); label: (1, H, W[, D])
"""

from __future__ import annotations

import math
from typing import Any

import torch

from monai_umed.protectors.base import Protector
from monai_umed.protectors.pgd import linf_bound

__all__ = ["LSPProtector"]


class LSPProtector(Protector):
    """Per-class linearly separable patch patterns.

    Args:
        epsilon: L-inf budget in normalised units (default ``8/255``); also sets the L2 scale.
        patch_size: side of a constant patch in pixels/voxels (default 8).
        grid: patches per side of one pattern tile (default 4, as on 32x32 CIFAR images with 8x8 patches).
        class_sep: distance scale between class clusters (default 10, the paper's value).
        kwargs: see :class:`~monai_umed.protectors.base.Protector` (``epochs`` is ignored).
    """

    name = "lsp"
    fits = False

    def __init__(self, epsilon: float = 8 / 255, patch_size: int = 8, grid: int = 4, class_sep: float = 10.0,
                 **kwargs: Any) -> None:
        super().__init__(epsilon=epsilon, **kwargs)
        if patch_size < 1 or grid < 1:
            raise ValueError(f"patch_size and grid must be >= 1, got {patch_size}, {grid}")
        self.patch_size = int(patch_size)
        self.grid = int(grid)
        self.class_sep = float(class_sep)
        self._cache: dict[tuple[int, int, int], torch.Tensor] = {}

    def params(self) -> dict[str, Any]:
        return {**super().params(), "patch_size": self.patch_size, "grid": self.grid, "class_sep": self.class_sep}

    def pattern(self, cls: int, channels: int, spatial_dims: int) -> torch.Tensor:
        """The tile of class ``cls``: ``channels x (grid * patch_size)^spatial_dims``, float32, ``|.| <= epsilon``."""
        key = (int(cls), int(channels), int(spatial_dims))
        if key not in self._cache:
            g = self.generator(f"class{cls}", f"lsp|C{channels}|D{spatial_dims}")
            cells = (channels,) + (self.grid,) * spatial_dims
            d = math.prod(cells)
            vertex = torch.randint(0, 2, (d,), generator=g, dtype=torch.int64).double() * 2 - 1
            point = vertex * self.class_sep + torch.randn(d, generator=g, dtype=torch.float64)
            point = point * (math.sqrt(d) * self.epsilon / point.norm().clamp_min(1e-12))  # L2 = sqrt(d) * eps
            tile = point.reshape(cells)
            for ax in range(1, spatial_dims + 1):
                tile = tile.repeat_interleave(self.patch_size, dim=ax)  # constant patches (L2 per entry unchanged)
            e = linf_bound(self.epsilon, torch.float32)
            self._cache[key] = tile.float().clamp(-e, e)
        return self._cache[key]

    def perturbation(
        self, image: torch.Tensor, label: torch.Tensor | None = None, case_id: str | None = None
    ) -> torch.Tensor:
        self._check_inputs(image, label)
        sd = image.ndim - 1
        shape = tuple(image.shape[1:])
        lab = torch.as_tensor(label).cpu().long()[0]
        delta = torch.zeros((image.shape[0],) + shape, dtype=torch.float32)
        for c in torch.unique(lab).tolist():
            tile = self.pattern(int(c), int(image.shape[0]), sd)
            reps = (1,) + tuple(-(-s // t) for s, t in zip(shape, tile.shape[1:]))
            full = tile.repeat(reps)[(slice(None),) + tuple(slice(0, s) for s in shape)]
            delta = torch.where((lab == c)[None], full, delta)
        return delta.to(device=image.device, dtype=image.dtype if image.is_floating_point() else torch.float32)
