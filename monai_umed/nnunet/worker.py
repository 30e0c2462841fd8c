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

"""``python -m monai_umed.nnunet.worker``: one nnU-Net v2 raw dataset to predictions on its test images.

Run by :mod:`monai_umed.evaluation.nnunet` with ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` in
the environment (nnU-Net reads them from there), it does what ``nnUNetv2_plan_and_preprocess``,
``nnUNetv2_train DATASET CONFIGURATION all -tr nnUNetTrainerShort`` and ``nnUNetv2_predict`` do, through nnU-Net's
own Python API:

1. fingerprint (:class:`~monai_umed.nnunet.trainer.FingerprintExtractor`), plan (``ExperimentPlanner``, plans
   ``nnUNetPlans``) and preprocess the configuration;
2. train :class:`~monai_umed.nnunet.trainer.nnUNetTrainerShort` on every training case (fold ``all``) with the
   schedule given, seeded, continuing exactly the run its output folder holds when an earlier worker was
   interrupted (:meth:`~monai_umed.nnunet.trainer.nnUNetTrainerShort.resume`);
3. predict every ``imagesTs`` case with ``nnUNetPredictor`` (Gaussian-weighted sliding window, step 0.5, mirroring)
   from the final weights, writing each segmentation with the dataset's own reader/writer.

nnU-Net's messages go to stdout; one ``[nnunet]`` line per step and per epoch goes to stderr. The outcome (schedule,
plans, losses per epoch, times, prediction files, or ``error``) is written as JSON to ``--result``; the exit code is
0 on success and 1 otherwise, the traceback then being on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from monai_umed.nnunet import CPU_MAX_BATCH, FOLD, PLANS, SHORT_EPOCHS, SHORT_ITERATIONS, TRAINER

__all__ = ["main", "run", "test_cases"]


def _say(msg: str) -> None:
    print(f"[nnunet] {msg}", file=sys.stderr, flush=True)


@contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """Set one environment variable inside the block."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def test_cases(folder: str | os.PathLike, file_ending: str) -> dict[str, list[str]]:
    """The cases of an ``imagesTs`` folder: ``{identifier: [channel files in channel order]}`` (nnU-Net's naming,
    ``CASE_0000.ext``, ``CASE_0001.ext``, ...: the channel index in four digits)."""
    cases: dict[str, list[str]] = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(file_ending) and len(f) > len(file_ending) + 5 and f[-len(file_ending) - 5] == "_":
            cases.setdefault(f[: -len(file_ending) - 5], []).append(os.path.join(folder, f))
    return cases


def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _trainer(plans: dict, cfg: str, dataset_json: dict, device: Any, args: argparse.Namespace) -> tuple[Any, int]:
    """The seeded trainer on the schedule asked for, continuing the run its output folder holds, if any.

    Returns:
        the trainer and the epoch it starts from (0: a new run; ``epochs``: a finished one, only to predict).
    """
    import shutil

    from monai_umed.nnunet.trainer import nnUNetTrainerShort

    def build() -> Any:
        _seed(args.seed)
        trainer = nnUNetTrainerShort(plans=plans, configuration=cfg, fold=FOLD, dataset_json=dataset_json,
                                     device=device)
        trainer.set_schedule(args.epochs, args.iterations, args.val_iterations)
        return trainer

    trainer = build()
    try:
        start = trainer.resume()
    except Exception as e:  # a checkpoint cut short by the interruption itself: nothing to continue exactly
        _say(f"cannot continue the run in {trainer.output_folder} ({type(e).__name__}: {' '.join(str(e).split())}): "
             f"training from the start")
        shutil.rmtree(trainer.output_folder, ignore_errors=True)
        return build(), 0
    if start:
        _say(f"continuing the run in {trainer.output_folder} after epoch {start}")
    return trainer, start


