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

Example::

    p = EMProtector(epsilon=8 / 255, rounds=10, steps=10)
    p.fit([{"image": x, "label": y, "case_id": "c0"}, ...])  # x: (C, H, W[, D]) in [0, 1]; y: (1, H, W[, D])
    delta = p.perturbation(x, y, case_id="c0")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from monai_umed.protectors.pgd import SampleWiseProtector, WorkSet, _Batch, pgd

__all__ = ["EMProtector"]


class EMProtector(SampleWiseProtector):
    """Sample-wise error-minimising noise with alternating surrogate training.

    Args:
        epsilon: L-inf budget in normalised units (default ``8/255``).
        alpha: PGD step; default ``epsilon / 10``.
        steps: PGD steps per round (default 10).
        rounds: maximum number of rounds (default 10); ``epochs``, when given, replaces it.
        train_steps: surrogate batches per round; ``None`` (default) = one pass over the training cases.
        stop_dice: stop when the surrogate's Dice on (a fixed subset of up to 64) perturbed training cases reaches
            this value (default 0.99).
        kwargs: see :class:`~monai_umed.protectors.pgd.SampleWiseProtector` (``work_size``, ``batch_size``,
            ``surrogate_channels``, ``lr``, ``augment``, ``resample_prob``, ``resample_scale``, ``spatial_dims``,
            ``seed``, ``epochs``, ``device``).

    Shapes: ``image`` C x spatial (2D or 3D) in ``[0, 1]``, ``label`` 1 x spatial; the returned delta has the image's
    shape. A case not seen in fit gets ``steps`` x (rounds run) PGD steps against the final, frozen surrogate.
    """

    name = "em"

    def __init__(
        self,
        epsilon: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        rounds: int = 10,
        train_steps: int | None = None,
        stop_dice: float = 0.99,
        **kwargs: Any,
    ) -> None:
        super().__init__(epsilon=epsilon, alpha=alpha, steps=steps, **kwargs)
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.rounds = int(rounds)
        self.train_steps = None if train_steps is None else int(train_steps)
        self.stop_dice = float(stop_dice)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "rounds": self.rounds, "train_steps": self.train_steps, "stop_dice": self.stop_dice}

    def _fit(self, ws: WorkSet, batches: list[list[int]], checkpoint: Path | None, progress: bool) -> None:
        rounds = int(self.epochs) if self.epochs is not None else self.rounds
        self._min_min(ws, batches, rounds, self.train_steps, self.stop_dice, checkpoint, progress)

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
