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

"""EM and SALM through UMed's release-path refinement (``release=True``) on tiny synthetic 8-bit RGB data."""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
import pytest
import torch
from monai.data import create_test_image_2d

from monai_umed import protectors
from monai_umed.protectors.refine import cap_energy
from monai_umed.protectors.release import psnr
from monai_umed.protectors.salm import tissue_mask

EPS = 8 / 255
FLOOR = 55.0  # dB: binding for EM and for SALM on this data
# tiny settings: a 2-level surrogate, 2 refinement rounds of 1 surrogate epoch, a 16-px victim grid
TINY = {"steps": 2, "batch_size": 3, "surrogate_channels": (4, 8), "work_size": 16, "epochs": 1, "release": True,
        "victim_grids": [16], "refine_rounds": 2, "refine_surrogate_epochs": 1, "refine_pgd": 2, "refine_size": 16,
        "seed": 0, "device": "cpu"}
# the per-case release stage on the whole mask (SALM's defaults lay a shared tile on a texture bound instead)
PER_CASE = {"refine_tile": 0, "refine_texture": None}


pytestmark = pytest.mark.usefixtures("one_thread")


def _case(i: int) -> dict:
    rs = np.random.RandomState(i)
    im, lab = create_test_image_2d(32, 32, num_objs=2, rad_max=7, rad_min=3, random_state=rs)
    x = torch.tensor(im)[None].float().repeat(3, 1, 1) * torch.tensor([1.0, 0.8, 0.6])[:, None, None]
    x = (x / x.max() * 255).round() / 255  # 8-bit data with an empty (0) background
    return {"image": x, "label": torch.tensor(lab > 0)[None].long(), "case_id": f"c{i}"}


def _data(n: int = 6) -> list[dict]:
    return [_case(i) for i in range(n)]


@lru_cache(maxsize=None)
def _fitted(name: str, min_psnr: float | None = None) -> protectors.Protector:
    return protectors.get(name, epsilon=EPS, min_psnr=min_psnr, **TINY, **PER_CASE).fit(_data(), progress=False)


