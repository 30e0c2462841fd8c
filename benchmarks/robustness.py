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

"""The attacker battery: one protected copy judged under every named training recipe, each against its own clean
baseline (:mod:`monai_umed.evaluation.recipes`).

For each protected copy (``LABEL=PATH``, written by ``monai-umed protect ... --split training``), each recipe and
each victim seed, :func:`monai_umed.evaluation.evaluate` trains a victim on the protected training files and one on
the clean files, both the recipe's way (cached: a clean baseline is trained once per recipe and seed and reused by
every copy), and tests both on the clean test list. One table, Markdown and JSON, with PSNR, clean Dice, protected
Dice, the bound the recipe is held to (issue 26; ``--bound NAME=VALUE`` changes one), whether it is met, and the
final training losses::

    python benchmarks/robustness.py ../shared/data/kvasir_seg umed=/tmp/umed_copy --out /tmp/battery
    python benchmarks/robustness.py ../shared/data/kvasir_seg umed=/tmp/umed_copy --recipes standard,nnunet \\
        --max-train 200 --epochs 20 --out /tmp/battery_screen

``--confirm-seeds 1,2,3,4`` trains more victims for a row whose seed-0 protected Dice lies within ``--margin``
(0.10) of its bound, and adds a mean row: one victim says little near a bound. Recipes that do not apply to the
data (JPEG and grayscale on 3D or single-channel images) are skipped with a note.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# runnable as a script from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai_umed.evaluation import evaluate  # noqa: E402
from monai_umed.evaluation.recipes import RECIPES, get_recipe, recipe_applies  # noqa: E402
from monai_umed.evaluation.report import fmt, markdown_table, write_json, write_markdown  # noqa: E402
from monai_umed.evaluation.train import describe_data, load_split  # noqa: E402

#: Protected-victim Dice each recipe is held to (issue 26, UMed; SALM's bounds are these + 0.10).
BOUNDS: dict[str, float] = {
    "standard": 0.10,
    "nnunet": 0.20, "nnunet_spatial": 0.20, "nnunet_intensity": 0.20, "nnunet_strong": 0.20,
    "jpeg50": 0.35, "blur1": 0.35, "median3": 0.35, "grayscale": 0.35,
    "segresnet": 0.20, "dynunet": 0.20, "epochs100": 0.20, "size256": 0.20,
    "pattern_subtract": 0.35, "nnunet_v2": 0.30,
}


def judge(clean: Path, copy: Path, recipe: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One row: the recipe's clean and protected victims (seed ``seed``), as :func:`evaluate` reports them."""
    r = get_recipe(recipe)
    rep = evaluate(clean, copy, victim=r.victim or "unet", defences=[r.defence],
                   epochs=r.epochs if r.epochs is not None else args.epochs, seed=seed,
                   image_size=r.image_size if r.image_size is not None else args.image_size, device=args.device,
                   cache_dir=args.cache_dir, threads=args.threads, max_train=args.max_train, progress=not args.quiet)
    row = rep["rows"][0]
    return {
        "recipe": recipe, "seed": seed, "psnr": rep["psnr"], "psnr_min": rep["imperceptibility"].get("psnr_min"),
        "dice_clean": rep["dice_clean"], "dice_protected": rep["dice_protected"],
        "loss_clean": rep["loss_end_clean"], "loss_protected": rep["loss_end_protected"],
        "victim": rep["victim"], "epochs": rep["epochs"], "image_size": rep["image_size"],
        "defence": rep["defence"], "train_seconds": row["protected_victim"].get("train_seconds"),
        "pattern": row.get("pattern_protected"),
        "clean_victim_key": row["clean_victim"].get("cache_key"),
    }


def table(rows: list[dict[str, Any]]) -> str:
    heads = ["copy", "recipe", "seed", "PSNR (min)", "Dice clean victim (%)", "Dice protected victim (%)", "bound (%)",
             "met", "final loss prot. / clean", "victim", "epochs", "size"]
    out = []
    for r in rows:
        bound = r.get("bound")
        met = "-" if bound is None or r["dice_protected"] is None else ("yes" if r["dice_protected"] <= bound else "no")
        out.append([r["copy"], r["recipe"], r["seed"], f"{fmt(r['psnr'])} ({fmt(r.get('psnr_min'))})",
                    fmt(r["dice_clean"], pct=True), fmt(r["dice_protected"], pct=True),
                    "-" if bound is None else fmt(bound, 0, pct=True), met,
                    f"{fmt(r.get('loss_protected'), 3)} / {fmt(r.get('loss_clean'), 3)}", r.get("victim", "-"),
                    r.get("epochs", "-"), r.get("image_size") or "native"])
    return markdown_table(heads, out)


def mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def m(key: str) -> float | None:
        v = [r[key] for r in rows if r.get(key) is not None]
        return float(np.mean(v)) if v else None

    first = rows[0]
    return {**first, "seed": f"mean of {len(rows)}", "dice_clean": m("dice_clean"),
            "dice_protected": m("dice_protected"), "loss_clean": m("loss_clean"), "loss_protected": m("loss_protected"),
            "dice_protected_sd": float(np.std([r["dice_protected"] for r in rows]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="the clean MSD-style dataset with training and test lists")
    parser.add_argument("copies", nargs="+", metavar="LABEL=PATH", help="protected copies of its training list")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names (default all)")
    parser.add_argument("--seeds", default="0", help="victim seeds for every row (default 0)")
    parser.add_argument("--confirm-seeds", default="", help="more seeds for rows near their bound, e.g. 1,2,3,4")
    parser.add_argument("--margin", type=float, default=0.10, help="'near the bound' (default 0.10 Dice)")
    parser.add_argument("--bound", action="append", default=[], metavar="RECIPE=DICE", help="change a bound")
    parser.add_argument("--epochs", type=int, default=30, help="the battery's epochs (default 30)")
    parser.add_argument("--image-size", type=int, default=128, help="the battery's victim grid (default 128)")
    parser.add_argument("--max-train", type=int, default=None, help="first N training cases only")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", default="auto")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", type=Path, default=Path("robustness_out"))
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    args.threads = args.threads if args.threads == "auto" else int(args.threads)
    bounds = dict(BOUNDS)
    for b in args.bound:
        name, _, value = b.partition("=")
        bounds[name.strip()] = float(value)
    recipes = [get_recipe(n).name for n in args.recipes.split(",") if n.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    confirm = [int(s) for s in args.confirm_seeds.split(",") if s.strip()]
    copies = []
    for c in args.copies:
        label, eq, path = c.partition("=")
        copies.append((label, Path(path)) if eq else (Path(c).name, Path(c)))
    info = describe_data(args.dataset, load_split(args.dataset, "training")[:1], None)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    t0 = time.perf_counter()

    def save() -> None:
        text = (f"# Attacker battery: {args.dataset}\n\n{args.epochs} epochs at {args.image_size} px unless a recipe "
                f"says otherwise; training cases: {args.max_train or 'all'}; wall time "
                f"{time.perf_counter() - t0:.0f} s.\n\n{table(rows)}\n")
        if skipped:
            text += "\nSkipped (do not apply to the data): " + ", ".join(skipped) + "\n"
        write_markdown(text, args.out / "robustness.md")
        write_json({"rows": rows, "skipped": skipped, "bounds": bounds, "args": {k: str(v) for k, v in
                    vars(args).items()}}, args.out / "robustness.json")

    for label, copy in copies:
        for name in recipes:
            if not recipe_applies(get_recipe(name), info["spatial_dims"], info["in_channels"]):
                skipped += [] if name in skipped else [name]
                continue
            done = []
            for seed in seeds:
                row = {"copy": label, **judge(args.dataset, copy, name, seed, args), "bound": bounds.get(name)}
                rows.append(row)
                done.append(row)
                save()
            near = (bounds.get(name) is not None and done[0]["dice_protected"] is not None
                    and abs(done[0]["dice_protected"] - bounds[name]) <= args.margin)
            for seed in (confirm if near else []):
                if seed in seeds:
                    continue
                row = {"copy": label, **judge(args.dataset, copy, name, seed, args), "bound": bounds.get(name)}
                rows.append(row)
                done.append(row)
                save()
            if len(done) > 1:
                rows.append(mean_row(done))
                save()
    save()
    print(table(rows))
    print(f"table: {args.out / 'robustness.md'} (and robustness.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
