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

"""The attacker battery: nnU-Net's augmentation, bit depth, the adaptive pattern attacker, new victims, recipes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_umed.evaluation.adaptive import estimate_shared_pattern, subtract_shared_pattern
from monai_umed.evaluation.command import add_command, run
from monai_umed.evaluation.defences import BitDepth, get_defence
from monai_umed.evaluation.nnunet_aug import nnunet_augment
from monai_umed.evaluation.recipes import RECIPES, get_recipe, recipe_applies
from monai_umed.evaluation.train import describe_data, load_split, make_config
from monai_umed.networks.victims import patch_size, victim_network

sys.path.insert(0, str(Path(__file__).parent))
from test_evaluate import _protected_copy, _write_2d, _write_3d  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _battery():
    spec = importlib.util.spec_from_file_location("robustness", ROOT / "benchmarks" / "robustness.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("part", ["all", "spatial", "intensity"])
def test_nnunet_augment_moves_image_and_label_together(spatial_dims, part):
    from monai.transforms import Compose

    ts = nnunet_augment(spatial_dims, part, p_rotate=1.0, p_scale=1.0, p_noise=1.0, p_blur=1.0, p_brightness=1.0,
                        p_contrast=1.0, p_lowres=1.0, p_gamma=1.0)
    names = {type(t).__name__ for t in ts}
    assert ("RandAffined" in names) == (part != "intensity")
    assert ("RandSimulateLowResolutiond" in names) == (part != "spatial")
    shape = (16,) * spatial_dims
    y = torch.zeros((1, *shape))
    y[(0, *[slice(4, 12)] * spatial_dims)] = 1
    x = y.clone().repeat(2, *[1] * spatial_dims) * 3 + torch.rand((2, *shape))
    c = Compose(ts)
    c.set_random_state(0)
    out = c({"image": x, "label": y})
    assert out["image"].shape == x.shape and out["label"].shape == y.shape
    assert set(torch.unique(torch.as_tensor(out["label"])).tolist()) <= {0.0, 1.0}  # nearest for labels
    assert not torch.equal(torch.as_tensor(out["image"]), x)
    with pytest.raises(ValueError, match="unknown"):
        nnunet_augment(spatial_dims, "all", p_nothing=1)
    with pytest.raises(ValueError, match="p_noise"):
        nnunet_augment(spatial_dims, "all", p_noise=2)


def test_defence_specs_labels_and_intensity():
    d = get_defence("nnunet")
    assert d.label == "nnunet" and d.intensity == "zscore" and not d.dataset_level
    assert get_defence("nnunet:rotate=30,p_rotate=0.5").label == "nnunet(rotate=30, p_rotate=0.5)"
    assert get_defence("pattern_subtract").dataset_level
    assert get_defence("bit_depth:bits=3").label == "bit_depth(bits=3)"
    for bad in ("bit_depth:bits=0", "nnunet:p_noise=3", "pattern_subtract:grid=2", "nnunet:colour=1"):
        with pytest.raises(ValueError):
            get_defence(bad)
    info = {"spatial_dims": 2, "in_channels": 3, "num_classes": 2, "shapes": [(64, 64)]}
    assert make_config("unet", info, 1, defence=get_defence("nnunet")).intensity == "zscore"
    assert make_config("unet", info, 1, defence=get_defence("nnunet"), intensity="scale").intensity == "scale"
    assert make_config("unet", info, 1).intensity == "scale"


def test_bit_depth():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    out = BitDepth(2)(x)
    assert out.dtype == np.float32 and len(np.unique(out)) == 4 and out.min() == 0 and out.max() == 255
    assert np.abs(out - x).max() <= 255 / 3 / 2 + 1e-4


def _tiled_cases(n: int, rng: np.random.Generator, amp: float = 2.0):
    """Smooth random RGB images carrying a class-wise 4-cell tile on a 128 grid (2 native pixels per cell)."""
    tiles = rng.choice([-1.0, 1.0], size=(2, 3, 4, 4))
    idx = np.arange(128) % 4
    images, labels, deltas = [], [], []
    for _ in range(n):
        x = np.cumsum(np.cumsum(rng.normal(size=(3, 256, 256)), 1), 2)
        x = (x - x.min()) / (x.max() - x.min()) * 200 + 20
        y = np.zeros((1, 256, 256))
        r0, c0 = rng.integers(20, 120, size=2)
        y[0, r0:r0 + 100, c0:c0 + 90] = 1
        cls = y[0, ::2, ::2].astype(int)
        g = tiles[cls[None], np.arange(3)[:, None, None], idx[None, :, None], idx[None, None, :]]
        d = np.repeat(np.repeat(g, 2, 1), 2, 2) * amp
        images.append(np.round(x + d))
        labels.append(y)
        deltas.append(d)
    return images, labels, deltas


def test_adaptive_attacker_finds_and_removes_a_shared_tile():
    rng = np.random.default_rng(0)
    images, labels, deltas = _tiled_cases(24, rng)
    p = estimate_shared_pattern(images, labels, num_classes=2)
    assert p.period == 4 and p.classwise and p.tiles.shape == (2, 3, 4, 4)
    assert p.null_ratio > 10
    before = np.mean([np.mean(d**2) for d in deltas])
    after = np.mean([np.mean((subtract_shared_pattern(x, y, p) - (x - d)) ** 2)
                     for x, y, d in zip(images, labels, deltas)])
    assert after < 0.5 * before
    # nothing shared: no period stands out
    plain = [np.round(x - d) for x, d in zip(images, deltas)]
    assert estimate_shared_pattern(plain, labels, num_classes=2).null_ratio < 3


@pytest.mark.parametrize("name", ["segresnet", "dynunet"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_new_victims(name, spatial_dims):
    net = victim_network(name, spatial_dims, 1, 3)
    roi = patch_size(name, [(37,) * spatial_dims])
    out = net(torch.zeros((1, 1, *roi)))
    assert out.shape == (1, 3, *roi)


def test_recipes_apply_and_resolve():
    assert get_recipe("NNUNET").defence == "nnunet"
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("nope")
    for r in RECIPES.values():
        get_defence(r.defence)  # every spec parses
    assert not recipe_applies(get_recipe("jpeg50"), 3, 1)
    assert not recipe_applies(get_recipe("grayscale"), 2, 1)
    assert recipe_applies(get_recipe("nnunet"), 3, 1)


def test_battery_runs_every_recipe_with_its_own_clean_baseline(tmp_path):
    pytest.importorskip("einops", reason="SwinUNETR needs einops")
    clean = _write_2d(tmp_path / "clean", n_train=3, n_test=1, size=32)
    prot = _protected_copy(clean, tmp_path / "prot")
    out = tmp_path / "out"
    rc = _battery().main([str(clean), f"noise={prot}", "--recipes", ",".join(n for n in RECIPES if n != "epochs100"),
                          "--epochs", "1", "--image-size", "32", "--threads", "1", "--quiet",
                          "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "robustness.json").read_text())
    rows = rep["rows"]
    assert [r["recipe"] for r in rows] == [n for n in RECIPES if n != "epochs100"]
    assert all(0.0 <= r["dice_clean"] <= 1.0 and 0.0 <= r["dice_protected"] <= 1.0 for r in rows)
    # one clean baseline per recipe, trained the recipe's way
    assert len({r["clean_victim_key"] for r in rows}) == len(rows)
    by = {r["recipe"]: r for r in rows}
    assert by["dynunet"]["victim"] == "dynunet" and by["size256"]["image_size"] == [256, 256]
    assert by["pattern_subtract"]["pattern"]["period"] >= 2
    assert "| noise | nnunet | 0 |" in (out / "robustness.md").read_text()


def test_battery_skips_what_does_not_apply_and_confirms_near_the_bound(tmp_path):
    clean = _write_3d(tmp_path / "clean", n_train=2, n_test=1)
    out = tmp_path / "out"
    _battery().main([str(clean), f"same={clean}", "--recipes", "standard,jpeg50", "--epochs", "1", "--threads", "1",
                     "--image-size", "32", "--quiet", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                     "--bound", "standard=0.5", "--margin", "1.0", "--confirm-seeds", "1"])
    rep = json.loads((out / "robustness.json").read_text())
    assert rep["skipped"] == ["jpeg50"]
    assert [r["seed"] for r in rep["rows"]] == [0, 1, "mean of 2"]


def test_cli_recipe(tmp_path, capsys):
    import argparse

    clean = _write_2d(tmp_path / "clean", n_train=2, n_test=1, size=32)
    parser = argparse.ArgumentParser()
    add_command(parser.add_subparsers())
    args = parser.parse_args(["evaluate", str(clean), str(clean), "--recipe", "bitdepth4", "--epochs", "1",
                              "--threads", "1", "--quiet", "--no-cache", "--report", str(tmp_path / "r.json")])
    assert run(args) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["defence"] == "bit_depth(bits=4)" and rep["victim"] == "unet" and rep["epochs"] == 1
    args = parser.parse_args(["evaluate", str(clean), str(clean), "--recipe", "segresnet", "--epochs", "1",
                              "--threads", "1", "--quiet", "--no-cache", "--report", str(tmp_path / "s.json")])
    assert run(args) == 0
    assert json.loads((tmp_path / "s.json").read_text())["victim"] == "segresnet"
    assert describe_data(clean, load_split(clean, "training"), None)["spatial_dims"] == 2
