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

"""The release path: a differentiable stand-in of what happens to a perturbation between ``protect`` and a victim.

A released perturbation is (1) added to the image and rounded to the file's dtype, (2) read back by an unauthorised
trainer who (3) resizes it with anti-aliasing to a grid of their choice (Kvasir-SEG 352 px -> 128 or 256 px),
(4) renormalises the intensities per image, and (5) augments it (flips, 90-degree rotations, mild intensity jitter).
Error-minimising noise is only as strong as what survives this path (METHODS.md 4.7), so the sample-wise refinement
(:mod:`monai_umed.protectors.refine`) optimises *through* it:

- :func:`quantise_st`: rounding to ``levels`` steps with a straight-through gradient;
- :class:`ReleasePath`: the random victim view of a batch of written images (expectation over grids, normalisation,
  flips, rotations and jitter), differentiable with respect to the images;

All functions take channel-first batches (``B x C x spatial``), 2D or 3D.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.convutils import gaussian_1d

__all__ = ["quantise_st", "gaussian_blur", "antialias_resize", "linear_resize", "axis_matrix", "ReleasePath", "psnr"]


def quantise_st(x: torch.Tensor, levels: int | None) -> torch.Tensor:
    """Round ``x`` in ``[0, 1]`` to multiples of ``1 / levels`` (the written file), straight-through gradient.

    ``levels=None`` keeps the float values (a float file is written without rounding).
    """
    x = x.clamp(0, 1)
    if not levels:
        return x
    return x + ((x * levels).round() / levels - x).detach()


def gaussian_blur(x: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian smoothing of a batch (B x C x spatial), differentiable.

    The kernel is MONAI's ``gaussian_1d`` (``erf``, truncated at 4 sigma) with zero padding, exactly as
    ``GaussianSmooth`` inside ``Resize(anti_aliasing=True)`` (the image borders darken the same way; tested
    against MONAI); an axis with ``sigma <= 0`` is left alone.
    """
    sd = x.ndim - 2
    conv = F.conv2d if sd == 2 else F.conv3d
    c = x.shape[1]
    for d in range(sd):
        s = float(sigma[d])
        if s <= 0:
            continue
        k = gaussian_1d(torch.tensor(s), truncated=4.0, approx="erf", normalize=False).to(x)
        r = (k.numel() - 1) // 2
        shape = [1] * (sd + 2)
        shape[2 + d] = k.numel()
        pad = [0, 0] * sd
        pad[2 * (sd - 1 - d)] = pad[2 * (sd - 1 - d) + 1] = r
        x = conv(F.pad(x, pad), k.reshape(shape).expand(c, *shape[1:]).contiguous(), groups=c)
    return x


@lru_cache(maxsize=64)
def axis_matrix(n_in: int, n_out: int, antialias: bool) -> torch.Tensor:
    """The ``n_out x n_in`` matrix of a 1D resize: linear interpolation (``align_corners=False``), after a Gaussian
    of ``sigma = (n_in / n_out - 1) / 2`` with zero padding when ``antialias`` and shrinking (MONAI's ``Resize``).

    (Bi/tri)linear interpolation and the Gaussian are separable, so a resize is one such matrix per axis; applying
    them as matrix products (BLAS) is several times faster on a CPU than depthwise convolutions.
    """
    eye = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, n_in, 1)
    if antialias and n_out < n_in:
        eye = gaussian_blur(eye, [(n_in / n_out - 1.0) / 2.0, 0.0])
    out = F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=False)
    return out.view(n_in, n_out).t().contiguous().float()


