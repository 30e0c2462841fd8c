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

"""EM: sample-wise error-minimising noise (Huang et al., "Unlearnable Examples: Making Personal Data Unexploitable",
ICLR 2021), adapted to segmentation (METHODS.md section 3).

Min-min: each round trains the surrogate UNet on the perturbed training images, stops once its training Dice reaches
``stop_dice``, and otherwise runs ``steps`` PGD *descent* steps of size ``alpha`` on ``DiceCE(f(x + delta), y)`` for
every case, ``|delta|_inf <= epsilon``. Noise starts uniform in ``[-epsilon, epsilon]``. The PGD objective sees the
same random flips and down/up-resizing as the surrogate (ours), so the shortcut survives a victim's preprocessing.

Release stage (``release=True``, ours): the min-min runs through the release path instead, as UMed's release stage
does (:mod:`monai_umed.protectors.em_release`).

Example::

    p = EMProtector(epsilon=8 / 255, rounds=10, steps=10)
    p.fit([{"image": x, "label": y, "case_id": "c0"}, ...])  # x: (C, H, W[, D]) in [0, 1]; y: (1, H, W[, D])
    delta = p.perturbation(x, y, case_id="c0")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from monai_umed.protectors.em_release import EMReleaseStage
from monai_umed.protectors.pgd import SampleWiseProtector, WorkSet, _Batch, pgd
from monai_umed.protectors.refine import cap_energy, grey_levels, psnr_energy

__all__ = ["EMProtector"]


class EMProtector(EMReleaseStage, SampleWiseProtector):
    """Sample-wise error-minimising noise with alternating surrogate training.

    Args:
        epsilon: L-inf budget in normalised units (default ``8/255``).
        alpha: PGD step; default ``epsilon / 10``.
        steps: PGD steps per round (default 10).
        rounds: maximum number of rounds (default 10); ``epochs``, when given, replaces it.
        train_steps: surrogate batches per round; ``None`` (default) = one pass over the training cases.
        stop_dice: stop when the surrogate's Dice on (a fixed subset of up to 64) perturbed training cases reaches
            this value (default 0.99).
        release: run the min-min through the release path (:class:`~monai_umed.protectors.refine.ReleaseRefiner`,
            UMed's release stage; :mod:`monai_umed.protectors.em_release`) instead of EM's work-grid loop (default
            False: the published method).
        min_psnr: per-case PSNR floor (dB) of the written perturbation: an energy budget in the release stage and a
            cap on what ``perturbation`` returns (default None: the L-inf budget alone).
        victim_grids: the grid sizes (longest side) the release path expects a trainer to resize to (``auto``:
            128 in 2D, the native grid in 3D).
        refine_rounds: release-stage min-min rounds (default 12).
        refine_pgd: release-stage PGD steps per case and round (default 2).
        refine_surrogate_epochs: release-stage surrogate passes over the training set per round (default 3).
        refine_reset: re-initialise the release-stage surrogate every this many rounds (default 3; 0: never).
        refine_stop: stop the release stage when its surrogate's training Dice over a round reaches this (0.95).
        refine_size: longest side of the release-stage work grid (``auto``: 128 in 2D, native in 3D; see
            :func:`~monai_umed.protectors.refine.auto_work_size`).
        refine_tile: 0 (default: one refined perturbation per case) or the side, in work-grid cells, of one tile
            shared by every case (:class:`~monai_umed.protectors.refine_shared.SharedTileRefiner`, UMed's 2D default),
            laid on the method's footprint; ``auto`` is UMed's choice (4 in 2D, per case in 3D). A case not seen in
            fit gets the fitted tile.
        refine_tile_classwise: with ``refine_tile``, one tile per label class, each laid on its own class's pixels
            (default True: a tile on every pixel alike would carry no label information).
        refine_tile_background: with ``refine_tile_classwise``, lay a tile on the background class too (default
            True); False spends the energy budget on the labelled structures only.
        refine_texture: None (default: ``epsilon`` on the whole footprint) or ``"b_min,low,high"``: the release
            stage writes on ``epsilon`` times UMed's texture-aware bound ``B`` on the footprint (0 outside the
            labelled structures; the ROI's texture energy mapped from its ``low``-``high`` quantiles to
            ``[b_min, 1]``), so the perturbation hides in the structures' own texture as UMed's shared tile does
            (``0,0.25,0.95``). A shared tile is fitted on the footprint alone and then laid on that map; one
            perturbation per case is refined on it.
        kwargs: see :class:`~monai_umed.protectors.pgd.SampleWiseProtector` (``work_size``, ``batch_size``,
            ``surrogate_channels``, ``lr``, ``augment``, ``resample_prob``, ``resample_scale``, ``spatial_dims``,
            ``seed``, ``epochs``, ``device``).

    Shapes: ``image`` C x spatial (2D or 3D) in ``[0, 1]``, ``label`` 1 x spatial; the returned delta has the image's
    shape. A case not seen in fit gets ``steps`` x (rounds run) PGD steps against the final, frozen surrogate (with
    ``release``: ``steps`` refinement steps through the release path against the release-stage surrogate).
    """

    name = "em"
    resume_bounds = ("epochs", "refine_rounds")

    def __init__(
        self,
        epsilon: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        rounds: int = 10,
        train_steps: int | None = None,
        stop_dice: float = 0.99,
        release: bool = False,
        min_psnr: float | None = None,
        victim_grids: Any = "auto",
        refine_rounds: int = 12,
        refine_pgd: int = 2,
        refine_surrogate_epochs: int = 3,
        refine_reset: int = 3,
        refine_stop: float = 0.95,
        refine_size: int | str | None = "auto",
        refine_tile: int | str = 0,
        refine_tile_classwise: bool | str = True,
        refine_tile_background: bool | str = True,
        refine_texture: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(epsilon=epsilon, alpha=alpha, steps=steps, **kwargs)
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.rounds = int(rounds)
        self.train_steps = None if train_steps is None else int(train_steps)
        self.stop_dice = float(stop_dice)
        self._init_release(release, min_psnr, victim_grids, refine_rounds, refine_pgd, refine_surrogate_epochs,
                           refine_reset, refine_stop, refine_size, refine_tile, refine_tile_classwise,
                           refine_tile_background, refine_texture)

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "rounds": self.rounds,
            "train_steps": self.train_steps,
            "stop_dice": self.stop_dice,
            **self._release_params(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            **self._release_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> "EMProtector":
        """Restore a fitted protector; the release-stage parameters recorded in ``state`` win (a key rebuilds it).

        Raises:
            ValueError: the state belongs to another method.
        """
        self._load_release_params(state.get("params", {}))
        super().load_state_dict(state)
        self._load_release_state(state)
        return self

    # -- fitting ------------------------------------------------------------------------------------------------------
    def fit(
        self,
        samples: Sequence[Mapping[str, Any]],
        *,
        progress: bool = True,
        checkpoint: str | os.PathLike | None = None,
    ) -> "EMProtector":
        """Learn one perturbation per training case (see the module docstring); with ``release`` the release stage
        follows (checkpointed in ``<checkpoint>.refine``, resumed from it).

        Args:
            samples: dicts with ``image`` (C x spatial in [0, 1]), ``label`` (1 x spatial int) and a unique
                ``case_id``.
            progress: show progress bars (and one line per release-stage round).
            checkpoint: fitting checkpoint, resumed from when it exists.
        """
        self.refiner, self.refine_classes = None, None
        super().fit(samples, progress=progress, checkpoint=checkpoint)
        self.levels = grey_levels([s["image"] for s in samples])
        if self.release:
            self.fitted = False
            self._fit_release(samples, checkpoint, progress)
            self.fitted = True
        return self

    def _fit(self, ws: WorkSet, batches: list[list[int]], checkpoint: Path | None, progress: bool) -> None:
        if self.release:
            self._fit_footprint(ws, batches, checkpoint, progress)
            return
        self._run_min_min(ws, batches, checkpoint, progress)

    def _run_min_min(self, ws: WorkSet, batches: list[list[int]], checkpoint: Path | None, progress: bool) -> None:
        """EM's min-min on the work grid (``rounds``, or ``epochs`` when given)."""
        rounds = int(self.epochs) if self.epochs is not None else self.rounds
        self._min_min(ws, batches, rounds, self.train_steps, self.stop_dice, checkpoint, progress)

    # -- perturbation -------------------------------------------------------------------------------------------------
    def perturbation(
        self, image: torch.Tensor, label: torch.Tensor | None = None, case_id: str | None = None
    ) -> torch.Tensor:
        """The case's perturbation (see :meth:`SampleWiseProtector.perturbation`); with ``release`` the refined one
        (a training case) or one refined for ``steps`` steps against the frozen release-stage surrogate (an unseen
        case), as written: clipped, rounded to the data's grey levels and, with ``min_psnr``, energy-capped.

        Raises:
            RuntimeError: the protector was not fitted.
            ValueError: bad shapes, missing label or channels that differ from the training data.
        """
        if self.release:
            return self._release_perturbation(image, label, case_id)
        delta = super().perturbation(image, label, case_id)
        energy = psnr_energy(self.min_psnr)
        if energy is None:
            return delta
        return cap_energy(image.detach().float(), delta.float(), energy, self.levels).to(image.dtype)

    def _unseen_steps(self) -> int:
        return self.steps * max(1, int(self.progress_state.get("pgd_rounds", 0)))

    def _update_mask(self, b: _Batch):
        """Per-step update mask (None: every voxel); SALM overrides it."""
        return None

    def _attack(self, b: _Batch, generator: torch.Generator, steps: int) -> torch.Tensor:
        sur = self.surrogate
        sur.model.eval()

        def objective(x_adv: torch.Tensor) -> torch.Tensor:
            xv, yv = self._views(x_adv, b.y, generator)
            return sur.loss(xv, yv)

        return pgd(objective, b.x, b.delta, epsilon=self.epsilon, alpha=self.alpha, steps=steps, descend=True,
                   update_mask=self._update_mask(b), valid=b.valid)
