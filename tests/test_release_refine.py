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

"""The release path stand-in, the refinement through it (UMed's refine stage) and the paper protocol."""

import numpy as np
import pytest
import torch
from monai.data import create_test_image_2d, create_test_image_3d
from monai.transforms import Resize
from test_evaluate import _write_2d

from monai_umed.protectors.release import ReleasePath, antialias_resize, psnr, quantise_st
from monai_umed.protectors.umed import UMedProtector


def _samples(n=6, size=48, sd=2):
    out = []
    for i in range(n):
        rs = np.random.RandomState(i)
        if sd == 2:
            im, lab = create_test_image_2d(size, size, num_objs=2, rad_max=10, random_state=rs)
            x = torch.tensor(im)[None].float().repeat(3, 1, 1)
        else:
            im, lab = create_test_image_3d(size, size, size, num_objs=2, rad_max=6, random_state=rs)
            x = torch.tensor(im)[None].float()
        x = (x / x.max() * 255).round() / 255
        out.append({"image": x, "label": torch.tensor(lab > 0)[None].long(), "case_id": f"c{i}"})
    return out


FAST = dict(epochs=1, batch_size=4, refine_rounds=2, refine_pgd=2, victim_grids=(32,), seed=3, refine_tile=0)


def test_quantise_st_and_psnr():
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    q = quantise_st(x, 255)
    assert torch.allclose(q * 255, (q * 255).round(), atol=1e-4)
    q.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight through
    d = torch.zeros(2, 1, 100, 100)
    d[0, :, :10] = 1 / 255  # one grey level on 10 % of the image: 10 log10(255^2 / 0.1) dB
    assert float(psnr(d)[0]) == pytest.approx(10 * np.log10(255.0 ** 2 / 0.1))
    assert float(psnr(d)[1]) == float("inf")


def test_antialias_resize_matches_monai():
    x = torch.rand(1, 3, 90, 90)
    ours = antialias_resize(x, (32, 32))
    ref = Resize((32, 32), mode="bilinear", anti_aliasing=True)(x[0])
    assert torch.allclose(ours[0], torch.as_tensor(ref), atol=2e-3)


