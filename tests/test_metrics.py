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

"""Evaluation metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import create_test_image_2d

from monai_umed.errors import InputError
from monai_umed.evaluation.command import pair_training_lists
from monai_umed.evaluation.metrics import (
    case_imperceptibility,
    data_range,
    dice_per_class,
    max_abs_delta,
    psnr,
    ssim,
    summarise_dice,
    summarise_imperceptibility,
)


def test_psnr_uint8_hand_computed():
    clean = np.zeros((1, 4, 4), np.uint8)
    prot = clean.copy()
    prot[0, 0, 0] = 4  # squared error 16 over 16 pixels -> MSE 1
    assert data_range(clean) == 255.0
    assert psnr(clean, prot) == pytest.approx(10 * math.log10(255.0**2 / 1.0))
    roi = np.zeros((1, 4, 4), bool)
    roi[0, 0, :2] = True  # two ROI pixels, one changed by 4 -> MSE 8
    assert psnr(clean, prot, mask=roi) == pytest.approx(10 * math.log10(255.0**2 / 8.0))
    assert max_abs_delta(clean, prot) == 4.0
    assert psnr(clean, clean) == math.inf
    assert math.isnan(psnr(clean, prot, mask=np.zeros_like(roi)))


def test_psnr_float_uses_clean_range_and_int16_dtype_range():
    clean = np.linspace(0, 2, 50, dtype=np.float32).reshape(1, 5, 10)
    prot = clean + np.float32(0.1)
    assert data_range(clean) == pytest.approx(2.0)
    assert psnr(clean, prot) == pytest.approx(10 * math.log10(4.0 / 0.01), abs=1e-4)
    ct = np.zeros((1, 2, 2, 2), np.int16)
    assert data_range(ct) == 65535.0
    # an RGB image with a change in one channel: MSE over every voxel and channel
    rgb = np.full((3, 2, 2), 100, np.uint8)
    rgb2 = rgb.copy()
    rgb2[1] += 2  # 4 of 12 values off by 2 -> MSE 16/12
    assert psnr(rgb, rgb2) == pytest.approx(10 * math.log10(255.0**2 * 12 / 16))


def test_ssim_identical_and_degraded_2d_3d():
    im, _ = create_test_image_2d(48, 48, num_objs=4, rad_max=10, noise_max=0.0, random_state=np.random.RandomState(0))
    clean = (im[None] * 200).astype(np.uint8)
    assert ssim(clean, clean) == pytest.approx(1.0)
    noisy = np.clip(clean.astype(int) + np.random.RandomState(1).randint(-20, 21, clean.shape), 0, 255).astype(np.uint8)
    assert ssim(clean, noisy) < 0.9
    vol = np.random.RandomState(2).rand(1, 12, 12, 12).astype(np.float32)
    assert ssim(vol, vol) == pytest.approx(1.0)
    assert ssim(vol, vol + 0.2 * np.random.RandomState(3).rand(*vol.shape).astype(np.float32)) < 1.0


def test_ssim_matches_monai_definition():
    from monai.metrics import SSIMMetric

    rng = np.random.RandomState(0)
    a = rng.randint(0, 256, (3, 40, 40)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.randint(-8, 9, a.shape), 0, 255).astype(np.uint8)
    ref = float(SSIMMetric(spatial_dims=2, data_range=255.0)(torch.tensor(b, dtype=torch.float64)[None],
                                                               torch.tensor(a, dtype=torch.float64)[None]).mean())
    assert ssim(a, b) == pytest.approx(ref, abs=1e-3)


def test_case_and_summary():
    clean = np.zeros((1, 4, 4), np.uint8)
    prot = clean.copy()
    prot[0, 1, 1] = 2
    label = np.zeros((1, 4, 4), np.uint8)
    label[0, 1, 1] = 1
    c = case_imperceptibility(clean, prot, label)
    assert c["psnr_roi"] == pytest.approx(10 * math.log10(255.0**2 / 4.0))
    assert c["psnr"] == pytest.approx(10 * math.log10(255.0**2 / (4.0 / 16)))
    assert c["max_abs_delta_rel"] == pytest.approx(2 / 255) and c["dtype"] == "uint8"
    same = case_imperceptibility(clean, clean, label)
    s = summarise_imperceptibility([c, same])
    assert s["identical_cases"] == 1 and s["cases"] == 2
    assert s["psnr"] == pytest.approx(c["psnr"])  # the identical case (inf) is left out of the mean
    assert s["max_abs_delta"] == 2.0 and s["max_abs_delta_rel"] == pytest.approx(2 / 255)
    assert s["dtypes"] == {"uint8": 2}


def test_dice_hand_computed():
    label = torch.zeros(1, 4, 4, dtype=torch.long)
    label[0, :2, :2] = 1  # 4 pixels of class 1
    label[0, 3, 3] = 2  # 1 pixel of class 2
    pred = torch.zeros_like(label)
    pred[0, :2, :1] = 1  # 2 pixels of class 1, both correct -> 2*2/(2+4) = 2/3
    pred[0, 0, 3] = 2  # class 2 wrong -> 0
    d = dice_per_class(pred, label, num_classes=3)
    assert d[0] == pytest.approx(2 / 3) and d[1] == pytest.approx(0.0)
    # a class absent from the ground truth is ignored (nan), not counted as 0 or 1
    d2 = dice_per_class(pred, torch.where(label == 2, 0, label), num_classes=3)
    assert math.isnan(d2[1])
    s = summarise_dice(np.array([d, d2]))
    assert s["dice"] == pytest.approx((2 / 3 + 0 + 2 / 3) / 3)
    assert s["dice_per_class"] == pytest.approx([2 / 3, 0.0])
    with pytest.raises(ValueError):
        dice_per_class(pred[0], label, 3)


def test_pairing_by_position_and_name():
    clean = [{"image": "/a/train/case_1.jpg", "label": "/a/l/case_1.png"}]
    ok = [{"image": "/b/train/case_1.png", "label": "/b/l/case_1.png"}]
    assert pair_training_lists(clean, ok)[0][1]["image"].endswith("case_1.png")
    with pytest.raises(InputError, match="does not correspond"):
        pair_training_lists(clean, [{"image": "/b/train/case_2.png", "label": "x"}])
    with pytest.raises(InputError, match="entries"):
        pair_training_lists(clean, ok + ok)
