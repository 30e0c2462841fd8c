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

"""``monai-umed check``: a quick self-check of a protected copy, for its owner, before they publish it.

It trains short victims on part of the protected copy and on the same part of the clean originals, with the
standard recipe and with nnU-Net's augmentation (:mod:`~monai_umed.evaluation.recipes`), tests every victim on
clean held-out images and prints one table: PSNR of the written files, clean-victim Dice, protected-victim Dice, the
ratio of the two and a verdict per recipe:

- ``protected``: the protected victim keeps at most a quarter of the clean victim's Dice;
- ``partly``: at most 60 %;
- ``not protected``: more.

The clean originals are the dataset the manifest names (``--clean`` to point elsewhere). Held-out images are its
``test`` list; a dataset without one lends its last ``--holdout`` training cases (clean), which the victims then do
not train on. A short victim is a screen, not the judge: ``monai-umed evaluate`` and ``benchmarks/robustness.py``
train full victims. Example::

    monai-umed check /data/kvasir_protected            # 200 cases, 20 epochs at 128 px, two recipes
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from monai_umed.errors import InputError
from monai_umed.evaluation.command import evaluate
from monai_umed.evaluation.recipes import get_recipe
from monai_umed.evaluation.report import fmt, markdown_table
from monai_umed.evaluation.train import find_dataset_json, load_split

__all__ = ["check", "verdict", "add_command", "run", "CHECK_RECIPES"]

#: The recipes of the self-check.
CHECK_RECIPES = ("standard", "nnunet")


def verdict(dice_clean: float | None, dice_protected: float | None) -> str:
    """``protected`` (ratio <= 0.25), ``partly`` (<= 0.6) or ``not protected``; ``-`` without a competent clean
    victim (Dice below 0.05: nothing to compare with)."""
    if dice_clean is None or dice_protected is None or dice_clean < 0.05:
        return "-"
    r = dice_protected / dice_clean
    return "protected" if r <= 0.25 else ("partly" if r <= 0.6 else "not protected")


def _source(protected: Path) -> Path:
    manifest = protected / "manifest.json"
    if not manifest.is_file():
        raise InputError("no manifest.json: give the clean originals with --clean", str(protected))
    summary = json.loads(manifest.read_text()).get("summary") or {}
    if not summary.get("dataset"):
        raise InputError("manifest.json names no source dataset: give the clean originals with --clean", str(manifest))
    return Path(summary["dataset"])


def _with_holdout(clean: Path, protected: Path, holdout: int, work: Path) -> tuple[Path, Path]:
    """dataset.json files for both copies whose last ``holdout`` clean training cases form the test list."""
    clean_cases = load_split(clean, "training")
    n = len(clean_cases)
    if n <= holdout:
        raise InputError(f"{n} training cases cannot lend {holdout} held-out cases", str(clean))
    out = []
    protected_cases = load_split(protected, "training")
    for name, root, cases in (("clean", clean, clean_cases), ("protected", protected, protected_cases)):
        meta = json.loads(find_dataset_json(root).read_text())
        meta = {**meta, "training": cases[: n - holdout], "test": clean_cases[n - holdout:]}
        (work / name).mkdir(parents=True, exist_ok=True)
        (work / name / "dataset.json").write_text(json.dumps(meta))
        out.append(work / name)
    return out[0], out[1]


def check(
    protected: str | os.PathLike,
    clean: str | os.PathLike | None = None,
    cases: int = 200,
    epochs: int = 20,
    image_size: int | None = 128,
    recipes: Sequence[str] = CHECK_RECIPES,
    holdout: int = 50,
    seed: int = 0,
    threads: int | str = "auto",
    device: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train short victims per recipe on ``cases`` protected and clean training cases; compare on clean images.

    Args:
        protected: the protected copy (``monai-umed protect``'s output folder).
        clean: the clean originals (default: the dataset its manifest names).
        cases: training cases per victim (the first ones of the list).
        epochs: epochs per victim.
        image_size: the victims' grid (None: native sizes; 3D data is always kept native).
        recipes: recipe names.
        holdout: clean training cases held out for testing when the dataset has no ``test`` list.
        seed: the victims' seed.
        threads: torch CPU threads.
        device: ``auto`` | ``cpu`` | ``cuda``.
        cache_dir: trained-victim cache.
        progress: progress output.

    Returns:
        ``{"rows": [...], "psnr", "psnr_min", "cases", "epochs", "image_size", "clean", "protected", "table"}``.

    Raises:
        InputError: no manifest and no ``clean``, bad numbers, or what :func:`evaluate` raises.
    """
    protected = Path(protected)
    clean = Path(clean) if clean is not None else _source(protected)
    if int(cases) < 2 or int(epochs) < 1:
        raise InputError(f"check needs cases >= 2 and epochs >= 1, got {cases} and {epochs}")
    meta = json.loads(find_dataset_json(clean).read_text())
    rows = []
    with tempfile.TemporaryDirectory(prefix="umed-check-") as tmp:
        c_ds, p_ds = (clean, protected) if meta.get("test") else _with_holdout(clean, protected, holdout, Path(tmp))
        sd3 = str(meta.get("tensorImageSize", "")).upper() == "3D"
        rep: dict[str, Any] = {}
        for name in recipes:
            r = get_recipe(name)
            rep = evaluate(c_ds, p_ds, victim=r.victim or "unet", defences=[r.defence], epochs=epochs, seed=seed,
                           image_size=None if sd3 else image_size, device=device, cache_dir=cache_dir,
                           threads=threads, max_train=cases, progress=progress)
            rows.append({"recipe": name, "dice_clean": rep["dice_clean"], "dice_protected": rep["dice_protected"],
                         "ratio": (rep["dice_protected"] / rep["dice_clean"] if rep["dice_clean"] else None),
                         "verdict": verdict(rep["dice_clean"], rep["dice_protected"]),
                         "loss_clean": rep["loss_end_clean"], "loss_protected": rep["loss_end_protected"]})
    out = {"rows": rows, "psnr": rep.get("psnr"), "psnr_min": rep.get("imperceptibility", {}).get("psnr_min"),
           "cases": rep.get("datasets", {}).get("train_cases"), "epochs": int(epochs),
           "image_size": rep.get("image_size"), "clean": str(clean), "protected": str(protected)}
    out["table"] = markdown_table(
        ["recipe", "Dice clean victim (%)", "Dice protected victim (%)", "protected / clean", "verdict"],
        [[r["recipe"], fmt(r["dice_clean"], pct=True), fmt(r["dice_protected"], pct=True), fmt(r["ratio"]),
          r["verdict"]] for r in rows])
    return out