def test_release_path_views_are_paired_and_seeded():
    path = ReleasePath(grids=(16, 24), normalise="minmax", jitter=0.05)
    x = torch.rand(2, 3, 48, 48)
    y = (x[:, :1] > 0.5).long()
    a = path.view(x, y, torch.Generator().manual_seed(1))
    b = path.view(x, y, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape[2:] == a[1].shape[2:] and a[0].shape[2] in (16, 24)
    with pytest.raises(ValueError):
        ReleasePath(normalise="bogus")


@pytest.mark.parametrize("step", ["sign", "scaled"])
def test_refinement_stays_inside_the_budget_after_quantisation(step):
    samples = _samples()
    p = UMedProtector(**{**FAST, "refine_step": step}).fit(samples, progress=False)
    assert p.params()["refine_step"] == step
    assert p.refiner is not None and len(p.refiner.history) == 2
    for rec in p.refiner.history:  # the round log: the surrogate's training Dice and loss, the PGD loss
        assert {"round", "dice", "loss", "pgd_loss"} <= set(rec)
    for s in samples:
        d = p.perturbation(s["image"], s["label"], s["case_id"])
        limit = p.budget(s["image"], s["label"])
        assert torch.all(d.abs() <= limit + 1e-6)
        assert float(d.abs().max()) > 0  # the refined perturbation is not empty
        # what reaches an 8-bit file: whole grey levels, still inside the map, PSNR >= min_psnr
        stored = np.round(s["image"].numpy() * 255).astype(np.uint8)
        written = np.clip(np.round(stored + d.numpy() * 255), 0, 255)
        dq = (written - stored) / 255.0
        assert np.all(np.abs(dq) <= limit.numpy() + 1e-6)
        assert float(psnr(torch.as_tensor(dq)[None])) >= 50.0 - 1e-6


def test_refinement_is_deterministic_and_resumable(tmp_path):
    samples = _samples(n=4)
    a = UMedProtector(**FAST).fit(samples, progress=False)
    b = UMedProtector(**FAST).fit(samples, progress=False)
    for cid in a.refiner.deltas:
        assert torch.equal(a.refiner.deltas[cid], b.refiner.deltas[cid])
    # an interrupted fit: the first round is checkpointed, then the fit resumes and ends where a full one ends
    ck = tmp_path / "fit.ckpt"
    one = {**FAST, "refine_rounds": 1}
    UMedProtector(**one).fit(samples, progress=False, checkpoint=ck)
    assert (tmp_path / "fit.ckpt.refine").is_file()
    c = UMedProtector(**FAST).fit(samples, progress=False, checkpoint=ck)
    for cid in a.refiner.deltas:
        assert torch.equal(a.refiner.deltas[cid], c.refiner.deltas[cid])
    assert [r["round"] for r in c.refiner.history] == [0, 1]


def test_refined_state_round_trip_and_unseen_cases():
    samples = _samples(n=4)
    p = UMedProtector(**FAST).fit(samples, progress=False)
    q = UMedProtector(refine_steps=2).load_state_dict(p.state_dict())
    assert q.refine_steps == 2  # a protect-time option, not taken from the state
    for s in samples:
        assert torch.equal(p.perturbation(s["image"], s["label"], s["case_id"]),
                           q.perturbation(s["image"], s["label"], s["case_id"]))
    new = _samples(n=5)[4]
    d_gen = p.perturbation(new["image"], new["label"], "unseen")
    d_ref = q.perturbation(new["image"], new["label"], "unseen")
    limit = p.budget(new["image"], new["label"])
    assert torch.all(d_ref.abs() <= limit + 1e-6) and not torch.equal(d_gen, d_ref)
    assert torch.equal(d_ref, q.perturbation(new["image"], new["label"], "unseen"))  # seeded by the case


def test_refinement_3d_and_disabled():
    samples = _samples(n=3, size=24, sd=3)
    p = UMedProtector(epochs=1, batch_size=2, refine_rounds=1, refine_pgd=1, seed=0).fit(samples, progress=False)
    d = p.perturbation(samples[0]["image"], samples[0]["label"], "c0")
    assert torch.all(d.abs() <= p.budget(samples[0]["image"], samples[0]["label"]) + 1e-6)
    off = UMedProtector(epochs=1, batch_size=2, refine_rounds=0).fit(samples, progress=False)
    assert off.refiner is None


def test_paper_protocol_adds_exactly_the_float_perturbation(tmp_path):
    from monai_umed.bundle import load_protector
    from monai_umed.data.datalist import load_dataset
    from monai_umed.evaluation.protocols import paper_training_list
    from monai_umed.pipeline import load_case, protect_dataset

    data = _write_2d(tmp_path / "data", n_train=3, n_test=1, size=32, ext=".png")
    protect_dataset(data, tmp_path / "out", method="noise", epsilon=3 / 255, split="training", progress=False)
    key = tmp_path / "out.umedkey"
    items = paper_training_list(data, key)
    protector = load_protector(key, device="cpu")
    spec = load_dataset(str(data))
    for item, case in zip(items, [c for c in spec.cases if c.split == "training"]):
        lc = load_case(spec, case)
        d = protector.perturbation(lc.tensor, lc.label, case.case_id)
        assert np.array_equal(item["image"], (lc.tensor + d).clamp(0, 1).numpy().astype(np.float32))
        # float, not rounded to the file's grey levels
        assert not np.allclose(item["image"] * 255, np.round(item["image"] * 255))


def test_distilled_generators_protect_unseen_volumes_larger_than_their_patch():
    samples = _samples(n=3, size=24, sd=3)
    p = UMedProtector(epochs=1, batch_size=2, refine_rounds=1, refine_pgd=1, distil_epochs=3, patch_size=12,
                      seed=0).fit(samples, progress=False)
    distil = [h["loss"] for h in p.distil_history]
    assert len(distil) == 3 and distil[-1] < distil[0]  # the generators learn the refined perturbations
    big = _samples(n=1, size=40, sd=3)[0]  # larger than the sliding window (twice the patch at generator scale)
    assert any(n > r for n, r in zip(big["image"].shape[1:], p._sw_roi()))
    with torch.no_grad():
        d = p.perturbation(big["image"], big["label"], case_id="unseen-volume")
    limit = p.budget(big["image"], big["label"])
    assert d.shape == big["image"].shape and torch.all(d.abs() <= limit + 1e-6)
    assert float(psnr(d[None])) >= 50.0 - 1e-6  # the energy cap holds for unseen cases too


@pytest.mark.parametrize("mode", ["scale", "sparse"])
def test_energy_projection_holds_the_budget(mode):
    from monai_umed.protectors.refine import ReleaseRefiner

    g = torch.Generator().manual_seed(0)
    d = torch.randn(3, 3, 16, 16, generator=g) * 0.02
    lim = torch.full((3, 3, 44, 44), 8 / 255)
    lim[:, :, :4] = 0  # outside the footprint
    energy = torch.tensor([1e-5, 1e-4, 1.0], dtype=torch.float64)
    p = ReleaseRefiner.project_energy(d, lim, energy, mode)
    mse = ReleaseRefiner.native_delta(p, lim).double().pow(2).flatten(1).mean(1)
    assert torch.all(mse <= energy * (1 + 1e-5))
    assert torch.equal(p[2], d[2])  # inside its budget: untouched
    if mode == "sparse":  # few strong cells rather than a faint dense pattern
        assert float((p[0] != 0).float().mean()) < 0.2
        assert float(p[0].abs().max()) > float(ReleaseRefiner.project_energy(d, lim, energy, "scale")[0].abs().max())


def test_distilled_output_is_scaled_up_to_the_energy_budget():
    from monai_umed.protectors.umed_release import UMedReleaseStage

    limit = torch.zeros(1, 40, 40)
    limit[:, 10:30, 10:30] = 8 / 255
    faint = (torch.rand(1, 40, 40, generator=torch.Generator().manual_seed(0)) - 0.5) * 1e-3 * (limit > 0)
    energy = 1e-5
    filled = UMedReleaseStage._fill_energy(faint, limit, energy)
    assert torch.all(filled.abs() <= limit + 1e-7)
    assert 0.9 * energy <= float(filled.double().pow(2).mean()) <= energy * 1.0001
    assert torch.equal(UMedReleaseStage._fill_energy(faint, limit, None), faint)


def test_auto_work_grid():
    from monai_umed.protectors.refine import auto_victim_grids, auto_work_size

    assert auto_victim_grids(2) == (128,) and auto_victim_grids(3) == ()
    assert auto_victim_grids(2, [256, 128]) == (256, 128)
    assert auto_work_size(2) == 128 and auto_work_size(3) is None
    assert auto_work_size(2, 64) == 64 and auto_work_size(2, None) is None
    p = UMedProtector(spatial_dims=2)
    assert p._refine_settings(2).work_size == 128


def test_shared_tile_is_one_pattern_for_every_case_and_resumes(tmp_path):
    from monai_umed.protectors.refine_shared import SharedTileRefiner, tile_pattern

    samples = _samples()
    p = UMedProtector(**{**FAST, "refine_tile": 4, "refine_tile_classwise": False, "distil_epochs": 0}).fit(
        samples, progress=False)
    ref = p.refiner
    assert isinstance(ref, SharedTileRefiner) and ref.pattern is not None and tuple(ref.pattern.shape) == (1, 3, 4, 4)
    assert float(ref.pattern.abs().max()) > 0
    for s in samples:  # every case's work-grid perturbation is the tiled pattern, scaled to its energy budget
        d = ref.deltas[s["case_id"]].float()
        tiled = tile_pattern(ref.pattern[0], d.shape[1:])
        scale = float((d * tiled).sum() / tiled.pow(2).sum())
        assert 0 < scale <= 1.0 + 1e-3
        assert torch.allclose(d, scale * tiled, atol=2e-3)
        delta = p.perturbation(s["image"], s["label"], s["case_id"])
        assert torch.all(delta.abs() <= p.budget(s["image"], s["label"]) + 1e-6)
    # the key round-trips the pattern; a fit interrupted after one round resumes to the same pattern
    q = UMedProtector(**FAST).load_state_dict(p.state_dict())
    assert torch.equal(q.refiner.pattern, ref.pattern)
    # a case not seen in fit gets the same tiled pattern (no generator involved), inside its map and energy budget
    new = _samples(n=7)[6]
    delta = q.perturbation(new["image"], new["label"], "unseen")
    d = q.refiner.unseen(new["image"], new["label"], q.budget(new["image"], new["label"]), q._energy())
    tiled = tile_pattern(ref.pattern[0], d.shape[1:])
    assert torch.allclose(d, float((d * tiled).sum() / tiled.pow(2).sum()) * tiled, atol=1e-5)
    assert float(delta.abs().max()) > 0 and torch.all(delta.abs() <= q.budget(new["image"], new["label"]) + 1e-6)
    assert float(delta.pow(2).mean()) <= 10 ** (-q.min_psnr / 10) * (1 + 1e-6)
    ckpt = tmp_path / "fit.ckpt"
    one = {**FAST, "refine_tile": 4, "refine_tile_classwise": False, "distil_epochs": 0}
    UMedProtector(**{**one, "refine_rounds": 1}).fit(samples, progress=False, checkpoint=ckpt)
    r = UMedProtector(**one).fit(samples, progress=False, checkpoint=ckpt)
    assert torch.equal(r.refiner.pattern, ref.pattern)


def test_working_set_on_asks_for_a_share_of_the_free_device_memory(monkeypatch):
    from monai_umed.protectors.refine import working_set_on

    t = [torch.zeros(100), torch.zeros(50, dtype=torch.float16)]  # 500 bytes
    assert not working_set_on("cpu", t)  # the CPU holds it already: nothing to move
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 4000))
    assert working_set_on("cuda", t)  # 500 <= 0.5 * 1000
    assert not working_set_on("cuda", t, extra_bytes=1)
    assert working_set_on(torch.device("cuda", 0), t, fraction=0.6, extra_bytes=100)
    assert not working_set_on("meta", t)  # free memory unknown

    def no_runtime(device=None):
        raise RuntimeError("no CUDA")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_runtime)
    assert not working_set_on("cuda", t)


