# Copyright (c) monai-umed contributors
# Licensed under the Apache License, Version 2.0 (the "License").
from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityd

from monai_umed import protectors
from monai_umed.transforms import Protect, ProtectD, Protectd, ProtectDict


@pytest.mark.parametrize("shape", [(3, 24, 20), (1, 12, 10, 8)])
def test_protect_inverse_is_exact(shape: tuple[int, ...]) -> None:
    x = MetaTensor(torch.rand(shape), meta={"filename_or_obj": "case.nii.gz"})
    y = (torch.rand((1,) + shape[1:]) > 0.5).long()
    t = Protect(protectors.get("noise", epsilon=8 / 255, region="roi"))
    out = t(x, label=y)
    assert isinstance(out, MetaTensor) and out.shape == x.shape
    d = out.as_tensor() - x.as_tensor()
    assert d.abs().max() <= 8 / 255 + 1e-6 and d.abs().max() > 0 and not d[y.expand_as(d) == 0].any()
    back = t.inverse(out)
    assert torch.equal(back.as_tensor(), x.as_tensor())
    assert len(back.applied_operations) == 0
    # the case id defaults to the file name, so the same file gets the same perturbation
    assert torch.equal(t(x, label=y).as_tensor(), out.as_tensor())


def test_dictionary_transform_in_compose(ds3d) -> None:
    assert ProtectD is ProtectDict is Protectd
    import json

    entry = json.loads((ds3d / "dataset.json").read_text())["training"][0]
    data = {k: str(ds3d / v) for k, v in entry.items()}
    prep = Compose([LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"]), ScaleIntensityd("image")])
    protect = Compose([Protectd("image", protector=protectors.get("noise", epsilon=0.05), label_key="label")])
    clean = prep(data)
    out = protect(dict(clean))
    assert (out["image"] - clean["image"]).abs().max() > 0
    back = protect.inverse(out)
    assert torch.equal(back["image"].as_tensor(), clean["image"].as_tensor())
    assert torch.equal(back["label"].as_tensor(), clean["label"].as_tensor())