@lru_cache(maxsize=128)
def _axis_matrix_on(n_in: int, n_out: int, antialias: bool, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """:func:`axis_matrix` on ``device`` in ``dtype``, kept: a resize inside a fit's inner loop on an accelerator
    then copies nothing from the host (a host-to-device copy waits for the device)."""
    return axis_matrix(n_in, n_out, antialias).to(device=device, dtype=dtype)


def linear_resize(x: torch.Tensor, shape: Sequence[int], antialias: bool = True) -> torch.Tensor:
    """Resize a batch (B x C x spatial) axis by axis with :func:`axis_matrix`; differentiable.

    With ``antialias`` it equals MONAI ``Resize(mode="bilinear"/"trilinear", anti_aliasing=True)`` (tested); without,
    ``F.interpolate(mode="bilinear"/"trilinear", align_corners=False)``.
    """
    shape = tuple(int(s) for s in shape)
    for d, (n_in, n_out) in enumerate(zip(x.shape[2:], shape)):
        if n_in == n_out:
            continue
        m = _axis_matrix_on(int(n_in), n_out, antialias, x.device, x.dtype)
        x = torch.movedim(torch.movedim(x, 2 + d, -1) @ m.t(), -1, 2 + d)
    return x


def antialias_resize(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """MONAI ``Resize(anti_aliasing=True)`` stand-in: Gaussian ``sigma = (in / out - 1) / 2`` on every shrunk axis,
    then (bi/tri)linear interpolation; differentiable (:func:`linear_resize`)."""
    return linear_resize(x, shape, antialias=True)


def _grid_shape(shape: Sequence[int], size: int) -> tuple[int, ...]:
    """``shape`` scaled so that its longest side is ``size`` (a victim's ``image_size`` for square data)."""
    f = size / max(shape)
    return tuple(max(1, int(round(s * f))) for s in shape)


def psnr(delta: torch.Tensor) -> torch.Tensor:
    """Per-case whole-image PSNR (dB) of a batch of normalised perturbations (peak 1)."""
    mse = delta.double().pow(2).flatten(1).mean(1)
    return torch.where(mse > 0, -10 * torch.log10(mse.clamp_min(1e-30)), torch.full_like(mse, float("inf")))


@dataclass
class ReleasePath:
    """The random victim view of written images: resize, renormalise, augment (differentiable).

    Args:
        grids: victim grid sizes (longest side) drawn uniformly per call; empty: the images' own grid.
        normalise: ``minmax`` (per image, MONAI ``ScaleIntensity``), ``zscore`` (per channel), ``random`` (either,
            or none) or ``none``.
        flips: random flips along every spatial axis.
        rot90: random 90-degree rotations in the first two spatial axes (when square).
        jitter: mild intensity jitter: a gain in ``[1 - jitter, 1 + jitter]`` and an offset in
            ``[-jitter / 2, jitter / 2]`` after normalisation, per image.
        augment: further random transforms of the view, ``augment(x, y, generator) -> (x, y)``, applied last
            (e.g. :class:`~monai_umed.protectors.release_augment.ViewAugment`, a strong trainer's augmentation);
            None: none.
        compress: a lossy re-encoding of the written images, ``compress(written, generator)``, applied first
            (e.g. :class:`~monai_umed.protectors.release_jpeg.JpegAugment`); None: none.
    """

    grids: Sequence[int] = field(default_factory=tuple)
    normalise: str = "minmax"
    flips: bool = True
    rot90: bool = True
    jitter: float = 0.0
    augment: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    compress: Callable[..., torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.normalise not in ("minmax", "zscore", "random", "none"):
            raise ValueError(f"normalise must be minmax, zscore, random or none, got {self.normalise!r}")
        self.grids = tuple(int(g) for g in (self.grids or ()))
        if any(g < 8 for g in self.grids):
            raise ValueError(f"victim grids must be at least 8 voxels, got {self.grids}")
        if not 0.0 <= float(self.jitter) < 1.0:
            raise ValueError(f"jitter must lie in [0, 1), got {self.jitter}")

    def grid(self, shape: Sequence[int], generator: torch.Generator) -> tuple[int, ...]:
        """A random victim grid for images of spatial ``shape``: the native grid when :attr:`grids` is empty or the
        drawn grid is not smaller than the image (an upsampling victim sees a smooth interpolation of the same
        pixels, so the stand-in spares the cost)."""
        native = tuple(int(s) for s in shape)
        if not self.grids:
            return native
        g = self.grids[int(torch.randint(len(self.grids), (1,), generator=generator))]
        return native if g >= max(native) else _grid_shape(shape, g)

    def labels(self, y: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """Nearest-neighbour labels on a victim grid (as MONAI ``Resized(mode="nearest")``)."""
        if tuple(y.shape[2:]) == tuple(shape):
            return y
        return F.interpolate(y.float(), size=tuple(shape), mode="nearest").to(y.dtype)

    def _normalise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        how = self.normalise
        if how == "random":
            how = ("minmax", "zscore", "none")[int(torch.randint(3, (1,), generator=generator))]
        if how == "minmax":
            dims = tuple(range(1, x.ndim))
            mn, mx = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
            return (x - mn) / (mx - mn).clamp_min(1e-6)
        if how == "zscore":
            dims = tuple(range(2, x.ndim))
            return (x - x.mean(dim=dims, keepdim=True)) / x.std(dim=dims, keepdim=True).clamp_min(1e-6)
        return x

    def view(
        self,
        written: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        shape: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The victim's view of a batch of written images and their labels.

        Args:
            written: B x C x spatial images as written (after :func:`quantise_st`).
            y: B x 1 x spatial labels on the same grid.
            generator: CPU generator, the only source of randomness.
            shape: the victim grid (default: :meth:`grid`).

        Returns:
            ``(x, y)`` on the victim grid, normalised and augmented identically.
        """
        shape = tuple(shape) if shape is not None else self.grid(written.shape[2:], generator)
        if self.compress is not None:
            written = self.compress(written, generator)
        x = self._normalise(antialias_resize(written, shape), generator)
        y = self.labels(y, shape)
        sd = x.ndim - 2
        r = torch.rand(sd + 3, generator=generator)
        if self.flips:
            for d in range(sd):
                if r[d] < 0.5:
                    x, y = x.flip(2 + d), y.flip(2 + d)
        if self.rot90 and x.shape[2] == x.shape[3] and r[sd] < 0.5:
            k = 1 + int(r[sd + 1] * 3) % 3
            x, y = x.rot90(k, (2, 3)), y.rot90(k, (2, 3))
        if self.jitter > 0:
            b = x.shape[0]
            u = torch.rand(2, b, generator=generator).to(x.device)
            gain = (1 + self.jitter * (2 * u[0] - 1)).view(b, *([1] * (x.ndim - 1)))
            offset = (self.jitter * (u[1] - 0.5)).view(b, *([1] * (x.ndim - 1)))
            x = x * gain + offset
        if self.augment is not None:
            x, y = self.augment(x, y, generator)
        return x, y