@pytest.mark.parametrize("mode", ["scale", "sparse"])
def test_energy_projection_without_host_sync_is_identical(mode):
    from monai_umed.protectors.refine import ReleaseRefiner

    g = torch.Generator().manual_seed(1)
    d = torch.randn(4, 3, 16, 16, generator=g) * 0.03
    lim = torch.rand(4, 3, 44, 44, generator=g) * (12 / 255)
    mse = ReleaseRefiner.native_delta(d, lim).double().pow(2).flatten(1).mean(1)
    for energy in (torch.tensor([1e-5, 3e-5, 1e-4, 1.0], dtype=torch.float64),  # some over, one inside
                   torch.tensor([1.0] * 4, dtype=torch.float64),  # every case inside its budget
                   mse / (1 + 5e-7)):  # every case over it by less than the tolerance: nothing changes
        a = ReleaseRefiner.project_energy(d, lim, energy, mode)
        b = ReleaseRefiner.project_energy(d, lim, energy, mode, sync=False)
        assert torch.equal(a, b)


@pytest.mark.parametrize("tile", [0, 4])
def test_resident_working_set_gives_the_same_fit_and_cpu_state(tile, tmp_path):
    """The on-device placement path (forced on the CPU): the same perturbations and round log as per-batch
    transfers, and what the fit returns, checkpoints and ``state_dict`` gives lies on the CPU."""
    from monai_umed.protectors.refine import RefineSettings, psnr_energy
    from monai_umed.protectors.refine_build import build_refiner
    from monai_umed.protectors.release import ReleasePath

    samples = _samples(n=5, size=32)
    images = [s["image"] for s in samples]
    labels = [s["label"] for s in samples]
    limits = [torch.full_like(x, 4 / 255) * (torch.arange(32) >= 4) for x in images]
    ids = [s["case_id"] for s in samples]

    def fit(resident, ckpt):
        settings = RefineSettings(rounds=2, pgd_steps=2, batch_size=2, work_size=16, shared_tile=tile)
        ref = build_refiner(2, 3, 2, ReleasePath(grids=(24,)), settings, surrogate_channels=(4, 8), lr=1e-3,
                            device="cpu", seed=1, tag="resident", levels=255)
        ref.resident = resident
        logged = []
        out = ref.fit(images, labels, limits, ids, checkpoint=ckpt, log=lambda _: logged.append(ref.state_dict()),
                      energies=[psnr_energy(50.0)] * len(ids))
        return ref, out, logged

    a, out_a, _ = fit(False, None)
    b, out_b, logged = fit(True, tmp_path / "refine.ckpt")
    assert b.history == a.history and len(b.history) == 2
    assert out_b.keys() == out_a.keys() == set(ids)
    for cid in ids:
        assert torch.equal(out_b[cid], out_a[cid]) and out_b[cid].dtype == torch.float16
        assert out_b[cid].device.type == "cpu" and b.deltas[cid].device.type == "cpu"
    if tile:
        assert torch.equal(b.pattern, a.pattern) and b.pattern.device.type == "cpu"
    saved = torch.load(tmp_path / "refine.ckpt", map_location="cpu", weights_only=False)
    for state in logged + [saved, b.state_dict()]:  # during the fit (after each round) and after it
        assert all(v.device.type == "cpu" for v in state["deltas"].values())
        assert state.get("pattern") is None or state["pattern"].device.type == "cpu"
    if tile:  # the shared tile's cases are made again from the final tile after the last checkpoint
        assert torch.equal(saved["pattern"], a.pattern)
    else:
        assert all(torch.equal(saved["deltas"][cid], out_a[cid]) for cid in ids)
    assert not b._lazy  # the sync-free inner loops end with the fit


