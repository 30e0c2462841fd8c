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

"""SALM: sparsity-aware local masking (Sun et al., "Medical Unlearnable Examples: Securing Medical Data from
Unauthorized Training via Sparsity-Aware Local Masking", arXiv 2403.10573), METHODS.md section 2.

Sample-wise error-minimising noise (EM's min-min, :mod:`monai_umed.protectors.em`) in which every PGD step updates only
a mask ``M_t``:

- sparsity mask ``S = dilate(x > tau, 1)`` (tissue, not the empty background; ``x > tau`` on any channel, dilation
  with the full 3x3 / 3x3x3 neighbourhood);
- significance: the top ``k`` fraction of ``|grad_delta L|`` (summed over channels) inside ``S``, recomputed at every
  step, so ``M_t = S ∧ top_k(|grad|)``;
- ``delta <- Proj_eps(delta - alpha * sign(grad) * M_t)``; the noise starts at 0, so a voxel never selected stays
  exactly 0.

The union of the ``M_t`` of a case is kept (:attr:`SALMProtector.masks`). On the file's grid (when the work grid is
reduced) the delta is upsampled and multiplied by the nearest-neighbour upsampled union and by ``S`` computed on the
file's own image, so the file is perturbed only inside both. For a case not seen in fit the support of its optimised
delta plays the union's role.

Release stage (``release=True``, ours; the machinery is EM's, :mod:`monai_umed.protectors.em_release`): SALM first
runs its own min-min as above to find its sparse mask, then refines one perturbation per case through the release path
(:class:`~monai_umed.protectors.refine.ReleaseRefiner`, shared with UMed) inside the budget map ``epsilon`` times that
mask (:meth:`SALMProtector.selection_mask`: the union of the top-``k`` selections inside the tissue mask ``S``, at
native resolution), with an optional per-case PSNR floor ``min_psnr``; the written perturbation stays exactly 0
outside the mask. A case not seen in fit gets its mask from SALM's per-case optimisation, then ``steps`` refinement
steps inside it. From the command line: ``--param salm.release=true --param salm.min_psnr=50``.

Example::

    p = SALMProtector(epsilon=8 / 255, k=0.1, tau=0.02)
    p.fit(samples)  # dicts with image (C, H, W[, D]) in [0, 1], label (1, H, W[, D]), case_id
    delta = p.perturbation(image, label, case_id="c0")
    assert not delta[:, ~p.selection_mask(image, "c0")[0]].any()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from monai_umed.protectors.em import EMProtector
from monai_umed.protectors.pgd import WorkSet, _Batch, dilate, upsample_delta

__all__ = ["SALMProtector", "tissue_mask", "topk_mask"]


def tissue_mask(x: torch.Tensor, tau: float) -> torch.Tensor:
    """SALM's sparsity mask of a batch (B x C x spatial): ``dilate(any_c(x > tau), 1)``, B x 1 x spatial bool."""
    return dilate((x > tau).any(1, keepdim=True), 1)


def topk_mask(score: torch.Tensor, region: torch.Tensor, k: float) -> torch.Tensor:
    """Per sample, the top ``k`` fraction (of the region's size, at least one voxel) of ``score`` inside ``region``.

    Args:
        score: B x 1 x spatial, non-negative.
        region: B x 1 x spatial bool.
        k: fraction in ``(0, 1]``.

    Returns:
        B x 1 x spatial bool; voxels with a zero score are never selected.
    """
    b = score.shape[0]
    flat = (score * region).reshape(b, -1)
    counts = region.reshape(b, -1).sum(1)
    kk = (counts.double() * k).ceil().long().clamp(1, flat.shape[1])
    thr = flat.sort(1, descending=True).values.gather(1, (kk - 1)[:, None])
    sel = (flat >= thr) & (flat > 0) & region.reshape(b, -1)
    return sel.reshape(score.shape)


