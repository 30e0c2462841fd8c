# Copyright (c) monai-umed contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""Footprint windows: a big 3D case refined and protected in the box of its labels, in memory that follows the
labelled structures rather than the volume (``protectors/refine_window.py``, UMed's ``refine_window``)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import create_test_image_3d

from monai_umed.protectors.refine_window import (
    WINDOW_VOXELS,
    Windowed,
    as_window,
    auto_window,
    crop,
    footprint_box,
    paste,
    split_box,
    window_box,
    window_energy,
)
from monai_umed.protectors.refine import grey_levels
from monai_umed.protectors.umed import UMedProtector

TINY = dict(epochs=1, refine_rounds=2, refine_surrogate_epochs=1, surrogate_channels=(4, 8), channels=(4, 8),
            distil_epochs=1, device="cpu", seed=3)


def _samples(n: int = 2, shape: tuple[int, int, int] = (48, 48, 40)) -> list[dict]:
    out = []
    for i in range(n):
        im, lab = create_test_image_3d(*shape, num_objs=2, rad_max=6, random_state=np.random.RandomState(i))
        out.append({"image": torch.tensor(im)[None].float().clamp(0, 1),
                    "label": torch.tensor(lab)[None].long().clamp(max=1), "case_id": f"c{i}"})
    return out


def test_boxes() -> None:
    lab = torch.zeros(1, 40, 30, 20, dtype=torch.long)
    lab[0, 10:14, 5:8, 0:3] = 1
    assert footprint_box(lab, (2, 2, 2)) == ((8, 3, 0), (16, 10, 5))
    assert footprint_box(torch.zeros_like(lab), (2, 2, 2)) is None
    # grown to whole tiles, centred, kept inside; an axis shorter than its tiles is taken whole
    assert window_box(((8, 3, 0), (16, 10, 5)), (40, 30, 20), 16) == ((4, 0, 0), (20, 16, 16))
    assert window_box(((8, 3, 0), (30, 10, 5)), (40, 30, 20), 16) == ((3, 0, 0), (35, 16, 16))
    assert window_box(None, (40, 30, 20), 16) == ((13, 8, 3), (29, 24, 19))
    assert window_box(((0, 0, 0), (40, 30, 20)), (40, 30, 20), 16) == ((0, 0, 0), (40, 30, 20))
    tiles = split_box(((3, 0, 0), (35, 30, 20)), 16)
    assert len(tiles) == 2 * 2 * 2 and tiles[0] == ((3, 0, 0), (19, 15, 10)) and tiles[-1] == ((19, 15, 10), (35, 30, 20))
    cover = torch.zeros(40, 30, 20, dtype=torch.int32)
    for a, b in tiles:  # the tiles cover the window exactly once
        cover[a[0]:b[0], a[1]:b[1], a[2]:b[2]] += 1
    assert int(cover.sum()) == 32 * 30 * 20 and int(cover.max()) == 1
    part = torch.arange(2 * 4 * 3 * 2, dtype=torch.float32).view(2, 4, 3, 2)
    box = ((1, 2, 3), (5, 5, 5))
    whole = paste(part, box, (6, 6, 6))
    assert whole.shape == (2, 6, 6, 6) and torch.equal(crop(whole, box), part) and float(whole.sum()) == float(part.sum())
    w = Windowed(part, box, (6, 6, 6))
    for probe in (((0, 0, 0), (6, 6, 6)), ((2, 1, 4), (6, 4, 6)), ((0, 0, 0), (1, 2, 3))):
        assert torch.equal(w.crop(probe), crop(whole, probe))
    assert window_energy(1e-5, (6, 6, 6), box) == pytest.approx(1e-5 * 216 / 24)
    assert window_energy(None, (6, 6, 6), box) is None


def test_window_parameter() -> None:
    assert as_window("auto") == "auto" and as_window("AUTO") == "auto" and as_window("0") == 0 and as_window(32) == 32
    for bad in (-1, 4, "x"):
        with pytest.raises(ValueError):
            as_window(bad)
    assert auto_window(2, (4096, 4096)) == 0 and auto_window(2, (64, 64), 32) == 0
    assert auto_window(3, (35, 50, 35)) == 0 and auto_window(3, (129, 128, 128)) == 64
    assert math.prod((128, 128, 128)) == WINDOW_VOXELS and auto_window(3, (128, 128, 128)) == 0
    assert auto_window(3, (40, 40, 40), 16) == 16


def test_window_maps_equal_whole_image_maps() -> None:
    """A window's maps, and the texture levels and energy scale taken from the labels' box, are the whole image's."""
    s = _samples(1)[0]
    whole = UMedProtector(refine_window=0, **TINY)
    windowed = UMedProtector(refine_window=16, **TINY)
    for p in (whole, windowed):
        p._set_spatial_dims(s["image"])
        p._levels_resolved = 0
    (c_whole,), (c_win,) = whole._scan([s])[0], windowed._scan([s])[0]
    assert c_win["scale"] == pytest.approx(c_whole["scale"], rel=1e-5)
    for a, b in zip(c_win["stats"], c_whole["stats"]):
        assert torch.allclose(a, b, atol=1e-6)
    box = windowed._window(s["image"], s["label"], None, None)
    assert box is not None and box != ((0, 0, 0), (48, 48, 40))
    x_w, y_w, maps = windowed._window_maps(s["image"], s["label"], None, box)
    full = whole._case_maps(s["image"], s["label"], full=True)
    assert torch.equal(x_w, crop(s["image"], box)) and torch.equal(y_w, crop(s["label"], box))
    for a, b in zip(maps, full):
        assert torch.allclose(a.float(), crop(b, box).float(), atol=1e-6)
    assert float(full[4].abs().sum()) == pytest.approx(float(maps[4].abs().sum()), rel=1e-5)  # nothing outside


def test_windowed_release_stage() -> None:
    """Fit, protect, reload and an unseen case, with every 3D case forced into windows of 16-voxel tiles."""
    samples = _samples()
    p = UMedProtector(refine_window=16, **TINY).fit(samples, progress=False)
    assert set(p.windows) == {"c0", "c1"} and set(p.refiner.deltas) == {"c0", "c1"}  # the tiles were assembled
    images, labels, ids = [s["image"] for s in samples], [s["label"] for s in samples], ["c0", "c1"]
    deltas = p.perturbation_batch(images, labels, ids)
    for d, s, cid in zip(deltas, samples, ids):
        box = p.windows[cid]
        assert d.shape == s["image"].shape
        assert tuple(p.refiner.deltas[cid].shape[1:]) == tuple(b - a for a, b in zip(*box))
        inside = paste(torch.ones_like(crop(d, box)), box, d.shape[1:])
        assert float(d.abs().max()) > 0 and float((d * (1 - inside)).abs().max()) == 0.0
        assert -10 * math.log10(float(d.double().pow(2).mean())) >= 50.0 - 1e-6  # min_psnr on the whole image
    # the fitted windows travel with the state; a reload protects the same way
    state = p.state_dict()
    assert state["refine_windows"] == {k: [list(a), list(b)] for k, (a, b) in p.windows.items()}
    q = UMedProtector(device="cpu").load_state_dict(state)
    assert q.windows == p.windows and q.refine_window == 16
    for a, b in zip(deltas, q.perturbation_batch(images, labels, ids)):
        assert torch.equal(a, b)
    # the same inputs and seed give the same perturbations, also when fit keeps only each case's window (as
    # ``protect`` streams a dataset: Protector.fit_sample)
    again = UMedProtector(refine_window=16, **TINY)
    kept = [again.fit_sample(s) for s in samples]
    for k, s, cid in zip(kept, samples, ids):
        assert k["window_box"] == p.windows[cid] and k["image"].numel() < s["image"].numel()
        assert k["window_shape"] == (48, 48, 40) and k["levels_ok"] == (grey_levels([s["image"]]) is not None)
    again.fit(kept, progress=False)
    for a, b in zip(deltas, again.perturbation_batch(images, labels, ids)):
        assert torch.equal(a, b)
    small = UMedProtector(**TINY)  # below 128^3 voxels a case is kept whole
    assert small.fit_sample(samples[0])["image"] is samples[0]["image"]
    # an unseen case is protected in the window its labels give
    unseen = _samples(3)[2]
    d = p.perturbation(unseen["image"], unseen["label"], "new")
    box = p._window(unseen["image"], unseen["label"], None, "new")
    inside = paste(torch.ones_like(crop(d, box)), box, d.shape[1:])
    assert float((d * (1 - inside)).abs().max()) == 0.0 and float(d.abs().max()) > 0
    # a state written before windows existed protects whole cases
    old = {**state, "params": {k: v for k, v in state["params"].items() if k != "refine_window"}}
    old.pop("refine_windows")
    assert UMedProtector(device="cpu").load_state_dict(old).refine_window == 0


def test_windowed_fit_resumes_at_its_last_round(tmp_path: Path) -> None:
    """A windowed fit interrupted after its first refinement round (its tiles checkpointed) resumes to the
    perturbations of an uninterrupted fit, as ``protect --resume`` does."""
    samples = _samples()
    full = UMedProtector(refine_window=16, **TINY).fit(samples, progress=False)
    ck = tmp_path / "fit.ckpt"
    UMedProtector(refine_window=16, **{**TINY, "refine_rounds": 1}).fit(samples, progress=False, checkpoint=ck)
    state = torch.load(f"{ck}.refine", weights_only=False)
    assert state["round"] == 1 and all("/tile" in c for c in state["case_ids"])
    resumed = UMedProtector(refine_window=16, **TINY).fit(samples, progress=False, checkpoint=ck)
    assert [r["round"] for r in resumed.refiner.history] == [0, 1] and resumed.windows == full.windows
    for cid in full.refiner.deltas:
        assert torch.equal(full.refiner.deltas[cid], resumed.refiner.deltas[cid])


_PEAK = """
import json, resource, sys
from monai_umed.pipeline import protect_dataset
params = {"refine_rounds": 1, "refine_surrogate_epochs": 1, "distil_epochs": 1}
protect_dataset(sys.argv[1], sys.argv[2], "umed", epochs=1, params=params, progress=False, device="cpu")
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _peak_bytes(shape: tuple[int, int, int], root: Path) -> int:
    from monai_umed.data.synthetic import make_synthetic_ct

    make_synthetic_ct(root / "ct", shape, radius=12, suffix=".nii")
    r = subprocess.run([sys.executable, "-c", _PEAK, str(root / "ct"), str(root / "out")], capture_output=True,
                       text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    return int(json.loads(r.stdout.strip().splitlines()[-1])["peak"])


def test_ct_memory_grows_with_the_labels_not_the_volume(tmp_path: Path) -> None:
    """UMed's default release path (fewer rounds, the same code) on two synthetic CTs with the same sphere, one with
    four times the voxels of the other: the peak host memory grows by a few bytes per added voxel (the decoded
    volume, its normalised copy and the written one), not by the hundreds per voxel a whole-volume refinement
    needs (measured before windows: about 700 bytes per voxel, 15.8 GB for a 512 x 512 x 300 CT)."""
    small, big = (128, 128, 136), (256, 256, 136)
    p_small = _peak_bytes(small, tmp_path / "small")
    p_big = _peak_bytes(big, tmp_path / "big")
    per_voxel = (p_big - p_small) / (math.prod(big) - math.prod(small))
    print(f"peak {p_small / 1e9:.2f} -> {p_big / 1e9:.2f} GB: {per_voxel:.1f} bytes per added voxel")
    assert per_voxel < 80, f"peak {p_small / 1e9:.2f} -> {p_big / 1e9:.2f} GB: {per_voxel:.0f} bytes per added voxel"
