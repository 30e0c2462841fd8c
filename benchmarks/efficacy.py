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

"""The efficacy benchmark (METHODS.md section 4): protect the training split with each method, judge each.

For one MSD-style dataset folder with ``training`` and ``test`` lists, every requested method protects the
training images (``monai_umed.pipeline.protect_dataset(..., split="training")``, written to disk in the source
formats), then :func:`monai_umed.evaluation.evaluate` trains the victim on the protected files and on the clean
ones (the clean victim is trained once and cached) and tests both on the clean test list. The ``clean`` row is the
victim trained on the unprotected files. One table (method, PSNR whole/ROI, SSIM, max |delta|, clean-victim Dice,
protected-victim Dice, time to protect, time per victim) is printed and written as Markdown and JSON::

    python benchmarks/efficacy.py ../shared/data/kvasir_seg --methods clean,noise --out /tmp/efficacy_kvasir
    python benchmarks/efficacy.py ../shared/data/hippocampus --methods clean,noise,umed --param umed.n_gen=5
    python benchmarks/efficacy.py ../shared/data/kvasir_seg --methods umed,umed-contour=umed \
        --param umed-contour.mode=contour

A ``--methods`` entry ``LABEL=METHOD`` adds a row named LABEL that runs METHOD with the parameters given to LABEL
(ablations and budget variants side by side in one table). ``--param LABEL.epsilon=2/255`` gives one row its own
L-inf budget (the table's ``epsilon x255`` column), e.g. to compare methods each at the budget that keeps them at
or above a PSNR.

``--protocol release,paper`` judges every row under each protocol (:mod:`monai_umed.evaluation.protocols`):
``release`` (default) trains the victim on the written files through its own pipeline; ``paper`` adds the key's
protector's float perturbation to the clean images and trains without rounding or random augmentation (the
published protocol). For a 2D dataset that the victim resizes, the ``paper`` rows use their own copy of the training
split on the victim's grid (``OUT/dataset_grid``, :func:`~monai_umed.evaluation.protocols.victim_grid_dataset`),
with each method's protector fitted on it (``OUT/protected_METHOD_grid``), as the published code does. Every row states its protocol and the victims' final training losses (an unlearnable copy
shows the protected victim's loss below the clean one's while its test Dice stays low).

``--victim-seeds 0,1,2`` judges every copy with one victim per seed (the protector is fitted once, with
``--seed``) and adds a ``mean`` row per method: on Kvasir-SEG one protected copy left victims of seeds 0 to 4 at
15.3, 5.6, 1.4, 26.7 and 19.9 % Dice, so a single victim says little about a copy near the target.

``--victim nnunet`` judges with nnU-Net v2 itself (:mod:`monai_umed.evaluation.nnunet`: its planning, preprocessing
and trainer on a short schedule, ``--epochs`` of its epochs), its runs kept in ``OUT/nnunet`` so that the clean
baseline is trained once for every row.

Same seed, epochs, split and victim for every row; the table states them. ``--max-train N`` keeps the first N
training cases (linked, not copied, into ``OUT/dataset``) to fit a smaller time budget; the test list is always
complete. Rerunning with the same ``--out`` reuses protected copies made with the same settings and cached victims.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# runnable as a script from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai_umed.errors import InputError  # noqa: E402
from monai_umed.evaluation import DEFAULT_EPOCHS, evaluate  # noqa: E402
from monai_umed.evaluation.command import JUDGE_VICTIMS  # noqa: E402
from monai_umed.evaluation.metrics import read_native  # noqa: E402
from monai_umed.evaluation.protocols import PROTOCOLS, victim_grid_dataset  # noqa: E402
from monai_umed.evaluation.report import fmt, markdown_table, write_json, write_markdown  # noqa: E402
from monai_umed.evaluation.train import find_dataset_json, load_split  # noqa: E402
from monai_umed.intensity import parse_epsilon  # noqa: E402


def parse_params(items: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``method.key=value`` items -> ``{method: {key: value}}`` (values read as JSON or fractions like 8/255)."""
    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for item in items:
        target, eq, value = item.partition("=")
        method, dot, key = target.partition(".")
        if not eq or not dot or not key:
            raise InputError(f"--param expects METHOD.KEY=VALUE, got {item!r}")
        if method not in out:
            raise InputError(f"--param {item!r} names method {method!r}, which is not among --methods")
        if "/" in value:
            try:
                out[method][key] = parse_epsilon(value)
                continue
            except ValueError:
                pass
        try:
            out[method][key] = json.loads(value)
        except json.JSONDecodeError:
            out[method][key] = value
    return out


