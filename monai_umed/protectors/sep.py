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

"""SEP: self-ensemble protection (Chen et al., "Self-Ensemble Protection: Training Checkpoints Are Good Data
Protectors", ICLR 2023), adapted to segmentation (METHODS.md section 3).

One clean training run of the surrogate UNet; the weights after ``n_checkpoints`` evenly spaced epochs form an
ensemble, and each case gets a PGD perturbation that minimises the *mean over the checkpoints* of TAP's targeted
cross-entropy (toward the permuted label map), ``|delta|_inf <= epsilon``. The paper uses 30 steps of 1/255 at
8/255 (``alpha = epsilon / 8``); the CPU default is 20 steps of ``epsilon / 6``.

Example::

    p = SEPProtector(epsilon=8 / 255, n_checkpoints=3)
    p.fit(samples)  # dicts with image (C, H, W[, D]) in [0, 1], label (1, H, W[, D]), case_id
    delta = p.perturbation(image, label, case_id="c0")
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from monai_umed.protectors.tap import TAPProtector

__all__ = ["SEPProtector"]


class SEPProtector(TAPProtector):
    """Targeted PGD against an ensemble of checkpoints of one clean surrogate training run.

    Args:
        epsilon: L-inf budget in normalised units (default ``8/255``).
        alpha: PGD step; default ``epsilon / 6``.
        steps: PGD steps per case (default 20; the paper uses 30 of 1/255).
        n_checkpoints: checkpoints in the ensemble (default 3), taken after evenly spaced epochs, the last one
            after the final epoch.
        pretrain_epochs: clean training epochs (default 10); ``epochs``, when given, replaces it.
        kwargs: see :class:`~monai_umed.protectors.pgd.SampleWiseProtector`.
    """

    name = "sep"
    alpha_fraction = 1 / 6

    def __init__(self, epsilon: float = 8 / 255, alpha: float | None = None, steps: int = 20,
                 n_checkpoints: int = 3, **kwargs: Any) -> None:
        super().__init__(epsilon=epsilon, alpha=alpha, steps=steps, **kwargs)
        if n_checkpoints < 1:
            raise ValueError(f"n_checkpoints must be >= 1, got {n_checkpoints}")
        self.n_checkpoints = int(n_checkpoints)
        self.ensemble: list[torch.nn.Module] = []

    def params(self) -> dict[str, Any]:
        return {**super().params(), "n_checkpoints": self.n_checkpoints}

    def _snapshot_epochs(self) -> list[int]:
        e = self._epochs()
        return sorted({max(1, round(e * (i + 1) / self.n_checkpoints)) for i in range(self.n_checkpoints)})

    def _after_pretrain(self) -> None:
        self.ensemble = []
        for snap in self.progress_state.get("snapshots", []):
            model = self._new_surrogate().model
            model.load_state_dict(snap)
            model.eval()
            self.ensemble.append(model)
        if not self.ensemble:
            raise RuntimeError("sep: no surrogate checkpoints were recorded")

    def _models(self) -> list[torch.nn.Module]:
        return self.ensemble

    def load_state_dict(self, state: Mapping[str, Any]) -> "SEPProtector":
        super().load_state_dict(state)
        if self.progress_state.get("snapshots"):
            self._after_pretrain()
        return self
