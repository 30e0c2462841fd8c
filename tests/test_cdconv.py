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

"""CDConv against a hand-computed central difference, and the perturbation generator built from it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from monai_umed.networks.cdconv import CDConv
from monai_umed.networks.generator import PerturbationGenerator


def hand_cdc(x: np.ndarray, w: np.ndarray, theta: float) -> np.ndarray:
    """``sum_n w(pn) x(p0 + pn) - theta * x(p0) * sum_n w(pn)`` with explicit loops (zero padding, stride 1).

    ``x``: (Cin, *spatial); ``w``: (Cout, Cin, *kernel) with odd kernel sizes.
    """
    sd = x.ndim - 1
    half = [k // 2 for k in w.shape[2:]]
    out = np.zeros((w.shape[0],) + x.shape[1:])
    for o in range(w.shape[0]):
        for p0 in itertools.product(*[range(n) for n in x.shape[1:]]):
            acc = 0.0
            for i in range(x.shape[0]):
                for pn in itertools.product(*[range(-h, h + 1) for h in half]):
                    q = tuple(a + b for a, b in zip(p0, pn))
                    inside = all(0 <= q[d] < x.shape[1 + d] for d in range(sd))
                    wn = w[(o, i) + tuple(b + h for b, h in zip(pn, half))]
                    acc += wn * (x[(i,) + q] if inside else 0.0) - theta * wn * x[(i,) + p0]
            out[(o,) + p0] = acc
    return out


@pytest.mark.parametrize("spatial_dims,shape", [(2, (5, 6)), (3, (4, 5, 3))])
@pytest.mark.parametrize("theta", [0.0, 0.7, 1.0])
def test_matches_hand_computed_central_difference(spatial_dims: int, shape: tuple, theta: float) -> None:
    torch.manual_seed(0)
    conv = CDConv(spatial_dims, 2, 3, kernel_size=3, theta=theta).double()
    x = torch.rand((1, 2) + shape, dtype=torch.float64)
    got = conv(x)[0].detach().numpy()
    want = hand_cdc(x[0].numpy(), conv.weight.detach().numpy(), theta)
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_pure_central_difference_ignores_the_intensity_level() -> None:
    """theta = 1 responds to differences only: adding a constant changes nothing away from the zero-padded border."""
    torch.manual_seed(1)
    conv = CDConv(2, 1, 2, theta=1.0).double()
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    a, b = conv(x), conv(x + 3.0)
    torch.testing.assert_close(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_theta_zero_is_a_plain_convolution(spatial_dims: int) -> None:
    torch.manual_seed(2)
    conv = CDConv(spatial_dims, 3, 4, theta=0.0, bias=True)
    x = torch.rand((2, 3) + (7,) * spatial_dims)
    fn = F.conv2d if spatial_dims == 2 else F.conv3d
    torch.testing.assert_close(conv(x), fn(x, conv.weight, conv.conv.bias, padding=1))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_two_term_definition_with_stride_and_gradient(spatial_dims: int) -> None:
    """The folded kernel equals vanilla conv minus theta times the 1x1 kernel-sum conv, also with stride 2, and the
    gradient reaches the learnable kernel."""
    torch.manual_seed(3)
    conv = CDConv(spatial_dims, 2, 3, stride=2, theta=0.6)
    x = torch.rand((1, 2) + (9,) * spatial_dims, requires_grad=True)
    fn = F.conv2d if spatial_dims == 2 else F.conv3d
    w = conv.weight
    ref = fn(x, w, padding=1, stride=2) - 0.6 * fn(x, w.sum(dim=tuple(range(2, 2 + spatial_dims)), keepdim=True),
                                                    stride=2)
    out = conv(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    assert float(conv.weight.grad.abs().sum()) > 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="spatial_dims"):
        CDConv(1, 1, 1)
    with pytest.raises(ValueError, match="theta"):
        CDConv(2, 1, 1, theta=1.5)
    with pytest.raises(ValueError, match="odd"):
        CDConv(2, 1, 1, kernel_size=4)


@pytest.mark.parametrize("spatial_dims,shape", [(2, (37, 50)), (3, (13, 17, 10))])
@pytest.mark.parametrize("theta", [0.0, 0.7])
def test_generator_keeps_any_size(spatial_dims: int, shape: tuple, theta: float) -> None:
    torch.manual_seed(4)
    net = PerturbationGenerator(spatial_dims, 5, 3, channels=(4, 8, 8), theta=theta)
    x = torch.rand((2, 5) + shape)
    y = net(x)
    assert y.shape == (2, 3) + shape and torch.isfinite(y).all()
    y.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    cdc = [m for m in net.modules() if isinstance(m, CDConv)]
    assert cdc and all(m.theta == theta for m in cdc)


def test_generator_output_per_sample_is_independent_of_the_batch() -> None:
    """Instance norm: a sample's output does not depend on the other samples in its batch."""
    torch.manual_seed(5)
    net = PerturbationGenerator(2, 3, 3, channels=(4, 8)).eval()
    a, b = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(torch.cat([a, b]))[:1], net(a), rtol=1e-5, atol=1e-6)