def _written(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """What an 8-bit file holds, minus the stored image (normalised units)."""
    stored = torch.round(x * 255)
    return (torch.clamp(torch.round(stored + d * 255), 0, 255) - stored) / 255


@pytest.mark.parametrize("name", ["em", "salm"])
def test_written_release_perturbation_stays_inside_the_budget_map(name: str) -> None:
    p = _fitted(name)
    assert p.release and p.refiner is not None and p.levels == 255
    assert [r["round"] for r in p.refiner.history] == [0, 1]
    for s in _data() + [_case(7)]:  # the last case was not seen in fit
        x, y, cid = s["image"], s["label"], s["case_id"]
        with torch.no_grad():  # as the pipeline calls it; an unseen case still gets its gradient steps
            d = p.perturbation(x, y, cid)
        limit = p.release_budget(x, y, cid)
        dq = _written(x, d)
        assert torch.allclose(dq, d, atol=1e-6)  # already the written values: whole grey levels
        assert torch.all(dq.abs() <= limit + 1e-6) and float(d.abs().max()) <= EPS + 1e-6
        assert float(d.abs().max()) > 0
    assert name != "em" or bool((p.release_budget(x, y, cid) == p.release_budget(x, y, cid).max()).all())


@pytest.mark.parametrize("name", ["em", "salm"])
def test_min_psnr_holds_per_case_on_the_rounded_values(name: str) -> None:
    p = _fitted(name, FLOOR)
    free = _fitted(name)
    for s in _data() + [_case(7)]:
        x, y, cid = s["image"], s["label"], s["case_id"]
        d = p.perturbation(x, y, cid)
        assert float(psnr(_written(x, d)[None])) >= FLOOR - 1e-6
    # without the floor the same data are perturbed harder (SALM's sparse mask alone gives about 52 dB here)
    s = _data()[0]
    assert float(psnr(free.perturbation(s["image"], s["label"], s["case_id"])[None])) < FLOOR
    # the energy cap is the one UMed uses (refine.cap_energy): a no-op on what is already within it
    d = p.perturbation(s["image"], s["label"], s["case_id"])
    assert torch.equal(cap_energy(s["image"], d, 1e-5, 255), d)


@pytest.mark.parametrize("name", ["em", "salm"])
def test_release_fit_is_deterministic_and_a_key_rebuilds_it(name: str) -> None:
    data = _data()
    a = _fitted(name)
    b = protectors.get(name, epsilon=EPS, min_psnr=None, **TINY, **PER_CASE).fit(data, progress=False)
    assert a.refiner.deltas.keys() == b.refiner.deltas.keys()
    for cid in a.refiner.deltas:
        assert torch.equal(a.refiner.deltas[cid], b.refiner.deltas[cid])
    params = a.params()
    assert params["release"] is True and params["victim_grids"] == [16] and params["refine_rounds"] == 2
    # a key: the recorded parameters and the state (the release parameters recorded in the state win)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    for q in (protectors.get(name, **params), protectors.get(name, **{**params, "release": False, "min_psnr": 40})):
        buf.seek(0)
        q.load_state_dict(torch.load(buf, map_location="cpu", weights_only=False))
        assert q.release and q.params() == params
        for s in data[:2] + [_case(7)]:
            x, y, cid = s["image"], s["label"], s["case_id"]
            assert torch.equal(q.perturbation(x, y, cid), a.perturbation(x, y, cid))


def test_release_fit_resumes_from_its_checkpoints(tmp_path) -> None:
    data = _data(4)
    full = protectors.get("salm", epsilon=EPS, **TINY).fit(data, progress=False)
    ckpt = tmp_path / "fit.ckpt"
    protectors.get("salm", epsilon=EPS, **{**TINY, "refine_rounds": 1}).fit(data, progress=False, checkpoint=ckpt)
    assert ckpt.is_file() and (tmp_path / "fit.ckpt.refine").is_file()
    resumed = protectors.get("salm", epsilon=EPS, **TINY).fit(data, progress=False, checkpoint=ckpt)
    assert [r["round"] for r in resumed.refiner.history] == [0, 1]
    for s in data:
        assert torch.equal(resumed.refiner.deltas[s["case_id"]], full.refiner.deltas[s["case_id"]])
        assert torch.equal(resumed.masks[s["case_id"]], full.masks[s["case_id"]])


def test_salm_release_perturbation_is_zero_outside_its_sparse_mask() -> None:
    p = _fitted("salm", FLOOR)
    for s in _data() + [_case(7)]:
        x, y, cid = s["image"], s["label"], s["case_id"]
        d = p.perturbation(x, y, cid)
        mask = p.release_footprint(x, y, cid)[0]
        tissue = tissue_mask(x[None], p.tau)[0, 0]
        assert not (mask & ~tissue).any() and (~mask).any()  # the background is never in the mask
        assert (d != 0).any() and not d[:, ~mask].any()
        if cid in p.masks:
            assert torch.equal(mask, p.selection_mask(x, cid)[0])


def test_salm_shared_tile_lies_on_its_sparse_mask_and_serves_unseen_cases() -> None:
    """``refine_tile``: one class-wise tile shared by every case (UMed's SharedTileRefiner), laid on SALM's mask."""
    from monai_umed.protectors.refine_shared import SharedTileRefiner, tile_pattern

    p = protectors.get("salm", epsilon=EPS, min_psnr=FLOOR, refine_tile=2, refine_texture=None, **TINY).fit(
        _data(), progress=False)
    assert isinstance(p.refiner, SharedTileRefiner) and p.refiner.classwise
    assert tuple(p.refiner.pattern.shape) == (2, 3, 2, 2) and p.refiner.pattern.abs().max() > 0
    for s in _data() + [_case(7)]:  # the last case was not seen in fit: it gets the fitted tile itself
        x, y, cid = s["image"], s["label"], s["case_id"]
        with torch.no_grad():
            d = p.perturbation(x, y, cid)
        mask = p.release_footprint(x, y, cid)[0]
        assert (d != 0).any() and not d[:, ~mask].any()
        assert torch.all(d.abs() <= p.release_budget(x, y, cid) + 1e-6)
        assert float(psnr(_written(x, d)[None])) >= FLOOR - 1e-6
    # a background-only work grid carries the background class's tile, scaled to the case's energy
    flat = p.refiner._cases(torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 4).long())[0]
    assert torch.equal(flat, tile_pattern(p.refiner.pattern[0], (4, 4)))
    # a key rebuilds it; without the option (the default) SALM refines one perturbation per case
    buf = io.BytesIO()
    torch.save(p.state_dict(), buf)
    buf.seek(0)
    q = protectors.get("salm", **p.params()).load_state_dict(torch.load(buf, map_location="cpu", weights_only=False))
    assert isinstance(q.refiner, SharedTileRefiner) and q.params()["refine_tile"] == 2
    s = _case(7)
    assert torch.equal(q.perturbation(s["image"], s["label"], "c7"), p.perturbation(s["image"], s["label"], "c7"))
    assert protectors.get("salm").refine_tile == "auto" and protectors.get("em").refine_tile == 0
    # refine_tile_background=False: no tile on the background class, every perturbed pixel is near a label
    fg = protectors.get("salm", epsilon=EPS, min_psnr=FLOOR, refine_tile=2, refine_tile_background=False,
                        refine_texture=None, **TINY).fit(_data(), progress=False)
    assert not fg.refiner.background and fg.refiner.pattern[0].abs().max() == 0
    for s in _data() + [_case(7)]:
        d = fg.perturbation(s["image"], s["label"], s["case_id"])
        near = torch.nn.functional.max_pool2d(s["label"][None].float(), 5, 1, 2)[0] > 0  # a work cell's reach
        assert (d != 0).any() and not d[:, ~near[0]].any()
    with pytest.raises(ValueError):
        protectors.get("salm", refine_tile=-1)


