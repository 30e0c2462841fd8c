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

"""Victim networks: the segmentation models an unauthorised trainer would use (METHODS.md section 4).

Four MONAI networks, 2D or 3D through ``spatial_dims``:

- ``unet``: MONAI ``UNet``, 5 levels by default (channels 16-32-64-128-256, strides 2, instance norm), as in
  MONAI's tutorials but with one residual unit per level instead of two (half the cost on a CPU). Its inputs
  must be multiples of ``2 ** (levels - 1)`` (16).
- ``swinunetr``: MONAI ``SwinUNETR`` (needs the ``einops`` package). Five stages of 2x downsampling: inputs must be
  multiples of 32 and, because its bottleneck's instance normalisation always uses the input's own statistics
  (in training and inference), the bottleneck must hold more than one voxel (at least one patch axis of 64 or more). ``feature_size`` 12 keeps it trainable on a CPU.
- ``segresnet``: MONAI ``SegResNet`` (Myronenko 2018: residual encoder, light decoder), ``init_filters`` 8, encoder
  blocks 1-2-2-4; inputs must be multiples of 8.
- ``dynunet``: MONAI ``DynUNet``, nnU-Net's U-Net (two 3x3 convolutions per level, instance norm, leaky ReLU,
  strided convolutions to downsample, transposed convolutions to upsample), 5 levels with filters 32-64-128-256-320
  (nnU-Net's, capped at 320); inputs must be multiples of 16. Deep supervision is off (one output).

:func:`patch_size` chooses a training patch from the data that satisfies those rules. Example::

    net = victim_network("unet", spatial_dims=3, in_channels=1, out_channels=3)
    roi = patch_size("unet", [(35, 51, 35), (36, 50, 33)])  # -> (32, 48, 32)
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch.nn as nn

__all__ = ["VICTIMS", "victim_network", "size_multiple", "patch_size", "default_victim_params"]

#: Victim names understood by :func:`victim_network`.
VICTIMS = ("unet", "swinunetr", "segresnet", "dynunet")


def default_victim_params(name: str) -> dict[str, Any]:
    """The constructor parameters used when none are given (recorded in every report)."""
    if name == "unet":
        return {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 1, "norm": "instance"}
    if name == "swinunetr":
        return {"feature_size": 12, "depths": [2, 2, 2, 2], "num_heads": [3, 6, 12, 24]}
    if name == "segresnet":
        return {"init_filters": 8, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]}
    if name == "dynunet":
        return {"filters": [32, 64, 128, 256, 320], "strides": [1, 2, 2, 2, 2], "norm_name": "instance"}
    raise ValueError(f"unknown victim {name!r}; choose one of {', '.join(VICTIMS)}")


def size_multiple(name: str, params: dict[str, Any] | None = None) -> int:
    """The number every spatial input size of the victim must be a multiple of.

    Args:
        name: one of :data:`VICTIMS`.
        params: constructor parameters (for ``unet`` and ``dynunet`` the ``strides`` decide it, for ``segresnet``
            the number of encoder stages).

    Raises:
        ValueError: unknown victim.
    """
    p = {**default_victim_params(name), **(params or {})}
    if name in ("unet", "dynunet"):
        return int(np.prod([int(s) for s in p["strides"]]))
    if name == "segresnet":
        return 2 ** (len(p["blocks_down"]) - 1)
    return 32


def victim_network(
    name: str,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    **params: Any,
) -> nn.Module:
    """Build a victim network.

    Args:
        name: one of :data:`VICTIMS`.
        spatial_dims: 2 or 3.
        in_channels: image channels (3 for RGB, 1 for MRI/CT).
        out_channels: classes including background (at least 2; softmax outputs).
        params: overrides of :func:`default_victim_params` passed to the MONAI constructor.

    Returns:
        The (untrained) network.

    Raises:
        ValueError: unknown victim, bad ``spatial_dims`` or fewer than 2 output channels.
        ImportError: ``swinunetr`` without the ``einops`` package.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if out_channels < 2:
        raise ValueError(f"out_channels must be at least 2 (background + one class), got {out_channels}")
    p = {**default_victim_params(name), **params}
    if name == "unet":
        from monai.networks.nets import UNet

        return UNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=tuple(p.pop("channels")),
            strides=tuple(p.pop("strides")),
            **p,
        )
    if name == "segresnet":
        from monai.networks.nets import SegResNet

        return SegResNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                         init_filters=int(p.pop("init_filters")), blocks_down=tuple(p.pop("blocks_down")),
                         blocks_up=tuple(p.pop("blocks_up")), **p)
    if name == "dynunet":
        from monai.networks.nets import DynUNet

        strides = [int(v) for v in p.pop("strides")]
        # nnU-Net's rule: 3x3(x3) kernels everywhere, each upsampling undoes one downsampling
        return DynUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                       kernel_size=[3] * len(strides), strides=strides, upsample_kernel_size=strides[1:],
                       filters=[int(v) for v in p.pop("filters")], **p)
    if name != "swinunetr":
        raise ValueError(f"unknown victim {name!r}; choose one of {', '.join(VICTIMS)}")
    try:
        import einops  # noqa: F401  (SwinUNETR fails only at its first forward pass without it)
    except ImportError as e:
        raise ImportError("the swinunetr victim needs the 'einops' package (pip install einops)") from e
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        spatial_dims=spatial_dims,
        feature_size=int(p.pop("feature_size")),
        depths=tuple(p.pop("depths")),
        num_heads=tuple(p.pop("num_heads")),
        **p,
    )


def patch_size(
    name: str,
    shapes: Sequence[Sequence[int]],
    params: dict[str, Any] | None = None,
    max_size: int | Sequence[int] | None = None,
) -> tuple[int, ...]:
    """A training patch (and sliding-window ROI) for the victim, sized from the data.

    Each axis is the median image size along it rounded *down* to the victim's :func:`size_multiple` (never below
    one multiple), so random crops stay inside most images; images smaller than the patch are padded. For
    ``swinunetr`` the bottleneck (patch / 32) must hold more than one voxel: when it would not, the axis with the
    largest median size is rounded *up* instead.

    Args:
        name: one of :data:`VICTIMS`.
        shapes: spatial shapes of the training images (after any resizing the victim does).
        params: victim constructor parameters.
        max_size: upper bound per axis (rounded down to the multiple), e.g. 96 to bound 3D memory.

    Returns:
        The patch size, one entry per spatial axis.
    """
    if not shapes:
        raise ValueError("patch_size needs at least one image shape")
    k = size_multiple(name, params)
    med = np.median(np.asarray([list(s) for s in shapes], dtype=np.float64), axis=0)
    patch = [max(k, int(m // k) * k) for m in med]
    if max_size is not None:
        caps = [max_size] * len(patch) if isinstance(max_size, int) else list(max_size)
        patch = [min(p, max(k, int(c // k) * k)) for p, c in zip(patch, caps)]
    if name == "swinunetr" and math.prod(p // 32 for p in patch) <= 1:
        ax = int(np.argmax(med))
        patch[ax] = max(patch[ax] + k, int(math.ceil(med[ax] / k)) * k)
    return tuple(int(p) for p in patch)
