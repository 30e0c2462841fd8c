# Copyright (c) monai-umed contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""protect -> restore round trips per format, split handling, resume, and the key."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from monai_umed import pipeline
from monai_umed.cli import main
from monai_umed.data.formats import array_sha256, codec_for
from monai_umed.errors import InputError, KeyMismatchError
from monai_umed.key import restore_dataset, verify_key
from monai_umed.pipeline import protect_dataset


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def decoded(path: Path) -> np.ndarray:
    return codec_for(str(path)).read(str(path)).array


def test_nifti_round_trip_keeps_headers(ds3d: Path, tmp_path: Path) -> None:
    before = tree_digest(ds3d)
    out = tmp_path / "prot"
    s = protect_dataset(ds3d, out, "noise", epsilon="8/255", progress=False)
    assert tree_digest(ds3d) == before  # inputs are never written to
    assert Path(s["key"]) == tmp_path / "prot.umedkey" and not Path(s["key"]).is_relative_to(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"]["protected"] == 4
    changed = 0
    for case in manifest["cases"]:
        src, dst = nib.load(ds3d / case["source"][0]), nib.load(out / case["output"][0])
        assert np.array_equal(src.affine, dst.affine) and src.shape == dst.shape
        assert src.get_data_dtype() == dst.get_data_dtype()
        assert src.header.binaryblock == dst.header.binaryblock
        a, b = np.asanyarray(src.dataobj), np.asanyarray(dst.dataobj)
        changed += int((a != b).any())
        assert case["array_sha256_protected"] == array_sha256(decoded(out / case["output"][0]))
        assert case["max_abs_delta"] > 0 and np.isfinite(case["psnr"]) and case["label"]["sha256"]
        # labels are byte copies
        assert (ds3d / case["label"]["source"]).read_bytes() == (out / case["label"]["output"]).read_bytes()
    assert changed == 4
    restored = tmp_path / "restored"
    restore_dataset(out, s["key"], restored, progress=False)
    for case in manifest["cases"]:
        a, b = nib.load(ds3d / case["source"][0]), nib.load(restored / case["output"][0])
        assert a.header.binaryblock == b.header.binaryblock
        ra, rb = np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)
        assert ra.dtype == rb.dtype and array_sha256(ra) == array_sha256(rb)


def test_jpeg_becomes_png_and_restores_exactly(tmp_path: Path) -> None:
    root = tmp_path / "jpg"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rs = np.random.RandomState(1)
    for i in range(3):
        Image.fromarray(rs.randint(0, 255, (24, 20, 3)).astype(np.uint8)).save(root / "images" / f"c{i}.jpg", quality=90)
        Image.fromarray((rs.rand(24, 20) > 0.5).astype(np.uint8)).save(root / "labels" / f"c{i}.png")
    out = tmp_path / "out"
    s = protect_dataset(root, out, "noise", epsilon=4 / 255, progress=False)
    assert s["jpeg_as_png"] == 3
    datalist = json.loads((out / "dataset.json").read_text())
    assert [e["image"] for e in datalist["training"]] == [f"images/c{i}.png" for i in range(3)]
    for i in range(3):
        with Image.open(out / "images" / f"c{i}.png") as im:
            assert im.format == "PNG" and im.mode == "RGB"
        d = decoded(out / "images" / f"c{i}.png").astype(int) - decoded(root / "images" / f"c{i}.jpg").astype(int)
        assert 0 < np.abs(d).max() <= 4
    restore_dataset(out, s["key"], tmp_path / "back", progress=False)
    for i in range(3):
        assert np.array_equal(decoded(tmp_path / "back" / "images" / f"c{i}.png"), decoded(root / "images" / f"c{i}.jpg"))