def test_refine_texture_lays_the_tile_on_the_texture_bound_inside_the_footprint() -> None:
    from monai_umed.masks import texture_bound

    p = protectors.get("salm", epsilon=EPS, min_psnr=FLOOR, refine_tile=2, refine_tile_background=False,
                       refine_texture="0,0.25,0.95", **TINY).fit(_data(), progress=False)
    assert p.params()["refine_texture"] == [0.0, 0.25, 0.95]
    # the tile is fitted on the sparse mask alone and only laid on the texture bound
    plain = protectors.get("salm", epsilon=EPS, min_psnr=FLOOR, refine_tile=2, refine_tile_background=False,
                           refine_texture=None, **TINY).fit(_data(), progress=False)
    assert torch.equal(plain.refiner.pattern, p.refiner.pattern)
    for s in _data() + [_case(7)]:  # the last case was not seen in fit
        x, y, cid = s["image"], s["label"], s["case_id"]
        limit = p.release_budget(x, y, cid)
        bound = texture_bound(x, y, 5, 0.0, (0.25, 0.95))
        footprint = p.release_footprint(x, y, cid)
        # epsilon x B on the sparse mask, floored to whole grey levels: nothing off the labels or the flattest quarter
        ideal = bound * footprint * EPS
        assert torch.allclose(limit * 255, (limit * 255).round(), atol=1e-4)
        assert torch.all(limit <= ideal + 1e-6) and torch.all(limit > ideal - 1 / 255) and limit.max() > 0
        assert not limit[:, y[0] == 0].any() and not limit[bound == 0].any()
        d = p.perturbation(x, y, cid)
        assert torch.all(_written(x, d).abs() <= limit + 1e-6) and d.abs().max() > 0
        assert float(psnr(_written(x, d)[None])) >= FLOOR - 1e-6
    # the parameter is recorded and restored with the key's state
    buf = io.BytesIO()
    torch.save(p.state_dict(), buf)
    buf.seek(0)
    q = protectors.get("salm", **{**p.params(), "refine_texture": None})
    q.load_state_dict(torch.load(buf, map_location="cpu", weights_only=False))
    assert q.refine_texture == (0.0, (0.25, 0.95))
    s = _case(7)
    assert torch.equal(q.perturbation(s["image"], s["label"], "c7"), p.perturbation(s["image"], s["label"], "c7"))
    assert protectors.get("em").refine_texture is None
    # one perturbation per case is refined on the textured map itself: nothing off the labels
    em = protectors.get("em", epsilon=EPS, refine_texture="0,0.25,0.95", **TINY).fit(_data(), progress=False)
    for s in _data()[:2] + [_case(7)]:
        d = em.perturbation(s["image"], s["label"], s["case_id"])
        assert d.abs().max() > 0 and not d[:, s["label"][0] == 0].any()
        limit = em.release_budget(s["image"], s["label"], s["case_id"])
        assert torch.all(_written(s["image"], d).abs() <= limit + 1e-6)
    for bad in ("0.5", "2,0.25,0.95", "0,0.9,0.2"):
        with pytest.raises(ValueError):
            protectors.get("em", refine_texture=bad)
    with pytest.raises(ValueError):
        protectors.get("em", refine_texture="0,0.25,0.95").release_budget(s["image"], None, "c7")


