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

"""The encoder-decoder perturbation generator of UMed (METHODS.md section 1.2 and 1.4).

A small U-shaped network: ``len(channels)`` levels (default 3, channels 16-32-64), each level two
:class:`~monai_umed.networks.cdconv.CDConv` + instance norm + LeakyReLU, stride-2 CDC downsampling, nearest
upsampling and skip connections, and a 1x1 head. The output is unbounded; the protector applies ``tanh`` and the
budget. Fully convolutional, so it runs on training patches and on whole images or sliding windows alike.

Example::

    net = PerturbationGenerator(spatial_dims=2, in_channels=5, out_channels=3, theta=0.7)
    raw = net(torch.cat([image, contour_band, roi], dim=1))  # (B, 3, H, W)
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Norm

from monai_umed.networks.cdconv import CDConv

__all__ = ["PerturbationGenerator"]


class _Block(nn.Sequential):
    """``n`` x (CDConv 3 -> InstanceNorm -> LeakyReLU); the first conv may downsample with ``stride``."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, theta: float, n: int = 2, stride: int = 1) -> None:
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [
                CDConv(spatial_dims, cin if i == 0 else cout, cout, 3, stride=stride if i == 0 else 1, theta=theta),
                Norm[Norm.INSTANCE, spatial_dims](cout, affine=True),
                nn.LeakyReLU(0.1, inplace=True),
            ]
        super().__init__(*layers)


class PerturbationGenerator(nn.Module):
    """Encoder-decoder with CDC convolutions, instance norm and skip connections, 2D or 3D.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (image channels plus mask channels).
        out_channels: output channels (one per image channel).
        channels: feature channels per level; the number of entries sets the depth (default ``(16, 32, 64)``).
        theta: CDC ``theta`` of every convolution (0 gives a plain convolutional U-Net).
        convs_per_level: convolutions per level in the encoder and decoder.

    Inputs of any spatial size are padded to a multiple of ``2 ** (len(channels) - 1)`` and the output is cropped
    back, so the output always has the input's spatial size.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (16, 32, 64),
        theta: float = 0.7,
        convs_per_level: int = 2,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        channels = tuple(int(c) for c in channels)
        if len(channels) < 1:
            raise ValueError("channels needs at least one level")
        self.spatial_dims = spatial_dims
        self.multiple = 2 ** (len(channels) - 1)
        self.encoders = nn.ModuleList()
        for i, c in enumerate(channels):
            cin = in_channels if i == 0 else channels[i - 1]
            self.encoders.append(_Block(spatial_dims, cin, c, theta, convs_per_level, stride=1 if i == 0 else 2))
        self.decoders = nn.ModuleList()
        for i in range(len(channels) - 1, 0, -1):
            self.decoders.append(_Block(spatial_dims, channels[i] + channels[i - 1], channels[i - 1], theta,
                                        convs_per_level))
        self.head = Conv[Conv.CONV, spatial_dims](channels[0], out_channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``(B, in_channels, *spatial)``.

        Returns:
            ``(B, out_channels, *spatial)`` unbounded output (apply ``tanh`` for a bounded perturbation).
        """
        spatial = x.shape[2:]
        pad: list[int] = []
        for s in reversed(spatial):
            pad += [0, (-s) % self.multiple]
        if any(pad):
            x = F.pad(x, pad, mode="replicate" if x.ndim in (4, 5) else "constant")
        skips = []
        h = x
        for enc in self.encoders:
            h = enc(h)
            skips.append(h)
        skips.pop()
        for dec in self.decoders:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[2:], mode="nearest")
            h = dec(torch.cat([h, skip], dim=1))
        out = self.head(h)
        return out[(slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)]
