# Copyright (c) monai-umed contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""Round trips on the real datasets beside the project (``-m slow``; skipped when ../shared/data is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from monai_umed.cli import main
from monai_umed.data.formats import array_sha256, codec_for

from conftest import shared_dataset

pytestmark = pytest.mark.slow


def _arrays_equal(a: Path, b: Path) -> bool:
    x, y = codec_for(str(a)).read(str(a)).array, codec_for(str(b)).read(str(b)).array
    return x.dtype == y.dtype and array_sha256(x) == array_sha256(y)


@pytest.mark.parametrize("name", ["hippocampus", "kvasir_seg"])
def test_protect_restore_real(name: str, tmp_path: Path) -> None:
    src = shared_dataset(name)
    out, key, back = tmp_path / "out", tmp_path / "out.key", tmp_path / "back"
    assert main(["protect", str(src), str(out), "--method", "noise", "--key", str(key), "--quiet"]) == 0
    assert main(["restore", str(out), str(key), str(back), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for case in manifest["cases"]:
        assert _arrays_equal(src / case["source"][0], back / case["output"][0])
        if name == "hippocampus":
            import nibabel as nib

            a, p, r = nib.load(src / case["source"][0]), nib.load(out / case["output"][0]), nib.load(back / case["output"][0])
            assert np.array_equal(a.affine, p.affine) and a.shape == p.shape and a.get_data_dtype() == p.get_data_dtype()
            assert a.header.binaryblock == r.header.binaryblock
        else:
            assert case["output"][0].endswith(".png")
