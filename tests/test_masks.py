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

"""ROI, contour band and texture bound on synthetic shapes (disk, sphere, touching classes), 2D and 3D."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_umed.masks import (
    contour_band,
    roi_mask,
    spacing_of,
    structuring_element,
    texture_bound,
    texture_energy,
    texture_stats,
)


def disk(shape: tuple[int, ...], radius: float, value: int = 1) -> tuple[torch.Tensor, np.ndarray]:
    """A centred disk/sphere label (1 x spatial) and the distance of every voxel from the centre."""
    grids = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape], indexing="ij")
    dist = np.sqrt(sum(g**2 for g in grids))
    return torch.from_numpy((dist <= radius).astype(np.int64) * value)[None], dist


def test_structuring_element() -> None:
    assert structuring_element(0, 2).sum() == 1
    se = structuring_element(2, 2)
    assert se.shape == (5, 5) and se.sum() == 13 and se[2, 0] and not se[0, 0]
    ball = structuring_element(1, 3)
    assert ball.shape == (3, 3, 3) and ball.sum() == 7
    # 2 mm with 1 x 1 x 2 mm voxels: two voxels in-plane, one along the coarse axis
    aniso = structuring_element(2.0, 3, spacing=(1.0, 1.0, 2.0))
    assert aniso.shape == (5, 5, 3)


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_disk_band_width(radius: int) -> None:
    label, dist = disk((41, 41), 12.0)
    band = contour_band(label, radius=radius)[0].numpy()
    assert band.dtype == bool and band.shape == (41, 41)
    # the band holds the voxels near the circle: none farther than `radius` from it, all closer than
    # `radius - 1/sqrt(2)` (a grid voxel may lie up to half a diagonal from the continuous boundary)
    off = np.abs(dist - 12.0)
    assert off[band].max() <= radius + 1e-9
    assert band[off < radius - np.sqrt(0.5)].all()
    # across a horizontal line through the centre the band is 2 * radius voxels wide on each side
    row = band[20]
    assert row.sum() == 2 * (2 * radius)


def test_sphere_band_and_roi_3d() -> None:
    label, dist = disk((25, 25, 25), 8.0)
    roi = roi_mask(label)
    assert roi.dtype == torch.bool and int(roi.sum()) == int((dist <= 8.0).sum())
    band = contour_band(label, radius=2)[0].numpy()
    assert band[np.abs(dist - 8.0) <= 1.5].all()
    assert not band[dist <= 4.5].any() and not band[dist >= 11.5].any()


def test_spacing_aware_radius() -> None:
    """radius_mm with 1 x 1 x 2 mm voxels: the band is 2 voxels deep in-plane and 1 voxel deep along z."""
    label = torch.zeros(1, 20, 20, 20, dtype=torch.int64)
    label[:, 5:15, 5:15, 5:15] = 1
    band = contour_band(label, radius_mm=2.0, spacing=(1.0, 1.0, 2.0))[0].numpy()
    line_x = band[:, 10, 10]
    line_z = band[10, 10, :]
    assert np.flatnonzero(line_x).tolist() == [3, 4, 5, 6, 13, 14, 15, 16]
    assert np.flatnonzero(line_z).tolist() == [4, 5, 14, 15]
    # without spacing the mm radius is ignored and the voxel radius applies on every axis
    iso = contour_band(label, radius=2, radius_mm=2.0)[0].numpy()
    assert np.flatnonzero(iso[10, 10, :]).tolist() == [3, 4, 5, 6, 13, 14, 15, 16]


def test_multi_class_boundary() -> None:
    """Two touching classes: the per-class band includes their shared boundary, the binary ROI band does not."""
    label = torch.zeros(1, 30, 30, dtype=torch.int64)
    label[:, 5:25, 5:15] = 1
    label[:, 5:25, 15:25] = 2
    per_class = contour_band(label, radius=1)[0].numpy()
    binary = contour_band(label, radius=1, per_class=False)[0].numpy()
    assert per_class[15, 14] and per_class[15, 15]
    assert not binary[15, 14] and not binary[15, 15]
    assert (binary <= per_class).all()
    assert binary[15, 4] and binary[15, 5] and not binary[15, 7]


def test_structures_touching_the_image_border_have_no_band_there() -> None:
    label = torch.zeros(1, 20, 20, dtype=torch.int64)
    label[:, :10, :] = 1  # top half, touching three borders
    band = contour_band(label, radius=2)[0].numpy()
    assert not band[0].any() and not band[:8, 0].any()
    assert band[8:12, 10].all()


def test_empty_label_and_bad_shapes() -> None:
    empty = torch.zeros(1, 10, 10, dtype=torch.int64)
    assert not contour_band(empty).any()
    assert not texture_bound(torch.rand(3, 10, 10), empty).any()
    with pytest.raises(ValueError):
        contour_band(torch.zeros(2, 10, 10))
    with pytest.raises(ValueError):
        texture_bound(torch.rand(1, 10, 10), torch.ones(1, 9, 10, dtype=torch.int64))


def test_texture_energy_values() -> None:
    flat = torch.full((1, 12, 12), 0.3)
    assert float(texture_energy(flat).abs().max()) < 1e-6
    checker = torch.from_numpy((np.indices((12, 12)).sum(0) % 2).astype(np.float32))[None]
    e = texture_energy(checker, window=5)[0]
    # a 5x5 window of a checkerboard holds 13 of one value and 12 of the other
    assert e[6, 6] == pytest.approx(np.sqrt(13 * 12) / 25, abs=1e-6)
    vol = torch.rand(2, 6, 7, 8)
    assert texture_energy(vol, window=3).shape == vol.shape


def test_texture_bound_range_and_adaptivity() -> None:
    """Flat ROI regions get b_min, the most textured ones 1, the outside 0 (per channel)."""
    img = torch.zeros(2, 40, 40)
    img[:, :, 20:] = torch.from_numpy((np.indices((40, 20)).sum(0) % 2).astype(np.float32))  # textured right half
    label = torch.zeros(1, 40, 40, dtype=torch.int64)
    label[:, 5:35, 5:35] = 1
    b = texture_bound(img, label, window=5, b_min=0.25)
    assert b.shape == img.shape
    assert float(b[:, label[0] == 0].abs().max()) == 0.0
    inside = b[:, label[0] > 0]
    assert float(inside.min()) == pytest.approx(0.25) and float(inside.max()) == pytest.approx(1.0)
    assert torch.allclose(b[:, 20, 10], torch.full((2,), 0.25))
    assert torch.allclose(b[:, 20, 28], torch.ones(2))


def test_texture_bound_on_a_crop_equals_the_whole_image() -> None:
    torch.manual_seed(0)
    img = torch.rand(3, 48, 40)
    label, _ = disk((48, 40), 15.0)
    stats = texture_stats(img, label, window=5, quantiles=(0.05, 0.95))
    full = texture_bound(img, label, window=5, quantiles=(0.05, 0.95))
    crop = texture_bound(img[:, 6:40, 4:30], label[:, 6:40, 4:30], window=5, stats=stats)
    torch.testing.assert_close(crop[:, 2:-2, 2:-2], full[:, 8:38, 6:28])


def test_spacing_of_meta_tensor() -> None:
    x = MetaTensor(torch.zeros(1, 4, 4, 4), affine=torch.diag(torch.tensor([0.5, 0.5, 2.0, 1.0])))
    assert spacing_of(x) == pytest.approx((0.5, 0.5, 2.0))
    assert spacing_of(torch.zeros(1, 4, 4)) is None
