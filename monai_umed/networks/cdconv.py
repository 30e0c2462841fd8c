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

"""Central difference convolution (CDC), 2D and 3D (Yu et al., "Searching Central Difference Convolutional Networks
for Face Anti-Spoofing", CVPR 2020), the building block of UMed's contour perturbator (METHODS.md section 1.1).

``CDC(x)(p0) = sum_n w(pn) x(p0 + pn) - theta * x(p0) * sum_n w(pn)``: a vanilla convolution minus ``theta`` times a
1x1 convolution whose weight is the spatial sum of the kernel. ``theta = 0`` is the plain convolution, ``theta = 1``
a pure central difference ``sum_n w(pn) (x(p0 + pn) - x(p0))`` that responds to gradients (edges, contours) and not
to the local intensity level.

Because the centre tap ``x(p0)`` is always inside the image (the padding keeps the size), the two terms fold into
one convolution with the effective kernel ``w - theta * sum(w) * e_centre`` (``e_centre`` is 1 at the centre tap):
the result is identical to the two-term form and costs one convolution instead of two. The learnable parameter
is still ``w``.

Example::

    conv = CDConv(spatial_dims=2, in_channels=3, out_channels=16, theta=0.7)
    y = conv(torch.rand(2, 3, 64, 64))  # (2, 16, 64, 64)
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from monai.networks.layers.factories import Conv

__all__ = ["CDConv"]


class CDConv(nn.Module):
    """Central difference convolution with the kernel-sum term, for ``spatial_dims`` 2 or 3.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size (int or one per spatial dim), default 3.
        stride: convolution stride (the output keeps ``ceil(size / stride)`` voxels per dim).
        dilation: kernel dilation.
        groups: grouped convolution (the central term is grouped the same way).
        bias: add a learnable bias (to the vanilla term only).
        theta: weight of the central difference term, in ``[0, 1]`` (default 0.7; 0 is a plain convolution).
        padding_mode: ``zeros`` | ``reflect`` | ``replicate`` | ``circular`` (the padding is always
            ``dilation * (kernel_size // 2)``, which keeps the centre tap aligned with ``p0``).

    Raises:
        ValueError: ``spatial_dims`` not 2 or 3, ``theta`` outside ``[0, 1]`` or an even kernel size.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = False,
        theta: float = 0.7,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if not 0.0 <= float(theta) <= 1.0:
            raise ValueError(f"theta must lie in [0, 1], got {theta}")
        ks = (kernel_size,) * spatial_dims if isinstance(kernel_size, int) else tuple(kernel_size)
        if len(ks) != spatial_dims or any(k % 2 == 0 for k in ks):
            raise ValueError(f"kernel_size must be odd with one entry per spatial dim, got {kernel_size}")
        dil = (dilation,) * spatial_dims if isinstance(dilation, int) else tuple(dilation)
        padding = tuple(d * (k // 2) for k, d in zip(ks, dil))
        self.spatial_dims = spatial_dims
        self.theta = float(theta)
        self.conv = Conv[Conv.CONV, spatial_dims](
            in_channels, out_channels, kernel_size=ks, stride=stride, padding=padding, dilation=dil,
            groups=groups, bias=bias, padding_mode=padding_mode,
        )
        centre = torch.zeros((1, 1) + ks)
        centre[(0, 0) + tuple(k // 2 for k in ks)] = 1.0
        self.register_buffer("_centre", centre, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The kernel ``w`` shared by the vanilla and the central term."""
        return self.conv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``(B, in_channels, *spatial)``.

        Returns:
            ``(B, out_channels, *spatial')``, same spatial size for stride 1.
        """
        if self.theta == 0.0:
            return self.conv(x)
        return self.conv._conv_forward(x, self.effective_weight(), self.conv.bias)

    def effective_weight(self) -> torch.Tensor:
        """The folded kernel ``w - theta * sum(w) * e_centre`` that the forward pass convolves with."""
        w = self.conv.weight
        w_sum = w.sum(dim=tuple(range(2, 2 + self.spatial_dims)), keepdim=True)
        return w - self.theta * w_sum * self._centre.to(dtype=w.dtype)

    def extra_repr(self) -> str:
        return f"theta={self.theta}"
