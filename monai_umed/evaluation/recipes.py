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

"""Named training recipes of the attacker battery: how an unauthorised trainer may set up their training.

A protection is only as good as the strongest ordinary trainer it survives. Each recipe changes one thing from the
judge's standard victim (a MONAI UNet, flips and 90-degree rotations, the battery's image size and epochs): the
augmentation (nnU-Net's, or one of its halves), a preprocessing countermeasure applied to every training image, the
network, the training length, the grid, or an adaptive attacker who knows how our protection works. Every recipe
is judged against its own clean baseline, trained the same way (``monai-umed evaluate --recipe NAME``,
``benchmarks/robustness.py``).

==================== ============================================================ ==============================
recipe               what the trainer does                                        as
==================== ============================================================ ==============================
standard             flips + 90-degree rotations (the judge's recipe)             defence ``none``
nnunet               nnU-Net v2's default augmentation, z-scored images           defence ``nnunet``
nnunet_spatial       its rotation / scaling only                                  defence ``nnunet_spatial``
nnunet_intensity     its noise, blur, brightness, contrast, low-res, gamma only    defence ``nnunet_intensity``
nnunet_strong        nnU-Net's, with rotation 30 deg and scaling 0.7-1.3 at p 0.5 defence ``nnunet:...``
jpeg75 / 50 / 30     JPEG re-encoding of every training image at that quality     defence ``jpeg``
grayscale            RGB -> gray for training and test                            defence ``grayscale``
blur0.5 / blur1      Gaussian blur of every training image, sigma in pixels       defence ``gaussian_blur``
median3              3 x 3 median filter of every training image                  defence ``median``
bitdepth4            every training image re-quantised to 16 levels               defence ``bit_depth``
pattern_subtract     shared-pattern estimation and subtraction (adaptive)         defence ``pattern_subtract``
segresnet            MONAI SegResNet instead of the UNet                          victim ``segresnet``
dynunet              MONAI DynUNet (nnU-Net's network)                            victim ``dynunet``
swinunetr            MONAI SwinUNETR                                              victim ``swinunetr``
nnunet_v2            nnU-Net v2 itself: its planning, preprocessing, trainer      victim ``nnunet``
epochs100            100 epochs instead of the battery's                          epochs 100
size256              a 256-pixel grid instead of the battery's                    image size 256
==================== ============================================================ ==============================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Recipe", "RECIPES", "get_recipe", "recipe_applies"]


@dataclass(frozen=True)
class Recipe:
    """One way to train a victim (None: the battery's own setting).

    Attributes:
        name: the recipe's name.
        defence: the defence spec (:func:`~monai_umed.evaluation.defences.get_defence`).
        victim: the network (:data:`~monai_umed.networks.victims.VICTIMS`), or None for the battery's.
        epochs: training epochs, or None.
        image_size: the victim's grid, or None.
        description: one line for tables.
    """

    name: str
    defence: str = "none"
    victim: str | None = None
    epochs: int | None = None
    image_size: int | None = None
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_STRONG = "nnunet:rotate=30,p_rotate=0.5,scale_lo=0.7,scale_hi=1.3,p_scale=0.5"

#: The battery, in the order of its table.
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("standard", description="flips + 90-degree rotations"),
    Recipe("nnunet", "nnunet", description="nnU-Net v2 default augmentation"),
    Recipe("nnunet_spatial", "nnunet_spatial", description="nnU-Net rotation + scaling only"),
    Recipe("nnunet_intensity", "nnunet_intensity", description="nnU-Net noise/blur/brightness/contrast/low-res/gamma"),
    Recipe("nnunet_strong", _STRONG, description="nnU-Net with rotation 30 deg, scaling 0.7-1.3, p 0.5"),
    Recipe("jpeg75", "jpeg:quality=75", description="JPEG q75 re-encoding"),
    Recipe("jpeg50", "jpeg:quality=50", description="JPEG q50 re-encoding"),
    Recipe("jpeg30", "jpeg:quality=30", description="JPEG q30 re-encoding"),
    Recipe("grayscale", "grayscale", description="grayscale (training and test)"),
    Recipe("blur0.5", "gaussian_blur:sigma=0.5", description="Gaussian blur sigma 0.5 px"),
    Recipe("blur1", "gaussian_blur:sigma=1", description="Gaussian blur sigma 1 px"),
    Recipe("median3", "median:radius=1", description="median 3x3"),
    Recipe("bitdepth4", "bit_depth:bits=4", description="bit-depth reduction to 4 bits"),
    Recipe("pattern_subtract", "pattern_subtract", description="adaptive: shared pattern estimated and subtracted"),
    Recipe("segresnet", victim="segresnet", description="SegResNet"),
    Recipe("dynunet", victim="dynunet", description="DynUNet (nnU-Net's network)"),
    Recipe("swinunetr", victim="swinunetr", description="SwinUNETR"),
    Recipe("nnunet_v2", victim="nnunet", description="nnU-Net v2 itself (short schedule, the battery's epochs)"),
    Recipe("epochs100", epochs=100, description="100 epochs"),
    Recipe("size256", image_size=256, description="256-pixel grid"),
)}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``.

    Raises:
        ValueError: an unknown name.
    """
    key = str(name).strip().lower()
    if key not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return RECIPES[key]


def recipe_applies(recipe: Recipe, spatial_dims: int, channels: int) -> bool:
    """Whether the recipe can be run on images of this kind (JPEG needs 2D, grayscale RGB) here (the ``nnunet``
    victim needs the ``nnunetv2`` package)."""
    import importlib.util

    from monai_umed.evaluation.defences import get_defence

    if recipe.victim == "nnunet" and importlib.util.find_spec("nnunetv2") is None:
        return False
    try:
        get_defence(recipe.defence, spatial_dims=spatial_dims, channels=channels)
    except ValueError:
        return False
    return True
