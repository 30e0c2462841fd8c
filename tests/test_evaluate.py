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

"""``evaluate`` / ``monai-umed evaluate`` end to end on tiny synthetic datasets: report schema, cache, CLI."""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import create_test_image_2d, create_test_image_3d
from PIL import Image

from monai_umed.errors import InputError
from monai_umed.evaluation import REPORT_KEYS, evaluate
from monai_umed.evaluation.command import add_command, run

TINY = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0}
FAST = dict(epochs=1, victim_params=TINY, threads=1, progress=False, batch_size=4)


def _write_2d(root: Path, n_train: int = 6, n_test: int = 3, size: int = 40, noise: int = 0, seed: int = 0,
              ext: str = ".jpg") -> Path:
    rng = np.random.RandomState(seed)
    entries: dict[str, list] = {"training": [], "test": []}
    for split, n in (("training", n_train), ("test", n_test)):
        for i in range(n):
            im, seg = create_test_image_2d(size, size, num_objs=2, rad_max=8, noise_max=0.2, num_seg_classes=1,
                                           random_state=np.random.RandomState(100 * (split == "test") + i))
            rgb = np.clip(np.stack([im * 220, im * 160 + 20, im * 90 + 40], -1), 0, 255).astype(np.uint8)
            if noise and split == "training":
                rgb = np.clip(rgb.astype(int) + rng.randint(-noise, noise + 1, rgb.shape), 0, 255).astype(np.uint8)
            img_rel, lab_rel = f"{split}/img/case_{i}{ext}", f"{split}/lab/case_{i}.png"
            (root / img_rel).parent.mkdir(parents=True, exist_ok=True)
            (root / lab_rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(root / img_rel, quality=95) if ext == ".jpg" else Image.fromarray(rgb).save(
                root / img_rel)
            Image.fromarray((seg > 0).astype(np.uint8)).save(root / lab_rel)
            entries[split].append({"image": img_rel, "label": lab_rel})
    meta = {"name": "synthetic", "labels": {"0": "background", "1": "object"}, "tensorImageSize": "2D", **entries}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _protected_copy(clean: Path, out: Path, noise: int = 2, seed: int = 1) -> Path:
    """What the pipeline writes: the training images with a bounded change, as PNG, same names and order."""
    meta = json.loads((clean / "dataset.json").read_text())
    rng = np.random.RandomState(seed)
    for e in meta["training"]:
        rgb = np.asarray(Image.open(clean / e["image"])).astype(int)
        rgb = np.clip(rgb + rng.randint(-noise, noise + 1, rgb.shape), 0, 255).astype(np.uint8)
        e["image"] = e["image"].rsplit(".", 1)[0] + ".png"
        (out / e["image"]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(out / e["image"])
        e["label"] = str((clean / e["label"]).resolve())
    for e in meta["test"]:
        e["image"], e["label"] = str((clean / e["image"]).resolve()), str((clean / e["label"]).resolve())
    (out / "dataset.json").write_text(json.dumps(meta))
    return out


def _write_3d(root: Path, n_train: int = 4, n_test: int = 2, noise: int = 0) -> Path:
    entries: dict[str, list] = {"training": [], "test": []}
    rng = np.random.RandomState(3)
    for split, n in (("training", n_train), ("test", n_test)):
        for i in range(n):
            im, seg = create_test_image_3d(20, 24, 16, num_objs=3, rad_max=5, rad_min=2, num_seg_classes=2,
                                           random_state=np.random.RandomState(50 * (split == "test") + i))
            vol = np.clip(im * 200 + 20, 0, 255).astype(np.uint8)
            if noise:
                vol = np.clip(vol.astype(int) + rng.randint(-noise, noise + 1, vol.shape), 0, 255).astype(np.uint8)
            for kind, arr in (("images", vol), ("labels", seg.astype(np.uint8))):
                (root / kind).mkdir(parents=True, exist_ok=True)
                nib.save(nib.Nifti1Image(arr, np.eye(4)), root / kind / f"{split}_{i:03d}.nii.gz")
            entries[split].append({"image": f"images/{split}_{i:03d}.nii.gz",
                                   "label": f"labels/{split}_{i:03d}.nii.gz"})
    meta = {"name": "synthetic3d", "labels": {"0": "background", "1": "a", "2": "b"}, "tensorImageSize": "3D",
            **entries}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_evaluate_2d_report_schema_figure_and_cache(tmp_path):
    clean = _write_2d(tmp_path / "clean")
    prot = _protected_copy(clean, tmp_path / "prot", noise=2)
    cache = tmp_path / "cache"
    rep = evaluate(clean, prot, defences=("none", "jpeg:quality=50", "adv_train:steps=1"), image_size=32,
                   report=tmp_path / "r.json", figure=tmp_path / "f.png", cache_dir=cache, figure_cases=2, **FAST)
    for k in REPORT_KEYS:
        assert k in rep, k
    on_disk = json.loads((tmp_path / "r.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert set(REPORT_KEYS) <= set(on_disk)
    assert (tmp_path / "r.md").read_text().count("\n| ") >= 4
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    assert (tmp_path / "f.png").stat().st_size > 1000
    assert rep["victim"] == "unet" and rep["defence"] == "none" and rep["epochs"] == 1 and rep["seed"] == 0
    assert rep["image_size"] == [32, 32] and rep["config"]["patch_size"] == [32, 32]
    labels = [r["defence"] for r in rep["rows"]]
    assert labels[:2] == ["none", "jpeg(quality=50)"] and labels[2].startswith("adv_train(eps=0.01569, steps=1")
    for r in rep["rows"]:
        assert 0.0 <= r["dice_clean"] <= 1.0 and 0.0 <= r["dice_protected"] <= 1.0
        assert len(r["per_case_dice_clean"]) == 3  # every clean test case, scored at its native 40x40 grid
    # imperceptibility of +-2 grey levels on uint8 RGB
    assert rep["max_abs_delta"] == 2.0
    assert 44.0 < rep["psnr"] < 52.0 and rep["ssim"] > 0.95 and rep["psnr_roi"] > 40.0
    assert rep["imperceptibility"]["cases"] == 6 and len(rep["imperceptibility"]["per_case"]) == 6
    assert {"monai", "torch", "monai_umed"} <= set(rep["versions"]) and rep["wall_time_s"] > 0
    assert not rep["rows"][0]["clean_victim"]["cached"]
    # the clean baseline is cached by content hash: a second run with the same settings trains nothing new for it,
    # and a "protected" set identical to the clean one hits the same cache entry
    again = evaluate(clean, clean, image_size=32, cache_dir=cache, **FAST)
    assert again["rows"][0]["clean_victim"]["cached"] and again["rows"][0]["protected_victim"]["cached"]
    assert again["dice_clean"] == pytest.approx(rep["dice_clean"])
    assert again["dice_protected"] == again["dice_clean"]
    assert again["psnr"] is None and again["imperceptibility"]["identical_cases"] == 6
    assert again["max_abs_delta"] == 0.0
    # part of a copy: the first N cases of both lists, for both victims and the imperceptibility figures
    part = evaluate(clean, prot, image_size=32, cache_dir=cache, max_train=2, **FAST)
    assert part["datasets"]["train_cases"] == 2 and part["imperceptibility"]["cases"] == 2
    assert part["imperceptibility"]["per_case"] == rep["imperceptibility"]["per_case"][:2]
    with pytest.raises(InputError):
        evaluate(clean, prot, image_size=32, cache_dir=cache, max_train=0, **FAST)


def test_evaluate_3d_multiclass(tmp_path):
    clean = _write_3d(tmp_path / "clean")
    prot = _write_3d(tmp_path / "prot", noise=3)
    rep = evaluate(clean, prot, defences=["median"], report=tmp_path / "r3.json", cache_dir=tmp_path / "c", **FAST)
    assert rep["datasets"]["spatial_dims"] == 3 and rep["datasets"]["num_classes"] == 3
    assert rep["defence"] == "median(radius=1)"
    assert len(rep["rows"][0]["dice_per_class_clean"]) == 2  # two foreground classes, each scored
    assert all(len(c) == 2 for c in rep["rows"][0]["per_case_dice_protected"])
    assert rep["max_abs_delta"] <= 3.0 and math.isfinite(rep["psnr"])
    assert all(p % 4 == 0 for p in rep["config"]["patch_size"])
    assert rep["config"]["intensity"] == "zscore"


def test_evaluate_swinunetr_2d(tmp_path):
    pytest.importorskip("einops", reason="SwinUNETR needs einops")
    clean = _write_2d(tmp_path / "clean", n_train=2, n_test=1, size=32)
    rep = evaluate(clean, clean, victim="swinunetr", epochs=1, threads=1, progress=False, use_cache=False,
                   victim_params={"feature_size": 12, "depths": [1, 1, 1, 1]})
    # 32x32 images: one axis is padded to 64 so the bottleneck holds more than one pixel
    assert rep["victim"] == "swinunetr" and rep["config"]["patch_size"] == [64, 32]
    assert 0.0 <= rep["dice_clean"] <= 1.0


def test_cli_run_and_errors(tmp_path, capsys):
    clean = _write_2d(tmp_path / "clean", n_train=3, n_test=2, size=32)
    prot = _protected_copy(clean, tmp_path / "prot")
    parser = argparse.ArgumentParser(prog="monai-umed")
    add_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", str(clean), str(prot), "--epochs", "1", "--report", str(tmp_path / "c.json"),
                              "--defence", "grayscale", "--threads", "1", "--quiet", "--batch-size", "2",
                              "--victim-param", "channels=[4,8,16]", "--victim-param", "strides=[2,2]",
                              "--cache-dir", str(tmp_path / "cache")])
    assert args.func is run
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "| grayscale |" in out and (tmp_path / "c.json").is_file()
    assert json.loads((tmp_path / "c.json").read_text())["defence"] == "grayscale"
    # a protected set whose files do not correspond to the clean ones is refused with the file named
    other = _write_2d(tmp_path / "other", n_train=3, n_test=1, size=32, ext=".png")
    meta = json.loads((other / "dataset.json").read_text())
    meta["training"] = meta["training"][::-1]
    (other / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="does not correspond"):
        evaluate(clean, other, **FAST)
    with pytest.raises(InputError, match="RGB|2D"):
        evaluate(_write_3d(tmp_path / "v"), _write_3d(tmp_path / "v2"), defences=["jpeg"], **FAST)
    with pytest.raises(InputError, match="dataset.json"):
        evaluate(tmp_path / "missing", prot, **FAST)
