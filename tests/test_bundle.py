# Copyright (c) monai-umed contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""The ``umed_protect`` MONAI bundle, run exactly as a user runs it: ``python -m monai.bundle ...`` in a subprocess,
from a working directory that is not the repository."""

from __future__ import annotations

import filecmp
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_umed.data.datalist import load_dataset
from monai_umed.data.formats import codec_for
from monai_umed.data.synthetic import make_demo_dataset
from monai_umed.errors import InputError
from monai_umed.key import read_key, restore_dataset

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "umed_protect"
CONFIGS = BUNDLE / "configs"


def bundle(args: list[str], cwd: Path, timeout: int = 300,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ARGS`` in ``cwd``; fails the test with its output when it does not exit 0."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    assert proc.returncode == 0, (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                                  f"stderr:\n{proc.stderr[-6000:]}")
    return proc


def printed(stdout: str, label: str) -> Path:
    """The path printed on the ``label:`` line."""
    m = re.search(rf"^{label}:\s+(\S+)", stdout, re.M)
    assert m, f"no '{label}:' line in\n{stdout}"
    return Path(m.group(1))


def arrays_equal(a: Path, b: Path) -> bool:
    x, y = codec_for(str(a)).read(str(a)).array, codec_for(str(b)).read(str(b)).array
    return x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


@pytest.fixture(scope="module")
def run2d(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One protect run on the embedded synthetic data (made smaller through overrides), from a foreign folder."""
    cwd = tmp_path_factory.mktemp("user_cwd")
    proc = bundle(["run", "protect", "--config_file", str(CONFIGS / "protect.json"),
                   "--output_dir", "released", "--method", "noise", "--epsilon", "4/255", "--params#region", "roi",
                   "--split", "training", "--seed", "3", "--progress", "False",
                   "--synthetic#n_train", "3", "--synthetic#n_test", "1", "--synthetic#size", "32"], cwd=cwd)
    return {"cwd": cwd, "stdout": proc.stdout, "out": cwd / "released", "source": cwd / "released_source"}


def test_protect_writes_dataset_key_and_manifest(run2d: dict) -> None:
    out, source = run2d["out"], run2d["source"]
    assert printed(run2d["stdout"], "output") == out
    assert printed(run2d["stdout"], "key") == out.with_name("released.umedkey")
    assert printed(run2d["stdout"], "manifest") == out / "manifest.json"
    assert f"synthetic dataset: {source}" in run2d["stdout"]
    assert (out / "dataset.json").is_file() and out.with_name("released.umedkey").is_file()
    assert not list(out.rglob("*.umedkey")), "the key must never be inside the released folder"

    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary["method"] == "noise" and summary["cases"] == 4 and summary["protected"] == 3
    assert summary["params"]["region"] == "roi" and summary["params"]["seed"] == 3
    assert summary["params"]["epsilon"] == pytest.approx(4 / 255)
    assert summary["split"] == "training"

    spec = load_dataset(out)
    assert [c.split for c in spec.cases] == ["training"] * 3 + ["test"]
    for case in spec.cases:
        src, dst = source / case.image, out / case.image
        assert filecmp.cmp(source / case.label, out / case.label, shallow=False)
        if case.split == "test":  # --split training copies the test list unchanged
            assert filecmp.cmp(src, dst, shallow=False)
            continue
        a = codec_for(str(src)).read(str(src)).array.astype(np.int32)
        b = codec_for(str(dst)).read(str(dst)).array.astype(np.int32)
        label = codec_for(str(src)).read_label(str(source / case.label), codec_for(str(src)).read(str(src)))
        delta = np.abs(b - a)
        assert 0 < delta.max() <= 4, "a 4/255 budget on uint8 allows at most 4 grey levels"
        outside = np.broadcast_to(label == 0, delta.shape)
        assert delta[outside].max() == 0, "region=roi must leave the background untouched"


def test_protect_runs_the_transform_chain(run2d: dict) -> None:
    line = next((ln for ln in run2d["stdout"].splitlines() if ln.startswith("MONAI transform chain on")), None)
    assert line is not None, run2d["stdout"]
    assert "budget 4/255" in line and "Compose.inverse gives back the clean image exactly" in line