def add_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``check`` sub-command to the ``monai-umed`` parser."""
    p = subparsers.add_parser(
        "check", help="quick self-check of a protected copy: short victims, standard and nnU-Net augmentation",
        description="Train short victims on part of the protected copy and of the clean originals, with the "
        "standard recipe and with nnU-Net's augmentation, and say how well the copy is protected.")
    p.add_argument("protected", help="the protected copy (monai-umed protect's output folder)")
    p.add_argument("--clean", default=None, help="the clean originals (default: the dataset its manifest names)")
    p.add_argument("--cases", type=int, default=200, help="training cases per victim (default 200)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per victim (default 20)")
    p.add_argument("--image-size", type=int, default=128, help="victim grid for 2D data (default 128; 0: native)")
    p.add_argument("--recipes", default=",".join(CHECK_RECIPES), help="comma-separated recipes (default "
                   f"{','.join(CHECK_RECIPES)})")
    p.add_argument("--holdout", type=int, default=50, help="held-out clean cases without a test list (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``monai-umed check``; prints the table."""
    from monai_umed.evaluation.report import write_json

    threads = args.threads if args.threads == "auto" else int(args.threads)
    try:
        recipes = [get_recipe(n).name for n in args.recipes.split(",") if n.strip()]
    except ValueError as e:
        raise InputError(str(e)) from e
    res = check(args.protected, clean=args.clean, cases=args.cases, epochs=args.epochs,
                image_size=args.image_size or None, recipes=recipes, holdout=args.holdout, seed=args.seed,
                threads=threads, device=args.device, cache_dir=args.cache_dir, progress=not args.quiet)
    print(f"{res['protected']}: {res['cases']} training cases, {res['epochs']} epochs, grid "
          f"{res['image_size'] or 'native'}; written files at {fmt(res['psnr'])} dB PSNR (min {fmt(res['psnr_min'])})")
    print(res["table"])
    print("A short victim is a screen; `monai-umed evaluate` and benchmarks/robustness.py train full ones.")
    if args.json:
        write_json(res, Path(args.json))
    return 0
