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

"""UMed end to end on tiny synthetic data: fit, protect, budgets after quantisation, modes, state, resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import create_test_image_2d, create_test_image_3d

from monai_umed import protectors
from monai_umed.intensity import compute_mapping, quantise
from monai_umed.masks import contour_band
from monai_umed.networks.cdconv import CDConv
from monai_umed.protectors.umed import UMedProtector

TINY = {"channels": (4, 8, 8), "surrogate_channels": (4, 8, 8), "patch_size": 32, "batch_size": 4, "device": "cpu"}


def samples_2d(n: int = 6, size: int = 48, seed: int = 0) -> list[dict]:
    """RGB images from 8-bit values (multiples of 1/255) with a binary label."""
    out = []
    for i in range(n):
        rs = np.random.RandomState(seed + i)
        im, lab = create_test_image_2d(size, size, num_objs=2, rad_max=10, rad_min=5, noise_max=0.3,
                                       num_seg_classes=1, random_state=rs)
        im = np.clip(im, 0, 1)
        rgb = np.stack([im, 0.8 * im + 0.1, 1.0 - 0.5 * im])
        out.append({"image": torch.from_numpy(np.round(rgb * 255).astype(np.float32) / 255),
                    "label": torch.from_numpy((lab > 0).astype(np.int64))[None], "case_id": f"case{i}"})
    return out


def samples_3d(n: int = 4, size: int = 20, seed: int = 0) -> list[dict]:
    """Float single-channel volumes with labels 0, 1, 2."""
    out = []
    for i in range(n):
        rs = np.random.RandomState(seed + i)
        im, lab = create_test_image_3d(size, size + 2, size - 2, num_objs=3, rad_max=6, rad_min=3, noise_max=0.2,
                                       num_seg_classes=2, random_state=rs)
        im = (im - im.min()) / (im.max() - im.min())
        out.append({"image": torch.from_numpy(im.astype(np.float32))[None],
                    "label": torch.from_numpy(lab.astype(np.int64))[None], "case_id": f"vol{i}"})
    return out


@pytest.fixture(scope="module")
def fitted_2d() -> tuple[UMedProtector, list[dict]]:
    data = samples_2d()
    p = protectors.get("umed", epsilon=8 / 255, epochs=2, **TINY)
    assert isinstance(p, UMedProtector)
    p.fit(data, progress=False)
    return p, data


def test_registry_and_parameters() -> None:
    p = protectors.get("umed", epsilon=4 / 255, contour_radius=3, theta=0.5, epochs=2)
    assert p.name == "umed" and p.fits and not p.fitted
    params = p.params()
    assert params["epsilon_c"] == params["epsilon_t"] == pytest.approx(4 / 255)
    assert params["contour_radius"] == 3 and params["theta"] == 0.5 and params["mode"] == "both"
    json.dumps(params)  # recorded in the manifest
    q = protectors.get("umed", patch_size="64,48", resize_aug="0.25,0.5", channels="8,16", texture_quantiles="0,1")
    assert q.patch_size == (64, 48) and q.resize_aug == (0.25, 0.5) and q.channels == (8, 16)
    assert protectors.get("umed", resize_aug=False).resize_aug is None
    for bad in ({"mode": "edges"}, {"theta": 2.0}, {"epsilon_c": 3.0}, {"gen_scale": 0.5}, {"resize_aug": "0.5,0.2"}):
        with pytest.raises(ValueError):
            protectors.get("umed", **bad)
    with pytest.raises(RuntimeError, match="not fitted"):
        p.perturbation(torch.rand(3, 16, 16), torch.zeros(1, 16, 16, dtype=torch.int64))


def test_fit_protect_2d_budget_after_quantisation(fitted_2d) -> None:
    p, data = fitted_2d
    assert p.fitted and p.spatial_dims == 2 and len(p.history) == 2
    assert p._levels_resolved == 255  # 8-bit inputs detected: the straight-through rounding was simulated
    deltas = p.perturbation_batch([d["image"] for d in data], [d["label"] for d in data], [d["case_id"] for d in data])
    eps_q = int(np.floor(p.max_epsilon * 255 + 1e-9))
    for d, delta in zip(data, deltas):
        x, y = d["image"], d["label"]
        assert delta.shape == x.shape and delta.dtype == torch.float32 and torch.isfinite(delta).all()
        limit = p.budget(x, y)
        assert bool((delta.abs() <= limit + 1e-6).all())
        region = (y > 0) | contour_band(y, radius=p.contour_radius)
        assert float(delta[:, ~region[0]].abs().max()) == 0.0
        assert float((x + delta).min()) >= 0.0 and float((x + delta).max()) <= 1.0
        # written as uint8 through the project's quantiser: the budget still holds voxel by voxel
        stored = np.round(x.numpy() * 255).astype(np.uint8)
        mapping = compute_mapping(stored)
        protected, dq = quantise(stored, delta.numpy(), mapping, p.max_epsilon)
        assert protected.dtype == np.uint8
        assert np.abs(dq).max() <= eps_q
        assert np.all(np.abs(dq) <= np.round(limit.numpy() * 255) + 1e-6)
        assert not np.any(dq[:, ~region[0].numpy()])
        mse = np.mean((dq / 255.0) ** 2)
        assert mse > 0 and 10 * np.log10(1 / mse) >= p.min_psnr - 1e-6
    assert sum(int(np.count_nonzero(dl.numpy())) for dl in deltas) > 0


def test_min_psnr_scales_only_when_needed() -> None:
    x = torch.rand(1, 32, 32)
    y = torch.zeros(1, 32, 32, dtype=torch.int64)
    y[:, 4:28, 4:28] = 1  # a large ROI: the full budget would cost more than 50 dB
    loose = UMedProtector(epsilon=8 / 255, min_psnr=None, quantise_levels=0, spatial_dims=2)
    tight = UMedProtector(epsilon=8 / 255, min_psnr=50.0, quantise_levels=0, spatial_dims=2)
    band = contour_band(y, radius=2)[0]
    assert torch.allclose(loose.budget(x, y)[0][band], torch.tensor(8 / 255))
    lim = tight.budget(x, y)
    assert 10 * np.log10(1 / float(lim.double().square().mean())) == pytest.approx(50.0, abs=1e-6)
    x_big = torch.rand(1, 96, 96)
    small = torch.zeros(1, 96, 96, dtype=torch.int64)
    small[:, 40:43, 40:43] = 1  # a tiny ROI in a large image keeps the full budget
    band_small = contour_band(small, radius=2)[0]
    assert torch.allclose(tight.budget(x_big, small)[0][band_small], torch.tensor(8 / 255))


def test_modes_confine_the_perturbation() -> None:
    data = samples_2d(n=4, size=40, seed=10)
    x, y = data[0]["image"], data[0]["label"]
    band = contour_band(y, radius=2)[0]
    roi = y[0] > 0
    for mode, region in (("contour", band), ("texture", roi)):
        p = UMedProtector(mode=mode, epochs=1, theta=0.0, **TINY).fit(data, progress=False)
        assert all(m.theta == 0.0 for m in p.gen_c.modules() if isinstance(m, CDConv))
        delta = p.perturbation(x, y, "case0")
        assert float(delta[:, ~region].abs().max()) == 0.0
        assert float(delta[:, region].abs().max()) > 0.0


def test_state_dict_round_trip_protects_identically(fitted_2d) -> None:
    p, data = fitted_2d
    buf = io.BytesIO()
    torch.save(p.state_dict(), buf)
    q = protectors.get("umed").load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    assert q.fitted and q.in_channels == 3 and q.params()["channels"] == [4, 8, 8]
    for d in data[:3]:
        a = p.perturbation(d["image"], d["label"], d["case_id"])
        b = q.perturbation(d["image"], d["label"], d["case_id"])
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="no generators"):
        protectors.get("umed").load_state_dict(protectors.get("umed").state_dict())


def test_batching_does_not_change_a_case(fitted_2d) -> None:
    p, data = fitted_2d
    alone = p.perturbation(data[1]["image"], data[1]["label"], data[1]["case_id"])
    batch = p.perturbation_batch([d["image"] for d in data[:3]], [d["label"] for d in data[:3]],
                                 [d["case_id"] for d in data[:3]])
    torch.testing.assert_close(batch[1], alone, rtol=0, atol=1e-6)


def test_checkpoint_resume_equals_uninterrupted_fit(tmp_path: Path) -> None:
    data = samples_2d(n=4, size=40, seed=20)
    full = UMedProtector(epochs=2, seed=3, **TINY).fit(data, progress=False)
    ckpt = tmp_path / "umed.ckpt"
    first = UMedProtector(epochs=1, seed=3, **TINY).fit(data, progress=False, checkpoint=ckpt)
    assert ckpt.is_file() and len(first.history) == 1
    state = torch.load(ckpt, weights_only=False)
    assert {"gen_c", "gen_t", "opt_gen", "surrogate", "epoch", "rng"} <= set(state) and state["epoch"] == 0
    resumed = UMedProtector(epochs=2, seed=3, **TINY).fit(data, progress=False, checkpoint=ckpt)
    assert resumed.history == full.history
    for a, b in ((full.gen_c, resumed.gen_c), (full.gen_t, resumed.gen_t)):
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(va, vb), k
    with pytest.raises(ValueError, match="different UMed parameters"):
        UMedProtector(epochs=2, seed=3, theta=0.1, **TINY).fit(data, progress=False, checkpoint=ckpt)


def test_3d_multiclass_sliding_window() -> None:
    data = samples_3d()
    p = UMedProtector(epochs=1, sw_roi_size=12, contour_radius_mm=1.5, **{**TINY, "patch_size": 16})
    p.fit(data, progress=False)
    assert p.spatial_dims == 3 and p.num_classes == 3 and p._levels_resolved == 0
    big = samples_3d(n=1, size=30, seed=7)[0]
    x, y = big["image"], big["label"]
    d1 = p.perturbation(x, y, big["case_id"])  # 30 x 32 x 28 > 12^3 windows: sliding-window path
    d2 = p.perturbation(x, y, big["case_id"])
    assert d1.shape == x.shape and torch.equal(d1, d2)
    limit = p.budget(x, y)
    assert bool((d1.abs() <= limit + 1e-6).all()) and float(d1.abs().max()) > 0
    region = (y > 0) | contour_band(y, radius=p.contour_radius)  # no spacing known: the voxel radius applies
    assert float(d1[:, ~region[0]].abs().max()) == 0.0


def test_empty_label_gives_no_perturbation(fitted_2d) -> None:
    p, _ = fitted_2d
    x = torch.rand(3, 40, 40)
    delta = p.perturbation(x, torch.zeros(1, 40, 40, dtype=torch.int64), "empty")
    assert float(delta.abs().max()) == 0.0
    with pytest.raises(ValueError, match="channels"):
        p.perturbation(torch.rand(1, 40, 40), torch.zeros(1, 40, 40, dtype=torch.int64), "grey")


def test_umed_protectd_in_a_compose_and_its_inverse(fitted_2d) -> None:
    from monai.data import MetaTensor
    from monai.transforms import Compose

    from monai_umed.transforms import Protectd, UMedProtectD, UMedProtectd, UMedProtectDict

    assert UMedProtectD is UMedProtectd is UMedProtectDict and issubclass(UMedProtectd, Protectd)
    p, data = fitted_2d
    d = data[0]
    x = MetaTensor(d["image"].clone(), meta={"filename_or_obj": "case0.png"})
    pipeline = Compose([UMedProtectd("image", protector=p, label_key="label", case_id_key="case_id")])
    out = pipeline({"image": x, "label": d["label"], "case_id": d["case_id"]})
    delta = out["image"].as_tensor() - d["image"]
    torch.testing.assert_close(delta, p.perturbation(d["image"], d["label"], d["case_id"]), rtol=0, atol=1e-6)
    assert float(delta.abs().max()) > 0
    back = pipeline.inverse(out)
    torch.testing.assert_close(back["image"].as_tensor(), d["image"], rtol=0, atol=1e-7)
    # built from a saved state instead of a live protector: same perturbation
    t2 = UMedProtectd("image", state=p.state_dict(), label_key="label", case_id_key="case_id")
    out2 = t2({"image": MetaTensor(d["image"].clone()), "label": d["label"], "case_id": d["case_id"]})
    assert torch.equal(out2["image"].as_tensor(), out["image"].as_tensor())
    with pytest.raises(ValueError, match="UMed"):
        UMedProtectd("image", protector=protectors.get("noise"))
    with pytest.raises(ValueError, match="state_dict"):
        UMedProtectd("image")


def test_contour_band_and_texture_bound_transforms() -> None:
    from monai.data import MetaTensor

    from monai_umed.masks import texture_bound
    from monai_umed.transforms import ContourBand, ContourBandd, ContourBandD, TextureBound, TextureBoundd

    assert ContourBandD is ContourBandd
    y = torch.zeros(1, 20, 20, 20, dtype=torch.int64)
    y[:, 5:15, 5:15, 5:15] = 1
    img = torch.rand(1, 20, 20, 20)
    # the label's own spacing makes the mm radius anisotropic: 2 voxels in-plane, 1 along the 2 mm axis
    meta_y = MetaTensor(y, affine=torch.diag(torch.tensor([1.0, 1.0, 2.0, 1.0])))
    band = ContourBand(radius_mm=2.0)(meta_y)
    assert isinstance(band, MetaTensor) and band.dtype == torch.uint8
    assert np.flatnonzero(band[0, 10, 10, :].numpy()).tolist() == [4, 5, 14, 15]
    assert np.flatnonzero(band[0, :, 10, 10].numpy()).tolist() == [3, 4, 5, 6, 13, 14, 15, 16]
    assert isinstance(ContourBand()(y.numpy()), np.ndarray)
    d = ContourBandd("label", radius=1)({"label": y})
    assert torch.equal(d["label"], y) and torch.equal(d["label_band"], ContourBand(radius=1)(y))
    d = TextureBoundd("image", label_key="label", b_min=0.3)({"image": img, "label": y})
    torch.testing.assert_close(d["image_bound"], texture_bound(img, y, 5, 0.3))
    torch.testing.assert_close(TextureBound(b_min=0.3)(img, y), d["image_bound"])
