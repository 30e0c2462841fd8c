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

"""The victim's on-device data path (CUDA's, run here on the CPU) against the plain one: same batches, same training,
and batched evaluation against one case at a time."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import ThreadDataLoader
from monai.transforms import EnsureTyped, RandCropByPosNegLabeld

from monai_umed.data.synthetic import make_demo_dataset
from monai_umed.errors import InputError
from monai_umed.evaluation.defences import get_defence
from monai_umed.evaluation.train import (
    _case_groups,
    _train_loader,
    cudnn_benchmark,
    describe_data,
    eval_transforms,
    evaluate_victim,
    load_split,
    make_config,
    train_transforms,
    train_victim,
)
from monai_umed.networks.victims import victim_network

TINY = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0}
CPU = torch.device("cpu")


def _config(root: Path, **kw):
    train = load_split(root, "training")
    return train, make_config("unet", describe_data(root, train, kw.pop("image_size", None)), epochs=2, seed=3,
                              batch_size=3, victim_params=TINY, **kw)


def _batches(loader, epochs: int = 2) -> list[dict[str, torch.Tensor]]:
    return [{k: b[k].clone() for k in ("image", "label")} for _ in range(epochs) for b in loader]


@pytest.mark.parametrize("augment", ["square", "strong_aug"])
def test_fast_loader_draws_the_same_batches(ds2d, one_thread, augment):
    # square patch: flips + 90-degree rotations; non-square patch + strong_aug: small rotations, elastic, intensity
    kw = {} if augment == "square" else {"patch": (32, 16), "defence": get_defence("strong_aug")}
    train, cfg = _config(ds2d, **kw)
    fast, plain = _train_loader(train, cfg, CPU, fast=True), _train_loader(train, cfg, CPU, fast=False)
    assert isinstance(fast, ThreadDataLoader) and not isinstance(plain, ThreadDataLoader)
    # the cache ends with the tensors on the device, right before the first random transform
    t = fast.dataset.transform.transforms
    first = [i for i, tr in enumerate(t) if isinstance(tr, RandCropByPosNegLabeld)][0]
    assert isinstance(t[first - 1], EnsureTyped) and len(t) == len(plain.dataset.transform.transforms) + 1
    got, want = _batches(fast), _batches(plain)
    assert len(got) == len(want) == 4  # 4 cases in batches of 3, 2 epochs
    for g, w in zip(got, want):
        assert g["image"].dtype == w["image"].dtype and g["label"].dtype == w["label"].dtype
        assert torch.equal(g["image"], w["image"]) and torch.equal(g["label"], w["label"])
    assert not torch.equal(got[0]["image"], got[2]["image"])  # the second epoch draws new crops and flips


def test_train_victim_fast_path_is_bit_identical(ds2d, one_thread):
    train, cfg = _config(ds2d)
    runs = {}
    for fast in (None, True, False):
        model, info = train_victim(train, cfg, device="cpu", use_cache=False, progress=False, fast=fast)
        runs[fast] = (info, model.state_dict())
    assert runs[None][0]["fast"] is False and runs[True][0]["fast"] is True  # auto: the fast path on CUDA only
    (fi, fw), (pi, pw) = runs[True], runs[False]
    assert len(fi["loss"]) == 2 and fi["loss"] == pi["loss"] == runs[None][0]["loss"]
    assert fw.keys() == pw.keys() and all(torch.equal(fw[k], pw[k]) for k in fw)


def test_cudnn_benchmark_is_restored():
    before = torch.backends.cudnn.benchmark
    with cudnn_benchmark("cpu"):
        assert torch.backends.cudnn.benchmark == before
    try:
        torch.backends.cudnn.benchmark = False
        with pytest.raises(RuntimeError), cudnn_benchmark("cuda"):  # only sets the flag: no GPU needed
            assert torch.backends.cudnn.benchmark is True
            raise RuntimeError
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before


@pytest.fixture
def mixed_test(tmp_path) -> tuple[list[dict[str, str]], object]:
    """A 32 px victim and a test list mixing 32 and 48 px images (one and several windows)."""
    small = make_demo_dataset(tmp_path / "small", n_train=2, n_test=3, size=32, rgb=True)
    large = make_demo_dataset(tmp_path / "large", n_train=1, n_test=2, size=48, rgb=True, seed=1)
    _, cfg = _config(small)
    s, big = load_split(small, "test"), load_split(large, "test")
    return [s[0], s[1], big[0], big[1], s[2]], cfg


def _model(cfg):
    torch.manual_seed(0)
    return victim_network(cfg.victim, cfg.spatial_dims, cfg.in_channels, cfg.num_classes, **cfg.victim_params)


def test_batched_evaluation_matches_one_case_at_a_time(mixed_test, one_thread):
    test, cfg = mixed_test
    groups = list(_case_groups(test, eval_transforms(cfg), cfg, cases=4))
    assert [len(g) for g in groups] == [2, 2, 1]  # consecutive cases of one shape only
    model = _model(cfg)
    one = evaluate_victim(model, test, cfg, device="cpu", keep=5, batch_cases=1, sw_batch_size=4)
    many = evaluate_victim(model, test, cfg, device="cpu", keep=5, batch_cases=4, sw_batch_size=32)
    assert len(one["per_case"]) == 5 and one["per_case"] == many["per_case"]
    assert one["dice"] == many["dice"] and one["dice_per_class"] == many["dice_per_class"]
    assert len(many["predictions"]) == 5
    assert [p.shape for p in many["predictions"]] == [(1, 32, 32)] * 2 + [(1, 48, 48)] * 2 + [(1, 32, 32)]
    assert all(np.array_equal(a, b) for a, b in zip(one["predictions"], many["predictions"]))
    assert len(evaluate_victim(model, test, cfg, device="cpu", keep=2, batch_cases=4)["predictions"]) == 2


def test_batched_resized_evaluation_and_errors(tmp_path, one_thread):
    # the victim resizes: every test image has one shape, so one call scores them all, back on the labels' grid
    root = make_demo_dataset(tmp_path / "ds", n_train=2, n_test=4, size=40, rgb=True)
    _, cfg = _config(root, image_size=24)
    test, model = load_split(root, "test"), _model(cfg)
    assert [len(g) for g in _case_groups(test, eval_transforms(cfg), cfg, cases=8)] == [4]
    one = evaluate_victim(model, test, cfg, device="cpu", keep=4, batch_cases=1)
    many = evaluate_victim(model, test, cfg, device="cpu", keep=4, batch_cases=8)
    assert one["per_case"] == many["per_case"] and many["predictions"][0].shape == (1, 40, 40)
    assert all(np.array_equal(a, b) for a, b in zip(one["predictions"], many["predictions"]))
    with pytest.raises(InputError, match="label values outside"):
        evaluate_victim(model, test, replace(cfg, num_classes=1), device="cpu", batch_cases=8)
    with pytest.raises(InputError, match="channel"):
        evaluate_victim(model, test, replace(cfg, in_channels=1), device="cpu", batch_cases=8)


def test_train_transforms_device_is_only_a_move(ds2d):
    _, cfg = _config(ds2d)
    plain, fast = train_transforms(cfg), train_transforms(cfg, device="cpu")
    names = [type(t).__name__ for t in fast.transforms]
    assert [n for i, n in enumerate(names) if i != names.index("RandCropByPosNegLabeld") - 1] == [
        type(t).__name__ for t in plain.transforms]
