# Copyright (c) monai-umed contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""Every bad input: one line naming the file and the cause, exit code 2, inputs untouched, nothing complete-looking."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_umed.cli import main
from monai_umed.pipeline import protect_dataset


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def run_bad(capsys, args: list[str], expect: list[str]) -> str:
    rc = main(args + ["--quiet"] if args[0] == "protect" else args)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("monai-umed: error:"), err
    for e in expect:
        assert e in err, err
    return err


def first_case(ds: Path, split: str = "training") -> dict[str, str]:
    return json.loads((ds / "dataset.json").read_text())[split][0]


@pytest.mark.parametrize(
    "damage, expect",
    [
        ("missing", ["file not found"]),
        ("corrupt", ["unreadable or corrupt"]),
        ("shape", ["does not match image shape"]),
        ("nonint", ["non-integer"]),
        ("nan", ["NaN"]),
    ],
)
def test_bad_files(ds3d: Path, tmp_path: Path, capsys, damage: str, expect: list[str]) -> None:
    case = first_case(ds3d)
    img, lab = ds3d / case["image"], ds3d / case["label"]
    affine = np.diag([1.5, 1.5, 1.5, 1])
    named = img
    if damage == "missing":
        img.unlink()
    elif damage == "corrupt":
        img.write_bytes(b"\x1f\x8b not really a gzip nifti")
    elif damage == "shape":
        nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), np.uint8), affine), lab)
        named = lab
    elif damage == "nonint":
        nib.save(nib.Nifti1Image(np.full((16, 16, 16), 0.5, np.float32), affine), lab)
        named = lab
    elif damage == "nan":
        a = np.zeros((16, 16, 16), np.float32)
        a[1, 2, 3] = np.nan
        nib.save(nib.Nifti1Image(a, affine), img)
    before = digest(ds3d)
    out = tmp_path / "out"
    err = run_bad(capsys, ["protect", str(ds3d), str(out)], expect)
    assert named.name in err
    assert digest(ds3d) == before
    assert not out.exists() and not (tmp_path / "out.umedkey").exists()


def test_output_exists_and_output_inside_input(ds2d: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "exists").mkdir()
    run_bad(capsys, ["protect", str(ds2d), str(tmp_path / "exists")], ["already exists", "exists"])
    run_bad(capsys, ["protect", str(ds2d), str(ds2d / "sub")], ["inside the input"])
    run_bad(capsys, ["protect", str(ds2d), str(tmp_path / "o"), "--key", str(tmp_path / "o" / "k")], ["outside"])
    assert not (ds2d / "sub").exists()


def test_key_that_does_not_match(ds2d: Path, ds3d: Path, tmp_path: Path, capsys) -> None:
    protect_dataset(ds2d, tmp_path / "a", progress=False)
    protect_dataset(ds3d, tmp_path / "b", progress=False)
    run_bad(capsys, ["restore", str(tmp_path / "a"), str(tmp_path / "b.umedkey"), str(tmp_path / "r")], ["key does not match"])
    (tmp_path / "junk.umedkey").write_bytes(b"nope")
    run_bad(capsys, ["restore", str(tmp_path / "a"), str(tmp_path / "junk.umedkey"), str(tmp_path / "r")], ["not a monai-umed key"])
    assert not (tmp_path / "r").exists()


def test_missing_dataset_and_bad_options(tmp_path: Path, ds2d: Path, capsys) -> None:
    run_bad(capsys, ["protect", str(tmp_path / "nothing"), str(tmp_path / "o")], ["dataset not found"])
    run_bad(capsys, ["protect", str(ds2d), str(tmp_path / "o"), "--method", "nosuch"], ["unknown protection method"])
    run_bad(capsys, ["protect", str(ds2d), str(tmp_path / "o"), "--epsilon", "abc"], ["epsilon"])
    run_bad(capsys, ["protect", str(ds2d), str(tmp_path / "o"), "--param", "bogus=1"], ["bad parameters"])


def test_label_required(ds2d: Path, tmp_path: Path, capsys) -> None:
    datalist = json.loads((ds2d / "dataset.json").read_text())
    del datalist["training"][1]["label"]
    (ds2d / "dataset.json").write_text(json.dumps(datalist))
    run_bad(capsys, ["protect", str(ds2d), str(tmp_path / "o"), "--param", "region=roi"], ["needs labels", "case_tr001"])
