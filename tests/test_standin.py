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

"""UMed's stand-in of a victim's preprocessing (:mod:`monai_umed.protectors.standin`)."""

from __future__ import annotations

import pytest
import torch

from monai_umed.protectors.standin import mix_batch, preprocess_standin


def _batch(sd: int = 2, n: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.rand((3, 2) + (n,) * sd)
    y = (torch.rand((3, 1) + (n,) * sd) > 0.5).long()
    return x, y


@pytest.mark.parametrize("sd", [2, 3])
def test_resize_range_padding_and_labels(sd):
    x, y = _batch(sd)
    for seed in range(12):
        xa, ya = preprocess_standin(x, y, torch.Generator().manual_seed(seed), 8, (0.3, 0.6))
        # down-resized to between 0.3 and 0.6 of 30 (9-18 voxels, at least the multiple), then padded to 8
        assert all(s in (16, 24) for s in xa.shape[2:]), xa.shape
        assert xa.shape[:2] == x.shape[:2] and ya.shape == (3, 1) + tuple(xa.shape[2:])
        assert ya.dtype == torch.long and set(ya.unique().tolist()) <= {0, 1}


def test_no_resize_keeps_the_grid_up_to_padding():
    x, y = _batch(2)
    xa, ya = preprocess_standin(x, y, torch.Generator().manual_seed(1), 16, None, flips=False)
    assert xa.shape[2:] == (32, 32)
    assert torch.equal(ya[..., :30, :30], y)  # labels are never resampled without a resize
    assert not ya[..., 30:, :].any() and not ya[..., :, 30:].any()


def test_same_generator_same_views_and_differentiable():
    x, y = _batch(2)
    x.requires_grad_(True)
    a = preprocess_standin(x, y, torch.Generator().manual_seed(5), 8, (0.3, 0.6))
    b = preprocess_standin(x, y, torch.Generator().manual_seed(5), 8, (0.3, 0.6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    a[0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_renormalisations_are_drawn():
    x, y = _batch(2)
    x = 0.2 + 0.5 * x  # neither [0, 1]-spanning nor zero-mean: each renormalisation is visible
    kinds = set()
    for seed in range(40):
        xa, _ = preprocess_standin(x, y, torch.Generator().manual_seed(seed), 2, None, flips=False)
        if torch.allclose(xa, x):
            kinds.add("none")
        elif torch.allclose(xa.amin(dim=(1, 2, 3)), torch.zeros(3)) and torch.allclose(xa.amax(dim=(1, 2, 3)),
                                                                                          torch.ones(3)):
            kinds.add("min-max")
        elif torch.allclose(xa.mean(dim=(2, 3)), torch.zeros(3, 2), atol=1e-5):
            kinds.add("z-score")
    assert kinds == {"none", "min-max", "z-score"}


def test_mix_batch():
    x, _ = _batch(2)
    g = torch.Generator().manual_seed(0)
    assert mix_batch(x, g, 0.0) is x
    one = x[:1]
    assert mix_batch(one, g, 1.0) is one  # nothing to mix with
    mixed = mix_batch(x, g, 1.0)
    # every patch is replaced by another patch of the batch (a cyclic shift, never itself)
    for i in range(3):
        assert not torch.equal(mixed[i], x[i])
        assert any(torch.equal(mixed[i], x[j]) for j in range(3))
