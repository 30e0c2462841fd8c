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

"""Random-noise control: uniform noise in ``[-epsilon, epsilon]`` (METHODS.md section 3, the control row).

Protection must beat this row by a wide margin; with ``region="image"`` it needs no label.

Example::

    p = NoiseProtector(epsilon=8 / 255, region="roi")
    delta = p.perturbation(image, label, case_id="case_001")  # image: (C, H, W[, D]) in [0, 1]
"""

from __future__ import annotations

from typing import Any

import torch

from monai_umed.protectors.base import Protector

__all__ = ["NoiseProtector"]


class NoiseProtector(Protector):
    """Uniform random noise, seeded per case.

    Args:
        epsilon: L-inf budget (normalised units).
        region: ``image`` (everywhere, default) or ``roi`` (only where ``label > 0``).
        kwargs: see :class:`~monai_umed.protectors.base.Protector`.
    """

    name = "noise"
    fits = False

    def __init__(self, epsilon: float = 8 / 255, region: str = "image", **kwargs: Any) -> None:
        super().__init__(epsilon=epsilon, **kwargs)
        if region not in ("image", "roi"):
            raise ValueError(f"region must be 'image' or 'roi', got {region!r}")
        self.region = region
        self.requires_label = region == "roi"

    def perturbation(
        self, image: torch.Tensor, label: torch.Tensor | None = None, case_id: str | None = None
    ) -> torch.Tensor:
        self._check_inputs(image, label)
        g = self.generator(case_id)
        u = torch.rand(tuple(image.shape), generator=g, dtype=torch.float64)
        delta = ((2 * u - 1) * self.epsilon).to(dtype=torch.float32)
        if self.region == "roi":
            delta = delta * (torch.as_tensor(label).cpu() > 0).to(delta.dtype)
        return delta.to(image.device)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "region": self.region}
