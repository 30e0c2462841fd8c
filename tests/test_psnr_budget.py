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

"""A dataset's PSNR budget (``mean_psnr``): one per-case floor chosen so that the written files reach a mean."""

import math

import numpy as np
import pytest
import torch
from monai.data import create_test_image_2d

from monai_umed.protectors.psnr_budget import floor_for_mean, written_psnr
from monai_umed.protectors.umed import UMedProtector

FAST = dict(epochs=1, batch_size=4, refine_rounds=2, refine_pgd=2, victim_grids=(32,), seed=3, refine_tile=4,
            distil_epochs=0)


def _samples():
    """Cases with large labels (their energy budget binds) and tiny ones (their budget map binds first)."""
    out = []
    for i, rad in enumerate((12, 12, 12, 11, 11, 11)):
        rs = np.random.RandomState(i)
        im, lab = create_test_image_2d(48, 48, num_objs=1 if rad < 5 else 3, rad_max=rad, rad_min=rad - 1,
                                       random_state=rs)
        x = torch.tensor(im)[None].float().repeat(3, 1, 1)
        x = (x / x.max() * 255).round() / 255
        out.append({"image": x, "label": torch.tensor(lab > 0)[None].long(), "case_id": f"c{i}"})
    return out


def _written(p, s):
    """The case's PSNR as its 8-bit file will have it (dB; inf when unchanged)."""
    d = p.perturbation(s["image"], s["label"], s["case_id"])
    stored = np.round(s["image"].numpy() * 255)
    dq = (np.clip(np.round(stored + d.numpy() * 255), 0, 255) - stored) / 255.0
    mse = float((dq.astype(np.float64) ** 2).mean())
    return math.inf if mse == 0 else -10 * math.log10(mse)


def test_floor_for_mean():
    assert floor_for_mean([48.0, 48.0, 56.0], 48.0, 50.0) == 48.0  # the mean is reached at the lowest floor
    f = floor_for_mean([48.0, 48.0, 52.0], 48.0, 50.0, margin=0.0)
    assert f == pytest.approx(49.0, abs=1e-6)  # (2 f + 52) / 3 = 50
    assert floor_for_mean([48.0, 48.0], 48.0, 50.0, margin=0.0) == pytest.approx(50.0, abs=1e-6)
    assert floor_for_mean([48.0, math.inf, 52.0], 48.0, 50.0, margin=0.0) == 48.0  # unchanged cases left out
    assert floor_for_mean([], 48.0, 50.0) == 48.0
    x = torch.full((1, 8, 8), 128 / 255)
    assert written_psnr(x, torch.zeros_like(x), None, 255) == math.inf
    assert written_psnr(x, torch.full_like(x, 1 / 255), None, 255) == pytest.approx(20 * math.log10(255), abs=1e-6)


def test_mean_psnr_spends_what_a_per_case_floor_leaves():
    samples = _samples()
    # the tile written on its fitting map, which lets the large labels take more than a 50 dB floor gives them (the
    # ``auto`` write bound leaves the flattest quarter of the ROI out, and that map alone holds them above 50 dB)
    maps = dict(tile_bound="fit")
    floor50 = UMedProtector(**FAST, **maps).fit(samples, progress=False)
    spent = UMedProtector(**FAST, **maps, min_psnr=48, mean_psnr=50).fit(samples, progress=False)
    assert floor50.psnr_floor is None and 48.0 <= spent.psnr_floor < 50.0
    before = [_written(floor50, s) for s in samples]
    after = [_written(spent, s) for s in samples]
    finite = [v for v in after if math.isfinite(v)]
    assert min(after) >= 48.0 - 1e-6 and sum(finite) / len(finite) >= 50.0  # the budget as the judge counts it
    assert min(before) >= 50.0 - 1e-6
    assert any(a < b - 0.5 for a, b in zip(after, before))  # the large labels get energy the 50 dB floor withheld
    for s in samples:  # still inside the budget map
        d = spent.perturbation(s["image"], s["label"], s["case_id"])
        assert torch.all(d.abs() <= spent.budget(s["image"], s["label"]) + 1e-6)
    # the key keeps the fitted floor: a loaded protector writes the same files and gives unseen cases that floor
    loaded = UMedProtector().load_state_dict(spent.state_dict())
    assert loaded.mean_psnr == 50.0 and loaded.psnr_floor == spent.psnr_floor
    s = samples[0]
    assert torch.equal(loaded.perturbation(s["image"], s["label"], s["case_id"]),
                       spent.perturbation(s["image"], s["label"], s["case_id"]))
    unseen = _written(loaded, {**s, "case_id": "new"})
    assert unseen >= spent.psnr_floor - 1e-6
    # a key written before the mean budget existed holds every case at min_psnr
    old = floor50.state_dict()
    old["params"].pop("mean_psnr")
    old.pop("psnr_floor")
    assert UMedProtector(mean_psnr=50, min_psnr=48).load_state_dict(old).mean_psnr is None


def test_mean_psnr_needs_a_floor_below_it():
    with pytest.raises(ValueError, match="mean_psnr"):
        UMedProtector(mean_psnr=49, min_psnr=50)
    with pytest.raises(ValueError, match="mean_psnr"):
        UMedProtector(mean_psnr=50, min_psnr=None)