class SALMProtector(EMProtector):
    """Sample-wise error-minimising noise restricted to significant tissue voxels.

    Args:
        epsilon: L-inf budget in normalised units (default ``8/255``).
        tau: tissue threshold on the normalised image (default 0.02).
        k: fraction of tissue voxels updated per step (default 0.3; the paper's 0.1 with ``k=0.1``).
        release: the release stage (default on): SALM's mask is the footprint of a perturbation refined through the
            release path. The defaults below are SALM's best configuration on Kvasir-SEG (eighth session: victims of
            five seeds at 7.41 % mean Dice at 52.90 dB); ``release=false`` (and ``min_psnr=none``, ``k=0.1``) gives
            the published sample-wise SALM.
        min_psnr: per-case PSNR floor of the written files (default 50 dB).
        refine_rounds: release-stage rounds (default 6).
        refine_tile: the shared tile's side (``auto``: 4 work-grid cells in 2D, one perturbation per case in 3D).
        refine_tile_background: a second tile for the background (default off: the tile lies on the mask only).
        refine_texture: the texture-aware bound the tile is written on (default ``0,0.25,0.95``: nothing on the
            flattest quarter of the mask).
        alpha: PGD step; default ``epsilon / 10``.
        steps: PGD steps per round (default 10).
        rounds: maximum rounds (default 10); ``epochs``, when given, replaces it.
        stop_dice: stop at this surrogate training Dice (default 0.99).
        kwargs: see :class:`~monai_umed.protectors.em.EMProtector` (among them the rest of the release stage:
            ``victim_grids``, ``refine_pgd``, ``refine_surrogate_epochs``, ``refine_reset``, ``refine_stop``,
            ``refine_size``).
    """

    name = "salm"

    def __init__(
        self,
        epsilon: float = 8 / 255,
        tau: float = 0.02,
        k: float = 0.3,
        release: bool | str = True,
        min_psnr: float | str | None = 50.0,
        refine_rounds: int = 6,
        refine_tile: int | str = "auto",
        refine_tile_background: bool | str = False,
        refine_texture: Any = "0,0.25,0.95",
        **kwargs: Any,
    ) -> None:
        super().__init__(epsilon=epsilon, release=release, min_psnr=min_psnr, refine_rounds=refine_rounds,
                         refine_tile=refine_tile, refine_tile_background=refine_tile_background,
                         refine_texture=refine_texture, **kwargs)
        if not 0.0 < k <= 1.0:
            raise ValueError(f"k must lie in (0, 1], got {k}")
        self.tau = float(tau)
        self.k = float(k)
        self.masks: dict[str, torch.Tensor] = {}

    def params(self) -> dict[str, Any]:
        return {**super().params(), "tau": self.tau, "k": self.k}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "masks": {k: v.cpu() for k, v in self.masks.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> "SALMProtector":
        super().load_state_dict(state)
        self.masks = {str(k): v for k, v in state.get("masks", {}).items()}
        return self

    def fit(self, samples, *, progress: bool = True, checkpoint=None) -> "SALMProtector":
        self.masks = {}
        return super().fit(samples, progress=progress, checkpoint=checkpoint)

    def _init_delta(self, x: torch.Tensor, case_id: str) -> torch.Tensor:
        return torch.zeros_like(x)

    def _fit_footprint(self, ws: WorkSet, batches: list[list[int]], checkpoint: Path | None, progress: bool) -> None:
        """Before the release stage: SALM's own min-min, whose selections (:attr:`masks`) are its footprint."""
        self._run_min_min(ws, batches, checkpoint, progress)

    def release_footprint(self, image: torch.Tensor, label: torch.Tensor | None, case_id: str | None) -> torch.Tensor:
        """SALM's sparse mask of a case (1 x spatial bool, native grid, :meth:`selection_mask`); a case not seen in
        fit is optimised by SALM first (against its frozen surrogate) and the support of its delta is used.

        Args:
            image: C x spatial image in ``[0, 1]``.
            label: its 1 x spatial labels (needed for an unseen case).
            case_id: the case.
        """
        if case_id is not None and case_id in self.deltas:
            return self.selection_mask(image, case_id)
        delta_w = self._optimise_unseen(image, label, case_id)
        return self.selection_mask(image, case_id, delta_w)

    def _update_mask(self, b: _Batch):
        region = tissue_mask(b.x, self.tau) & (b.valid > 0)
        b.selected = torch.zeros_like(region)

        def mask(grad: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
            m = topk_mask(grad.abs().sum(1, keepdim=True), region, self.k)
            b.selected |= m
            return m.to(grad.dtype)

        return mask

    def _store(self, ws: WorkSet, b: _Batch, delta: torch.Tensor) -> None:
        super()._store(ws, b, delta)
        if b.selected is None:
            return
        for j, i in enumerate(b.idx):
            crop = (slice(None),) + tuple(slice(0, s) for s in b.shapes[j])
            m = self._held(b.selected[j][crop].detach())
            cid = ws.case_ids[i]
            self.masks[cid] = m if cid not in self.masks else (self.masks[cid] | m)

    def _to_host(self) -> None:
        super()._to_host()
        self.masks = {k: v.cpu() for k, v in self.masks.items()}

    def _work_mask(self, delta_w: torch.Tensor, case_id: str | None) -> torch.Tensor:
        if case_id is not None and case_id in self.masks:
            return self.masks[case_id].to(delta_w.device)
        return (delta_w != 0).any(0, keepdim=True)

    def selection_mask(self, image: torch.Tensor, case_id: str | None, delta_w: torch.Tensor | None = None) -> torch.Tensor:
        """The voxels of ``image`` (file grid, 1 x spatial bool) that SALM may perturb for this case: the union of
        the selected voxels (nearest-neighbour upsampled) inside the tissue mask ``S`` of ``image``.

        Args:
            image: the case's image (C x spatial).
            case_id: a training case, or None / an unseen case together with its work-grid ``delta_w``.
            delta_w: the work-grid perturbation of an unseen case.
        """
        if delta_w is None:
            if case_id not in self.deltas:
                raise KeyError(f"salm: case {case_id!r} was not seen in fit; pass its work-grid delta")
            delta_w = self.deltas[case_id].float()
        sel = upsample_delta(self._work_mask(delta_w, case_id).float(), image.shape[1:], mode="nearest") > 0
        return sel.to(image.device) & tissue_mask(image[None].float(), self.tau)[0]

    def _native_delta(self, delta_w: torch.Tensor, image: torch.Tensor, case_id: str | None) -> torch.Tensor:
        mask = self.selection_mask(image, case_id, delta_w)
        return upsample_delta(delta_w.float(), image.shape[1:]) * mask
