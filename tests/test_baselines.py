# Copyright (c) monai-umed contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""SALM and the baselines EM, TAP, SEP, LSP, AR on tiny synthetic 2D/3D data (RGB and single channel)."""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import create_test_image_2d, create_test_image_3d

from monai_umed import protectors
from monai_umed.intensity import compute_mapping, quantise
from monai_umed.protectors.pgd import dilate

FITTED = ["em", "salm", "tap", "sep"]
FREE = ["lsp", "ar"]
EPS = 8 / 255
# tiny settings: a 2-level surrogate, native grid, few steps
TINY = {"work_size": None, "steps": 3, "batch_size": 2, "surrogate_channels": (4, 8), "epochs": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def _case(i: int, kind: str) -> dict:
    rs = np.random.RandomState(i)
    if kind == "3d":
        im, lab = create_test_image_3d(14 + i % 2, 12, 10, num_objs=2, rad_max=4, rad_min=2, num_seg_classes=2,
                                       random_state=rs)
        image = torch.tensor(im)[None]
    else:
        im, lab = create_test_image_2d(24, 20 + 2 * (i % 2), num_objs=2, rad_max=6, rad_min=3, num_seg_classes=1,
                                       random_state=rs)
        image = torch.tensor(im)[None]
        if kind == "rgb":
            image = torch.cat([image, 0.8 * image, 0.5 * image])
    image = (image / image.max()).float()
    # uint8-representable images, so the quantisation check is exact
    image = torch.round(image * 255) / 255
    return {"image": image, "label": torch.tensor(lab)[None].long(), "case_id": f"{kind}_{i:02d}"}


@lru_cache(maxsize=None)
def _data(kind: str) -> tuple:
    return tuple(_case(i, kind) for i in range(3))


def _unseen(kind: str) -> dict:
    return _case(7, kind)


@lru_cache(maxsize=None)
def _fitted(name: str, kind: str, seed: int = 0):
    p = protectors.get(name, epsilon=EPS, seed=seed, **(TINY if name in FITTED else {}))
    return p.fit(list(_data(kind)), progress=False)


def _check_budget(delta: torch.Tensor, image: torch.Tensor) -> None:
    assert delta.shape == image.shape and delta.dtype == torch.float32
    assert torch.isfinite(delta).all()
    assert float(delta.abs().max()) <= EPS + 1e-7  # float32 rounding of 8/255; the written levels are checked below
    stored = np.round(image.numpy() * 255).astype(np.uint8)
    mapping = compute_mapping(stored, "dtype")
    protected, dq = quantise(stored, delta.numpy(), mapping, EPS)
    assert protected.dtype == np.uint8
    assert np.abs(dq).max() <= math.floor(EPS * 255)
    assert np.abs(dq).max() > 0  # something was written


def test_registry() -> None:
    names = protectors.names()
    for name in FITTED + FREE:
        assert name in names
        p = protectors.get(name)
        assert p.name == name and p.fits == (name in FITTED)
        assert p.params()["epsilon"] == pytest.approx(8 / 255)


@pytest.mark.parametrize("kind", ["rgb", "gray", "3d"])
@pytest.mark.parametrize("name", FITTED + FREE)
def test_end_to_end_and_budget_after_quantisation(name: str, kind: str) -> None:
    p = _fitted(name, kind)
    for s in list(_data(kind)) + [_unseen(kind)]:
        with torch.no_grad():  # as the pipeline calls it; an unseen case still gets its gradient steps
            delta = p.perturbation(s["image"], s["label"], s["case_id"])
        _check_budget(delta, s["image"])
    if name in FITTED:
        assert set(p.deltas) == {s["case_id"] for s in _data(kind)}
        assert p.num_classes == (3 if kind == "3d" else 2)


@pytest.mark.parametrize("name", FITTED)
def test_fitted_methods_are_deterministic_and_reloadable(name: str) -> None:
    data = list(_data("rgb"))
    a = _fitted(name, "rgb")
    b = protectors.get(name, epsilon=EPS, seed=0, **TINY).fit(data, progress=False)
    c = protectors.get(name, epsilon=EPS, seed=1, **TINY).fit(data, progress=False)
    u = _unseen("rgb")
    for s in data + [u]:
        da = a.perturbation(s["image"], s["label"], s["case_id"])
        assert torch.equal(da, b.perturbation(s["image"], s["label"], s["case_id"]))
    s = data[0]
    assert not torch.equal(a.perturbation(s["image"], s["label"], s["case_id"]),
                           c.perturbation(s["image"], s["label"], s["case_id"]))
    # the state (deltas keyed by case_id, surrogate) protects after a reload, seen and unseen cases alike
    r = protectors.get(name, epsilon=EPS, seed=0, **TINY).load_state_dict(a.state_dict())
    for s in (data[1], u):
        assert torch.equal(r.perturbation(s["image"], s["label"], s["case_id"]),
                           a.perturbation(s["image"], s["label"], s["case_id"]))


@pytest.mark.parametrize("name", FREE)
def test_surrogate_free_methods_depend_only_on_label_and_shape(name: str) -> None:
    data = list(_data("rgb"))
    p = protectors.get(name, epsilon=EPS, seed=3)
    forward = [p.perturbation(s["image"], s["label"], s["case_id"]) for s in data]
    q = protectors.get(name, epsilon=EPS, seed=3)
    backward = [q.perturbation(s["image"], s["label"], s["case_id"]) for s in reversed(data)][::-1]
    for f, b in zip(forward, backward):
        assert f.numpy().tobytes() == b.numpy().tobytes()
    s = data[0]
    other = p.perturbation(torch.rand_like(s["image"]), s["label"], "another_case")
    assert torch.equal(other, forward[0])
    # each class carries its own pattern
    lab = s["label"][0]
    assert not torch.equal(forward[0][:, lab == 1][:, :4], forward[0][:, lab == 0][:, :4])
    assert not torch.equal(protectors.get(name, epsilon=EPS, seed=4).perturbation(s["image"], s["label"]), forward[0])


def test_salm_perturbs_only_inside_its_masks() -> None:
    tau, k = 0.02, 0.1
    data = list(_data("rgb"))
    # one round of one step: exactly the top-k significant tissue pixels are updated
    p = protectors.get("salm", epsilon=EPS, tau=tau, k=k, **{**TINY, "steps": 1, "epochs": 1}).fit(data, progress=False)
    for s in data:
        x, cid = s["image"], s["case_id"]
        tissue = dilate((x > tau).any(0, keepdim=True)[None], 1)[0]
        sel = p.masks[cid]
        assert sel.any() and not (sel & ~tissue).any()
        assert int(sel.sum()) <= math.ceil(k * int(tissue.sum()))
        delta = p.perturbation(x, s["label"], cid)
        assert (delta != 0).any()
        assert not delta[:, ~sel[0]].any()  # never selected -> exactly 0
    # several rounds on a reduced work grid: the file's delta stays inside the upsampled selection and tissue
    q = _fitted("salm", "rgb")
    r = protectors.get("salm", epsilon=EPS, **{**TINY, "work_size": 12}).fit(data, progress=False)
    for s in data + [_unseen("rgb")]:
        x, cid = s["image"], s["case_id"]
        tissue = dilate((x > tau).any(0, keepdim=True)[None], 1)[0]
        for prot in (q, r):
            delta = prot.perturbation(x, s["label"], cid)
            outside = ~tissue[0]
            assert not delta[:, outside].any()
            if cid in prot.masks:
                assert not delta[:, ~prot.selection_mask(x, cid)[0]].any()
    assert tuple(r.deltas[data[0]["case_id"]].shape[1:]) == (12, 10)


def test_fit_honours_epochs_and_resumes_from_checkpoint(tmp_path: Path) -> None:
    data = list(_data("gray"))
    full = _fitted("em", "gray")
    assert full.progress_state["round"] <= 2
    ckpt = tmp_path / "em.ckpt"
    part = protectors.get("em", epsilon=EPS, **{**TINY, "epochs": 1}).fit(data, progress=False, checkpoint=ckpt)
    assert ckpt.is_file() and part.progress_state["round"] == 1
    resumed = protectors.get("em", epsilon=EPS, **TINY).fit(data, progress=False, checkpoint=ckpt)
    for s in data:
        assert torch.equal(resumed.deltas[s["case_id"]], full.deltas[s["case_id"]])
    with pytest.raises(ValueError, match="other parameters"):
        protectors.get("em", epsilon=EPS, **{**TINY, "steps": 5}).fit(data, progress=False, checkpoint=ckpt)
    # SEP: checkpoints of one clean run, then PGD; a finished checkpoint is reused as is
    sep = protectors.get("sep", epsilon=EPS, n_checkpoints=2, **{**TINY, "epochs": 3})
    sep.fit(data, progress=False, checkpoint=tmp_path / "sep.ckpt")
    assert sep.progress_state["pretrain_epoch"] == 3 and len(sep.ensemble) == 2
    again = protectors.get("sep", epsilon=EPS, n_checkpoints=2, **{**TINY, "epochs": 3})
    again.fit(data, progress=False, checkpoint=tmp_path / "sep.ckpt")
    s = data[1]
    assert torch.equal(again.perturbation(s["image"], s["label"], s["case_id"]),
                       sep.perturbation(s["image"], s["label"], s["case_id"]))


def test_tap_resumes_an_interrupted_attack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from monai_umed.protectors.tap import TAPProtector

    data = list(_data("gray"))
    full = _fitted("tap", "gray")
    attack, calls = TAPProtector._attack, []

    def interrupted(self, b, generator, steps):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(1)
        return attack(self, b, generator, steps)

    ckpt = tmp_path / "tap.ckpt"
    monkeypatch.setattr(TAPProtector, "_attack", interrupted)
    with pytest.raises(KeyboardInterrupt):
        protectors.get("tap", epsilon=EPS, **TINY).fit(data, progress=False, checkpoint=ckpt)
    monkeypatch.undo()
    resumed = protectors.get("tap", epsilon=EPS, **TINY).fit(data, progress=False, checkpoint=ckpt)
    assert resumed.progress_state["attacked"] == 2
    for s in data:
        assert torch.equal(resumed.deltas[s["case_id"]], full.deltas[s["case_id"]])


def test_errors() -> None:
    s = _data("gray")[0]
    p = protectors.get("em", **TINY)
    with pytest.raises(RuntimeError, match="fit"):
        p.perturbation(s["image"], s["label"], s["case_id"])
    with pytest.raises(ValueError, match="label"):
        p.fit([{"image": s["image"], "label": None, "case_id": "a"}], progress=False)
    with pytest.raises(ValueError, match="duplicate"):
        p.fit([s, s], progress=False)
    with pytest.raises(ValueError, match="needs a label"):
        protectors.get("lsp").perturbation(s["image"], None)
    with pytest.raises(ValueError, match="k must"):
        protectors.get("salm", k=0.0)
