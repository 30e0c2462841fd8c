# Copyright (c) monai-umed contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

"""nnU-Net v2 as a judge, with the real ``nnunetv2`` package: the conversion passes nnU-Net's own integrity check
and lies on the source grid, a tiny ``evaluate --victim nnunet`` runs nnU-Net end to end, bad input is one line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from monai_umed.errors import InputError
from monai_umed.evaluation import REPORT_KEYS, evaluate
from monai_umed.evaluation.command import add_command, run
from monai_umed.evaluation.metrics import read_native
from monai_umed.evaluation.nnunet import make_schedule
from monai_umed.evaluation.nnunet_convert import channel_names, nnunet_labels, write_raw_dataset
from monai_umed.evaluation.train import load_split
from test_evaluate import _protected_copy, _write_2d, _write_3d

pytest.importorskip("nnunetv2", reason="nnU-Net v2 is the dev extra's (monai-umed[nnunet])")


def _convert(dataset: Path, out: Path, spatial_dims: int, channels: int, num_classes: int, **kw) -> dict:
    meta = json.loads((dataset / "dataset.json").read_text())
    return write_raw_dataset(out, load_split(dataset, "training"), load_split(dataset, "test"),
                             nnunet_labels(meta["labels"], num_classes), channel_names(meta, spatial_dims, channels),
                             spatial_dims, **kw)


def _verify(folder: Path) -> None:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(folder), num_processes=1)  # raises on any problem


def _roundtrip(reader_writer, nnunet_label: str, tmp: Path, ending: str) -> np.ndarray:
    """A label read by nnU-Net's reader and written back by its writer (what a prediction goes through), read as
    the judge reads files."""
    seg, props = reader_writer.read_seg(nnunet_label)
    reader_writer.write_seg(seg[0].astype(np.uint8), str(tmp / f"roundtrip{ending}"), props)
    return read_native(tmp / f"roundtrip{ending}")


def test_labels_and_channel_names():
    assert nnunet_labels({"0": "background", "1": "polyp"}, 2) == {"background": 0, "polyp": 1}
    assert nnunet_labels({"background": 0, "a": 1, "b": 2}, 3) == {"background": 0, "a": 1, "b": 2}
    assert nnunet_labels({"0": "bg", "1": "x", "2": "x"}, 3) == {"background": 0, "x": 1, "x_2": 2}
    assert nnunet_labels(None, 3) == {"background": 0, "class_1": 1, "class_2": 2}
    with pytest.raises(InputError, match="consecutive"):
        nnunet_labels({"0": "background", "2": "b"}, 2)
    assert channel_names({"modality": {"0": "RGB"}}, 2, 3) == {"0": "R", "1": "G", "2": "B"}
    assert channel_names({"modality": {"0": "CT"}}, 3, 1) == {"0": "CT"}
    assert channel_names({}, 3, 2) == {"0": "channel_0", "1": "channel_1"}
    with pytest.raises(InputError, match="at least 1"):
        make_schedule(epochs=0)


def test_convert_2d_rgb_jpeg_passes_nnunet_integrity(tmp_path):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    clean = _write_2d(tmp_path / "clean", n_train=3, n_test=2, size=36)  # JPEG images, PNG labels
    folder = tmp_path / "raw" / "Dataset500_Test"
    conv = _convert(clean, folder, 2, 3, 2)
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "R", "1": "G", "2": "B"} and meta["file_ending"] == ".png"
    assert meta["labels"] == {"background": 0, "object": 1} and meta["numTraining"] == 3
    # one RGB PNG per case (nnU-Net's natural images), labels beside, the test images in imagesTs
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"train_0000{i}_0000.png" for i in range(3)]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"train_0000{i}.png" for i in range(3)]
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == [f"test_0000{i}_0000.png" for i in range(2)]
    expected = [[str(folder / "imagesTs" / f"test_0000{i}_0000.png")] for i in range(2)]
    assert [c["files"] for c in conv["test"]] == expected
    _verify(folder)
    # the decoded JPEG's pixels, exactly, as nnU-Net reads them (channel first, one slice)
    src = read_native(load_split(clean, "training")[0]["image"])
    image, props = NaturalImage2DIO().read_images([str(folder / "imagesTr" / "train_00000_0000.png")])
    assert image.shape == (3, 1, 36, 36) and props["spacing"] == (999, 1, 1)
    np.testing.assert_array_equal(image[:, 0], np.swapaxes(src, 1, 2))
    # a segmentation written by nnU-Net's writer lies on the source label's grid as the judge reads it
    src_label = read_native(load_split(clean, "training")[0]["label"])
    back = _roundtrip(NaturalImage2DIO(), str(folder / "labelsTr" / "train_00000.png"), tmp_path, ".png")
    np.testing.assert_array_equal(back, src_label)
    # resampled before conversion (2D only): 24 x 24 files, labels still 0/1
    small = _convert(clean, tmp_path / "raw" / "Dataset501_Small", 2, 3, 2, image_size=24)
    assert small["image_size"] == [24, 24]
    assert np.asarray(Image.open(small["training"][0]["files"][0])).shape == (24, 24, 3)
    with pytest.raises(InputError, match="2D data only"):
        _convert(_write_3d(tmp_path / "v"), tmp_path / "raw" / "Dataset502_V", 3, 1, 3, image_size=24)


def test_convert_3d_passes_nnunet_integrity(tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    clean = _write_3d(tmp_path / "clean", n_train=3, n_test=1)
    meta = json.loads((clean / "dataset.json").read_text())
    meta["modality"] = {"0": "MRI"}
    (clean / "dataset.json").write_text(json.dumps(meta))
    folder = tmp_path / "raw" / "Dataset500_Vol"
    _convert(clean, folder, 3, 1, 3)
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MRI"} and meta["file_ending"] == ".nii.gz"
    assert meta["labels"] == {"background": 0, "a": 1, "b": 2}
    assert (folder / "imagesTr" / "train_00000_0000.nii.gz").is_file()
    assert (folder / "imagesTs" / "test_00000_0000.nii.gz").is_file()
    _verify(folder)
    first = load_split(clean, "training")[0]
    written = nib.load(folder / "imagesTr" / "train_00000_0000.nii.gz")
    np.testing.assert_array_equal(np.asarray(written.dataobj), read_native(first["image"])[0])
    assert written.get_data_dtype() == np.uint8
    back = _roundtrip(SimpleITKIO(), str(folder / "labelsTr" / "train_00000.nii.gz"), tmp_path, ".nii.gz")
    np.testing.assert_array_equal(back, read_native(first["label"]))


def test_evaluate_nnunet_end_to_end(tmp_path, capsys):
    clean = _write_2d(tmp_path / "clean", n_train=4, n_test=2, size=48)
    prot = _protected_copy(clean, tmp_path / "prot", noise=2)
    work = tmp_path / "work"
    parser = argparse.ArgumentParser(prog="monai-umed")
    add_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", str(clean), str(prot), "--victim", "nnunet", "--epochs", "1",
                              "--nnunet-iterations", "2", "--image-size", "32", "--threads", "1", "--quiet",
                              "--nnunet-dir", str(work), "--report", str(tmp_path / "r.json")])
    assert run(args) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert set(REPORT_KEYS) <= set(rep)
    assert rep["victim"] == "nnunet" and rep["epochs"] == 1 and rep["image_size"] == [32, 32]
    nn = rep["nnunet"]
    assert (nn["trainer"], nn["configuration"], nn["fold"], nn["epochs"], nn["iterations"], nn["val_iterations"]) == (
        "nnUNetTrainerShort", "2d", "all", 1, 2, 1)
    assert nn["patch_size"] == [32, 32] and nn["batch_size"] >= 1 and nn["work_dir"] == str(work.resolve())
    row = rep["rows"][0]
    for role in ("clean", "protected"):
        assert 0.0 <= row[f"dice_{role}"] <= 1.0
        assert len(row[f"per_case_dice_{role}"]) == 2  # every clean test case, scored on its native 48 x 48 grid
        v = row[f"{role}_victim"]
        assert len(v["loss"]) == 1 and len(v["val_loss"]) == 1 and not v["cached"]
        assert v["trainer"] == "nnUNetTrainerShort" and v["epochs"] == 1 and v["iterations"] == 2
        assert Path(v["checkpoint"]).is_file() and Path(v["log_file"]).is_file()
        preds = sorted((work / "predictions" / nn["datasets"][role]).glob("test_*.png"))
        assert len(preds) == 2 and np.asarray(Image.open(preds[0])).shape == (32, 32)
    assert rep["loss_end_clean"] == row["clean_victim"]["loss"][-1] and rep["dice_drop"] is not None
    assert 40.0 < rep["psnr"] < 55.0 and rep["imperceptibility"]["cases"] == 4
    md = (tmp_path / "r.md").read_text()
    assert "trainer nnUNetTrainerShort, configuration 2d" in md and "1 epochs x 2 iterations" in md
    assert "| none |" in capsys.readouterr().out
    # a finished run is reused by content: the clean copy judged against itself trains nothing
    again = evaluate(clean, clean, victim="nnunet", epochs=1, nnunet_iterations=2, image_size=32, threads=1,
                     progress=False, nnunet_dir=work)
    assert again["rows"][0]["clean_victim"]["cached"] and again["rows"][0]["protected_victim"]["cached"]
    assert again["dice_clean"] == pytest.approx(rep["dice_clean"]) == again["dice_protected"]


def _final_weights(report: dict) -> dict:
    return torch.load(report["rows"][0]["clean_victim"]["checkpoint"], weights_only=False)["network_weights"]


def test_interrupted_nnunet_run_continues_exactly(tmp_path):
    """``evaluate`` killed mid-training (the whole process group, as a session's end does) and run again continues
    nnU-Net from its last finished epoch, and ends with the uninterrupted run's weights and Dice, bit for bit."""
    clean = _write_2d(tmp_path / "clean", n_train=4, n_test=2, size=48)
    opts = ["--victim", "nnunet", "--epochs", "3", "--nnunet-iterations", "12", "--image-size", "32",
            "--threads", "1", "--quiet"]
    quick = dict(victim="nnunet", epochs=3, nnunet_iterations=12, image_size=32, threads=1, progress=False)
    whole = evaluate(clean, clean, nnunet_dir=tmp_path / "whole", **quick)
    assert whole["rows"][0]["clean_victim"]["resumed_from_epoch"] == 0

    work = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "monai_umed", "evaluate", str(clean), str(clean), *opts,
                             "--nnunet-dir", str(work)], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    results = work / "nnUNet_results"
    try:
        # epoch 2's checkpoint is on disk once its random states are and epoch 1's are gone: kill during epoch 3
        while not (list(results.rglob("rng_epoch2.pt")) and not list(results.rglob("rng_epoch1.pt"))):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint of epoch 2 in 300 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert list(results.rglob("checkpoint_latest.pth")) and not list(results.rglob("checkpoint_final.pth"))

    again = evaluate(clean, clean, nnunet_dir=work, **quick)
    victim = again["rows"][0]["clean_victim"]
    assert victim["resumed_from_epoch"] == 2 and not victim["cached"] and len(victim["loss"]) == 3
    assert victim["loss"] == whole["rows"][0]["clean_victim"]["loss"]
    assert again["dice_clean"] == whole["dice_clean"]
    a, b = _final_weights(whole), _final_weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(results.rglob("rng_epoch*.pt")) and not list(results.rglob("checkpoint_latest.pth"))


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def test_bad_input_is_one_line(tmp_path):
    clean = _write_2d(tmp_path / "clean", n_train=3, n_test=1, size=40, ext=".png")
    quick = dict(victim="nnunet", epochs=1, nnunet_iterations=1, threads=1, progress=False,
                 nnunet_dir=tmp_path / "work")
    # a class that dataset.json's labels do not name
    label = clean / "training" / "lab" / "case_1.png"
    lab = np.asarray(Image.open(label)).copy()
    lab[:2, :2] = 2
    Image.fromarray(lab).save(label)
    with pytest.raises(InputError, match=r"class\(es\) \[2\] that dataset.json's labels do not name") as e:
        evaluate(clean, clean, **quick)
    assert _one_line(e).startswith(str(label))
    Image.fromarray((lab == 1).astype(np.uint8)).save(label)
    # a label on another grid than its image
    Image.fromarray(np.zeros((32, 40), np.uint8)).save(label)
    with pytest.raises(InputError, match=r"label shape \(40, 32\) differs from its image's \(40, 40\)") as e:
        evaluate(clean, clean, **quick)
    _one_line(e)
    # options the nnunet victim does not take
    with pytest.raises(InputError, match="defence none"):
        evaluate(clean, clean, defences=["jpeg"], **quick)
    with pytest.raises(InputError, match="release"):
        evaluate(clean, clean, protocol="paper", **quick)
    with pytest.raises(InputError, match="at least 1"):
        evaluate(clean, clean, **{**quick, "nnunet_iterations": 0})
    with pytest.raises(InputError, match="batch_size, lr belong"):
        evaluate(clean, clean, batch_size=4, lr=0.1, **quick)
    with pytest.raises(InputError, match="nnunet victim"):
        evaluate(clean, clean, epochs=1, threads=1, progress=False, nnunet_iterations=3)
    # the command line prints one line and exits with 2
    from monai_umed.cli import main

    assert main(["evaluate", str(clean), str(clean), "--victim", "nnunet", "--quiet", "--threads", "1",
                 "--nnunet-dir", str(tmp_path / "work")]) == 2
