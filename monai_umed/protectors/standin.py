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

"""What a victim does to a protected training patch, as UMed's generators are fitted through it (METHODS.md 4.7).

- :func:`preprocess_standin`: a differentiable stand-in of common preprocessing: a random down-resize (area, MONAI
  ``Resize``'s Gaussian anti-aliasing + linear, or antialiased bilinear; scale drawn log-uniformly from a range),
  a random intensity renormalisation (none, min-max, z-score), flips and 90-degree rotations, and padding to the
  network's multiple.
- :func:`mix_batch`: with a probability per patch, the perturbation is fitted on top of another patch of the batch,
  so that it does not rely on the image it was made for.

All randomness comes from the ``torch.Generator`` passed in (CPU), one draw sequence per call, so a fit is
reproducible from its seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from monai_umed.protectors.release import gaussian_blur
from monai_umed.protectors.surrogate import augment_pair

__all__ = ["preprocess_standin", "mix_batch"]


def preprocess_standin(
    x: torch.Tensor,
    y: torch.Tensor,
    g: torch.Generator,
    multiple: int,
    resize_range: tuple[float, float] | None,
    flips: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A victim's preprocessing of a batch, differentiable with respect to the images.

    Args:
        x: images, ``B x C x spatial``, in ``[0, 1]``.
        y: labels, ``B x 1 x spatial``, integer.
        g: the fit's random generator.
        multiple: the network's size multiple (the result is zero-padded up to it).
        resize_range: scale range ``(low, high)`` of the random down-resize; ``None`` keeps the size.
        flips: also apply random flips and a 90-degree rotation (:func:`augment_pair`).

    Returns:
        The preprocessed ``(x, y)``.
    """
    sd = x.ndim - 2
    r = torch.rand(4, generator=g)
    if resize_range is not None:
        lo, hi = math.log(resize_range[0]), math.log(resize_range[1])
        scale = math.exp(lo + float(r[0]) * (hi - lo))
        size = [max(multiple, int(round(n * scale))) for n in x.shape[2:]]
        if list(size) != list(x.shape[2:]):
            kind = float(r[1])
            linear = "bilinear" if sd == 2 else "trilinear"
            if kind < 1 / 3:
                x = F.interpolate(x, size=size, mode="area")
            elif kind < 2 / 3 or sd == 3:
                # MONAI Resize(anti_aliasing=True): Gaussian sigma = (1/scale - 1) / 2, then (bi/tri)linear
                sig = [max(0.0, (n / m - 1.0) / 2.0) for n, m in zip(x.shape[2:], size)]
                x = F.interpolate(gaussian_blur(x, sig), size=size, mode=linear, align_corners=False)
            else:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            y = F.interpolate(y.float(), size=size, mode="nearest").long()
    dims = tuple(range(1, x.ndim))
    if float(r[2]) < 1 / 3:
        lo_v = x.amin(dim=dims, keepdim=True)
        hi_v = x.amax(dim=dims, keepdim=True)
        x = (x - lo_v) / (hi_v - lo_v).clamp_min(1e-6)
    elif float(r[2]) < 2 / 3:
        sdims = tuple(range(2, x.ndim))
        x = (x - x.mean(dim=sdims, keepdim=True)) / x.std(dim=sdims, keepdim=True).clamp_min(1e-6)
    if flips:
        x, y = augment_pair(x, y, g)
    pad: list[int] = []
    for n in reversed(x.shape[2:]):
        pad += [0, (-n) % multiple]
    if any(pad):
        x, y = F.pad(x, pad), F.pad(y, pad)
    return x, y


def mix_batch(x: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    """The images the perturbations are added to while fitting: with probability ``p`` per patch, another patch of
    the batch ``x`` (``B x C x spatial``); the perturbation and the target stay those of the original patch."""
    b = x.shape[0]
    if p <= 0.0 or b < 2:
        return x
    r = torch.rand(b + 1, generator=g)
    shift = 1 + int(float(r[-1]) * (b - 1)) % (b - 1)
    swap = (r[:b] < p).to(x.device).reshape((b,) + (1,) * (x.ndim - 1))
    return torch.where(swap, torch.roll(x, shift, dims=0), x)