def test_resident_umed_fit_writes_the_same_perturbations(monkeypatch):
    import monai_umed.protectors.refine as refine

    samples = _samples(n=4)
    ref = UMedProtector(**FAST).fit(samples, progress=False)
    monkeypatch.setattr(refine, "working_set_on", lambda *a, **k: True)
    res = UMedProtector(**FAST).fit(samples, progress=False)
    assert res.refiner.history == ref.refiner.history
    for s in samples:
        x, y, cid = s["image"], s["label"], s["case_id"]
        assert torch.equal(res.refiner.deltas[cid], ref.refiner.deltas[cid])
        assert torch.equal(res.perturbation(x, y, cid), ref.perturbation(x, y, cid))


def test_classwise_tiles_lay_each_class_pattern_on_its_own_pixels():
    from monai_umed.protectors.refine_shared import tile_pattern

    samples = _samples()
    p = UMedProtector(**{**FAST, "refine_tile": 4, "refine_tile_classwise": "true", "distil_epochs": 0}).fit(
        samples, progress=False)
    ref = p.refiner
    assert p.params()["refine_tile_classwise"] is True and tuple(ref.pattern.shape) == (2, 3, 4, 4)
    assert float(ref.pattern[0].abs().max()) > 0 and float(ref.pattern[1].abs().max()) > 0
    for s in samples:  # on a work cell of one class only, the case's perturbation is that class's tile (scaled)
        d = ref.deltas[s["case_id"]].float()
        frac = torch.nn.functional.interpolate(s["label"][None].float(), size=d.shape[1:], mode="area")[0, 0]
        for k, cells in ((1, frac == 1), (0, frac == 0)):
            tiled = tile_pattern(ref.pattern[k], d.shape[1:])[:, cells]
            got = d[:, cells]
            scale = float((got * tiled).sum() / tiled.pow(2).sum().clamp_min(1e-12))
            assert torch.allclose(got, scale * tiled, atol=2e-3)
    q = UMedProtector(**FAST).load_state_dict(p.state_dict())
    assert q.refine_tile_classwise and torch.equal(q.refiner.pattern, ref.pattern)


