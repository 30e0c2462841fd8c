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


@pytest.mark.timeout(3600)  # UMed's full default fit: about 8 minutes on a loaded 2-core machine
def test_dicom_ct_umed_defaults(tmp_path: Path) -> None:
    """The real DICOM CT (3 slices + DICOM-SEG of the liver) with UMed and no parameters: SimpleITK reads the written
    files as the same series (geometry and every element but PixelData unchanged), the change stays in the liver's
    budget, and the key restores every file bit for bit."""
    import pydicom
    import SimpleITK as sitk

    from dicom_utils import compare_datasets

    src = shared_dataset("dicom_ct_liver")
    out, key, back = tmp_path / "out", tmp_path / "out.key", tmp_path / "back"
    assert main(["protect", str(src), str(out), "--method", "umed", "--key", str(key), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    (case,) = manifest["cases"]
    assert case["fmt"] == "dicom" and case["method"] == "umed" and case["psnr"] >= 50.0 - 1e-6
    assert case["max_abs_delta"] > 0

    uid = str(pydicom.dcmread(src / case["source"][0], stop_before_pixels=True).SeriesInstanceUID)

    def series(folder: Path) -> sitk.Image:  # the CT series (the folder also holds the DICOM-SEG's own series)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), uid))
        return reader.Execute()

    a, b = series(src), series(out)
    assert a.GetSize() == b.GetSize() == (512, 512, 3)
    assert a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()
    va, vb = sitk.GetArrayFromImage(a).astype(int), sitk.GetArrayFromImage(b).astype(int)
    assert 0 < np.abs(va - vb).max() <= case["max_abs_delta"]
    for rel in case["output"]:
        x, y = pydicom.dcmread(src / rel), pydicom.dcmread(out / rel)
        assert compare_datasets(x, y, (0x7FE00010,)) == []
    assert main(["restore", str(out), str(key), str(back), "--quiet"]) == 0
    for rel in [*case["source"], "liver_seg.dcm"]:  # the series and its DICOM-SEG (the NRRD copy is not listed)
        assert (back / rel).read_bytes() == (src / rel).read_bytes()
