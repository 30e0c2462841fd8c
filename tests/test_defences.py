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

"""Each defence keeps shape and dtype and has the effect it is named for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, create_test_image_2d, create_test_image_3d
from monai.transforms import Compose

from monai_umed.evaluation.defences import (
    DEFENCES,
    Grayscale,
    GrayscaleD,
    JpegCompress,
    JpegCompressD,
    get_defence,
    pgd_attack,
)


def _rgb(seed: int = 0, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    im, seg = create_test_image_2d(size, size, num_objs=4, rad_max=10, noise_max=0.3, num_seg_classes=1,
                                   random_state=np.random.RandomState(seed))
    rng = np.random.RandomState(seed + 1)
    rgb = np.stack([im * w for w in (0.9, 0.6, 0.3)]) * 255 + rng.randint(0, 30, (3, size, size))
    return np.clip(rgb, 0, 255).astype(np.uint8), seg[None].astype(np.int64)


def _apply(transforms, image, label=None):
    data = {"image": MetaTensor(torch.as_tensor(image))}
    if label is not None:
        data["label"] = MetaTensor(torch.as_tensor(label))
    return Compose(transforms)(data)


def test_parse_defaults_and_errors():
    assert set(DEFENCES) == {"none", "gaussian_blur", "median", "jpeg", "grayscale", "strong_aug", "adv_train", "bit_depth",
                             "nnunet", "nnunet_spatial", "nnunet_intensity", "pattern_subtract"}
    assert get_defence("none").preprocess() == [] and get_defence("none").label == "none"
    d = get_defence("jpeg:quality=50")
    assert d.params["quality"] == 50 and d.label == "jpeg(quality=50)" and not d.at_test
    assert get_defence("grayscale").at_test
    assert not get_defence("grayscale:at_test=0").at_test
    adv = get_defence("adv_train", epsilon=8 / 255)
    assert adv.adversarial and adv.params["eps"] == pytest.approx(4 / 255)
    assert adv.params["alpha"] == pytest.approx(2.5 * 4 / 255 / 3)
    assert get_defence("adv_train:eps=2/255,steps=2").params["eps"] == pytest.approx(2 / 255)
    with pytest.raises(ValueError, match="unknown defence"):
        get_defence("sharpen")
    with pytest.raises(ValueError, match="bad parameter"):
        get_defence("jpeg:sigma=1")
    with pytest.raises(ValueError):
        get_defence("gaussian_blur:sigma=-1")
    with pytest.raises(ValueError, match="2D"):
        get_defence("jpeg", spatial_dims=3, channels=1)
    with pytest.raises(ValueError, match="RGB"):
        get_defence("grayscale", spatial_dims=2, channels=1)


@pytest.mark.parametrize("spec", ["gaussian_blur:sigma=1.0", "median"])
def test_smoothing_reduces_variance_2d_and_3d(spec):
    rgb, _ = _rgb()
    d = get_defence(spec)
    out = _apply(d.preprocess(), rgb)["image"]
    assert out.shape == rgb.shape and out.dtype == torch.float32
    # high-frequency energy (neighbour differences) drops; the mean stays
    diff = lambda a: float(torch.as_tensor(a, dtype=torch.float32).diff(dim=-1).var())  # noqa: E731
    assert diff(out) < 0.5 * diff(rgb)
    assert float(out.mean()) == pytest.approx(float(rgb.astype(np.float32).mean()), rel=0.05)
    vol, _ = create_test_image_3d(16, 16, 16, rad_max=6, rad_min=2, noise_max=0.5,
                                  random_state=np.random.RandomState(0))
    out3 = _apply(d.preprocess(), vol[None].astype(np.float32))["image"]
    assert out3.shape == (1, 16, 16, 16) and float(out3.var()) < float(vol.var())


def test_jpeg_changes_values_keeps_range_and_dtype():
    rgb, _ = _rgb()
    out = _apply(get_defence("jpeg:quality=30").preprocess(), rgb)["image"]
    assert out.shape == rgb.shape and out.dtype == torch.uint8
    assert not np.array_equal(np.asarray(out), rgb)
    assert int(out.min()) >= 0 and int(out.max()) <= 255
    assert float(np.abs(np.asarray(out, np.float64) - rgb).mean()) < 20  # lossy, not destroyed
    stronger = JpegCompress(5)(rgb)
    assert np.abs(stronger.astype(float) - rgb).mean() > np.abs(np.asarray(out, float) - rgb).mean()
    gray = np.linspace(-100.0, 300.0, 32 * 32, dtype=np.float32).reshape(1, 32, 32)
    g = JpegCompress(75)(gray)
    assert g.dtype == np.float32 and g.shape == gray.shape
    assert g.min() >= -100.5 and g.max() <= 300.5 and np.abs(g - gray).max() > 0
    with pytest.raises(ValueError):
        JpegCompress()(np.zeros((1, 8, 8, 8), np.uint8))
    d = JpegCompressD(keys="image", quality=50)({"image": rgb})
    assert d["image"].shape == rgb.shape


def test_grayscale_equal_channels():
    rgb, _ = _rgb()
    out = _apply(get_defence("grayscale").preprocess(), rgb)["image"]
    assert out.shape == rgb.shape and out.dtype == torch.uint8
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    expected = np.round(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])
    np.testing.assert_allclose(np.asarray(out[0], np.float64), expected, atol=0.5)
    assert GrayscaleD(keys="image")({"image": rgb.astype(np.float32)})["image"].dtype == np.float32
    with pytest.raises(ValueError, match="RGB"):
        Grayscale()(np.zeros((1, 4, 4), np.uint8))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_strong_aug_keeps_shape_and_labels(spatial_dims):
    d = get_defence("strong_aug:prob=1,elastic_prob=1")
    if spatial_dims == 2:
        img, seg = create_test_image_2d(32, 32, rad_max=8, num_seg_classes=2, random_state=np.random.RandomState(0))
    else:
        img, seg = create_test_image_3d(16, 16, 16, rad_max=6, rad_min=2, num_seg_classes=2,
                                        random_state=np.random.RandomState(0))
    t = Compose(d.augment(spatial_dims))
    t.set_random_state(seed=0)
    out = t({"image": img[None].astype(np.float32), "label": seg[None].astype(np.float32)})
    assert tuple(out["image"].shape) == (1,) + img.shape and tuple(out["label"].shape) == (1,) + seg.shape
    assert set(np.unique(np.asarray(out["label"]))) <= set(np.unique(seg))
    assert not np.allclose(np.asarray(out["image"]), img[None])


def test_adv_train_pgd_increases_loss_within_budget():
    from monai.losses import DiceCELoss

    from monai_umed.networks.victims import victim_network

    torch.manual_seed(0)
    net = victim_network("unet", 2, 1, 2, channels=[4, 8], strides=[2]).eval()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    img, seg = create_test_image_2d(32, 32, rad_max=8, random_state=np.random.RandomState(0))
    x = torch.as_tensor(img, dtype=torch.float32)[None, None]
    y = torch.as_tensor(seg > 0, dtype=torch.long)[None, None]
    eps = 8 / 255
    adv = pgd_attack(net, loss_fn, x, y, eps=eps, steps=5, alpha=2 / 255, generator=torch.Generator().manual_seed(0))
    rng = float(x.max() - x.min())
    assert adv.shape == x.shape
    assert float((adv - x).abs().max()) <= eps * rng + 1e-6
    with torch.no_grad():
        assert float(loss_fn(net(adv), y)) > float(loss_fn(net(x), y))