def test_key_restores_exactly(run2d: dict, tmp_path: Path) -> None:
    out, source = run2d["out"], run2d["source"]
    key = out.with_name("released.umedkey")
    assert read_key(key)["method"] == "noise"
    restored = Path(restore_dataset(out, key, tmp_path / "restored", progress=False)["output"])
    for case in load_dataset(source).cases:
        assert arrays_equal(source / case.image, restored / case.image), case.case_id


def test_restore_workflow_and_load_protector(run2d: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    from monai.bundle import run

    from monai_umed.bundle import load_protector

    out, source = run2d["out"], run2d["source"]
    monkeypatch.chdir(tmp_path)  # the entry point of `python -m monai.bundle run`, in this process (saves a start-up)
    run("restore", config_file=str(CONFIGS / "restore.json"), logging_file=False, dataset_dir=str(out),
        output_dir="back", progress=False)
    back = printed(capsys.readouterr().out, "output")
    assert back == tmp_path / "back"
    for case in load_dataset(source).cases:
        assert arrays_equal(source / case.image, back / case.image), case.case_id
    protector = load_protector(out.with_name("released.umedkey"), device="cpu")
    assert protector.name == "noise" and protector.params()["region"] == "roi"
    assert protector.epsilon == pytest.approx(4 / 255)


def test_evaluate_workflow(run2d: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture) -> None:
    from monai.bundle import run

    monkeypatch.chdir(tmp_path)
    run("evaluate", config_file=str(CONFIGS / "evaluate.json"), logging_file=False, dataset_dir=str(run2d["out"]),
        output_dir="eval", epochs=1, use_cache=False, figure=False, device="cpu", progress=False)
    stdout = capsys.readouterr().out
    report_path = printed(stdout, "report")
    assert report_path == tmp_path / "eval" / "report.json" and (tmp_path / "eval" / "report.md").is_file()
    report = json.loads(report_path.read_text())
    # the clean dataset comes from the protected folder's manifest; the budget too
    assert report["datasets"]["clean"] == str(run2d["source"]) and report["datasets"]["protected"] == str(run2d["out"])
    assert report["datasets"]["train_cases"] == 3 and report["datasets"]["test_cases"] == 1
    assert report["epochs"] == 1 and report["config"]["epsilon"] == pytest.approx(4 / 255)
    assert 0.0 <= report["dice_clean"] <= 1.0 and 0.0 <= report["dice_protected"] <= 1.0
    assert report["max_abs_delta"] <= 4
    assert "defence none: trained on clean" in stdout


def test_protect_user_dataset_3d_with_key_file(tmp_path: Path) -> None:
    data = make_demo_dataset(tmp_path / "mri", spatial_dims=3, n_train=2, n_test=1, size=16, num_classes=2)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    key = tmp_path / "keys" / "mri.umedkey"
    proc = bundle(["run", "protect", "--config_file", str(CONFIGS / "protect.json"), "--dataset_dir", str(data),
                   "--output_dir", str(tmp_path / "mri_protected"), "--key_file", str(key), "--method", "noise",
                   "--epsilon", "0.02", "--progress", "False", "--check_transforms", "False"], cwd=cwd)
    assert "synthetic dataset" not in proc.stdout and "MONAI transform chain" not in proc.stdout
    out = printed(proc.stdout, "output")
    assert out == tmp_path / "mri_protected" and printed(proc.stdout, "key") == key and key.is_file()
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary["protected"] == 3 and summary["params"]["epsilon"] == pytest.approx(0.02)
    restored = Path(restore_dataset(out, key, tmp_path / "restored", progress=False)["output"])
    for case in load_dataset(data).cases:
        assert not arrays_equal(data / case.image, out / case.image)
        assert arrays_equal(data / case.image, restored / case.image)
    assert not list(cwd.iterdir()), "the bundle must not write into the working directory"


def test_verify_metadata_offline(tmp_path: Path) -> None:
    proc = bundle(["verify_metadata", "--meta_file", str(CONFIGS / "metadata.json"),
                   "--filepath", str(CONFIGS / "metadata_schema.json")], cwd=tmp_path)
    assert "metadata is verified with no error" in proc.stdout + proc.stderr
    assert "skipped downloading" in proc.stdout + proc.stderr


def test_schema_rejects_incomplete_metadata() -> None:
    from jsonschema import ValidationError, validate

    schema = json.loads((CONFIGS / "metadata_schema.json").read_text())
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    validate(meta, schema)
    for field in ("authors", "network_data_format", "numpy_version"):
        broken = {k: v for k, v in meta.items() if k != field}
        with pytest.raises(ValidationError, match=field):
            validate(broken, schema)
    bad_io = json.loads(json.dumps(meta))
    del bad_io["network_data_format"]["inputs"]["image"]["value_range"]
    with pytest.raises(ValidationError):
        validate(bad_io, schema)


def test_bundle_layout_and_config_syntax() -> None:
    from monai.bundle import ConfigParser

    for rel in ("LICENSE", "docs/README.md", "models/README.md", "configs/logging.conf"):
        assert (BUNDLE / rel).is_file(), rel
    for name, run_id in (("protect", "protect"), ("restore", "restore"), ("evaluate", "evaluate")):
        parser = ConfigParser()
        parser.read_config(CONFIGS / f"{name}.json")
        assert run_id in parser, f"{name}.json has no '{run_id}' workflow"
        assert parser["dataset_dir"] is None, f"{name}.json must default to no --dataset_dir"
    parser = ConfigParser()
    parser.read_config(CONFIGS / "protect.json")
    targets = [t["_target_"] for t in parser["preprocessing"]["transforms"]]
    assert targets[0] == "LoadImaged" and targets[-1] == "monai_umed.transforms.Protectd"


def test_helpers_reject_bad_input(tmp_path: Path) -> None:
    from monai.transforms import Compose, LoadImaged

    from monai_umed.bundle import build_protector, check_transforms, evaluate, output_folder, restore, source_dataset

    (tmp_path / "exists").mkdir()
    with pytest.raises(InputError, match="already exists"):
        output_folder(tmp_path / "exists")
    with pytest.raises(InputError, match="dataset not found"):
        source_dataset(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "out_source").mkdir()
    (tmp_path / "out_source" / "x").write_text("user file")
    with pytest.raises(InputError, match="not empty"):
        source_dataset(None, tmp_path / "out")
    with pytest.raises(InputError, match="unknown protection method"):
        build_protector("nope")
    with pytest.raises(InputError, match="protector file not found"):
        build_protector("noise", protector_file=tmp_path / "none.pt")
    state = tmp_path / "noise.pt"
    torch.save(build_protector("noise", epsilon=0.01).state_dict(), state)
    assert build_protector("noise", protector_file=state).fitted
    with pytest.raises(InputError, match="cannot load"):
        build_protector("umed", protector_file=state)
    with pytest.raises(InputError, match="--dataset_dir"):
        restore(None)
    with pytest.raises(InputError, match="--dataset_dir"):
        evaluate(None)
    (tmp_path / "bare").mkdir()
    with pytest.raises(InputError, match="--clean_dir"):
        evaluate(tmp_path / "bare")
    with pytest.raises(InputError, match="Protectd"):
        check_transforms(Compose([LoadImaged("image")]), tmp_path, "8/255")


@pytest.mark.slow
def test_protect_with_no_arguments(tmp_path: Path) -> None:
    """The command of the bundle's README, verbatim: UMed on the embedded synthetic dataset, in a new temp folder."""
    proc = bundle(["run", "protect", "--config_file", str(CONFIGS / "protect.json")], cwd=tmp_path, timeout=1800,
                  env={"TMPDIR": str(tmp_path)})
    out = printed(proc.stdout, "output")
    assert out.parent.parent == tmp_path and out.name == "protected"
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary["method"] == "umed" and summary["protected"] == 10 and summary["psnr_min"] >= 50.0
    key = printed(proc.stdout, "key")
    restored = Path(restore_dataset(out, key, tmp_path / "restored", progress=False)["output"])
    source = out.with_name("protected_source")
    for case in load_dataset(source).cases:
        assert arrays_equal(source / case.image, restored / case.image)
    assert "Compose.inverse gives back the clean image exactly" in proc.stdout