def run(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Plan, preprocess, train and predict one dataset (see the module docstring); fills ``result`` as it goes."""
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    from monai_umed.nnunet.trainer import FINAL, FingerprintExtractor

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = convert_id_to_dataset_name(args.dataset_id)
    cfg = args.configuration
    result.update({"dataset": name, "configuration": cfg, "trainer": TRAINER, "plans": PLANS,
                   "fold": FOLD, "device": str(device), "threads": args.threads, "seed": args.seed})

    t0 = time.perf_counter()
    _say(f"{name}: fingerprint, plan and preprocess ({cfg})")
    extract_fingerprint_dataset(args.dataset_id, FingerprintExtractor, num_processes=args.processes,
                                check_dataset_integrity=False, clean=True, verbose=False)
    # the planner sets torch's threads to the augmentation processes while it sizes networks: 0 would fail there
    with _env("nnUNet_n_proc_DA", str(max(1, args.threads))):
        plan_experiment_dataset(args.dataset_id)
    pre = Path(os.environ["nnUNet_preprocessed"]) / name
    plans = load_json(str(pre / f"{PLANS}.json"))
    if cfg not in plans["configurations"]:
        raise RuntimeError(f"nnU-Net planned no {cfg} configuration for {name} "
                           f"(planned: {', '.join(plans['configurations'])})")
    preprocess_dataset(args.dataset_id, PLANS, configurations=(cfg,), num_processes=(args.processes,), verbose=False)
    result["plan_seconds"] = time.perf_counter() - t0

    # the batch: nnU-Net's plan (sized for 8 GB of GPU memory), capped on a CPU, or the caller's
    conf = plans["configurations"][cfg]
    planned = int(conf["batch_size"])
    batch = int(args.batch_size) if args.batch_size else (planned if device.type == "cuda"
                                                          else min(planned, CPU_MAX_BATCH))
    conf["batch_size"] = batch
    plans["continue_training"] = False  # nnU-Net >= 2.7 takes the resume flag through the plans dict
    arch = conf.get("architecture", {})
    result.update({"planned_batch_size": planned, "batch_size": batch,
                   "patch_size": [int(p) for p in conf["patch_size"]], "spacing": [float(s) for s in conf["spacing"]],
                   "normalization": conf.get("normalization_schemes"),
                   "network": arch.get("network_class_name", conf.get("UNet_class_name")),
                   "image_reader_writer": plans.get("image_reader_writer")})

    dataset_json = load_json(str(pre / "dataset.json"))
    trainer, start = _trainer(plans, cfg, dataset_json, device, args)
    result.update({"epochs": trainer.num_epochs, "iterations": trainer.num_iterations_per_epoch,
                   "val_iterations": trainer.num_val_iterations_per_epoch, "output_folder": trainer.output_folder,
                   "log_file": trainer.log_file, "resumed_from_epoch": start})
    _say(f"{name}: training {trainer.__class__.__name__}, {cfg}, fold {FOLD}, {trainer.num_epochs} epochs x "
         f"{trainer.num_iterations_per_epoch} iterations, batch {batch}, patch {result['patch_size']}, {device}"
         + (f", resumed after epoch {start}" if start else ""))
    t1 = time.perf_counter()
    if start < trainer.num_epochs:
        trainer.run_training()
    log = trainer.logger.get_checkpoint()
    result.update({
        "train_seconds": time.perf_counter() - t1,
        "train_losses": [float(v) for v in log["train_losses"]],
        "val_losses": [float(v) for v in log["val_losses"]],
        "pseudo_dice": [float(v) for v in log["mean_fg_dice"]],
        "epoch_seconds": [float(e - s) for s, e in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"])],
        "checkpoint": os.path.join(trainer.output_folder, FINAL),
    })

    # nnU-Net's predictor on the final weights, as its own validation does it after training
    t2 = time.perf_counter()
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager,
                                    [trainer.network.state_dict()], trainer.dataset_json, trainer.__class__.__name__,
                                    trainer.inference_allowed_mirroring_axes)
    ending = dataset_json["file_ending"]
    cases = test_cases(Path(os.environ["nnUNet_raw"]) / name / "imagesTs", ending)
    out = Path(args.predictions)
    out.mkdir(parents=True, exist_ok=True)
    _say(f"{name}: predicting {len(cases)} test cases")
    rw = trainer.plans_manager.image_reader_writer_class()
    predictions = {}
    with torch.no_grad():
        for case, files in cases.items():
            image, props = rw.read_images(files)
            seg = predictor.predict_single_npy_array(image, props, None, None, False)
            path = out / f"{case}{ending}"
            rw.write_seg(np.asarray(seg), str(path), props)
            predictions[case] = str(path)
    result.update({"predictions": predictions, "predict_seconds": time.perf_counter() - t2,
                   "mirroring_axes": None if trainer.inference_allowed_mirroring_axes is None
                   else [int(a) for a in trainer.inference_allowed_mirroring_axes]})


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import torch

    return {"nnunetv2": version("nnunetv2"), "torch": torch.__version__}


def _write_result(result: dict[str, Any], path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m monai_umed.nnunet.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset-id", type=int, required=True, help="the raw dataset's id (DatasetNNN_Name)")
    p.add_argument("--configuration", required=True, help="2d or 3d_fullres")
    p.add_argument("--epochs", type=int, default=SHORT_EPOCHS)
    p.add_argument("--iterations", type=int, default=SHORT_ITERATIONS, help="training batches per epoch")
    p.add_argument("--val-iterations", type=int, default=None, help="validation batches per epoch")
    p.add_argument("--batch-size", type=int, default=None, help="default: nnU-Net's plan (capped on a CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--processes", type=int, default=1, help="nnU-Net's fingerprint and preprocessing processes")
    p.add_argument("--predictions", required=True, help="folder for the test segmentations")
    p.add_argument("--result", required=True, help="JSON outcome")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result: dict[str, Any] = {}
    try:
        result["versions"] = _versions()
        run(args, result)
        code = 0
    except Exception as e:  # nnU-Net fails in many ways; the judge reports the last one on a line
        traceback.print_exc(file=sys.stdout)
        result["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"
        code = 1
    _write_result(result, args.result)
    return code


if __name__ == "__main__":
    sys.exit(main())