def subset_dataset(dataset: Path, out: Path, max_train: int) -> Path:
    """A dataset folder holding the first ``max_train`` training cases and the full test list, as symbolic links
    to the original files (nothing is copied; paths stay relative to the new folder)."""
    src_json = find_dataset_json(dataset)
    meta = json.loads(src_json.read_text())
    root = src_json.parent.resolve()
    out.mkdir(parents=True, exist_ok=True)
    keep = {"training": meta["training"][:max_train], "test": meta.get("test") or []}
    if not keep["test"]:
        raise InputError("dataset.json has no 'test' list", src_json)
    new_meta = {k: v for k, v in meta.items() if k not in ("training", "validation", "test", "numTraining", "numTest")}
    new_meta["description"] = f"{meta.get('description', '')} [first {max_train} training cases, linked]".strip()
    for split, entries in keep.items():
        new_meta[split] = []
        for e in entries:
            new_e = {}
            for k in ("image", "label"):
                rel = os.path.normpath(e[k])
                link = out / rel
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.is_symlink():
                    link.symlink_to(root / rel)
                new_e[k] = Path(rel).as_posix()
            new_meta[split].append(new_e)
    (out / "dataset.json").write_text(json.dumps(new_meta, indent=1))
    return out


def protect(dataset: Path, out: Path, label: str, method: str, args: argparse.Namespace,
            params: dict[str, Any], epsilon: float) -> dict[str, Any]:
    """Protect the training split once for the row ``label``; a finished copy made with the same settings is
    reused."""
    from monai_umed.pipeline import protect_dataset

    target = out / f"protected_{label}"
    record = out / f"protected_{label}.json"
    settings = {"dataset": str(dataset.resolve()), "method": method, "epsilon": epsilon, "params": params,
                "epochs": args.protect_epochs, "seed": args.seed}
    if target.exists():
        if record.is_file() and json.loads(record.read_text()).get("settings") == settings:
            print(f"[efficacy] {label}: reusing {target}", file=sys.stderr, flush=True)
            return json.loads(record.read_text())["summary"]
        raise InputError(f"{target} exists but was made with other settings (or did not finish); "
                         "delete it or choose another --out")
    print(f"[efficacy] {label}: protecting the training split", file=sys.stderr, flush=True)
    summary = protect_dataset(dataset, target, method=method, key=out / f"protected_{label}.umedkey",
                              epsilon=epsilon, epochs=args.protect_epochs, params=params, split="training",
                              device=args.device, seed=args.seed, progress=not args.quiet)
    write_json({"settings": settings, "summary": summary}, record)
    return summary