def test_symmetric_tile_is_invariant_to_flips_and_rotations():
    from monai_umed.protectors.refine_shared import symmetrise

    t = symmetrise(torch.randn(2, 3, 4, 4), 2)
    for k in range(4):
        assert torch.allclose(torch.rot90(t, k, (-2, -1)), t, atol=1e-6)
    assert torch.allclose(t.flip(-1), t, atol=1e-6) and torch.allclose(t.flip(-2), t, atol=1e-6)
    c = symmetrise(torch.randn(1, 1, 3, 3, 3), 3)
    assert torch.allclose(c.flip(-1), c, atol=1e-6) and torch.allclose(c.transpose(-3, -2), c, atol=1e-6)
    p = UMedProtector(**{**FAST, "refine_tile": 4, "refine_tile_symmetric": True, "distil_epochs": 0}).fit(
        _samples(), progress=False)
    assert float(p.refiner.pattern.abs().max()) > 0
    assert torch.allclose(torch.rot90(p.refiner.pattern, 1, (-2, -1)), p.refiner.pattern, atol=1e-6)


def test_scaled_tile_step_keeps_a_smooth_direction_inside_the_budget():
    samples = _samples()
    kw = {**FAST, "refine_tile": 4, "refine_tile_classwise": "true", "distil_epochs": 0}
    p = UMedProtector(**{**kw, "refine_step": "scaled"}).fit(samples, progress=False)
    ref = p.refiner
    top = float(upsample_limit_max(p, samples))
    for k in range(ref.pattern.shape[0]):  # each tile is a direction of fixed root mean square, inside +-top
        t = ref.pattern[k]
        assert float(t.abs().max()) <= top + 1e-6
        assert float(t.pow(2).mean().sqrt()) == pytest.approx(top / 2**0.5, rel=0.2)
        assert len(torch.unique(t.abs())) > 2  # not a saturated sign pattern
    for s in samples:
        d = p.perturbation(s["image"], s["label"], s["case_id"])
        assert torch.all(d.abs() <= p.budget(s["image"], s["label"]) + 1e-6)
        assert float(d.pow(2).mean()) <= 10 ** (-p.min_psnr / 10) * (1 + 1e-6)
    q = UMedProtector(**FAST).load_state_dict(p.state_dict())
    assert q.refine_step == "scaled" and torch.equal(q.refiner.pattern, ref.pattern)


def upsample_limit_max(p, samples):
    """The largest value of the fitted protector's full budget maps (the tile's bound)."""
    return max(float(p.budget(s["image"], s["label"]).max()) for s in samples)


