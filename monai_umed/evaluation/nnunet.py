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

"""nnU-Net v2 as a judge: ``monai-umed evaluate CLEAN PROTECTED --victim nnunet`` (issue 29).

The strongest ordinary trainer of medical segmentation is nnU-Net itself, run the way its users run it. For each of
the two training lists (the clean one, the protected one) the judge

1. converts the list, with the clean test list as ``imagesTs``, into an nnU-Net v2 raw dataset
   (:mod:`~monai_umed.evaluation.nnunet_convert`);
2. runs nnU-Net's fingerprint extraction, planning (``ExperimentPlanner``, ``nnUNetPlans``) and preprocessing,
   trains ``nnUNetTrainerShort`` (nnU-Net's default trainer on a short :class:`NNUNetSchedule`) on every training
   case (fold ``all``) with configuration ``2d`` for images or ``3d_fullres`` for volumes, and predicts the test
   images with nnU-Net's ``nnUNetPredictor``: all in ``python -m monai_umed.nnunet.worker``, a subprocess, because
   nnU-Net reads ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` from its environment;
3. scores the predictions against the clean test labels with the judge's Dice
   (:func:`~monai_umed.evaluation.metrics.dice_per_class`), at each label's own grid.

Everything lives in a work folder (``--nnunet-dir``; by default ``nnunet/`` beside the report, or a temporary folder
without a report): ``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``, ``predictions`` and ``logs``. A run
is recorded in its raw dataset (``monai_umed_run.json``) under a content hash of the training and test files, the
schedule, the seed, the grid, the device type and the versions, so that a finished run is reused (the clean
baseline of every protector judged with the same work folder, or a "protected" copy identical to the clean one) and
an interrupted one is continued from its last finished epoch, exactly as if it had not stopped (a CPU schedule of
hours can span sessions; see :mod:`monai_umed.nnunet.trainer`).
One ``evaluate`` at a time per work folder. Nothing is downloaded.

The subprocess's environment bounds its CPU use to the judge's ``--threads``: ``OMP_NUM_THREADS``,
``MKL_NUM_THREADS``, ``nnUNet_def_n_proc`` (nnU-Net's process pools) and ``nnUNet_n_proc_DA`` (data augmentation
processes: 0, in the training process, on a CPU; ``threads`` on CUDA); ``nnUNet_compile`` is off (a short schedule
does not pay back ``torch.compile``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from monai_umed.data.formats import file_sha256
from monai_umed.errors import InputError
from monai_umed.evaluation.metrics import dice_per_class, read_native, summarise_dice
from monai_umed.evaluation.nnunet_convert import (
    CONVERT_FORMAT,
    channel_names,
    grid_size,
    nnunet_labels,
    write_raw_dataset,
)
from monai_umed.evaluation.report import write_json
from monai_umed.evaluation.train import find_dataset_json
from monai_umed.nnunet import FOLD, PLANS, SHORT_EPOCHS, SHORT_ITERATIONS, TRAINER, configuration_for

__all__ = [
    "NNUNET", "NNUNetSchedule", "make_schedule", "nnunet_version", "nnunet_env", "run_key", "judge_nnunet",
    "score_predictions", "RUN_RECORD", "FIRST_DATASET_ID",
]

#: The victim name that selects nnU-Net v2 (``evaluate(..., victim="nnunet")``).
NNUNET = "nnunet"
#: The run record in each raw dataset folder.
RUN_RECORD = "monai_umed_run.json"
#: Dataset ids are taken from here on, the first free one (nnU-Net's own examples use lower ids).
FIRST_DATASET_ID = 500


@dataclass(frozen=True)
class NNUNetSchedule:
    """How long nnU-Net trains: ``epochs`` x ``iterations`` batches, ``val_iterations`` validation batches per epoch.

    Attributes:
        epochs: training epochs (nnU-Net's default trainer: 1000).
        iterations: training batches per epoch (nnU-Net: 250).
        val_iterations: validation batches per epoch (nnU-Net: 50; here a fifth of ``iterations``).
        batch_size: images per batch; None: nnU-Net's plan, capped at
            :data:`~monai_umed.nnunet.CPU_MAX_BATCH` on a CPU.
        trainer: the trainer class that runs it.
    """

    epochs: int = SHORT_EPOCHS
    iterations: int = SHORT_ITERATIONS
    val_iterations: int = max(1, SHORT_ITERATIONS // 5)
    batch_size: int | None = None
    trainer: str = TRAINER

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_schedule(
    epochs: int | None = None,
    iterations: int | None = None,
    val_iterations: int | None = None,
    batch_size: int | None = None,
) -> NNUNetSchedule:
    """A :class:`NNUNetSchedule` from the user's choices (None: the short schedule's defaults).

    Raises:
        InputError: a count below 1.
    """
    e = SHORT_EPOCHS if epochs is None else int(epochs)
    i = SHORT_ITERATIONS if iterations is None else int(iterations)
    v = max(1, i // 5) if val_iterations is None else int(val_iterations)
    for name, value in (("epochs", e), ("iterations", i), ("validation iterations", v)):
        if value < 1:
            raise InputError(f"nnU-Net {name} must be at least 1, got {value}")
    if batch_size is not None and int(batch_size) < 1:
        raise InputError(f"nnU-Net batch size must be at least 1, got {batch_size}")
    return NNUNetSchedule(e, i, v, None if batch_size is None else int(batch_size))


def nnunet_version() -> str:
    """The installed ``nnunetv2`` version.

    Raises:
        InputError: nnU-Net v2 is not installed.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nnunetv2")
    except PackageNotFoundError:
        raise InputError("the nnunet victim needs nnU-Net v2: pip install \"monai-umed[nnunet]\"") from None