def _rows(method: str, protocol: str, is_clean: bool, epsilon: float, rep: dict[str, Any], psum: dict[str, Any],
          t0: float) -> list[dict[str, Any]]:
    """The table rows (one per defence) of one method judged under one protocol."""
    imp = rep["imperceptibility"]
    paper = protocol == "paper" and not is_clean
    out = []
    for r in rep["rows"]:
        pv, cv = r["protected_victim"], r["clean_victim"]
        out.append({
            "method": method, "protocol": protocol, "defence": r["defence"], "epsilon": None if is_clean else epsilon,
            # the paper protocol's images are the float ones: their PSNR, not the written files'
            "psnr": None if is_clean else (imp.get("paper_psnr") if paper else rep["psnr"]),
            "psnr_roi": None if is_clean or paper else rep["psnr_roi"],
            "ssim": None if is_clean or paper else rep["ssim"],
            "max_abs_delta": None if is_clean else rep["max_abs_delta"],
            "max_abs_delta_rel": None if is_clean else rep["max_abs_delta_rel"],
            "clean_dtypes": imp["dtypes"],
            "dice_clean": r["dice_clean"], "dice_protected": r["dice_protected"],
            "dice_per_class_clean": r["dice_per_class_clean"],
            "dice_per_class_protected": r["dice_per_class_protected"],
            "loss_end_clean": (cv.get("loss") or [None])[-1], "loss_end_protected": (pv.get("loss") or [None])[-1],
            "loss_clean": cv.get("loss"), "loss_protected": pv.get("loss"),
            "protect_seconds": psum.get("seconds"), "victim_seconds": pv["train_seconds"],
            "victim_cached": pv["cached"], "epoch_seconds": pv.get("epoch_seconds"),
            "wall_seconds": time.perf_counter() - t0,
        })
    return out


def victim_seed_list(text: str | None, seed: int) -> list[int]:
    """``--victim-seeds`` as distinct integers in the given order (default: the run's ``seed``)."""
    if text is None:
        return [int(seed)]
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--victim-seeds takes comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise InputError(f"--victim-seeds needs distinct seeds, got {text!r}")
    return seeds


