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

"""Protection of cases not seen in ``fit``: fit a protector on the first N training cases, protect them all.

The protector is fitted on the first ``--fit-cases`` training cases only; ``protect_dataset`` then protects the
whole training list with it (cases seen in fit get their fitted perturbation, the others what the method does for
an unseen case: for UMed the distilled generators' one pass plus ``refine_steps``), and the victim trained on all
written files is judged on the clean test list (release protocol). PSNR is reported for the seen and the unseen
cases separately::

    python benchmarks/unseen.py ../shared/data/kvasir_seg --fit-cases 400 --out /tmp/unseen_kvasir
    python benchmarks/unseen.py ../shared/data/kvasir_seg --fit-cases 100 --max-train 200 --epochs 20 \
        --param refine_steps=10 --out /tmp/unseen_small
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from efficacy import parse_params, subset_dataset  # noqa: E402

from monai_umed import protectors  # noqa: E402
from monai_umed.data.datalist import load_dataset  # noqa: E402
from monai_umed.errors import InputError  # noqa: E402
from monai_umed.evaluation import evaluate  # noqa: E402
from monai_umed.evaluation.report import fmt, markdown_table, write_json, write_markdown  # noqa: E402
from monai_umed.intensity import parse_epsilon  # noqa: E402
from monai_umed.pipeline import load_case, protect_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", type=Path)
    ap.add_argument("--method", default="umed")
    ap.add_argument("--fit-cases", type=int, required=True, help="fit on the first N training cases")
    ap.add_argument("--max-train", type=int, default=None, help="protect and train on the first N training cases")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="protector parameter")
    ap.add_argument("--epsilon", type=parse_epsilon, default=8 / 255)
    ap.add_argument("--protect-epochs", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None, help="victim epochs (default: the judge's)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", default="auto")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except InputError as e:
        print(f"unseen: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    params = parse_params([f"{args.method}.{p}" for p in args.param], [args.method])[args.method]
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = args.dataset if args.max_train is None else subset_dataset(args.dataset, args.out / "dataset",
                                                                           args.max_train)
    spec = load_dataset(str(dataset))
    train = [c for c in spec.cases if c.split == "training"]
    if not 0 < args.fit_cases < len(train):
        raise InputError(f"--fit-cases must lie in 1..{len(train) - 1} (the training list has {len(train)})")
    t0 = time.perf_counter()
    settings = {"epsilon": args.epsilon, "seed": args.seed, "device": args.device, "epochs": args.protect_epochs,
                **params}
    protector = protectors.get(args.method, **settings)
    samples = []
    for c in train[: args.fit_cases]:
        lc = load_case(spec, c)
        samples.append({"image": lc.tensor, "label": lc.label, "case_id": c.case_id, "meta": lc.image.meta})
    protector.fit(samples, progress=True)
    fit_s = time.perf_counter() - t0
    del samples
    out = args.out / "protected"
    summary = protect_dataset(dataset, out, protector=protector, epsilon=args.epsilon, split="training",
                              seed=args.seed, device=args.device, key=args.out / "protected.umedkey")
    protect_s = time.perf_counter() - t0 - fit_s
    threads = args.threads if args.threads == "auto" else int(args.threads)
    rep = evaluate(dataset, out, epochs=args.epochs, seed=args.seed, image_size=args.image_size, device=args.device,
                   cache_dir=args.cache_dir, threads=threads, report=args.out / "eval.json", epsilon=args.epsilon)
    per = rep["imperceptibility"]["per_case"]
    seen, unseen = per[: args.fit_cases], per[args.fit_cases:]

    def mean(rows, k):
        v = [r[k] for r in rows if r[k] is not None and r[k] != float("inf")]
        return sum(v) / len(v) if v else None

    row = [args.method, len(train), args.fit_cases, fmt(mean(seen, "psnr")), fmt(mean(unseen, "psnr")),
           fmt(min(r["psnr"] for r in per)), fmt(rep["dice_clean"], 2, pct=True), fmt(rep["dice_protected"], 2, pct=True),
           fmt(rep["loss_end_clean"], 4), fmt(rep["loss_end_protected"], 4), fmt(fit_s, 0), fmt(protect_s, 0)]
    text = (f"Unseen cases on `{args.dataset}` (release protocol, victim unet, {rep['epochs']} epochs, "
            f"{args.image_size} px, seed {args.seed}; params {params})\n\n" + markdown_table(
                ["method", "training cases", "fitted on", "PSNR seen", "PSNR unseen", "PSNR min",
                 "Dice clean victim (%)", "Dice protected victim (%)", "final loss clean", "final loss protected",
                 "fit (s)", "protect (s)"], [row]) + "\n")
    print(text)
    write_markdown(text, args.out / "unseen.md")
    write_json({"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "report": str(
        args.out / "eval.json"), "fit_seconds": fit_s, "protect_seconds": protect_s}, args.out / "unseen.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
