# Copyright (c) monai-umed contributors
# Licensed under the Apache License, Version 2.0 (the "License").
from __future__ import annotations

import pytest
import torch

from monai_umed import protectors
from monai_umed.protectors.base import case_seed


def test_registry() -> None:
    assert "noise" in protectors.names()
    p = protectors.get("noise", epsilon=0.1)
    assert p.name == "noise" and p.params()["epsilon"] == 0.1
    with pytest.raises(ValueError, match="unknown protection method"):
        protectors.get("nope")
    with pytest.raises(ValueError, match="bad parameters"):
        protectors.get("noise", bogus=1)
    with pytest.raises(ValueError):
        protectors.get("noise", region="everywhere")
    with pytest.raises(ValueError):
        protectors.get("noise", epsilon=2.0)


@pytest.mark.parametrize("shape", [(3, 16, 16), (1, 8, 8, 8)])
def test_noise_is_bounded_and_seeded_per_case(shape: tuple[int, ...]) -> None:
    p = protectors.get("noise", epsilon=4 / 255, seed=7)
    x = torch.rand(shape)
    a, b = p.perturbation(x, None, "a"), p.perturbation(x, None, "b")
    assert a.shape == x.shape and a.abs().max() <= 4 / 255
    assert not torch.equal(a, b)
    # independent of call order and of other instances
    assert torch.equal(protectors.get("noise", epsilon=4 / 255, seed=7).perturbation(x, None, "a"), a)
    assert not torch.equal(protectors.get("noise", epsilon=4 / 255, seed=8).perturbation(x, None, "a"), a)
    assert case_seed(1, "x") == case_seed(1, "x") != case_seed(1, "y")


def test_state_dict_round_trip() -> None:
    p = protectors.get("noise", epsilon=0.02, region="roi")
    q = protectors.get("noise", epsilon=0.02, region="roi").load_state_dict(p.state_dict())
    x, y = torch.rand(1, 8, 8), torch.ones(1, 8, 8, dtype=torch.long)
    assert torch.equal(p.perturbation(x, y, "c"), q.perturbation(x, y, "c"))
    with pytest.raises(ValueError, match="needs a label"):
        p.perturbation(x, None, "c")