def seed_means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ``mean`` row per defence over the victim seeds of ``rows`` (one method under one protocol): the mean
    Dice of the clean and the protected victims, their standard deviations over the seeds, the mean final losses."""
    out = []
    for defence in dict.fromkeys(r["defence"] for r in rows):
        group = [r for r in rows if r["defence"] == defence]
        mean = {**group[0], "victim_seed": "mean", "victim_cached": False, "per_seed": [r["victim_seed"] for r in group]}
        for key in ("dice_clean", "dice_protected", "loss_end_clean", "loss_end_protected", "victim_seconds"):
            vals = [r[key] for r in group if r[key] is not None]
            mean[key] = float(np.mean(vals)) if vals else None
            if key.startswith("dice"):
                mean[f"{key}_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        for key in ("dice_per_class_clean", "dice_per_class_protected", "loss_clean", "loss_protected",
                    "epoch_seconds"):
            mean[key] = None
        out.append(mean)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    def dice(r: dict[str, Any], key: str) -> str:
        sd = r.get(f"{key}_sd")
        return fmt(r[key], 2, pct=True) + ("" if sd is None else f" +- {sd * 100:.2f}")

    headers = ["method", "protocol", "defence", "victim seed", "epsilon x255", "PSNR (dB)", "PSNR ROI (dB)", "SSIM", "max abs delta (native)",
               "max abs delta / R (x255)", "Dice clean victim (%)",
               "Dice protected victim (%)", "final loss clean", "final loss protected", "protect (s)", "victim (s)"]
    body = []
    for r in rows:
        body.append([
            r["method"], r["protocol"], r["defence"], str(r.get("victim_seed", "-")),
            "-" if r["epsilon"] is None else f"{r['epsilon'] * 255:.3g}",
            fmt(r["psnr"]), fmt(r["psnr_roi"]), fmt(r["ssim"], 4),
            fmt(r["max_abs_delta"], 1),
            fmt(None if r["max_abs_delta_rel"] is None else r["max_abs_delta_rel"] * 255, 2),
            dice(r, "dice_clean"), dice(r, "dice_protected"),
            fmt(r["loss_end_clean"], 4), fmt(r["loss_end_protected"], 4),
            fmt(r["protect_seconds"], 0), fmt(r["victim_seconds"], 0) + (" (cached)" if r["victim_cached"] else ""),
        ])
    return markdown_table(headers, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path, help="MSD-style dataset folder with training and test lists")
    parser.add_argument("--methods", default="clean,noise", help="comma-separated: clean and protector names")
    parser.add_argument("--victim", default="unet", choices=JUDGE_VICTIMS,
                        help="victim network (default unet); nnunet: nnU-Net v2 itself, its work folder OUT/nnunet")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"victim epochs (default {DEFAULT_EPOCHS[2]} for 2D, {DEFAULT_EPOCHS[3]} for 3D)")
    parser.add_argument("--out", type=Path, default=Path("efficacy_out"), help="output folder")
    parser.add_argument("--epsilon", type=parse_epsilon, default=8 / 255, help="L-inf budget (default 8/255)")
    parser.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="a protector parameter, repeatable")
    parser.add_argument("--protect-epochs", type=int, default=None, help="bound on protector fitting")
    parser.add_argument("--max-train", type=int, default=None, help="use only the first N training cases")
    parser.add_argument("--image-size", type=int, nargs="+", default=None,
                        help="victim resize (default 128 for 2D datasets, native for 3D)")
    parser.add_argument("--defence", action="append", default=None, help="defence rows (default none)")
    parser.add_argument("--protocol", default="release",
                        help="comma-separated judging protocols, each row under each: release (default), paper")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--victim-seeds", default=None,
                        help="comma-separated victim seeds, one victim each and a mean row (default: --seed)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", default="auto", help="torch CPU threads for the victims (default: idle cores)")
    parser.add_argument("--cache-dir", default=None, help="trained-victim cache (default ~/.cache/monai-umed/victims)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except InputError as e:
        print(f"efficacy: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from monai_umed import protectors

    entries = [m.strip() for m in args.methods.split(",") if m.strip()]
    base = {e.partition("=")[0].strip(): (e.partition("=")[2] or e).strip() for e in entries}
    methods = list(base)
    if len(methods) != len(entries):
        raise InputError(f"--methods names a row twice: {args.methods}")
    available = protectors.names()
    unknown = [base[m] for m in methods if base[m] != "clean" and base[m] not in available]
    if unknown or not methods:
        raise InputError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; available: clean, "
                         f"{', '.join(available)}")
    params = parse_params(args.param, methods)
    # a row's own budget is a protect_dataset argument, not a protector parameter
    epsilons = {m: params[m].pop("epsilon", args.epsilon) for m in methods}
    bad = [m for m, e in epsilons.items() if not isinstance(e, (int, float)) or not 0 <= e <= 1]
    if bad:
        raise InputError(f"--param {bad[0]}.epsilon must be a number in [0, 1] (e.g. 2/255), got {epsilons[bad[0]]!r}")
    protocols = [p.strip() for p in args.protocol.split(",") if p.strip()]
    if not protocols or any(p not in PROTOCOLS for p in protocols):
        raise InputError(f"--protocol takes a comma-separated list of {', '.join(PROTOCOLS)}, got {args.protocol!r}")
    if args.max_train is not None and args.max_train < 1:
        raise InputError("--max-train must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = args.dataset
    if args.max_train is not None:
        dataset = subset_dataset(args.dataset, args.out / "dataset", args.max_train)
    train = load_split(dataset, "training")
    spatial_dims = read_native(train[0]["image"]).ndim - 1
    image_size = args.image_size
    if image_size is None and spatial_dims == 2:
        image_size = [128]
    image_size = None if image_size is None else (image_size[0] if len(image_size) == 1 else image_size)
    threads = args.threads if args.threads == "auto" else int(args.threads)
    victim_seeds = victim_seed_list(args.victim_seeds, args.seed)
    rows, reports = [], {}
    for method in methods:
        t0 = time.perf_counter()
        is_clean = base[method] == "clean"
        for protocol in protocols:
            # the paper protocol perturbs images on the victim's grid: a 2D row fits its protector on a resized copy
            on_grid = protocol == "paper" and image_size is not None and spatial_dims == 2
            data = victim_grid_dataset(dataset, args.out / "dataset_grid", image_size) if on_grid else dataset
            label = f"{method}_grid" if on_grid else method
            if is_clean:
                protected, psum = data, {"seconds": 0.0}
            else:
                psum = protect(data, args.out, label, base[method], args, params[method], epsilons[method])
                protected = Path(psum["output"])
            judged = []
            for vseed in victim_seeds:
                print(f"[efficacy] {method}: evaluating ({args.victim}, {protocol} protocol, victim seed {vseed})",
                      file=sys.stderr, flush=True)
                name = f"eval_{method}.json" if protocol == "release" else f"eval_{method}_{protocol}.json"
                if vseed != victim_seeds[0]:
                    name = name.replace(".json", f"_seed{vseed}.json")
                rep = evaluate(data, protected, victim=args.victim, defences=args.defence or ["none"],
                               epochs=args.epochs, seed=vseed, image_size=image_size, device=args.device,
                               cache_dir=args.cache_dir, epsilon=epsilons[method], threads=threads,
                               report=args.out / name, progress=not args.quiet, protocol=protocol,
                               key=None if is_clean else args.out / f"protected_{label}.umedkey")
                reports[f"{method}/{protocol}" + ("" if vseed == victim_seeds[0] else f"/seed{vseed}")] = str(
                    args.out / name)
                judged += [{**r, "victim_seed": vseed} for r in _rows(method, protocol, is_clean, epsilons[method],
                                                                      rep, psum, t0)]
                first_rep = rep
                print(f"[efficacy] {method} ({protocol}, victim seed {vseed}): Dice clean victim "
                      f"{fmt(judged[-1]['dice_clean'], 2, True)} %, protected victim "
                      f"{fmt(judged[-1]['dice_protected'], 2, True)} %", file=sys.stderr, flush=True)
            rows += judged + (seed_means(judged) if len(victim_seeds) > 1 else [])
    cfg = first_rep["config"]
    dtypes = next((r["clean_dtypes"] for r in rows if r["clean_dtypes"]), None)
    header = (
        f"Efficacy on `{args.dataset}` ({first_rep['datasets']['train_cases']} training cases"
        f"{' (first ' + str(args.max_train) + ')' if args.max_train else ''}, "
        f"{first_rep['datasets']['test_cases']} clean test cases); victim {args.victim} {cfg['victim_params']}, "
        f"{first_rep['epochs']} epochs, seed {args.seed} (victim seeds {', '.join(map(str, victim_seeds))}), "
        f"image size {first_rep['image_size'] or 'native'}, "
        f"patch {cfg['patch_size']}, batch {cfg['batch_size']} x {cfg['num_samples']}, lr {cfg['lr']}, "
        f"intensity {cfg['intensity']}, device {cfg['device']}, {cfg['threads']} thread(s); "
        f"epsilon {args.epsilon:.5g} ({args.epsilon * 255:.3g}/255) unless a row gives its own"
        f"{'; clean training images by dtype ' + str(dtypes) if dtypes else ''}. "
        f"Dice: mean over test cases and foreground classes. PSNR/SSIM/max abs delta: protected vs clean "
        f"training files as written, native units; R = dtype range for integer images, the clean image's "
        f"max - min otherwise."
    )
    text = header + "\n\n" + table(rows) + "\n"
    print(text)
    out_json = {"dataset": str(args.dataset), "methods": methods, "protocols": protocols, "row_methods": base, "epsilon": args.epsilon,
                "seed": args.seed, "victim_seeds": victim_seeds, "victim": args.victim, "epochs": first_rep["epochs"],
                "max_train": args.max_train,
                "image_size": first_rep["image_size"], "config": cfg, "versions": first_rep["versions"],
                "rows": rows, "reports": reports, "params": params}
    write_json(out_json, args.out / "efficacy.json")
    write_markdown(text, args.out / "efficacy.md")
    print(f"written: {args.out / 'efficacy.md'}, {args.out / 'efficacy.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
