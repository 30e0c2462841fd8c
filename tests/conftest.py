# Copyright (c) monai-umed contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""Shared fixtures: tiny synthetic datasets written to disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from monai_umed.data.synthetic import make_demo_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waiting on a busy machine (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def ds2d(tmp_path: Path) -> Path:
    """2D RGB PNG dataset, 4 training + 2 test cases."""
    return make_demo_dataset(tmp_path / "ds2d", spatial_dims=2, n_train=4, n_test=2, size=32, rgb=True)


@pytest.fixture
def ds3d(tmp_path: Path) -> Path:
    """3D int16 NIfTI dataset with two foreground classes, 3 training + 1 test cases."""
    return make_demo_dataset(tmp_path / "ds3d", spatial_dims=3, n_train=3, n_test=1, size=16, num_classes=2)


def shared_dataset(name: str) -> Path:
    """A real dataset beside the project, or skip the test with a clear message."""
    p = SHARED_DATA / name
    if not p.exists():
        pytest.skip(f"real dataset {p} is not present (it lives outside the repository)")
    return p
