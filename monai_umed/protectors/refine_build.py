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

"""Building a release stage's refiner: per-case (:class:`~monai_umed.protectors.refine.ReleaseRefiner`) or one
shared tile (:class:`~monai_umed.protectors.refine_shared.SharedTileRefiner`), with a fresh seeded surrogate.

It lives above both refiners, so that neither imports the other's module to build itself.
"""

from __future__ import annotations

from typing import Sequence

import torch

from monai_umed.protectors.base import case_seed
from monai_umed.protectors.refine import RefineSettings, ReleaseRefiner
from monai_umed.protectors.refine_shared import SharedTileRefiner
from monai_umed.protectors.release import ReleasePath
from monai_umed.protectors.surrogate import Surrogate

__all__ = ["build_refiner"]


def build_refiner(
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    path: ReleasePath,
    settings: RefineSettings,
    *,
    surrogate_channels: Sequence[int],
    lr: float,
    device: torch.device | str,
    seed: int,
    tag: str,
    levels: int | None,
) -> ReleaseRefiner:
    """A release stage's refiner with a fresh surrogate UNet seeded from ``(seed, tag)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: label classes (background included).
        path: the release path the refinement runs through.
        settings: the refinement's settings.
        surrogate_channels: the surrogate's channels per level.
        lr: the surrogate's learning rate.
        device: where the surrogate runs.
        seed: the protector's seed (also the refiner's).
        tag: names the surrogate's seed stream (e.g. ``umed-refine``, ``em-refine``).
        levels: grey levels of the data (None: float data).
    """
    sur = Surrogate(spatial_dims, in_channels, num_classes, channels=surrogate_channels, lr=lr, device=device,
                    seed=case_seed(seed, tag) % (2**31))
    if settings.shared_tile:
        return SharedTileRefiner(sur, path, settings, levels=levels, seed=seed, tile=settings.shared_tile,
                                 classwise=settings.shared_classwise, symmetric=settings.shared_symmetric,
                                 fill=settings.shared_fill, background=settings.shared_background,
                                 colour=settings.shared_colour, harmonics=settings.shared_harmonics)
    return ReleaseRefiner(sur, path, settings, levels=levels, seed=seed)