def test_filled_tile_spends_each_case_energy_budget():
    samples = _samples()
    kw = {**FAST, "refine_tile": 4, "distil_epochs": 0}
    faint = UMedProtector(**kw).fit(samples, progress=False)
    full = UMedProtector(**{**kw, "refine_tile_fill": "true"}).fit(samples, progress=False)
    e = 10 ** (-full.min_psnr / 10)
    spent = {"faint": [], "full": []}
    for s in samples:
        a = full.perturbation(s["image"], s["label"], s["case_id"])
        b = faint.perturbation(s["image"], s["label"], s["case_id"])
        assert float(a.pow(2).mean()) <= e * (1 + 1e-6)  # never over the budget
        assert torch.all(a.abs() <= full.budget(s["image"], s["label"]) + 1e-6)
        spent["full"].append(float(a.pow(2).mean()))
        spent["faint"].append(float(b.pow(2).mean()))
    assert sum(spent["full"]) > sum(spent["faint"])  # filling spends more of the budget than the faint tile


def test_quiet_colour_is_the_direction_images_vary_least_along():
    from monai_umed.colour import quiet_colour

    rng = np.random.default_rng(0)
    # images that vary along every colour but `quiet` (up to a little noise)
    base = rng.normal(0, 30, (2, 64, 64))
    quiet = np.array([1.0, -2.0, 1.0]) / np.sqrt(6)
    loud = np.stack([base[0], base[1], base[0] + 2 * base[1]])
    loud = loud - quiet[:, None, None] * np.tensordot(quiet, loud, 1)[None]
    v = quiet_colour([torch.as_tensor(loud + 0.1 * rng.normal(size=loud.shape))])
    assert abs(float((v ** 2).mean()) - 1.0) < 1e-9 and v[np.argmax(np.abs(v))] > 0
    assert abs(abs(float(v @ quiet)) / np.sqrt(3) - 1.0) < 1e-3
    assert np.array_equal(quiet_colour([np.zeros((1, 8, 8))]), np.ones(1))
    with pytest.raises(ValueError, match="no images"):
        quiet_colour([])
    with pytest.raises(ValueError, match="channels"):
        quiet_colour([np.zeros((3, 8, 8)), np.zeros((2, 8, 8))])


def test_quiet_tile_lies_along_the_data_colour_and_the_key_keeps_it():
    from monai_umed.colour import quiet_colour

    samples = _samples()
    rng = np.random.default_rng(1)
    for s in samples:  # give the images a colour structure: the green channel a scaled copy of the red one
        x = s["image"].clone()
        x[1] = (0.8 * x[0] + 0.05 * torch.as_tensor(rng.random(x.shape[1:]), dtype=x.dtype)).clamp(0, 1)
        s["image"] = (x * 255).round() / 255
    kw = {**FAST, "refine_tile": 4, "refine_tile_colour": "Quiet", "distil_epochs": 0}
    p = UMedProtector(**kw).fit(samples, progress=False)
    ref = p.refiner
    v = torch.as_tensor(quiet_colour([s["image"] for s in samples]), dtype=torch.float32)
    assert ref.colour == "quiet" and torch.equal(ref.colour_vector, v)
    assert tuple(ref.pattern.shape) == (2, 1, 4, 4) and float(ref.pattern.abs().max()) > 0
    # a texture, not a flat offset: every class tile has (about) zero mean over its cells
    assert float(ref.pattern.mean((2, 3)).abs().max()) <= 0.25 * float(ref.pattern.abs().max())
    for s in samples:  # every stored perturbation is one map times the colour vector
        d = ref.deltas[s["case_id"]].float()
        one = (d * v.view(-1, 1, 1)).sum(0) / v.pow(2).sum()
        assert float(one.abs().max()) > 0
        assert torch.allclose(d, v.view(-1, 1, 1) * one[None], atol=2e-3)
        delta = p.perturbation(s["image"], s["label"], s["case_id"])
        assert torch.all(delta.abs() <= p.budget(s["image"], s["label"]) + 1e-6)
    q = UMedProtector().load_state_dict(p.state_dict())
    assert q.refine_tile_colour == "quiet" and torch.equal(q.refiner.colour_vector, v)
    s = samples[0]
    assert torch.equal(q.perturbation(s["image"], s["label"], s["case_id"]),
                       p.perturbation(s["image"], s["label"], s["case_id"]))
    with pytest.raises(ValueError, match="refine_tile_colour"):
        UMedProtector(refine_tile_colour="loud")