def nnunet_env(work_dir: str | os.PathLike, threads: int, device: torch.device) -> dict[str, str]:
    """The worker's environment: this process's, with nnU-Net's folders under ``work_dir`` and its CPU use bounded
    to ``threads`` (see the module docstring)."""
    w = Path(work_dir).resolve()
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(w / "nnUNet_raw"),
        "nnUNet_preprocessed": str(w / "nnUNet_preprocessed"),
        "nnUNet_results": str(w / "nnUNet_results"),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "nnUNet_def_n_proc": str(threads),
        # on a CPU the augmentation runs in the training process: extra processes would only compete for its cores
        "nnUNet_n_proc_DA": str(threads) if device.type == "cuda" else "0",
        "nnUNet_compile": "false",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def run_key(
    train: Sequence[Mapping[str, str]],
    test: Sequence[Mapping[str, str]],
    settings: Mapping[str, Any],
) -> str:
    """Content hash of one nnU-Net run: training images and labels and test images (bytes, in list order) and
    ``settings`` (schedule, seed, grid, labels, channels, configuration, device type, versions)."""
    h = hashlib.sha256()
    for it in train:
        h.update(file_sha256(it["image"]).encode())
        h.update(file_sha256(it["label"]).encode())
    h.update(b"|test|")
    for it in test:
        h.update(file_sha256(it["image"]).encode())
    h.update(json.dumps({**settings, "format": CONVERT_FORMAT}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _dataset_id(name: str) -> int | None:
    head = name[len("Dataset"):].partition("_")[0] if name.startswith("Dataset") else ""
    return int(head) if head.isdigit() else None


def _find_dataset(work: Path, key: str) -> tuple[int, dict[str, Any] | None]:
    """The id of the dataset recorded under ``key`` with its record, else the first free id and None."""
    used = set()
    for sub in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        for d in (work / sub).glob("Dataset*_*"):
            i = _dataset_id(d.name)
            if i is None:
                continue
            used.add(i)
            rec = d / RUN_RECORD if sub == "nnUNet_raw" else None
            if rec is not None and rec.is_file():
                try:
                    record = json.loads(rec.read_text())
                except (OSError, ValueError):
                    continue
                if record.get("key") == key:
                    return i, record
    i = FIRST_DATASET_ID
    while i in used:
        i += 1
    return i, None


def _finished(record: dict[str, Any] | None) -> bool:
    """Whether a recorded run ended with every prediction on disk."""
    result = (record or {}).get("result") or {}
    preds = result.get("predictions")
    return bool(preds) and "error" not in result and all(os.path.isfile(p) for p in preds.values())


def _clear(work: Path, dataset_id: int) -> None:
    """Remove every folder of a dataset id (raw, preprocessed, results, predictions, logs)."""
    for sub in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "predictions"):
        for d in (work / sub).glob(f"Dataset{dataset_id:03d}_*"):
            shutil.rmtree(d) if d.is_dir() else d.unlink()


def _run_worker(args: list[str], env: dict[str, str], log: Path, label: str, progress: bool) -> None:
    """Run ``python -m monai_umed.nnunet.worker ARGS``: nnU-Net's output appended to ``log``, its ``[nnunet]``
    lines also to stderr when ``progress``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "monai_umed.nnunet.worker", *args]
    # both streams append to one file: O_APPEND keeps the child's stdout and the copied stderr lines whole
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.PIPE, text=True, bufsize=1)
        assert proc.stderr is not None
        for line in proc.stderr:
            out.write(line)
            out.flush()
            if progress and line.startswith("[nnunet]"):
                print(f"[evaluate] {label}: {line[len('[nnunet]'):].strip()}", file=sys.stderr, flush=True)
        proc.wait()


def _resample_label(pred: np.ndarray, shape: Sequence[int], num_classes: int) -> np.ndarray:
    """A ``1 x spatial`` label map on another grid: one-hot maps resampled (bi/trilinear), then argmax, as the MONAI
    victims resample their logits."""
    one_hot = F.one_hot(torch.as_tensor(pred[0]).long().clamp(0, num_classes - 1), num_classes)
    one_hot = one_hot.movedim(-1, 0)[None].float()
    mode = "bilinear" if pred.ndim == 3 else "trilinear"
    return F.interpolate(one_hot, size=tuple(shape), mode=mode, align_corners=False).argmax(1).numpy()


def score_predictions(
    predictions: Sequence[str], test: Sequence[Mapping[str, str]], num_classes: int, keep: int = 0
) -> dict[str, Any]:
    """The judge's Dice of nnU-Net's test segmentations against the clean test labels.

    Both are read through :func:`~monai_umed.evaluation.metrics.read_native`; a prediction on another grid (2D data
    resampled before conversion) is resampled to the label's (:func:`_resample_label`).

    Returns:
        ``dice``, ``dice_per_class``, ``per_case`` (per-class lists, None for classes absent from a case),
        ``predictions`` (the first ``keep`` maps, ``1 x spatial`` int16) and ``seconds``.

    Raises:
        InputError: a test label that is not a 1-channel map of the classes, or whose dimensionality differs.
    """
    t0 = time.perf_counter()
    per_case, kept = [], []
    for path, it in zip(predictions, test):
        label = read_native(it["label"])
        pred = read_native(path).astype(np.int64)
        if label.shape[0] != 1 or label.ndim != pred.ndim:
            raise InputError(f"label shape {label.shape} is not a 1-channel {pred.ndim - 1}D map", it["label"])
        label = label.astype(np.int64)
        if int(label.max()) >= num_classes or int(label.min()) < 0:
            raise InputError(f"label values outside 0..{num_classes - 1}", it["label"])
        if pred.shape != label.shape:
            pred = _resample_label(pred, label.shape[1:], num_classes)
        dice = dice_per_class(torch.as_tensor(pred), torch.as_tensor(label), num_classes)
        per_case.append([None if not np.isfinite(v) else float(v) for v in dice])
        if len(kept) < keep:
            kept.append(pred.astype(np.int16))
    arr = np.array([[np.nan if v is None else v for v in row] for row in per_case], dtype=np.float64)
    return {**summarise_dice(arr), "per_case": per_case, "predictions": kept, "seconds": time.perf_counter() - t0}


@contextmanager
def _work_folder(nnunet_dir: str | os.PathLike | None, report: str | os.PathLike | None) -> Iterator[Path]:
    """``nnunet_dir``, else ``nnunet/`` beside the report, else a temporary folder removed afterwards."""
    if nnunet_dir is not None or report is not None:
        w = Path(nnunet_dir) if nnunet_dir is not None else Path(report).resolve().parent / "nnunet"
        w.mkdir(parents=True, exist_ok=True)
        yield w.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="monai-umed-nnunet-") as tmp:
        yield Path(tmp)


def _victim_info(result: dict[str, Any], record: dict[str, Any], cached: bool, work: Path) -> dict[str, Any]:
    """One victim's training record, shaped like the MONAI victims' (``loss`` per epoch, ``train_seconds``, ...)
    with nnU-Net's own figures beside."""
    keys = ("trainer", "configuration", "plans", "fold", "epochs", "iterations", "val_iterations", "batch_size",
            "planned_batch_size", "patch_size", "spacing", "network", "normalization", "image_reader_writer",
            "device", "threads", "seed", "output_folder", "log_file", "checkpoint", "predict_seconds",
            "mirroring_axes", "versions", "resumed_from_epoch")
    return {
        "train_seconds": float(result.get("train_seconds") or 0.0),
        "load_seconds": float(result.get("plan_seconds") or 0.0),
        "epoch_seconds": result.get("epoch_seconds") or [],
        "loss": result.get("train_losses") or [],
        "val_loss": result.get("val_losses") or [],
        "pseudo_dice": result.get("pseudo_dice") or [],
        "cases": record.get("train_cases"),
        "cached": cached,
        "cache_key": record.get("key"),
        "cache_file": None,
        "dataset": result.get("dataset"),
        "raw_folder": str(work / "nnUNet_raw" / str(result.get("dataset"))),
        "worker_log": record.get("worker_log"),
        **{k: result.get(k) for k in keys},
    }


def judge_nnunet(
    clean_dataset: str | os.PathLike,
    clean_train: Sequence[Mapping[str, str]],
    protected_train: Sequence[Mapping[str, str]],
    test: Sequence[Mapping[str, str]],
    info: Mapping[str, Any],
    schedule: NNUNetSchedule,
    device: torch.device,
    threads: int,
    seed: int = 0,
    image_size: int | Sequence[int] | None = None,
    nnunet_dir: str | os.PathLike | None = None,
    report: str | os.PathLike | None = None,
    use_cache: bool = True,
    keep: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Train nnU-Net v2 on the clean and on the protected training list, score both on the clean test list.

    Args:
        clean_dataset: the clean dataset (its dataset.json names the classes and channels).
        clean_train: the clean training entries (absolute ``image`` and ``label`` paths).
        protected_train: the protected training entries, in the same order.
        test: the clean test entries.
        info: :func:`~monai_umed.evaluation.train.describe_data` of the clean training list.
        schedule: epochs, iterations, batch size.
        device: ``cpu`` or ``cuda``.
        threads: the CPU threads (and processes) nnU-Net may use.
        seed: seeds nnU-Net's weights, sampling and augmentation.
        image_size: 2D only: resample images to this grid before conversion (None: native).
        nnunet_dir: the work folder (see :func:`_work_folder`).
        report: the report path (the default work folder lies beside it).
        use_cache: reuse a finished run recorded under the same key.
        keep: predicted maps kept per victim (for figures).
        progress: progress lines on stderr.

    Returns:
        ``row`` (the report row: Dice per victim, per class, per case, each victim's training record),
        ``results`` (per role, :func:`score_predictions`), ``nnunet`` (what ran: trainer, configuration, schedule,
        plans, work folder, datasets) and ``config`` (the report's configuration).

    Raises:
        InputError: nnU-Net v2 missing, a dataset nnU-Net would refuse (named file), a bad ``image_size``.
        RuntimeError: nnU-Net failed (the message names the worker's log).
    """
    version = nnunet_version()
    spatial_dims, channels, num_classes = info["spatial_dims"], info["in_channels"], info["num_classes"]
    grid = grid_size(image_size, spatial_dims)
    size = None if grid is None else list(grid)
    with open(find_dataset_json(clean_dataset)) as f:
        meta = json.load(f)
    labels = nnunet_labels(meta.get("labels"), num_classes)
    if len(labels) != num_classes:
        raise InputError(f"dataset.json names {len(labels)} classes, the data has {num_classes}")
    names = channel_names(meta, spatial_dims, channels)
    cfg = configuration_for(spatial_dims)
    settings = {"schedule": schedule.to_dict(), "seed": int(seed), "image_size": size, "labels": labels,
                "channel_names": names, "configuration": cfg, "device": device.type, "nnunetv2": version,
                "torch": torch.__version__}
    row: dict[str, Any] = {"defence": "none", "defence_name": "none", "defence_params": {}}
    results: dict[str, dict[str, Any]] = {}
    datasets: dict[str, str] = {}
    with _work_folder(nnunet_dir, report) as work:
        env = nnunet_env(work, threads, device)
        for role, train in (("clean", clean_train), ("protected", protected_train)):
            key = run_key(train, test, settings)
            dataset_id, record = _find_dataset(work, key)
            cached = use_cache and _finished(record)
            name = f"Dataset{dataset_id:03d}_UMed{role.capitalize()}"
            if cached:
                result = record["result"]
                name = result["dataset"]
                if progress:
                    print(f"[evaluate] {role} victim: nnU-Net run {name} reused (same files and settings)",
                          file=sys.stderr, flush=True)
            else:
                raw = work / "nnUNet_raw" / name
                log = work / "logs" / f"{name}.log"
                if use_cache and record is not None and raw.is_dir():
                    # an interrupted run of the same files and settings: its conversion is complete (the record is
                    # written after it) and the worker continues its training from the last finished epoch
                    if progress:
                        print(f"[evaluate] {role} victim: continuing the interrupted nnU-Net run {name}",
                              file=sys.stderr, flush=True)
                else:
                    _clear(work, dataset_id)
                    log.unlink(missing_ok=True)
                    if progress:
                        print(f"[evaluate] {role} victim: converting {len(train)} training and {len(test)} test "
                              f"cases to {raw}", file=sys.stderr, flush=True)
                    write_raw_dataset(raw, train, test, labels, names, spatial_dims, image_size=image_size,
                                      description=f"monai-umed judge, {role} training list of {clean_dataset}")
                    record = {"key": key, "role": role, "settings": settings, "train_cases": len(train),
                              "test_cases": len(test), "worker_log": str(log)}
                    write_json(record, raw / RUN_RECORD)  # atomic: a half-written record hides a finished run
                result_path = work / "logs" / f"{name}.result.json"
                args = ["--dataset-id", str(dataset_id), "--configuration", cfg, "--epochs", str(schedule.epochs),
                        "--iterations", str(schedule.iterations), "--val-iterations", str(schedule.val_iterations),
                        "--seed", str(int(seed)), "--device", device.type, "--threads", str(threads),
                        "--processes", str(threads), "--predictions", str(work / "predictions" / name),
                        "--result", str(result_path)]
                if schedule.batch_size is not None:
                    args += ["--batch-size", str(schedule.batch_size)]
                if result_path.exists():
                    result_path.unlink()
                _run_worker(args, env, log, f"{role} victim", progress)
                result = json.loads(result_path.read_text()) if result_path.is_file() else {}
                if "error" in result or not result.get("predictions"):
                    raise RuntimeError(f"nnU-Net failed on the {role} training list: "
                                       f"{result.get('error', 'no result written')} (log: {log})")
                record["result"] = result
                write_json(record, raw / RUN_RECORD)  # atomic: a half-written record hides a finished run
            datasets[role] = name
            preds = [result["predictions"][f"test_{n:05d}"] for n in range(len(test))]
            res = score_predictions(preds, test, num_classes, keep=keep)
            results[role] = res
            row[f"{role}_victim"] = _victim_info(result, record, cached, work)
            row[f"dice_{role}"] = res["dice"]
            row[f"dice_per_class_{role}"] = res["dice_per_class"]
            row[f"per_case_dice_{role}"] = res["per_case"]
            row[f"test_seconds_{role}"] = res["seconds"]
        kept_work = None if nnunet_dir is None and report is None else str(work)
    row["dice_drop"] = (None if row["dice_clean"] is None or row["dice_protected"] is None
                        else row["dice_clean"] - row["dice_protected"])
    first = row["protected_victim"]
    ran = {
        "trainer": first["trainer"], "configuration": cfg, "plans": PLANS, "fold": FOLD,
        "epochs": schedule.epochs, "iterations": schedule.iterations, "val_iterations": schedule.val_iterations,
        "batch_size": first["batch_size"], "planned_batch_size": first["planned_batch_size"],
        "patch_size": first["patch_size"], "network": first["network"], "nnunetv2": version,
        "image_size": size, "work_dir": kept_work, "datasets": datasets, "labels": labels, "channel_names": names,
    }
    config = {
        "victim": NNUNET, "spatial_dims": spatial_dims, "in_channels": channels, "num_classes": num_classes,
        "image_size": size, "seed": int(seed), "victim_params": {}, "trainer": ran["trainer"],
        "configuration": cfg, "epochs": schedule.epochs, "iterations": schedule.iterations,
        "val_iterations": schedule.val_iterations, "batch_size": ran["batch_size"], "patch_size": ran["patch_size"],
        "nnunet_dir": kept_work,
    }
    return {"row": row, "results": results, "nnunet": ran, "config": config}