def test_png_grey_and_rgb_keep_mode(ds2d: Path, tmp_path: Path) -> None:
    grey = tmp_path / "grey"
    (grey / "images").mkdir(parents=True)
    Image.fromarray(np.full((16, 16), 100, np.uint8)).save(grey / "images" / "a.png")
    s = protect_dataset(grey, tmp_path / "g_out", "noise", progress=False)  # no labels: fine for region=image
    with Image.open(tmp_path / "g_out" / "images" / "a.png") as im:
        assert im.mode == "L"
    assert s["protected"] == 1
    s = protect_dataset(ds2d, tmp_path / "rgb_out", "noise", progress=False)
    for case in json.loads((tmp_path / "rgb_out" / "manifest.json").read_text())["cases"]:
        with Image.open(tmp_path / "rgb_out" / case["output"][0]) as im:
            assert im.mode == "RGB"


def test_split_training_copies_the_rest(ds2d: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    s = protect_dataset(ds2d, out, "noise", split="training", progress=False)
    assert s["protected"] == 4 and s["cases"] == 6
    manifest = json.loads((out / "manifest.json").read_text())
    for case in manifest["cases"]:
        same = (ds2d / case["source"][0]).read_bytes() == (out / case["output"][0]).read_bytes()
        assert same == (case["split"] == "test")
    back = tmp_path / "back"
    restore_dataset(out, s["key"], back, progress=False)
    for case in manifest["cases"]:
        assert np.array_equal(decoded(back / case["output"][0]), decoded(ds2d / case["source"][0]))


def test_same_seed_same_bytes_and_resume_after_interruption(ds2d: Path, tmp_path: Path, monkeypatch) -> None:
    ref = tmp_path / "ref"
    protect_dataset(ds2d, ref, "noise", seed=3, batch_size=2, progress=False)
    calls = {"n": 0}
    original = pipeline._protect_batch

    def crash_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_protect_batch", crash_on_second_batch)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        protect_dataset(ds2d, out, "noise", seed=3, batch_size=2, progress=False)
    assert not out.exists() and (tmp_path / "run.partial").is_dir()  # nothing looks complete
    assert not (tmp_path / "run.umedkey").exists()
    with pytest.raises(InputError, match="--resume"):
        protect_dataset(ds2d, out, "noise", seed=3, batch_size=2, progress=False)
    with pytest.raises(InputError, match="different"):
        protect_dataset(ds2d, out, "noise", seed=4, batch_size=2, progress=False, resume=True)
    monkeypatch.setattr(pipeline, "_protect_batch", original)
    done = []
    monkeypatch.setattr(pipeline, "_protect_batch", lambda job, p, loaded, u: done.extend(n for n, _ in loaded) or original(job, p, loaded, u))
    protect_dataset(ds2d, out, "noise", seed=3, batch_size=2, progress=False, resume=True)
    assert len(done) == 4  # the first batch (2 cases) was not redone
    ref_tree, run_tree = tree_digest(ref), tree_digest(out)
    assert {k: v for k, v in ref_tree.items() if k != "manifest.json"} == {k: v for k, v in run_tree.items() if k != "manifest.json"}
    verify_key(out, tmp_path / "run.umedkey")
    assert not (tmp_path / "run.partial").exists() and not (tmp_path / "run.umedkey.parts").exists()


def test_big_cases_are_protected_one_at_a_time(ds3d: Path, tmp_path: Path, monkeypatch) -> None:
    """When a batch of cases the size of the first one would exceed half of the decoding budget (CT volumes), every
    case is decoded, perturbed and written alone, and the bytes are those of batched protection."""
    ref = tmp_path / "ref"
    protect_dataset(ds3d, ref, "noise", seed=3, batch_size=4, progress=False)
    sizes = []
    original = pipeline._protect_batch
    monkeypatch.setattr(pipeline, "_protect_batch",
                        lambda job, p, loaded, u: sizes.append(len(loaded)) or original(job, p, loaded, u))
    monkeypatch.setattr(pipeline, "IO_MEMORY", 4 * 16**3 * 14)  # less than two of these cases decoded, doubled
    out = tmp_path / "run"
    protect_dataset(ds3d, out, "noise", seed=3, batch_size=4, progress=False)
    assert sizes == [1, 1, 1, 1]
    assert {k: v for k, v in tree_digest(ref).items() if k != "manifest.json"} == \
        {k: v for k, v in tree_digest(out).items() if k != "manifest.json"}
    sizes.clear()
    monkeypatch.setattr(pipeline, "IO_MEMORY", 1 << 30)  # small cases stay batched
    protect_dataset(ds3d, tmp_path / "again", "noise", seed=3, batch_size=4, progress=False)
    assert sizes == [4]


def test_key_is_sparse_zip_and_refuses_other_datasets(ds2d: Path, ds3d: Path, tmp_path: Path) -> None:
    s2 = protect_dataset(ds2d, tmp_path / "p2", "noise", progress=False)
    s3 = protect_dataset(ds3d, tmp_path / "p3", "noise", key=tmp_path / "keys" / "k3", progress=False)
    with zipfile.ZipFile(s2["key"]) as z:
        names = z.namelist()
        assert "key.json" in names and sum(n.startswith("deltas/") for n in names) == 6
        with np.load(__import__("io").BytesIO(z.read([n for n in names if n.startswith("deltas/")][0]))) as d:
            assert set(d.files) == {"dense", "shape", "dtype"} and d["dense"].dtype == np.int8  # whole-image noise
    s3 = protect_dataset(ds3d, tmp_path / "p3roi", "noise", params={"region": "roi"}, progress=False)
    with zipfile.ZipFile(s3["key"]) as z:
        with np.load(__import__("io").BytesIO(z.read("deltas/000000.npz"))) as d:
            assert set(d.files) == {"index", "value", "shape", "dtype"}  # ROI-confined: sparse
    with pytest.raises(KeyMismatchError):
        restore_dataset(tmp_path / "p2", s3["key"], tmp_path / "r", progress=False)
    # a tampered protected file is detected
    f = next((tmp_path / "p2" / "imagesTr").glob("*.png"))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(f)
    with pytest.raises(KeyMismatchError, match=f.name):
        restore_dataset(tmp_path / "p2", s2["key"], tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_noise_roi_needs_labels_and_stays_in_roi(ds3d: Path, tmp_path: Path) -> None:
    out = tmp_path / "roi"
    protect_dataset(ds3d, out, "noise", params={"region": "roi"}, progress=False)
    for case in json.loads((out / "manifest.json").read_text())["cases"]:
        d = decoded(out / case["output"][0]).astype(int) - decoded(ds3d / case["source"][0]).astype(int)
        lab = decoded(ds3d / case["label"]["source"])
        assert not d[lab == 0].any() and d[lab > 0].any()


def test_cli_round_trip_and_messages(ds2d: Path, tmp_path: Path, capsys) -> None:
    out, key = tmp_path / "o", tmp_path / "k.umedkey"
    assert main(["protect", str(ds2d), str(out), "--method", "noise", "--key", str(key), "--epsilon", "2/255",
                 "--param", "region=image", "--quiet", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert "protected 6 of 6" in text and str(key) in text
    assert main(["verify", str(out), str(key)]) == 0
    assert main(["restore", str(out), str(key), str(tmp_path / "r"), "--quiet"]) == 0
    assert "bit for bit" in capsys.readouterr().out
    assert main(["methods"]) == 0 and "noise" in capsys.readouterr().out
    # --resume on a finished run refuses to overwrite it
    assert main(["protect", str(ds2d), str(out), "--key", str(key), "--resume", "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_demo_command(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--output", str(tmp_path / "demo")]) == 0
    text = capsys.readouterr().out
    assert "2D RGB PNG" in text and "3D NIfTI" in text and "NO" not in text


def test_released_files_are_readable_and_key_is_private(ds2d: Path, tmp_path: Path) -> None:
    import os
    import stat

    s = protect_dataset(ds2d, tmp_path / "o", "noise", progress=False)
    umask = os.umask(0)
    os.umask(umask)
    for p in (tmp_path / "o").rglob("*"):
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(Path(s["key"]).stat().st_mode) == 0o600


def test_psnr_floor_holds_on_the_written_file(ds2d: Path, tmp_path: Path) -> None:
    """A protector's ``min_psnr`` is a promise about the file: rounding to the stored grey levels must not break it
    (a dense Gaussian perturbation of one grey level RMS rounds to about 47.8 dB unless the pipeline scales it
    down)."""
    import torch

    from monai_umed.protectors.base import Protector

    class Flat(Protector):
        name = "flat"
        fits = False
        min_psnr = 50.0

        def perturbation(self, image, label=None, case_id=None):
            g = self.generator(case_id)
            return torch.randn(image.shape, generator=g) / 255

    out = tmp_path / "out"
    summary = protect_dataset(ds2d, out, protector=Flat(epsilon=8 / 255), split="training", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    cases = [c for c in manifest["cases"] if c.get("protected")]
    assert cases and summary
    for c in cases:
        clean = decoded(ds2d / c["source"][0]).astype(np.float64)
        written = decoded(out / c["output"][0]).astype(np.float64)
        mse = np.mean((written - clean) ** 2)
        assert mse > 0  # still perturbed
        assert 10 * np.log10(255.0 ** 2 / mse) >= 50.0
        assert c["psnr"] >= 50.0
    restored = tmp_path / "restored"
    restore_dataset(out, tmp_path / "out.umedkey", restored)
    for c in cases:
        assert np.array_equal(decoded(restored / c["source"][0]), decoded(ds2d / c["source"][0]))


def test_protect_warns_when_the_release_surrogate_never_learnt_the_copy(ds2d: Path, tmp_path: Path, capsys) -> None:
    """The release stage's fit report reaches the key and ``protect``'s summary (not the published manifest), and
    the CLI warns, with the self-check to run, when no round reached ``refine_stop``."""
    from monai_umed.key import read_key

    tiny = ["--method", "umed", "--quiet", "--param", "epochs=1", "--param", "refine_rounds=1", "--param",
            "victim_grids=[16]", "--param", "distil_epochs=1", "--param", "refine_surrogate_epochs=1"]
    unfitted = tmp_path / "unfitted"
    assert main(["protect", str(ds2d), str(unfitted), *tiny, "--param", "refine_stop=1.0"]) == 0
    err = capsys.readouterr().err
    assert "warning: the release stage's surrogate" in err and f"monai-umed check {unfitted} --clean {ds2d}" in err
    fit = read_key(tmp_path / "unfitted.umedkey")["fit"]
    assert fit["rounds"] == 1 and len(fit["dice"]) == 1 and fit["dice"][0] < 1.0
    assert fit["stop_dice"] == 1.0 and fit["reached_stop"] is False
    assert "fit" not in json.loads((unfitted / "manifest.json").read_text())["summary"]

    fitted = tmp_path / "fitted"
    # a first round that fits clean images (stop 0) does not end the stage: the second, on the tile, does
    s = protect_dataset(ds2d, fitted, "umed", progress=False, params={"epochs": 1, "refine_rounds": 2,
                        "victim_grids": [16], "distil_epochs": 1, "refine_surrogate_epochs": 1, "refine_stop": 0.0})
    assert s["fit"]["reached_stop"] is True and s["fit"]["rounds"] == 2
    assert main(["protect", str(ds2d), str(fitted), *tiny, "--param", "refine_stop=0.0", "--param",
                 "refine_rounds=2", "--resume"]) == 0
    out = capsys.readouterr()
    assert "already complete" in out.out and "warning" not in out.err
    # surrogate-free methods have nothing to report
    assert protect_dataset(ds2d, tmp_path / "noise", "noise", progress=False)["fit"] is None
