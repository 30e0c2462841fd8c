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

"""UMed's masks and budget maps: the regions of a case, the per-voxel budget and its energy scale.

For one case (image and label, at native resolution) this mixin computes

1. the regions: the contour band ``M_c`` (:func:`~monai_umed.masks.contour_band`, empty in ``texture`` mode) and
   the ROI ``M_roi`` (:func:`~monai_umed.masks.roi_mask`);
2. the budget maps ``(a_c, a_t, limit)``: ``a_c = eps_c * M_c``, ``a_t = eps_t * B * M_roi`` with the texture-aware
   bound ``B`` (:func:`~monai_umed.masks.texture_bound`, on the whole image's :func:`~monai_umed.masks.texture_stats`
   so that a crop gets the same map), and ``limit`` = ``eps_c`` on the band, ``eps_t * B`` elsewhere in the ROI, 0
   outside; the texture bound is the fitting one (``b_min``, ``texture_quantiles``) or, once a shared tile is fitted,
   the one it is written on (``tile_bound``);
3. the per-case energy scale ``s <= 1`` that keeps the whole-image PSNR of the largest admissible perturbation at
   ``min_psnr`` or above, and the limit floored to whole grey levels;
4. the projection of the generators' raw outputs onto that budget and onto ``[0, 1]``
   (:meth:`UMedBudgetMaps._combine`).

The mixin relies on :class:`~monai_umed.protectors.umed.UMedProtector`'s settings (see :class:`UMedBudgetMaps`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from monai_umed.blocks import BLOCK
from monai_umed.masks import contour_band, roi_mask, spacing_of, texture_bound, texture_stats
from monai_umed.protectors.refine import auto_tile, auto_tile_bound, floor_to_levels, psnr_energy
from monai_umed.protectors.refine_shared import SharedTileRefiner

__all__ = ["UMedBudgetMaps"]


class UMedBudgetMaps:
    """Mixin of :class:`~monai_umed.protectors.umed.UMedProtector`: the per-case masks and budget maps.

    Its methods read these attributes of :class:`~monai_umed.protectors.umed.UMedProtector` (see its ``Args``):
    ``mode``, ``epsilon_c``, ``epsilon_t``, ``contour_radius``, ``contour_radius_mm``, ``texture_window``,
    ``b_min``, ``texture_quantiles``, ``tile_bound``, ``refine_tile``, ``min_psnr``, ``refiner`` (from
    :class:`~monai_umed.protectors.umed_release.UMedReleaseStage`), ``_levels_resolved`` (the resolved
    ``quantise_levels``) and the method ``_sd()`` (the spatial dimensions).
    """

    # -- resolved settings -----------------------------------------------------------------------------------------
    def _texture_bound(self) -> tuple[float, tuple[float, float]]:
        """``(b_min, texture_quantiles)`` of the texture bound in use: once a shared tile is fitted, the bound it is
        written on (``tile_bound``, :func:`~monai_umed.protectors.refine.auto_tile_bound`); before that, and for
        every other perturbation, the fitting bound (``b_min``, ``texture_quantiles``)."""
        if isinstance(self.refiner, SharedTileRefiner) and self.refiner.pattern is not None:
            written = auto_tile_bound(self.tile_bound, auto_tile(self._sd(), self.refine_tile))
            if written is not None:
                return written
        return self.b_min, self.texture_quantiles

    # -- masks and budget ------------------------------------------------------------------------------------------
    def _regions(
        self, image: torch.Tensor, label: torch.Tensor, spacing: Sequence[float] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M_c, M_roi)`` of one case (``1 x spatial`` bool, CPU); the band is empty in ``texture`` mode."""
        lab = torch.as_tensor(label).detach().cpu()
        if spacing is None:
            spacing = spacing_of(image)
        if spacing is not None:
            spacing = tuple(float(v) for v in spacing)[: self._sd()]
        m_roi = roi_mask(lab)
        if self.mode == "texture":
            return torch.zeros_like(m_roi), m_roi
        return contour_band(lab, radius=self.contour_radius, spacing=spacing, radius_mm=self.contour_radius_mm), m_roi

    def _maps(
        self,
        img: torch.Tensor,
        lab: torch.Tensor,
        m_c: torch.Tensor,
        m_roi: torch.Tensor,
        stats: tuple[torch.Tensor, torch.Tensor] | None,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a_c, a_t, limit)`` for an image (or a crop of one, with the whole image's texture ``stats``)."""
        return self._scaled(*self._unit_maps(img, lab, m_c, m_roi, stats), scale)

    def _unit_maps(
        self,
        img: torch.Tensor,
        lab: torch.Tensor,
        m_c: torch.Tensor,
        m_roi: torch.Tensor,
        stats: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a_c, a_t, limit)`` at energy scale 1, not floored to grey levels; three distinct tensors (the callers
        scale them in place, so a big volume holds each map once)."""
        if self.mode == "contour" or stats is None:
            a_t = torch.zeros_like(img)
        else:  # the bound is not needed afterwards: a_t takes its memory
            b_min = self._texture_bound()[0]
            a_t = texture_bound(img, lab, self.texture_window, b_min, stats=stats).mul_(self.epsilon_t)
        if self.mode == "texture":
            return torch.zeros_like(img), a_t, a_t.clone()
        mc_f = m_c.to(torch.float32).expand_as(img)
        a_c = self.epsilon_c * mc_f
        limit = torch.where(mc_f > 0, a_c, a_t)
        return a_c, a_t, limit

    def _scaled(
        self, a_c: torch.Tensor, a_t: torch.Tensor, limit: torch.Tensor, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The maps of :meth:`_unit_maps` times the energy scale, the limit floored to whole grey levels (in place)."""
        if scale != 1.0:
            a_c.mul_(scale), a_t.mul_(scale), limit.mul_(scale)
        return a_c, a_t, floor_to_levels(limit, self._levels_resolved, inplace=True)

    def _texture_stats(self, img: torch.Tensor, lab: torch.Tensor,
                       m_roi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The texture-energy levels of :func:`texture_stats` (None when the texture map is not used)."""
        if self.mode != "contour" and bool(m_roi.any()):
            return texture_stats(img, lab, self.texture_window, self._texture_bound()[1])
        return None

    def _energy_scale(self, limit: torch.Tensor, voxels: int | None = None) -> float:
        """The scale ``s <= 1`` that keeps the whole-image PSNR of the largest admissible perturbation (the unscaled,
        unfloored ``limit``) at ``min_psnr`` or above; 1 without ``min_psnr``. The mean square is summed in float64
        a block at a time, so a big volume needs no float64 copy of itself. ``voxels``: the whole image's spatial
        voxels when ``limit`` is a crop outside which the map is 0 (None: ``limit`` is the whole image)."""
        if self.min_psnr is None:
            return 1.0
        flat = limit.reshape(-1)
        total = sum(float(part.double().square_().sum()) for part in flat.split(BLOCK))
        n = flat.numel() if voxels is None else int(voxels) * int(limit.shape[0])
        mse = total / max(n, 1)
        target = psnr_energy(self.min_psnr)
        return math.sqrt(target / mse) if mse > target else 1.0

    def _case_stats(
        self, img: torch.Tensor, lab: torch.Tensor, m_c: torch.Tensor, m_roi: torch.Tensor, voxels: int | None = None
    ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, float]:
        """Whole-image quantities of a case: the texture-energy levels of :func:`texture_stats` and the energy
        scale ``s <= 1`` that keeps the whole-image PSNR of the largest admissible perturbation >= ``min_psnr``.
        Both may be computed on a crop that holds the ROI, its band and a margin of context (``voxels``: the whole
        image's spatial voxels): the levels are quantiles over the ROI and the map is 0 outside the band and ROI."""
        stats = self._texture_stats(img, lab, m_roi)
        if self.min_psnr is None:
            return stats, 1.0
        return stats, self._energy_scale(self._unit_maps(img, lab, m_c, m_roi, stats)[2], voxels)

    def _case_maps(
        self, image: torch.Tensor, label: torch.Tensor, spacing: Sequence[float] | None = None, full: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-case maps at native resolution, all on the CPU: ``(M_c, M_roi, a_c, a_t, limit)``.

        ``delta = clamp(a_c * tanh(F_c) + a_t * tanh(F_t), -limit, limit)`` with ``a_c = s * eps_c * M_c``,
        ``a_t = s * eps_t * B * M_roi`` and ``limit`` = ``s * eps_c`` on the band, ``s * eps_t * B`` elsewhere in
        the ROI, 0 outside. ``s <= 1`` is the per-case energy scale that keeps the whole-image PSNR of the largest
        admissible perturbation at ``min_psnr`` or above (``full``: ``s = 1``, the refinement's map, whose energy is
        bounded separately); with ``quantise_levels`` the limit is floored to whole grey levels, so the written
        (rounded) perturbation stays inside it.
        """
        img = torch.as_tensor(image).detach().cpu().float()
        lab = torch.as_tensor(label).detach().cpu()
        m_c, m_roi = self._regions(image, lab, spacing)
        a_c, a_t, limit = self._unit_maps(img, lab, m_c, m_roi, self._texture_stats(img, lab, m_roi))
        return (m_c, m_roi) + self._scaled(a_c, a_t, limit, 1.0 if full else self._energy_scale(limit))

    @staticmethod
    def _combine(
        x: torch.Tensor, raw_c: torch.Tensor, raw_t: torch.Tensor, a_c: torch.Tensor, a_t: torch.Tensor,
        limit: torch.Tensor,
    ) -> torch.Tensor:
        """``delta`` from the generators' raw outputs, projected on the budget and on ``[0, 1]`` (batched)."""
        delta = a_c * torch.tanh(raw_c) + a_t * torch.tanh(raw_t)
        delta = torch.maximum(torch.minimum(delta, limit), -limit)
        return (x + delta).clamp(0.0, 1.0) - x
