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

"""The victim factory: MONAI UNet and SwinUNETR in 2D and 3D, and patch sizes that satisfy their rules."""

from __future__ import annotations

import pytest
import torch

from monai_umed.networks.victims import default_victim_params, patch_size, size_multiple, victim_network

TINY_UNET = {"channels": [4, 8, 16], "strides": [2, 2]}


@pytest.mark.parametrize("spatial_dims,in_ch,classes,shape", [(2, 3, 2, (32, 48)), (3, 1, 3, (16, 32, 16))])
def test_unet_forward_shape(spatial_dims, in_ch, classes, shape):
    net = victim_network("unet", spatial_dims, in_ch, classes, **TINY_UNET).eval()
    with torch.no_grad():
        out = net(torch.rand((2, in_ch) + shape))
    assert out.shape == (2, classes) + shape


def test_default_unet_is_five_levels():
    net = victim_network("unet", 2, 3, 2)
    assert size_multiple("unet") == 16
    with torch.no_grad():
        assert net.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 2, 32, 32)
    assert len(default_victim_params("unet")["channels"]) == 5


@pytest.mark.parametrize("spatial_dims,in_ch,classes,shape", [(2, 3, 2, (64, 32)), (3, 1, 3, (32, 32, 64))])
def test_swinunetr_forward_shape(spatial_dims, in_ch, classes, shape):
    pytest.importorskip("einops", reason="SwinUNETR needs einops")
    # the bottleneck (size / 32) must hold more than one voxel: its instance norm always uses the input's statistics
    net = victim_network("swinunetr", spatial_dims, in_ch, classes, feature_size=12, depths=[1, 1, 1, 1]).eval()
    with torch.no_grad():
        out = net(torch.rand((1, in_ch) + shape))
    assert out.shape == (1, classes) + shape
    assert size_multiple("swinunetr") == 32


def test_patch_size_rules():
    shapes = [(35, 51, 35), (36, 50, 33), (40, 55, 36)]
    assert patch_size("unet", shapes) == (32, 48, 32)
    # SwinUNETR: multiples of 32 and a bottleneck of more than one voxel -> the longest axis is rounded up
    swin = patch_size("swinunetr", shapes)
    assert all(p % 32 == 0 for p in swin) and swin == (32, 64, 32)
    assert patch_size("unet", [(128, 128)]) == (128, 128)
    assert patch_size("unet", [(300, 300, 300)], max_size=96) == (96, 96, 96)
    assert patch_size("unet", [(8, 8)]) == (16, 16)  # never below one multiple: small images are padded
    assert patch_size("unet", [(64, 64)], params={"strides": [2, 2]}) == (64, 64)


def test_factory_errors():
    with pytest.raises(ValueError, match="unknown victim"):
        victim_network("vnet", 2, 1, 2)
    with pytest.raises(ValueError, match="spatial_dims"):
        victim_network("unet", 4, 1, 2)
    with pytest.raises(ValueError, match="out_channels"):
        victim_network("unet", 2, 1, 1)
    with pytest.raises(ValueError):
        patch_size("unet", [])
