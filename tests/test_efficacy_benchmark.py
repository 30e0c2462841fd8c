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

"""benchmarks/efficacy.py end to end on tiny synthetic data: labelled rows (``LABEL=METHOD``) with their own
parameters, the table and the JSON record."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluate import _write_2d

from monai_umed.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str = "efficacy"):
    """A script of ``benchmarks/`` imported as a module."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_labelled_rows_and_table(tmp_path, capsys):
    data = _write_2d(tmp_path / "data", n_train=4, n_test=2, size=32, ext=".png")
    out = tmp_path / "out"
    args = [str(data), "--methods", "clean,noise,noise-roi=noise,noise-2=noise", "--param", "noise-roi.region=roi",
            "--param", "noise-2.epsilon=2/255", "--epochs", "1",
            "--image-size", "32", "--threads", "1", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--quiet"]
    assert _bench().main(args) == 0
    text = capsys.readouterr().out
    assert "| noise-roi |" in text and "| noise |" in text and "| clean |" in text
    rec = json.loads((out / "efficacy.json").read_text())
    assert rec["row_methods"] == {"clean": "clean", "noise": "noise", "noise-roi": "noise", "noise-2": "noise"}
    assert rec["params"]["noise-roi"] == {"region": "roi"} and rec["params"]["noise"] == {}
    settings = json.loads((out / "protected_noise-roi.json").read_text())["settings"]
    assert settings["method"] == "noise" and settings["params"] == {"region": "roi"}
    # a row's own budget reaches protect_dataset (not the protector's parameters) and the table
    settings = json.loads((out / "protected_noise-2.json").read_text())["settings"]
    assert settings["params"] == {} and settings["epsilon"] == pytest.approx(2 / 255)
    assert "| noise-2 | release | none | 0 | 2 |" in text and "| noise | release | none | 0 | 8 |" in text
    rows = {r["method"]: r for r in rec["rows"]}
    # the ROI-only row leaves the background untouched, so it is closer to the clean images than whole-image noise
    assert rows["noise-roi"]["psnr"] > rows["noise"]["psnr"]
    assert rows["noise-2"]["psnr"] > rows["noise"]["psnr"] + 6
    assert rows["noise-2"]["max_abs_delta"] <= 2
    assert rows["clean"]["psnr"] is None and rows["clean"]["epsilon"] is None


def test_paper_and_release_rows(tmp_path, capsys):
    data = _write_2d(tmp_path / "data", n_train=4, n_test=2, size=48, ext=".png")
    out = tmp_path / "out"
    args = [str(data), "--methods", "clean,noise", "--protocol", "release,paper", "--epochs", "1", "--image-size",
            "32", "--threads", "1", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert _bench().main(args) == 0
    text = capsys.readouterr().out
    for row in ("| clean | release |", "| clean | paper |", "| noise | release |", "| noise | paper |"):
        assert row in text
    rec = json.loads((out / "efficacy.json").read_text())
    rows = {(r["method"], r["protocol"]): r for r in rec["rows"]}
    assert len(rows) == 4 and rec["protocols"] == ["release", "paper"]
    for r in rows.values():  # every row reports its victims' final training losses
        assert r["loss_end_clean"] is not None and r["loss_end_protected"] is not None
    # the paper row's PSNR is that of the float perturbation, the release row's that of the rounded files
    assert rows[("noise", "paper")]["psnr"] != rows[("noise", "release")]["psnr"]
    rep = json.loads((out / "eval_noise_paper.json").read_text())
    assert rep["protocol"] == "paper" and rep["config"]["augment"] is False
    # the paper rows fit and perturb on the victim's grid: a 32-px copy of the training split, its own protected copy
    grid = json.loads((out / "dataset_grid" / "dataset.json").read_text())
    assert rep["datasets"]["train_cases"] == len(grid["training"]) == 4
    assert Image.open(out / "dataset_grid" / grid["training"][0]["image"]).size == (32, 32)
    assert (out / "protected_noise_grid").is_dir() and (out / "protected_noise_grid.umedkey").is_file()
    assert (out / "dataset_grid" / grid["test"][0]["image"]).resolve() == (data / grid["test"][0]["image"]).resolve()


def test_victim_seeds_give_one_row_each_and_a_mean(tmp_path, capsys):
    data = _write_2d(tmp_path / "data", n_train=4, n_test=2, size=32, ext=".png")
    out = tmp_path / "out"
    args = [str(data), "--methods", "noise", "--victim-seeds", "0,3", "--epochs", "1", "--image-size", "32",
            "--threads", "1", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert _bench().main(args) == 0
    text = capsys.readouterr().out
    assert "| noise | release | none | 0 |" in text and "| noise | release | none | 3 |" in text
    assert "| noise | release | none | mean |" in text and "victim seeds 0, 3" in text
    rec = json.loads((out / "efficacy.json").read_text())
    assert rec["victim_seeds"] == [0, 3]
    rows = {r["victim_seed"]: r for r in rec["rows"]}
    assert set(rows) == {0, 3, "mean"}
    assert rows[0]["dice_protected"] != rows[3]["dice_protected"]  # two victims, not one reported twice
    for key in ("dice_clean", "dice_protected"):
        assert rows["mean"][key] == pytest.approx((rows[0][key] + rows[3][key]) / 2)
        assert rows["mean"][f"{key}_sd"] == pytest.approx(float(np.std([rows[0][key], rows[3][key]], ddof=1)))
    # one protected copy, one report per victim seed
    assert json.loads((out / "eval_noise_seed3.json").read_text())["seed"] == 3
    assert json.loads((out / "eval_noise.json").read_text())["seed"] == 0
    assert rec["reports"]["noise/release/seed3"].endswith("eval_noise_seed3.json")


def test_victim_grid_dataset_resizes_like_the_victim(tmp_path):
    from monai.transforms import Resize

    from monai_umed.evaluation.protocols import victim_grid_dataset

    data = _write_2d(tmp_path / "data", n_train=2, n_test=1, size=32, ext=".png")
    out = victim_grid_dataset(data, tmp_path / "grid", 12)
    meta, src = json.loads((out / "dataset.json").read_text()), json.loads((data / "dataset.json").read_text())
    for e, o in zip(src["training"], meta["training"]):
        img = np.asarray(Image.open(data / e["image"])).astype(np.float32)
        chw = torch.from_numpy(np.ascontiguousarray(img.reshape(32, 32, -1).transpose(2, 0, 1)))
        want = np.asarray(Resize((12, 12), mode="bilinear", anti_aliasing=True)(chw)).round().clip(0, 255)
        got = np.asarray(Image.open(out / o["image"])).astype(np.float32).reshape(12, 12, -1).transpose(2, 0, 1)
        np.testing.assert_array_equal(got, want)
        lab = np.asarray(Image.open(out / o["label"]))
        assert lab.shape == (12, 12) and set(np.unique(lab)) <= set(np.unique(np.asarray(Image.open(data / e["label"]))))
    assert victim_grid_dataset(data, tmp_path / "grid", 12) == out  # a finished copy is reused
    with pytest.raises(InputError):
        victim_grid_dataset(data, tmp_path / "grid3d", (12, 12, 12))


@pytest.mark.parametrize("methods, extra", [("clean,nonexistent", []), ("a=noise,a=noise", []),
                                           ("x=nonexistent", []), ("noise", ["--param", "noise.epsilon=abc"]),
                                           ("noise", ["--param", "noise.epsilon=3"]),
                                           ("noise", ["--protocol", "paper,bogus"]),
                                           ("noise", ["--victim-seeds", "0,0"]), ("noise", ["--victim-seeds", "a"])])
def test_bad_methods(tmp_path, methods, extra, capsys):
    data = _write_2d(tmp_path / "data", n_train=2, n_test=1, size=32, ext=".png")
    assert _bench().main([str(data), "--methods", methods, "--out", str(tmp_path / "o"), *extra]) == 2
    assert "efficacy: error:" in capsys.readouterr().err


def test_unseen_benchmark_reports_seen_and_unseen_cases(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("unseen_bench", ROOT / "benchmarks" / "unseen.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = _write_2d(tmp_path / "data", n_train=4, n_test=1, size=32, ext=".png")
    args = [str(data), "--fit-cases", "2", "--epochs", "1", "--image-size", "32", "--param", "epochs=1",
            "--param", "refine_rounds=1", "--param", "victim_grids=[16]", "--param", "refine_steps=1",
            "--param", "distil_epochs=1", "--threads", "1", "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache")]
    assert mod.main(args) == 0
    text = capsys.readouterr().out
    assert "| umed | 4 | 2 |" in text
    assert (tmp_path / "out" / "protected.umedkey").is_file()
    assert mod.main([str(data), "--fit-cases", "4", "--out", str(tmp_path / "o2")]) == 2  # no unseen case left


def test_tile_maps_rewrites_a_fitted_tile_on_other_maps(tmp_path, capsys):
    """The screen writes every training case again from the key's fitted tile laid on the new maps; the new copy has
    its own key that restores the clean files exactly, and the fitted tile is unchanged."""
    from monai_umed.bundle import load_protector
    from monai_umed.key import restore_dataset
    from monai_umed.pipeline import protect_dataset

    data = _write_2d(tmp_path / "data", n_train=4, n_test=1, size=32, ext=".png")
    params = dict(epochs=1, batch_size=4, refine_rounds=1, refine_pgd=1, victim_grids=[16], refine_size=16,
                  refine_tile=4, distil_epochs=0)
    protect_dataset(data, tmp_path / "fitted", method="umed", params=params, split="training",
                    key=tmp_path / "fitted.umedkey", seed=0, device="cpu")
    tm = _bench("tile_maps")
    out = tmp_path / "flat"
    assert tm.main([str(tmp_path / "fitted.umedkey"), str(data), str(out), "--param", "tile_bound=1,0,1"]) == 0
    assert "4 cases written" in capsys.readouterr().out
    before, after = load_protector(tmp_path / "fitted.umedkey"), load_protector(out / "protected.umedkey")
    assert torch.equal(before.refiner.pattern, after.refiner.pattern)
    assert after.tile_bound == "1,0,1" and after._texture_bound() == (1.0, (0.0, 1.0)) and not after.refiner.deltas
    restore_dataset(out / "protected", out / "protected.umedkey", out / "restored")
    meta = json.loads((data / "dataset.json").read_text())
    for e in meta["training"]:
        name = Path(e["image"]).name
        clean = np.asarray(Image.open(data / e["image"]))
        assert np.array_equal(np.asarray(Image.open(next((out / "restored").rglob(name)))), clean)
    assert tm.main([str(tmp_path / "fitted.umedkey"), str(data), str(tmp_path / "bad"), "--param", "lr=1"]) == 2
    assert "changes only" in capsys.readouterr().err


def test_tile_maps_rewrites_salms_fitted_tile_on_the_texture_bound(tmp_path, capsys):
    """A SALM key with a shared tile is written again with ``refine_texture``: same tile, the budget map now
    epsilon x B on the sparse mask, and only SALM's map parameters are accepted."""
    from monai_umed.bundle import load_protector
    from monai_umed.pipeline import protect_dataset

    data = _write_2d(tmp_path / "data", n_train=4, n_test=1, size=32, ext=".png")
    params = dict(epochs=1, steps=2, batch_size=4, surrogate_channels=[4, 8], work_size=16, release=True,
                  refine_rounds=1, refine_pgd=1, victim_grids=[16], refine_size=16, refine_tile=2,
                  refine_tile_background=False, min_psnr=50, refine_texture=None)
    protect_dataset(data, tmp_path / "fitted", method="salm", params=params, split="training",
                    key=tmp_path / "fitted.umedkey", seed=0, device="cpu")
    tm = _bench("tile_maps")
    out = tmp_path / "tex"
    assert tm.main([str(tmp_path / "fitted.umedkey"), str(data), str(out), "--param",
                    "refine_texture=0,0.25,0.95", "--param", "min_psnr=none"]) == 0
    assert "4 cases written" in capsys.readouterr().out
    before, after = load_protector(tmp_path / "fitted.umedkey"), load_protector(out / "protected.umedkey")
    assert torch.equal(before.refiner.pattern, after.refiner.pattern) and not after.refiner.deltas
    assert before.refine_texture is None and after.refine_texture == (0.0, (0.25, 0.95))
    assert before.min_psnr == 50 and after.min_psnr is None  # parsed as the constructor parses it
    assert tm.main([str(tmp_path / "fitted.umedkey"), str(data), str(tmp_path / "bad2"), "--param",
                    "refine_texture=0,0.9,0.2"]) == 2
    assert "texture bound" in capsys.readouterr().err
    assert tm.main([str(tmp_path / "fitted.umedkey"), str(data), str(tmp_path / "bad"), "--param", "b_min=0"]) == 2
    assert "changes only refine_texture, min_psnr of salm" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["shift", "checker"])
def test_shortcut_oracles_write_the_label_code_at_the_requested_psnr(tmp_path, kind, capsys):
    from monai_umed.data.synthetic import make_demo_dataset
    from monai_umed.evaluation.metrics import read_native

    so = _bench("shortcut_oracles")
    data = make_demo_dataset(tmp_path / "data", spatial_dims=3, n_train=3, n_test=1, num_classes=2)
    clean = {p.name: p.read_bytes() for p in (data / "imagesTr").iterdir()}
    out = tmp_path / "oracle"
    assert so.main([str(data), str(out), "--pattern", kind, "--psnr", "45"]) == 0
    assert "[oracle]" in capsys.readouterr().out
    meta = json.loads((out / "dataset.json").read_text())
    assert len(meta["training"]) == 3 and "test" not in meta
    for it in meta["training"]:
        name = Path(it["image"]).name
        x0, x1 = read_native(data / "imagesTr" / name), read_native(out / it["image"])
        y = read_native(out / it["label"])
        assert x1.dtype == x0.dtype and x1.shape == x0.shape
        delta = x1.astype(np.float64) - x0.astype(np.float64)
        assert np.all(delta[y == 0] == 0)  # only the labelled voxels change
        sign = np.sign(delta)[y > 0]
        if kind == "shift":  # one sign per class: +1 on class 1, -1 on class 2
            assert np.all(np.sign(delta)[y == 1] >= 0) and np.all(np.sign(delta)[y == 2] <= 0)
        else:  # neighbours along an axis alternate
            assert set(np.unique(sign)) <= {-1.0, 0.0, 1.0} and (sign > 0).any() and (sign < 0).any()
        mse = float((delta ** 2).mean())
        r = float(np.iinfo(x0.dtype).max - np.iinfo(x0.dtype).min)
        assert abs(10 * np.log10(r * r / mse) - 45.0) < 0.5
    assert {p.name: p.read_bytes() for p in (data / "imagesTr").iterdir()} == clean  # the input is untouched
    # a second write into the same folder is refused, nothing is overwritten
    assert so.main([str(data), str(out)]) == 2
    assert "already holds a dataset" in capsys.readouterr().err


def test_shortcut_oracle_dots_and_band_live_on_the_victims_grid():
    from scipy.ndimage import zoom

    so = _bench("shortcut_oracles")
    label = np.zeros((1, 96, 64), np.int64)
    label[0, 10:90, 5:60] = 1
    for kind in ("dots", "rings", "band"):
        u = so.oracle_pattern(label, kind, grid=32, period=8.0)
        assert u.shape == label.shape and np.all(u[label == 0] == 0) and np.isfinite(u).all()
        # the period is in the victim's pixels: resized to the 32 grid, the spectrum peaks at 32 / 8 = 4 cycles
        full = so.oracle_pattern(np.ones_like(label), kind, grid=32, period=8.0)[0]
        small = zoom(full, (32 / 96, 32 / 64), order=1)
        power = np.abs(np.fft.fft2(small - small.mean())) ** 2
        fy, fx = np.meshgrid(np.fft.fftfreq(32) * 32, np.fft.fftfreq(32) * 32, indexing="ij")
        radius = np.sqrt(fy ** 2 + fx ** 2)
        ring = power[(radius > 2.5) & (radius < 6.5)].sum() / power.sum()
        assert ring > 0.8, (kind, ring)
    # --background: the background carries the same pattern with the opposite sign
    fg, both = so.oracle_pattern(label, "dots", 32, 8.0), so.oracle_pattern(label, "dots", 32, 8.0, background=True)
    assert np.array_equal(both[label == 1], fg[label == 1])
    assert np.array_equal(both[label == 0], -so.oracle_pattern(np.ones_like(label), "dots", 32, 8.0)[label == 0])
    # band: one field for every case of a size, seeded (the same texture in every file)
    assert np.array_equal(so.band_field((40, 40), 32, 8.0), so.band_field((40, 40), 32, 8.0))
    assert abs(float((so.band_field((40, 40), 32, 8.0) ** 2).mean()) - 1.0) < 1e-9



def test_shortcut_oracle_pattern_rejects_unknown_kinds():
    so = _bench("shortcut_oracles")
    with pytest.raises(ValueError, match="pattern must be"):
        so.oracle_pattern(np.ones((1, 4, 4), np.int64), "stripes")
    assert np.array_equal(so.add_at_psnr(np.ones((1, 4, 4), np.uint8), np.zeros((1, 4, 4)), 50.0),
                          np.ones((1, 4, 4), np.uint8))
