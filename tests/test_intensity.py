# Copyright (c) monai-umed contributors
# Licensed under the Apache License, Version 2.0 (the "License").
from __future__ import annotations

import numpy as np
import pytest

from monai_umed.intensity import budget_in_stored, compute_mapping, parse_epsilon, quantise


def test_parse_epsilon() -> None:
    assert parse_epsilon("8/255") == pytest.approx(8 / 255)
    assert parse_epsilon("0.01") == 0.01
    assert parse_epsilon(0.5) == 0.5
    for bad in ("abc", "1/0", "2", "-0.1"):
        with pytest.raises(ValueError):
            parse_epsilon(bad)


def test_mapping_rules_and_inverse() -> None:
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    m = compute_mapping(u8)
    assert m.method == "dtype" and m.lo == [0.0] and m.hi == [255.0]
    np.testing.assert_allclose(m.to_stored(m.to_normalised(u8)), u8, atol=1e-9)
    ct = np.full((1, 4, 4, 4), 1000, np.int16)  # stored values with intercept -1024 -> HU
    m = compute_mapping(ct, modality="CT", slope=1.0, intercept=-1024.0)
    assert m.method == "window" and m.lo == [-1024.0] and m.hi == [3071.0]
    assert m.to_normalised(np.array([[1024]], np.int16))[0, 0] == pytest.approx(1024 / 4095)
    mr = np.random.RandomState(0).gamma(2.0, 100.0, (1, 8, 8, 8)).astype(np.float32)
    m = compute_mapping(mr, modality="MRI")
    assert m.method == "percentile"
    assert m.lo[0] == pytest.approx(np.percentile(mr, 0.5)) and m.hi[0] == pytest.approx(np.percentile(mr, 99.5))
    rgb = np.zeros((3, 4, 4), np.uint8)
    assert len(compute_mapping(rgb).lo) == 3
    flat = np.ones((1, 4, 4), np.float32)
    m = compute_mapping(flat, "minmax")
    assert m.hi[0] > m.lo[0]


def test_quantise_respects_budget_and_dtype() -> None:
    rs = np.random.RandomState(0)
    x = rs.randint(0, 256, (3, 20, 20)).astype(np.uint8)
    m = compute_mapping(x)
    delta = rs.uniform(-0.2, 0.2, x.shape)
    eps = 8 / 255
    out, dq = quantise(x, delta, m, eps)
    assert out.dtype == np.uint8
    assert np.abs(dq).max() <= 8
    np.testing.assert_array_equal(out.astype(int) - x.astype(int), dq)
    # budgets that are not whole grey levels are floored, never rounded up
    out, dq = quantise(x, delta, m, 6.6 / 255)
    assert np.abs(dq).max() <= 6
    assert budget_in_stored(6.6 / 255, m)[0] == 6
    # saturation at the dtype range
    out, _ = quantise(np.full((3, 2, 2), 254, np.uint8), np.full((3, 2, 2), 0.03), m, eps)
    assert out.max() == 255  # the dtype-range window allows it even though the image never reaches 255


def test_quantise_warns_when_budget_is_below_one_step() -> None:
    x = np.zeros((1, 4, 4), np.uint8)
    with pytest.warns(UserWarning, match="unprotected"):
        _, dq = quantise(x, np.full(x.shape, 0.5 / 255), compute_mapping(x), 0.5 / 255, source="a.png")
    assert not dq.any()


def test_quantise_float_images() -> None:
    x = np.linspace(0, 100, 64, dtype=np.float32).reshape(1, 8, 8)
    m = compute_mapping(x, "minmax")
    out, dq = quantise(x, np.full(x.shape, 0.01), m, 0.02)
    assert out.dtype == np.float32
    np.testing.assert_allclose(dq.ravel()[:-1], 1.0, rtol=1e-5)
    assert out.max() == x.max()  # kept inside the image's own range
    out, dq = quantise(x, np.full(x.shape, -0.01), m, 0.02)
    assert out.min() == 0.0 and dq.ravel()[0] == 0.0
