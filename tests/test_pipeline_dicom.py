# Copyright (c) monai-umed contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""DICOM through the whole job: series in sub-folders with DICOM-SEG labels, protect -> restore, UIDs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom

from monai_umed.cli import main

from dicom_utils import compare_datasets, make_ct_series, make_seg


def _sitk_volume(folder: Path, series_uid: str) -> np.ndarray:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series_uid))
    return sitk.GetArrayFromImage(reader.Execute()).astype(int)


def _dataset(root: Path) -> dict[str, np.ndarray]:
    volumes = {}
    for i in range(2):
        files, vol, dsets = make_ct_series(root / f"series{i}", n_slices=3, seed=i, prefix=f"s{i}")
        mask = np.zeros_like(vol, dtype=np.uint8)
        mask[:, 5:15, 6:18] = 1
        make_seg(root / f"series{i}" / "seg.dcm", dsets, mask, seed=i)
        volumes[f"series{i}"] = vol
    return volumes


def test_dicom_protect_restore_keeps_elements(tmp_path: Path) -> None:
    src = tmp_path / "dicom"
    _dataset(src)
    out, key = tmp_path / "out", tmp_path / "out.key"
    assert main(["protect", str(src), str(out), "--method", "noise", "--key", str(key), "--quiet", "--new-uids"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"]["protected"] == 2
    for case in manifest["cases"]:
        assert case["fmt"] == "dicom" and len(case["output"]) == 3
        for rel in case["output"]:
            a, b = pydicom.dcmread(src / rel), pydicom.dcmread(out / rel)
            ignore = (0x7FE00010, 0x00080018, 0x00020003, 0x00020000)  # pixels, the new UIDs, group length
            assert compare_datasets(a, b, ignore) == []
            assert a.SOPInstanceUID != b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
            d = b.pixel_array.astype(int) - a.pixel_array.astype(int)
            assert np.abs(d).max() <= int(8 / 255 * 4095)
        # SimpleITK reads the written files as one series
        uid = str(pydicom.dcmread(out / case["output"][0]).SeriesInstanceUID)
        folder = Path(case["output"][0]).parent
        vol, ref = _sitk_volume(out / folder, uid), _sitk_volume(src / folder, uid)
        assert vol.shape == ref.shape == (3, 20, 24) and 0 < np.abs(vol - ref).max() <= 128
    back = tmp_path / "back"
    assert main(["restore", str(out), str(key), str(back), "--quiet"]) == 0
    for p in src.rglob("*.dcm"):
        assert (back / p.relative_to(src)).read_bytes() == p.read_bytes()  # bit for bit, UIDs included
