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

"""``monai-umed evaluate``: judge a protected dataset against its clean original (METHODS.md section 4).

It trains a victim on the protected ``training`` list and the same victim on the clean ``training`` list (the
baseline, cached by content hash), evaluates both on the clean ``test`` list, measures imperceptibility on the
written files, and writes a JSON report, a Markdown table and optionally a figure. The same job is available in
Python as :func:`evaluate`::

    report = evaluate("data/kvasir", "out/kvasir_umed", victim="unet", image_size=128, report="eval.json")
    print(report["dice_clean"], report["dice_protected"], report["psnr"])
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from monai_umed.errors import InputError
from monai_umed.evaluation.adaptive import PATTERN_DEFAULTS, subtract_pattern_list
from monai_umed.evaluation.defences import DEFENCES, get_defence
from monai_umed.evaluation.metrics import case_imperceptibility, read_native, summarise_imperceptibility
from monai_umed.evaluation.nnunet import NNUNET, judge_nnunet, make_schedule, nnunet_version
from monai_umed.evaluation.protocols import PROTOCOLS, paper_training_list
from monai_umed.evaluation.recipes import RECIPES, Recipe, get_recipe
from monai_umed.evaluation.report import report_markdown, write_json, write_markdown
from monai_umed.evaluation.report import versions as _versions
from monai_umed.evaluation.train import (
    describe_data,
    evaluate_victim,
    load_split,
    make_config,
    resolve_device,
    resolve_threads,
    train_victim,
)
from monai_umed.networks.victims import VICTIMS
from monai_umed.nnunet import CPU_MAX_BATCH, SHORT_EPOCHS, SHORT_ITERATIONS

__all__ = [
    "evaluate", "add_command", "run", "DEFAULT_EPOCHS", "JUDGE_VICTIMS", "pair_training_lists", "imperceptibility",
]

#: Default epochs per spatial dimensionality. A judge must be competent (METHODS.md 4.8): 30 epochs bring the 2D
#: UNet to clean Dice >= 0.72 on Kvasir-SEG at 128 px (10 epochs left it at 0.64, which hides or exaggerates
#: protection); see docs/evaluation.md for the measured epoch times.
DEFAULT_EPOCHS = {2: 30, 3: 8}

#: The victims the judge trains: the MONAI networks, and nnU-Net v2 run as its users run it
#: (:mod:`~monai_umed.evaluation.nnunet`).
JUDGE_VICTIMS = (*VICTIMS, NNUNET)


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name)[0]


def pair_training_lists(
    clean: Sequence[dict[str, str]], protected: Sequence[dict[str, str]]
) -> list[tuple[dict[str, str], dict[str, str]]]:
    """Pair the training entries of the clean and protected datasets by list position.

    Raises:
        InputError: different lengths, or an entry whose image file name (without extension: a JPEG may be
            released as PNG) differs from the clean one at the same position.
    """
    if len(clean) != len(protected):
        raise InputError(f"the protected training list has {len(protected)} entries, the clean one {len(clean)}; "
                         "evaluate a protected copy of this very dataset")
    pairs = []
    for n, (c, p) in enumerate(zip(clean, protected)):
        if _stem(c["image"]) != _stem(p["image"]):
            raise InputError(f"protected training entry {n} ({os.path.basename(p['image'])}) does not correspond to "
                             f"the clean entry {n} ({os.path.basename(c['image'])})", p["image"])
        pairs.append((c, p))
    return pairs


def imperceptibility(
    pairs: Sequence[tuple[dict[str, str], dict[str, str]]], progress: bool = False
) -> dict[str, Any]:
    """PSNR, PSNR in the ROI, SSIM and max |delta| of every protected training file against its clean file.

    The ROI is the clean label (``label > 0``) of the entry; an entry whose protected image is the clean file
    itself is identical without being read. Returns :func:`summarise_imperceptibility` plus
    ``per_case`` (one dict per entry, with the protected file name).

    Raises:
        InputError: a protected file whose shape differs from the clean one.
    """
    items = list(pairs)
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="imperceptibility", unit="case", leave=False)
    per_case = []
    for c, p in items:
        if os.path.realpath(c["image"]) == os.path.realpath(p["image"]):  # the same file: nothing to read
            per_case.append({"image": os.path.basename(p["image"]), "psnr": float("inf"), "psnr_roi": float("inf"),
                             "ssim": 1.0, "max_abs_delta": 0.0, "max_abs_delta_rel": 0.0, "data_range": None,
                             "dtype": None})
            continue
        clean, prot = read_native(c["image"]), read_native(p["image"])
        if clean.shape != prot.shape:
            raise InputError(f"protected image shape {prot.shape} differs from the clean {clean.shape} "
                             f"({c['image']})", p["image"])
        label = read_native(c["label"])
        label = label if tuple(label.shape[1:]) == tuple(clean.shape[1:]) else None
        per_case.append({"image": os.path.basename(p["image"]), **case_imperceptibility(clean, prot, label)})
    return {**summarise_imperceptibility(per_case), "per_case": per_case}


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


def evaluate(
    clean_dataset: str | os.PathLike,
    protected_dataset: str | os.PathLike,
    victim: str = "unet",
    defences: Sequence[str] = ("none",),
    epochs: int | None = None,
    seed: int = 0,
    image_size: int | Sequence[int] | None = None,
    device: str = "auto",
    report: str | os.PathLike | None = None,
    figure: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    batch_size: int | None = None,
    lr: float | None = None,
    intensity: str = "auto",
    patch_size: Sequence[int] | None = None,
    victim_params: dict[str, Any] | None = None,
    epsilon: float = 8 / 255,
    threads: int | str | None = "auto",
    test_key: str = "test",
    figure_cases: int = 3,
    progress: bool = True,
    protocol: str = "release",
    key: str | os.PathLike | None = None,
    max_train: int | None = None,
    nnunet_dir: str | os.PathLike | None = None,
    nnunet_iterations: int | None = None,
    nnunet_val_iterations: int | None = None,
    nnunet_batch_size: int | None = None,
) -> dict[str, Any]:
    """Judge a protected dataset: victims trained on protected and clean files, Dice on clean test images.

    Args:
        clean_dataset: the original MSD-style dataset (folder or dataset.json) with ``training`` and ``test``.
        protected_dataset: its protected copy (``training`` entries in the same order).
        victim: one of :data:`JUDGE_VICTIMS`: a MONAI network of :data:`~monai_umed.networks.victims.VICTIMS`, or
            ``nnunet`` (nnU-Net v2's own planning, preprocessing, training and prediction on a short schedule; see
            :mod:`~monai_umed.evaluation.nnunet`).
        defences: defence specs (``none``, ``jpeg:quality=50``, ...), one row each; the first gives the top-level
            ``dice_clean``/``dice_protected``.
        epochs: training epochs (:data:`DEFAULT_EPOCHS` for the data's dimensionality when None; for ``nnunet``
            nnU-Net's epochs, :data:`~monai_umed.nnunet.SHORT_EPOCHS` when None).
        seed: seeds weights, shuffling and augmentation (the same for every victim).
        image_size: size the victim resizes every image to (an int for all axes, or one per axis); None keeps the
            native sizes.
        device: ``auto`` | ``cpu`` | ``cuda``.
        report: JSON report path; the Markdown table goes beside it (same name, ``.md``).
        figure: optional figure path (PNG).
        cache_dir: where trained victims are cached (default ``~/.cache/monai-umed/victims``).
        use_cache: reuse and store trained victims.
        batch_size: cases per batch (16 in 2D, 4 in 3D by default).
        lr: Adam learning rate.
        intensity: the victim's intensity scaling (``auto``, ``scale``, ``zscore``, ``percentile``, ``none``).
        patch_size: training patch / sliding-window ROI (sized from the data when None).
        victim_params: network constructor overrides.
        epsilon: the protection budget in normalised units (``adv_train`` defaults to half of it).
        threads: torch CPU threads (``auto``: the idle cores, see
            :func:`~monai_umed.evaluation.train.resolve_threads`).
        test_key: the clean dataset's list used for testing.
        figure_cases: cases drawn in the figure.
        progress: progress messages and bars on stderr.
        protocol: ``release`` (the written files through the victim's own pipeline) or ``paper`` (the key's
            protector's float perturbation on the clean images, no rounding, no random augmentation, for both
            victims); see :mod:`~monai_umed.evaluation.protocols`.
        key: the protected copy's restoration key (``paper`` only; default ``PROTECTED.umedkey`` beside it).
        max_train: train both victims on the first ``max_train`` training cases only (the same cases of the same
            protected copy: e.g. a bigger victim judged on part of a copy protected as a whole).
        nnunet_dir: ``nnunet`` only: nnU-Net's work folder (default ``nnunet/`` beside the report, else a temporary
            folder).
        nnunet_iterations: ``nnunet`` only: training iterations per epoch (default
            :data:`~monai_umed.nnunet.SHORT_ITERATIONS`).
        nnunet_val_iterations: ``nnunet`` only: validation iterations per epoch (default a fifth of the iterations).
        nnunet_batch_size: ``nnunet`` only: images per batch (default nnU-Net's plan, capped at
            :data:`~monai_umed.nnunet.CPU_MAX_BATCH` on a CPU).

    Returns:
        The report (see :data:`~monai_umed.evaluation.report.REPORT_KEYS`).

    Raises:
        InputError: unreadable or mismatched datasets, a bad option, or a defence that does not fit the data.
    """
    t0 = time.perf_counter()
    if victim not in JUDGE_VICTIMS:
        raise InputError(f"unknown victim {victim!r}; choose one of {', '.join(JUDGE_VICTIMS)}")
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if victim == NNUNET:
        # nnU-Net trains on files with its own pipeline: no in-memory paper images, no defence of the MONAI recipe
        if protocol != "release":
            raise InputError("the nnunet victim trains on the written files: use --protocol release")
        if any(str(d).split(":")[0].strip() != "none" for d in (defences or ("none",))):
            raise InputError("defences belong to the MONAI victims' recipe; the nnunet victim trains with nnU-Net's "
                             "own augmentation (defence none)")
        monai_only = {"batch_size": batch_size, "lr": lr, "patch_size": patch_size, "victim_params": victim_params,
                      "intensity": None if intensity == "auto" else intensity}
        given = [k for k, v in monai_only.items() if v is not None]
        if given:
            raise InputError(f"{', '.join(given)} belong(s) to the MONAI victims; nnU-Net plans its own (its batch: "
                             "nnunet_batch_size)")
        nnunet_version()  # installed? (before anything slow)
    elif any(v is not None for v in (nnunet_dir, nnunet_iterations, nnunet_val_iterations, nnunet_batch_size)):
        raise InputError("the nnunet_* options belong to the nnunet victim")
    old_threads = torch.get_num_threads()
    n_threads = resolve_threads(threads)
    torch.set_num_threads(n_threads)
    try:
        if max_train is not None and int(max_train) < 1:
            raise InputError(f"max_train must be at least 1, got {max_train}")
        clean_train = load_split(clean_dataset, "training")
        test = load_split(clean_dataset, test_key)
        prot_train = load_split(protected_dataset, "training")
        pairs = pair_training_lists(clean_train, prot_train)[:max_train]
        clean_train, prot_train = [c for c, _ in pairs], [p for _, p in pairs]
        info = describe_data(clean_dataset, clean_train, image_size)
        p_first = read_native(prot_train[0]["image"])
        if p_first.ndim - 1 != info["spatial_dims"] or p_first.shape[0] != info["in_channels"]:
            raise InputError(f"protected image {p_first.shape} does not match the clean data "
                             f"({info['spatial_dims']}D, {info['in_channels']} channel(s))", prot_train[0]["image"])
        try:
            specs = [get_defence(s, epsilon=epsilon, spatial_dims=info["spatial_dims"], channels=info["in_channels"])
                     for s in (defences or ("none",))]
        except ValueError as e:
            raise InputError(str(e)) from e
        if victim == NNUNET:
            schedule = make_schedule(epochs, nnunet_iterations, nnunet_val_iterations, nnunet_batch_size)
            n_epochs = schedule.epochs
        else:
            n_epochs = int(epochs) if epochs is not None else DEFAULT_EPOCHS[info["spatial_dims"]]
        dev = resolve_device(device)
        _log(progress, f"imperceptibility of {len(pairs)} protected training files")
        imp = imperceptibility(pairs, progress=progress)
        prot_data: list[dict[str, Any]] = prot_train
        unchanged = all(os.path.realpath(c["image"]) == os.path.realpath(p["image"]) for c, p in pairs)
        if protocol == "paper" and not unchanged:  # the clean copy itself needs no key: nothing to add
            from monai_umed.pipeline import default_key_path

            key = Path(key) if key is not None else default_key_path(Path(protected_dataset).parent
                                                                     if Path(protected_dataset).is_file()
                                                                     else protected_dataset)
            if not key.is_file():
                raise InputError("the paper protocol needs the protected copy's key (--key)", str(key))
            _log(progress, f"paper protocol: float perturbations of {len(clean_train)} training cases from {key}")
            prot_data = paper_training_list(clean_dataset, key, device=str(dev), progress=progress)[:max_train]
            if len(prot_data) != len(clean_train):
                raise InputError(f"the key's dataset has {len(prot_data)} training cases, the clean one "
                                 f"{len(clean_train)}", str(key))
            psnrs = [it["psnr"] for it in prot_data if np.isfinite(it["psnr"])]
            imp["paper_psnr"] = float(np.mean(psnrs)) if psnrs else float("inf")
            imp["paper_psnr_min"] = float(np.min(psnrs)) if psnrs else float("inf")
        rows, figure_data = [], None
        config, nnunet_info = None, None
        for d in (specs if victim != NNUNET else ()):  # nnU-Net: below, with its own pipeline
            try:
                cfg = make_config(victim, info, n_epochs, seed=seed, image_size=image_size, defence=d,
                                  batch_size=batch_size, lr=lr, intensity=intensity, victim_params=victim_params,
                                  patch=patch_size, augment=protocol != "paper")
            except ValueError as e:
                raise InputError(str(e)) from e
            config = config or cfg
            row: dict[str, Any] = {"defence": d.label, "defence_name": d.name, "defence_params": d.params}
            results = {}
            lists = {"clean": clean_train, "protected": prot_data}
            if d.dataset_level:  # the attacker cleans each training list as a whole before training on it
                for role in lists:
                    _log(progress, f"{d.label}: estimating the shared pattern of the {role} training list")
                    lists[role], pattern = subtract_pattern_list(lists[role], info["num_classes"], **{
                        k: v for k, v in d.params.items() if k in PATTERN_DEFAULTS})
                    row[f"pattern_{role}"] = {"period": pattern.period, "explained": pattern.explained,
                                              "null_ratio": pattern.null_ratio}
            for role, data in lists.items():
                _log(progress, f"{role} victim: {victim}, defence {d.label}, {n_epochs} epochs, {len(data)} cases")
                model, tinfo = train_victim(data, cfg, device=dev, cache_dir=cache_dir, use_cache=use_cache,
                                            progress=progress, description=f"{role} victim ({d.label})")
                _log(progress, f"{role} victim {'loaded from cache' if tinfo['cached'] else 'trained'} "
                               f"({tinfo['train_seconds']:.0f} s); testing on {len(test)} clean cases")
                res = evaluate_victim(model, test, cfg, device=dev, keep=figure_cases if figure else 0,
                                      progress=progress)
                results[role] = res
                row[f"{role}_victim"] = tinfo
                row[f"dice_{role}"] = res["dice"]
                row[f"dice_per_class_{role}"] = res["dice_per_class"]
                row[f"per_case_dice_{role}"] = res["per_case"]
                row[f"test_seconds_{role}"] = res["seconds"]
                del model
            row["dice_drop"] = (None if row["dice_clean"] is None or row["dice_protected"] is None
                                else row["dice_clean"] - row["dice_protected"])
            rows.append(row)
            if figure and figure_data is None:
                figure_data = (results["clean"], results["protected"])
        if victim == NNUNET:
            _log(progress, f"nnU-Net v2 victims: {schedule.epochs} epochs x {schedule.iterations} iterations, "
                           f"{len(clean_train)} cases")
            judged = judge_nnunet(clean_dataset, clean_train, prot_train, test, info, schedule, device=dev,
                                  threads=n_threads, seed=seed, image_size=image_size, nnunet_dir=nnunet_dir,
                                  report=report, use_cache=use_cache, keep=figure_cases if figure else 0,
                                  progress=progress)
            rows = [judged["row"]]
            figure_data = (judged["results"]["clean"], judged["results"]["protected"])
            nnunet_info = judged["nnunet"]
            config_dict, grid = judged["config"], judged["config"]["image_size"]
        else:
            config_dict = {k: v for k, v in config.to_dict().items() if k != "defence"}
            grid = None if config.image_size is None else list(config.image_size)
        first = rows[0]
        out: dict[str, Any] = {
            "dice_clean": first["dice_clean"],
            "dice_protected": first["dice_protected"],
            "dice_drop": first["dice_drop"],
            "psnr": imp["psnr"],
            "psnr_roi": imp["psnr_roi"],
            "ssim": imp["ssim"],
            "max_abs_delta": imp["max_abs_delta"],
            "max_abs_delta_rel": imp["max_abs_delta_rel"],
            "victim": victim,
            "protocol": protocol,
            "loss_end_clean": first["clean_victim"]["loss"][-1] if first["clean_victim"].get("loss") else None,
            "loss_end_protected": (first["protected_victim"]["loss"][-1] if first["protected_victim"].get("loss")
                                   else None),
            "defence": first["defence"],
            "defences": [r["defence"] for r in rows],
            "epochs": n_epochs,
            "seed": int(seed),
            "image_size": grid,
            "rows": rows,
            "imperceptibility": imp,
            "config": {**config_dict, "device": str(dev), "threads": n_threads, "test_key": test_key,
                       "epsilon": float(epsilon), "use_cache": bool(use_cache)},
            "datasets": {"clean": str(Path(clean_dataset).resolve()),
                         "protected": str(Path(protected_dataset).resolve()),
                         "train_cases": len(clean_train), "test_cases": len(test),
                         "spatial_dims": info["spatial_dims"], "in_channels": info["in_channels"],
                         "num_classes": info["num_classes"]},
            "versions": _versions(),
        }
        if nnunet_info is not None:
            out["nnunet"] = nnunet_info
            out["versions"]["nnunetv2"] = nnunet_info["nnunetv2"]
        if figure:
            from monai_umed.evaluation.figure import draw_figure

            k = min(figure_cases, len(pairs), len(test))
            train_cases = [(read_native(c["image"]), read_native(p["image"]), read_native(c["label"]))
                           for c, p in pairs[:k]]
            test_cases = [(read_native(t["image"]), read_native(t["label"])) for t in test[:k]]
            res_c, res_p = figure_data

            def case_mean(row: list) -> float | None:
                v = [x for x in row if x is not None]
                return float(np.mean(v)) if v else None

            draw_figure(figure, train_cases, test_cases, res_c["predictions"], res_p["predictions"],
                        [case_mean(r) for r in res_c["per_case"][:k]], [case_mean(r) for r in res_p["per_case"][:k]],
                        title=f"{victim}, defence {first['defence']}, {n_epochs} epochs, seed {seed}")
            out["figure"] = str(figure)
        out["wall_time_s"] = time.perf_counter() - t0
        if report:
            rp = Path(report)
            out["report_markdown"] = str(rp.with_suffix(".md"))
            write_json(out, rp)
            write_markdown(report_markdown(out), rp.with_suffix(".md"))
        return out
    finally:
        torch.set_num_threads(old_threads)


def _victim_param(text: str) -> tuple[str, Any]:
    import json

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--victim-param expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _epsilon(text: str) -> float:
    from monai_umed.intensity import parse_epsilon

    try:
        return parse_epsilon(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``evaluate`` sub-command to the ``monai-umed`` parser."""
    p = subparsers.add_parser(
        "evaluate",
        help="judge a protected dataset: victims trained on protected vs clean files, Dice on the clean test list",
        description="Train a victim on the protected training list and the same victim on the clean one (cached), "
        "test both on the clean test list, measure PSNR/SSIM/max|delta| of the written files, and write a JSON "
        "report with a Markdown table beside it.",
    )
    p.add_argument("clean", help="the clean MSD-style dataset (folder or dataset.json) with training and test lists")
    p.add_argument("protected", help="its protected copy (same training list order)")
    p.add_argument("--victim", choices=JUDGE_VICTIMS, default=None,
                   help="victim network (default unet, or the recipe's); nnunet: nnU-Net v2 itself, planned, "
                   "trained and run by nnU-Net (needs monai-umed[nnunet])")
    p.add_argument("--recipe", default=None, choices=tuple(RECIPES), metavar="NAME",
                   help=f"a named training recipe of the attacker battery: {', '.join(RECIPES)} (sets the defence, "
                   "victim, epochs and image size it names; options given explicitly win)")
    p.add_argument("--defence", action="append", metavar="NAME[:KEY=VALUE,...]",
                   help=f"defence applied by the trainer, repeatable, one row each: {', '.join(DEFENCES)} "
                   "(default none), e.g. jpeg:quality=50")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs (default {DEFAULT_EPOCHS[2]} for 2D, {DEFAULT_EPOCHS[3]} for 3D; nnU-Net's "
                   f"epochs for --victim nnunet, default {SHORT_EPOCHS})")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, shuffling and augmentation (default 0)")
    p.add_argument("--image-size", type=int, nargs="+", default=None, metavar="N",
                   help="resize every image to this size inside the victim pipeline (one value or one per axis)")
    p.add_argument("--report", default=None, metavar="REPORT.json",
                   help="JSON report; a Markdown table is written beside it (REPORT.md)")
    p.add_argument("--figure", default=None, metavar="FILE.png", help="draw clean/perturbation/protected/predictions")
    p.add_argument("--figure-cases", type=int, default=3, help="cases in the figure (default 3)")
    p.add_argument("--cache-dir", default=None, help="trained-victim cache (default ~/.cache/monai-umed/victims)")
    p.add_argument("--no-cache", action="store_true", help="always train, never read or write the cache")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--threads", default="auto", help="torch CPU threads (default auto: the idle cores)")
    p.add_argument("--batch-size", type=int, default=None, help="cases per batch (default 16 in 2D, 4 in 3D)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 5e-4 swinunetr, 1e-3 the others)")
    p.add_argument("--intensity", default="auto", choices=("auto", "scale", "zscore", "percentile", "none"),
                   help="victim intensity scaling (default auto: min/max in 2D, z-score in 3D)")
    p.add_argument("--patch-size", type=int, nargs="+", default=None, metavar="N",
                   help="training patch and sliding-window ROI (default: sized from the data)")
    p.add_argument("--victim-param", type=_victim_param, action="append", default=[], metavar="KEY=VALUE",
                   help="victim constructor override, repeatable (e.g. feature_size=24)")
    p.add_argument("--epsilon", type=_epsilon, default=8 / 255,
                   help="protection budget in normalised units (adv_train defaults to half of it; default 8/255)")
    p.add_argument("--test-key", default="test", help="the clean dataset's test list (default test)")
    p.add_argument("--max-train", type=int, default=None, metavar="N",
                   help="train both victims on the first N training cases only (default all)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="release",
                   help="release (default): victims train on the written files through their own pipeline; paper: "
                   "the key's protector adds its float perturbation to the clean images, no rounding, no random "
                   "augmentation (the published protocol)")
    p.add_argument("--key", default=None, help="the protected copy's key, for --protocol paper "
                   "(default PROTECTED.umedkey)")
    g = p.add_argument_group("nnU-Net v2 victim (--victim nnunet)")
    g.add_argument("--nnunet-dir", default=None, metavar="DIR",
                   help="nnU-Net's work folder: nnUNet_raw, nnUNet_preprocessed, nnUNet_results, predictions, logs "
                   "(default: nnunet/ beside the report, else a temporary folder)")
    g.add_argument("--nnunet-iterations", type=int, default=None, metavar="N",
                   help=f"training iterations per epoch (default {SHORT_ITERATIONS}; nnU-Net's own trainer: 250)")
    g.add_argument("--nnunet-val-iterations", type=int, default=None, metavar="N",
                   help="validation iterations per epoch (default a fifth of the iterations)")
    g.add_argument("--nnunet-batch-size", type=int, default=None, metavar="N",
                   help=f"images per batch (default nnU-Net's plan, at most {CPU_MAX_BATCH} on a CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``monai-umed evaluate`` from parsed arguments; prints the Markdown summary and returns the exit code."""
    image_size = None if not args.image_size else (args.image_size[0] if len(args.image_size) == 1 else args.image_size)
    threads = args.threads if args.threads == "auto" else int(args.threads)
    recipe = get_recipe(args.recipe) if args.recipe else Recipe("none")
    report = evaluate(
        args.clean,
        args.protected,
        victim=args.victim or recipe.victim or "unet",
        defences=args.defence or [recipe.defence],
        epochs=args.epochs if args.epochs is not None else recipe.epochs,
        seed=args.seed,
        image_size=image_size if image_size is not None else recipe.image_size,
        device=args.device,
        report=args.report,
        figure=args.figure,
        cache_dir=args.cache_dir,
        use_cache=not args.no_cache,
        batch_size=args.batch_size,
        lr=args.lr,
        intensity=args.intensity,
        patch_size=args.patch_size,
        victim_params=dict(args.victim_param) or None,
        epsilon=args.epsilon,
        threads=threads,
        test_key=args.test_key,
        figure_cases=args.figure_cases,
        progress=not args.quiet,
        protocol=args.protocol,
        key=args.key,
        max_train=args.max_train,
        nnunet_dir=args.nnunet_dir,
        nnunet_iterations=args.nnunet_iterations,
        nnunet_val_iterations=args.nnunet_val_iterations,
        nnunet_batch_size=args.nnunet_batch_size,
    )
    print(report_markdown(report))
    if args.report:
        print(f"report: {args.report} (and {report['report_markdown']})")
    return 0