def test_harmonics_keep_only_the_tile_period():
    from monai_umed.protectors.refine_shared import lowpass_tile

    t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    low = lowpass_tile(t, 2, 1)
    spec = torch.fft.fft2(low.double()).abs()
    k = torch.fft.fftfreq(8, d=1 / 8).abs()
    far = (k[:, None] > 1) | (k[None, :] > 1)
    assert float(spec[..., far].max()) < 1e-5 and float(spec[..., ~far].max()) > 0
    assert torch.allclose(lowpass_tile(low, 2, 1), low, atol=1e-6) and torch.equal(lowpass_tile(t, 2, 0), t)
    samples = _samples()
    p = UMedProtector(**{**FAST, "refine_tile": 8, "refine_tile_harmonics": 1, "distil_epochs": 0}).fit(
        samples, progress=False)
    power = torch.fft.fft2(p.refiner.pattern.double()).abs().pow(2)
    # the clamp to the budget after the projection leaves a little of the finer periods, no more
    assert float(power.sum()) > 0 and float(power[..., far].sum()) <= 0.1 * float(power.sum())
    q = UMedProtector().load_state_dict(p.state_dict())
    assert q.refine_tile_harmonics == 1 and q.refiner.harmonics == 1


def test_a_key_from_before_the_tile_loads_as_per_case():
    from monai_umed.protectors.refine_shared import SharedTileRefiner

    samples = _samples()
    p = UMedProtector(**{**FAST, "distil_epochs": 0}).fit(samples, progress=False)
    state = p.state_dict()
    for k in ("refine_tile", "refine_tile_classwise", "refine_tile_symmetric", "refine_tile_fill"):
        state["params"].pop(k)
    q = UMedProtector().load_state_dict(state)  # the default would be the 2D tile
    assert q.refine_tile == 0 and not isinstance(q.refiner, SharedTileRefiner)
    s = samples[0]
    assert torch.equal(q.perturbation(s["image"], s["label"], s["case_id"]),
                       p.perturbation(s["image"], s["label"], s["case_id"]))


def test_the_tile_is_fitted_on_one_texture_bound_and_written_on_another():
    """``tile_bound=auto``: the 2D shared tile is fitted on METHODS.md's bound and written on ``b_min=0``, quantiles
    (0.25, 0.95): the same tile, laid only where the written bound is non-zero; ``fit`` writes it on the fitting
    bound, and a key from before ``tile_bound`` does so too."""
    from monai_umed.protectors.refine import auto_tile_bound

    assert auto_tile_bound("auto", 4) == (0.0, (0.25, 0.95)) and auto_tile_bound("auto", 0) is None
    assert auto_tile_bound("fit", 4) is None and auto_tile_bound("0.1,0,1", 4) == (0.1, (0.0, 1.0))
    for bad in (dict(tile_bound="0.1,0.9"), dict(tile_bound="2,0,1"), dict(tile_bound="0,0.9,0.1"),
                dict(b_min=1.5), dict(texture_quantiles=(0.9, 0.1))):
        with pytest.raises(ValueError, match="tile_bound|b_min|texture_quantiles"):
            UMedProtector(**bad)
    samples = _samples(n=4)
    cfg = {**FAST, "refine_tile": 4, "distil_epochs": 0}
    written = UMedProtector(**cfg).fit(samples, progress=False)
    fitted = UMedProtector(**cfg, tile_bound="fit").fit(samples, progress=False)
    assert torch.equal(written.refiner.pattern, fitted.refiner.pattern)  # the fit itself does not change
    assert written._texture_bound() == (0.0, (0.25, 0.95)) and fitted._texture_bound() == (0.25, (0.05, 0.95))
    flattest = 0
    for s in samples:
        roi = (s["label"] > 0).expand_as(s["image"])
        d_w = written.perturbation(s["image"], s["label"], s["case_id"])
        d_f = fitted.perturbation(s["image"], s["label"], s["case_id"])
        lim_w, lim_f = written.budget(s["image"], s["label"]), fitted.budget(s["image"], s["label"])
        assert torch.all(d_w.abs() <= lim_w + 1e-6) and torch.all(d_f.abs() <= lim_f + 1e-6)
        flattest += int(((lim_w == 0) & (lim_f > 0) & roi).sum())
        # written or new, a case gets the same tile laid on the written bound
        assert torch.allclose(d_w, written.perturbation(s["image"], s["label"], "unseen"), atol=1 / 255 + 1e-6)
    assert flattest > 0  # the flattest part of the ROI carries the tile only on the fitting bound
    q = UMedProtector().load_state_dict(written.state_dict())
    assert q.tile_bound == "auto"
    s = samples[0]
    assert torch.equal(q.perturbation(s["image"], s["label"], s["case_id"]),
                       written.perturbation(s["image"], s["label"], s["case_id"]))
    state = fitted.state_dict()
    state["params"].pop("tile_bound")  # a key from before ``tile_bound`` wrote the tile on its fitting bound
    old = UMedProtector().load_state_dict(state)
    assert old.tile_bound == "fit" and torch.equal(old.perturbation(s["image"], s["label"], s["case_id"]),
                                                   fitted.perturbation(s["image"], s["label"], s["case_id"]))


