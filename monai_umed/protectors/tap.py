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

"""TAP: targeted adversarial poisoning (Fowl et al., "Adversarial Examples Make Strong Poisons", NeurIPS 2021),
adapted to segmentation (METHODS.md section 3).

A surrogate UNet is trained on the *clean* training images and frozen; each case then gets a targeted PGD
perturbation that minimises the cross-entropy of the surrogate toward a permuted label map (binary: foreground and
background swapped; K+1 classes: ``(y + 1) mod (K + 1)``), ``|delta|_inf <= epsilon``. The paper runs 250 steps;
here ``steps`` is a parameter (default 40, for CPU). The PGD objective sees random flips and down/up-resizing (ours).

Example::

    p = TAPProtector(epsilon=8 / 255, steps=40)
    p.fit(samples)  # dicts with image (C, H, W[, D]) in [0, 1], label (1, H, W[, D]), case_id
    delta = p.perturbation(image, label, case_id="c0")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from monai_umed.protectors.pgd import SampleWiseProtector, WorkSet, _Batch, pgd, targeted_labels

__all__ = ["TAPProtector"]


class TAPProtector(SampleWiseProtector):
    """Targeted adversarial poisoning against a frozen surrogate trained on clean data.

    Args:
        epsilon: L-inf budget in normalised units (default ``8/255``).
        alpha: PGD step; default ``epsilon / 10``.
        steps: targeted PGD steps per case (default 40; the paper uses 250).
        pretrain_epochs: clean training epochs of the surrogate (default 10); ``epochs``, when given, replaces it.
        kwargs: see :class:`~monai_umed.protectors.pgd.SampleWiseProtector`.

    The fitting checkpoint is written after every surrogate epoch and after every tenth of the PGD batches.
    A case not seen in fit gets the same ``steps`` of targeted PGD against the frozen surrogate.
    """

    name = "tap"

    def __init__(self, epsilon: float = 8 / 255, alpha: float | None = None, steps: int = 40,
                 pretrain_epochs: int = 10, **kwargs: Any) -> None:
        super().__init__(epsilon=epsilon, alpha=alpha, steps=steps, **kwargs)
        if pretrain_epochs < 1:
            raise ValueError(f"pretrain_epochs must be >= 1, got {pretrain_epochs}")
        self.pretrain_epochs = int(pretrain_epochs)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "pretrain_epochs": self.pretrain_epochs}

    def _epochs(self) -> int:
        return int(self.epochs) if self.epochs is not None else self.pretrain_epochs

    def _fit(self, ws: WorkSet, batches: list[list[int]], checkpoint: Path | None, progress: bool) -> None:
        done = int(self.progress_state.get("pretrain_epoch", 0))
        self._pretrain(ws, batches, self._epochs(), checkpoint, progress, snapshots=self._snapshot_epochs())
        if int(self.progress_state.get("pretrain_epoch", 0)) != done and self.progress_state.get("attacked"):
            # a resumed run trained the surrogate further: the perturbations made against the old one are stale
            self.deltas, self.progress_state["attacked"] = {}, 0
        self._after_pretrain()
        self._ensure_deltas(ws)
        every = max(1, len(batches) // 10)

        def on_batch(bi: int) -> None:
            self.progress_state["attacked"] = bi + 1
            if (bi + 1) % every == 0 or bi + 1 == len(batches):
                self._save(checkpoint)

        start = int(self.progress_state.get("attacked", 0))
        self._attack_all(ws, batches, "attack", self.steps, progress, start=start, on_batch=on_batch)

    def _snapshot_epochs(self) -> list[int]:
        """Epochs after which surrogate weights are kept (none for TAP; SEP's checkpoints)."""
        return []

    def _after_pretrain(self) -> None:
        """Hook run once the surrogate is trained (SEP builds its checkpoint ensemble here)."""
        self.surrogate.model.eval()

    def _models(self) -> list[torch.nn.Module]:
        """The frozen networks whose mean targeted loss PGD minimises."""
        return [self.surrogate.model]

    def _attack(self, b: _Batch, generator: torch.Generator, steps: int) -> torch.Tensor:
        models = self._models()
        for m in models:
            m.eval()
        target = torch.cat([targeted_labels(b.y, int(self.num_classes or 2)).float(), b.valid], 1)

        def objective(x_adv: torch.Tensor) -> torch.Tensor:
            xv, tv = self._views(x_adv, target, generator)
            losses = [self._losses_with_valid(m(xv), tv[:, :1], tv[:, 1:]) for m in models]
            return torch.stack(losses).mean()

        return pgd(objective, b.x, b.delta, epsilon=self.epsilon, alpha=self.alpha, steps=steps, descend=True,
                   valid=b.valid)
