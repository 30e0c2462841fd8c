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

"""Differentiable stand-ins of a strong trainer's augmentation, for the release path's expectation over views.

A perturbation fitted through flips and 90-degree rotations only is learnt as a shortcut by a victim that trains
that way, and unlearnt by one that trains with nnU-Net's augmentation (issue 26: 0.05 -> 0.70 Dice on Kvasir-SEG).
:class:`ViewAugment` draws, per sample, the same family of random transforms nnU-Net v2 applies
(:mod:`monai_umed.evaluation.nnunet_aug` is the judge's MONAI version): rotation and scaling (one affine,
``grid_sample``, bilinear for images and nearest for labels), Gaussian noise relative to the image's standard
deviation, Gaussian blur, multiplicative brightness, contrast about the mean, low-resolution simulation (nearest
down, linear up) and gamma with the image's statistics kept. Every step is differentiable with respect to the image
(nearest sampling passes gradients to the pixels it picks), so the refinement's PGD steps see the expectation over
this family. The probabilities are higher than nnU-Net's defaults, so that every batch carries transformed views.

``jpeg`` adds :class:`~monai_umed.protectors.release_jpeg.JpegAugment` (a differentiable JPEG of the written image,
quality 30-90, half of the batches) before the victim's resize. All randomness comes from the ``torch.Generator`` passed in (CPU), one draw sequence per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from monai_umed.protectors.release import gaussian_blur
from monai_umed.protectors.release_jpeg import JpegAugment

__all__ = ["ViewAugment", "RELEASE_AUGMENTS", "as_release_augment"]


@dataclass
class ViewAugment:
    """Random nnU-Net-like transforms of a batch of victim views (``B x C x spatial``) and labels.

    Args:
        rotate: largest rotation in degrees (in-plane in 2D, about each axis in 3D).
        scale: scaling range (``> 1`` shrinks the content, as nnU-Net's).
        p_spatial: probability of a random affine (rotation and scaling) per sample.
        noise_var: largest noise variance, in units of the image's own variance.
        blur: Gaussian sigma range in pixels of the view.
        brightness: multiplicative brightness ``1 +- brightness``.
        contrast: contrast factor ``1 +- contrast`` about the mean (clipped to the image's range).
        lowres: the zoom range of the low-resolution simulation.
        gamma: gamma range (on the image scaled to [0, 1], statistics kept).
        p_intensity: probability of each intensity transform per sample.
    """

    rotate: float = 30.0
    scale: tuple[float, float] = (0.7, 1.4)
    p_spatial: float = 0.5
    noise_var: float = 0.1
    blur: tuple[float, float] = (0.5, 1.0)
    brightness: float = 0.25
    contrast: float = 0.25
    lowres: tuple[float, float] = (0.5, 1.0)
    gamma: tuple[float, float] = (0.7, 1.5)
    p_intensity: float = 0.25

    def _affine(self, b: int, sd: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample affine matrices (``B x sd x (sd + 1)``, ``affine_grid``'s convention) and which are applied."""
        u = torch.rand(b, 1 + sd + 1, generator=g, dtype=torch.float64)
        on = u[:, 0] < self.p_spatial
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, -1]
        mats = []
        for i in range(b):
            r = torch.eye(sd, dtype=torch.float64)
            for a in range(1 if sd == 2 else 3):
                t = math.radians(self.rotate) * (2 * float(u[i, 1 + a]) - 1)
                c, si = math.cos(t), math.sin(t)
                i0, i1 = ((0, 1), (0, 2), (1, 2))[a]
                m = torch.eye(sd, dtype=torch.float64)
                m[i0, i0], m[i0, i1], m[i1, i0], m[i1, i1] = c, -si, si, c
                r = r @ m
            mats.append(torch.cat([r * s[i], torch.zeros(sd, 1, dtype=torch.float64)], 1))
        return torch.stack(mats), on

    def spatial(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random rotation and scaling of the samples drawn (zero padding, as the judge's ``RandAffined``)."""
        b, sd = x.shape[0], x.ndim - 2
        theta, on = self._affine(b, sd, g)
        if not bool(on.any()):
            return x, y
        idx = torch.nonzero(on).flatten().to(x.device)
        grid = F.affine_grid(theta[on].to(x), [int(on.sum()), 1, *x.shape[2:]], align_corners=False)
        xs = F.grid_sample(x.index_select(0, idx), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        ys = F.grid_sample(y.index_select(0, idx).to(x.dtype), grid, mode="nearest", padding_mode="zeros",
                           align_corners=False).round().to(y.dtype)
        return x.index_copy(0, idx, xs), y.index_copy(0, idx, ys)

    def intensity(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """nnU-Net's intensity and resolution transforms, in its order, each drawn per sample."""
        b, sd = x.shape[0], x.ndim - 2
        u = torch.rand(6, b, generator=g, dtype=torch.float64)  # which transforms apply
        v = torch.rand(6, b, generator=g, dtype=torch.float64)  # their strengths
        noise = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
        out = []
        for i in range(b):
            xi = x[i:i + 1]
            if u[0, i] < self.p_intensity:  # Gaussian noise, relative to the image's spread
                sd_i = xi.detach().std().clamp_min(1e-6)
                xi = xi + noise[i:i + 1] * sd_i * math.sqrt(self.noise_var * float(v[0, i]))
            if u[1, i] < self.p_intensity:
                s = self.blur[0] + (self.blur[1] - self.blur[0]) * float(v[1, i])
                xi = gaussian_blur(xi, [s] * sd)
            if u[2, i] < self.p_intensity:
                xi = xi * (1 + self.brightness * (2 * float(v[2, i]) - 1))
            if u[3, i] < self.p_intensity:
                m, lo, hi = xi.mean(), xi.detach().amin(), xi.detach().amax()
                xi = ((xi - m) * (1 + self.contrast * (2 * float(v[3, i]) - 1)) + m).clamp(lo, hi)
            if u[4, i] < self.p_intensity:
                z = self.lowres[0] + (self.lowres[1] - self.lowres[0]) * float(v[4, i])
                small = [max(1, int(round(n * z))) for n in xi.shape[2:]]
                xi = F.interpolate(F.interpolate(xi, size=small, mode="nearest"), size=xi.shape[2:],
                                   mode="bilinear" if sd == 2 else "trilinear", align_corners=False)
            if u[5, i] < self.p_intensity:
                gam = self.gamma[0] + (self.gamma[1] - self.gamma[0]) * float(v[5, i])
                m, s = xi.mean(), xi.std().clamp_min(1e-6)
                lo, hi = xi.detach().amin(), xi.detach().amax()
                t = ((xi - lo) / (hi - lo).clamp_min(1e-6)).clamp_min(1e-6) ** gam
                xi = (t - t.mean()) / t.std().clamp_min(1e-6) * s + m
            out.append(xi)
        return torch.cat(out, 0)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.spatial(x, y, g)
        return self.intensity(x, g), y


#: Named release-path augmentations (the UMed parameter ``release_augment``): ``(view augmentation, compression)``.
RELEASE_AUGMENTS: dict[str, tuple[ViewAugment | None, JpegAugment | None]] = {
    "none": (None, None),
    "nnunet": (ViewAugment(), None),
    "jpeg": (None, JpegAugment()),
    "nnunet_jpeg": (ViewAugment(), JpegAugment()),
}


def as_release_augment(value: Any) -> str:
    """Check a ``release_augment`` parameter (a name of :data:`RELEASE_AUGMENTS`; None or False: ``none``).

    Raises:
        ValueError: an unknown name.
    """
    name = "none" if value in (None, False, 0, "") else str(value).strip().lower()
    if name not in RELEASE_AUGMENTS:
        raise ValueError(f"unknown release_augment {value!r}; choose from {', '.join(RELEASE_AUGMENTS)}")
    return name