@pytest.mark.parametrize("sd", [2, 3])
def test_view_augment_is_seeded_differentiable_and_moves_labels_with_images(sd):
    from monai_umed.protectors.release_augment import ViewAugment

    a = ViewAugment(p_spatial=1.0, p_intensity=1.0)
    y = torch.zeros((3, 1) + (24,) * sd, dtype=torch.long)
    y[(slice(None), 0) + (slice(6, 18),) * sd] = 1
    x = (y.float() * 0.5 + 0.25).repeat(1, 2, *[1] * sd).requires_grad_(True)
    xa, ya = a(x, y, torch.Generator().manual_seed(1))
    xb, yb = a(x, y, torch.Generator().manual_seed(1))
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and ya.dtype == torch.long
    assert set(torch.unique(ya).tolist()) <= {0, 1} and not torch.equal(ya, y)  # the label was moved too
    xa.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0 and torch.isfinite(xa).all()
    # rotating 0 and scaling by 1 leaves the geometry alone
    still = ViewAugment(rotate=0.0, scale=(1.0, 1.0), p_spatial=1.0, p_intensity=0.0)
    xs, ys = still(x.detach(), y, torch.Generator().manual_seed(0))
    assert torch.equal(ys, y) and torch.allclose(xs, x.detach(), atol=1e-5)


def test_release_augment_parameter_reaches_the_path_and_the_key():
    from monai_umed.protectors.release_augment import ViewAugment

    p = UMedProtector(**{**FAST, "release_augment": "nnunet", "refine_tile": 4, "distil_epochs": 0})
    assert isinstance(p._release_path(2).augment, ViewAugment) and p._release_path(2).compress is None
    assert UMedProtector(**{**FAST, "release_augment": "nnunet_jpeg"})._release_path(2).compress is not None
    assert UMedProtector(**FAST)._release_path(2).augment is None
    with pytest.raises(ValueError, match="release_augment"):
        UMedProtector(**{**FAST, "release_augment": "everything"})
    p.fit(_samples(n=4), progress=False)
    q = UMedProtector().load_state_dict(p.state_dict())
    assert q.release_augment == "nnunet" and q.params()["release_augment"] == "nnunet"


def test_soft_jpeg_follows_pillow_and_passes_gradients():
    import io

    from PIL import Image

    from monai_umed.protectors.release_jpeg import JpegAugment, jpeg_soft

    rng = np.random.RandomState(0)
    im, _ = create_test_image_2d(64, 64, num_objs=4, rad_max=12, noise_max=0.3, random_state=rng)
    rgb = np.clip(np.stack([im * 200 + 20, im * 120 + 60, im * 60 + 90], -1), 0, 255).astype(np.uint8)
    for q in (30, 75):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=q)
        ref = np.asarray(Image.open(buf).convert("RGB")).astype(np.float64)
        x = torch.tensor(rgb).permute(2, 0, 1)[None].float().div(255).requires_grad_(True)
        out = jpeg_soft(x, q)
        ours = out[0].detach().permute(1, 2, 0).numpy() * 255
        # close to libjpeg's result, much closer than the image is to its re-encoding
        assert np.sqrt(np.mean((ours - ref) ** 2)) < 0.5 * np.sqrt(np.mean((rgb - ref) ** 2))
        out.sum().backward()
        assert float(x.grad.abs().sum()) > 0
    gray = torch.rand(2, 1, 20, 28)
    assert jpeg_soft(gray, 50).shape == gray.shape
    with pytest.raises(ValueError, match="1 or 3 channels"):
        jpeg_soft(torch.rand(1, 2, 16, 16), 50)
    aug = JpegAugment(p=1.0)
    assert torch.equal(aug(gray, torch.Generator().manual_seed(0)), aug(gray, torch.Generator().manual_seed(0)))
    vol = torch.rand(1, 1, 8, 8, 8)
    assert aug(vol, torch.Generator()) is vol