def test_release_parameters_and_defaults() -> None:
    p = protectors.get("salm", release="true", min_psnr="50", victim_grids="128,256")
    assert p.release and p.min_psnr == 50.0 and p.victim_grids == (128, 256)
    q = protectors.get("em")
    assert not q.release and q.min_psnr is None and q.victim_grids == "auto"
    assert (q.refine_rounds, q.refine_pgd, q.refine_surrogate_epochs, q.refine_reset) == (12, 2, 3, 3)
    with pytest.raises(ValueError):
        protectors.get("em", release="maybe")
    with pytest.raises(ValueError):
        protectors.get("em", victim_grids=[4])
    with pytest.raises(RuntimeError):
        protectors.get("em", release=True).perturbation(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8).long(), "c")


def test_pipeline_key_rebuilds_the_release_protector(tmp_path) -> None:
    from test_evaluate import _write_2d

    from monai_umed.bundle import load_protector
    from monai_umed.key import read_key
    from monai_umed.pipeline import protect_dataset

    root = _write_2d(tmp_path / "data", n_train=6, size=32, ext=".png")
    params = {k: v for k, v in TINY.items() if k not in ("seed", "device")}
    summary = protect_dataset(root, tmp_path / "out", method="salm", key=tmp_path / "k.umedkey", epsilon=EPS,
                              params={**params, "min_psnr": 50}, split="training", device="cpu", seed=0,
                              progress=False)
    assert summary["protected"] == 6 and summary["psnr_min"] >= 50.0 and summary["max_abs_delta"] <= 8
    q = load_protector(tmp_path / "k.umedkey", device="cpu")
    record = read_key(tmp_path / "k.umedkey")
    assert q.release and q.min_psnr == 50.0 and q.params() == record["params"]
    trained = {c["case_id"] for c in record["cases"] if c.get("protected")}
    assert set(q.refiner.deltas) == trained


@pytest.mark.parametrize("name", ["em", "salm"])
def test_resident_working_set_gives_the_same_release_fit(name: str, monkeypatch) -> None:
    """The on-device placement of both fits (SALM's own min-min in pgd.py, the release stage's refinement), forced on
    the CPU: the same deltas, masks and written perturbations, kept on the CPU afterwards."""
    import monai_umed.protectors.pgd as pgd
    import monai_umed.protectors.refine as refine

    ref = _fitted(name, FLOOR)
    monkeypatch.setattr(pgd, "working_set_on", lambda *a, **k: True)
    monkeypatch.setattr(refine, "working_set_on", lambda *a, **k: True)
    p = protectors.get(name, epsilon=EPS, min_psnr=FLOOR, **TINY, **PER_CASE).fit(_data(), progress=False)
    assert p.refiner.history == ref.refiner.history and p.progress_state == ref.progress_state
    for table in ("deltas", "masks"):
        mine, theirs = getattr(p, table, {}), getattr(ref, table, {})
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) and mine[k].device.type == "cpu" for k in mine)
    for s in _data() + [_case(7)]:
        x, y, cid = s["image"], s["label"], s["case_id"]
        assert torch.equal(p.refiner.deltas.get(cid, x), ref.refiner.deltas.get(cid, x))
        assert torch.equal(p.perturbation(x, y, cid), ref.perturbation(x, y, cid))


def test_resident_em_work_grid_fit_gives_the_same_deltas(monkeypatch) -> None:
    """EM's own min-min (``release=False``) with its work set and deltas forced on the device (the CPU here)."""
    kw = {**TINY, "release": False}
    ref = protectors.get("em", epsilon=EPS, **kw).fit(_data(4), progress=False)
    res = protectors.get("em", epsilon=EPS, **kw)
    res.resident = True
    res.fit(_data(4), progress=False)
    assert res.progress_state == ref.progress_state and res.deltas.keys() == ref.deltas.keys()
    assert all(torch.equal(res.deltas[k], ref.deltas[k]) and res.deltas[k].device.type == "cpu" for k in res.deltas)
    assert not res._resident
