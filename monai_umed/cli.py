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

"""The ``monai-umed`` command: protect, restore, verify, demo, methods (and evaluate and check, from the evaluation
package).

Bad input ends with one line ``monai-umed: error: <file>: <cause>`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

from monai_umed import __version__
from monai_umed.errors import InputError

__all__ = ["main", "build_parser", "parse_param"]

# sub-commands that live with their feature; each module exposes add_command(subparsers)
_EXTRA_COMMANDS = ("monai_umed.evaluation.command", "monai_umed.evaluation.check")
_FRACTION = re.compile(r"^\s*-?\d+(\.\d*)?\s*/\s*\d+(\.\d*)?\s*$")


def parse_param(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> ``(key, value)``; the value is read as JSON (numbers, booleans, lists) or a fraction
    such as ``8/255``, else kept as a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip().replace("-", "_")
    if _FRACTION.match(value):
        num, den = value.split("/")
        return key, float(num) / float(den)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _add_protect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("protect", help="protect a dataset: write a protected copy, its manifest and its key",
                       description="Protect DATASET (MSD dataset.json, images/+labels/ folder, or DICOM series) into "
                       "the new folder OUTPUT, in the source formats, with manifest.json and a restoration key.")
    p.add_argument("dataset", help="dataset.json, its folder, an images/+labels/ folder or a folder of DICOM series")
    p.add_argument("output", help="new output folder (must not exist, must not lie inside DATASET)")
    p.add_argument("--method", default="noise", help="protection method (see `monai-umed methods`)")
    p.add_argument("--key", default=None, help="key file (default: OUTPUT.umedkey beside OUTPUT)")
    p.add_argument("--epsilon", default="8/255", help="L-inf budget: 8/255 or a float in normalised units")
    p.add_argument("--epochs", type=int, default=None, help="bound on fitting (ignored by methods that fit nothing)")
    p.add_argument("--param", action="append", type=parse_param, default=[], metavar="KEY=VALUE",
                   help="method-specific setting (repeatable)")
    p.add_argument("--contour-radius", type=float, default=None, help="UMed contour band radius (pixels/voxels)")
    p.add_argument("--theta", type=float, default=None, help="UMed CDC theta in [0, 1]")
    p.add_argument("--split", choices=("all", "training"), default="all",
                   help="all: protect every listed image (default); training: protect the training list, copy the rest")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--intensity", default="auto", choices=("auto", "dtype", "window", "minmax", "percentile"),
                   help="native -> [0, 1] mapping (METHODS.md section 0)")
    p.add_argument("--new-uids", action="store_true", help="DICOM: give written files new SOPInstanceUIDs")
    p.add_argument("--batch-size", type=int, default=8, help="cases per perturbation batch")
    p.add_argument("--io-threads", type=int, default=None, metavar="N",
                   help="threads that decode ahead and write behind the perturbation (default: one per core, at "
                   "most 4; 0: none); the output is the same bytes whatever N")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run with the same settings "
                   "(a run that already completed with them: check its key and succeed)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_protect)


def _run_protect(args: argparse.Namespace) -> int:
    from monai_umed.pipeline import protect_dataset

    params = dict(args.param)
    if args.contour_radius is not None:
        params["contour_radius"] = args.contour_radius
    if args.theta is not None:
        params["theta"] = args.theta
    try:
        from monai_umed.intensity import parse_epsilon

        eps = parse_epsilon(args.epsilon)
    except ValueError as e:
        raise InputError(str(e)) from e
    summary = protect_dataset(
        args.dataset, args.output, args.method, key=args.key, epsilon=eps, epochs=args.epochs, params=params,
        split=args.split, device=args.device, seed=args.seed, resume=args.resume, progress=not args.quiet,
        intensity=args.intensity, new_uids=args.new_uids, batch_size=args.batch_size, io_threads=args.io_threads,
    )
    if summary.get("rank", 0):  # under torchrun, rank 0 reports for the whole job
        return 0
    if summary.get("already_complete"):
        print(f"already complete: {summary['output']} and its key match these settings and check out in full "
              f"({summary['protected']} of {summary['cases']} images protected with {summary['method']}); "
              "nothing to do")
        _print_written(summary)
        _warn_unfitted(summary, args.dataset)
        return 0
    if summary["jpeg_as_png"]:
        print(f"notice: {summary['jpeg_as_png']} JPEG image(s) were written as lossless PNG (JPEG would destroy the "
              "perturbation); dataset.json points at the .png files", file=sys.stderr)
    print(f"protected {summary['protected']} of {summary['cases']} images with {summary['method']} "
          f"(PSNR mean {summary['psnr_mean']:.2f} dB, min {summary['psnr_min']:.2f} dB, "
          f"max |delta| {summary['max_abs_delta']:.4g} native units) in {summary['seconds']:.1f} s")
    _print_written(summary)
    _warn_unfitted(summary, args.dataset)
    return 0


def _warn_unfitted(summary: dict[str, Any], dataset: str) -> None:
    """Say so when the release stage's surrogate never learnt the perturbed training set (``fit_report``): on all but
    one of the copies judged where that happened, victims learnt the real task."""
    fit = summary.get("fit") or {}
    if fit.get("reached_stop", True):
        return
    print(f"warning: the release stage's surrogate reached a training Dice of only {fit['dice'][-1]:.2f} on the "
          f"protected training set after {fit['rounds']} round(s) (it stops at {fit['stop_dice']:.2f}, once the "
          "perturbation is what it learns first); on all but one of the copies judged where this happened, victims "
          "learnt the real task from the protected files (docs/evaluation.md). Judge this copy before you publish it: "
          f"monai-umed check {summary['output']} --clean {dataset}", file=sys.stderr)


def _print_written(summary: dict[str, Any]) -> None:
    print(f"output:   {summary['output']}\nmanifest: {summary['manifest']}\nkey:      {summary['key']} (keep it private)")


def _add_restore(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("restore", help="rebuild the original dataset from a protected copy and its key")
    p.add_argument("protected", help="protected dataset folder")
    p.add_argument("key", help="its key file")
    p.add_argument("output", help="new folder for the restored dataset")
    p.add_argument("--skip-damaged", action="store_true",
                   help="with a damaged key, restore every other case and list those that could not be restored "
                   "(exit code 2 when any was left out)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_restore)


def _run_restore(args: argparse.Namespace) -> int:
    from monai_umed.key import restore_dataset

    s = restore_dataset(args.protected, args.key, args.output, progress=not args.quiet, skip_damaged=args.skip_damaged)
    for line in s["warnings"]:
        print(f"monai-umed: warning: {args.key}: {line}; restoring does not need it, but replace this key with a "
              "good copy", file=sys.stderr)
    for line in s["problems"]:
        print(f"monai-umed: error: {args.key}: {line}: not restored", file=sys.stderr)
    if s["skipped"]:
        print(f"restored {s['restored']} images bit for bit into {s['output']}; {len(s['skipped'])} of {s['cases']} "
              f"cases NOT restored (damaged key): {', '.join(s['skipped'])}")
        return 2
    print(f"restored {s['restored']} images ({s['cases']} cases) bit for bit into {s['output']}")
    return 0


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a whole key and that it belongs to a protected dataset",
                       description="Check every part of KEY (each case's delta, the fitted protector, key.json) and "
                       "that every protected file in PROTECTED matches it; name each damaged or mismatching case.")
    p.add_argument("protected")
    p.add_argument("key")
    p.add_argument("--quick", action="store_true",
                   help="only check key.json against the protected files (a damaged delta goes unnoticed)")
    p.set_defaults(func=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    from monai_umed.key import check_key, verify_key

    if args.quick:
        record = verify_key(args.protected, args.key)
        how = "quick check: key.json only, the deltas were not read"
    else:
        report = check_key(args.protected, args.key)
        report.raise_for_problems(args.key)
        record = report.record
        how = "full check: every delta intact"
    print(f"key matches: {len(record['cases'])} cases, method {record['method']}, fingerprint "
          f"{record['fingerprint'][:16]} ({how})")
    return 0


def _add_methods(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the protection methods of this installation")
    p.set_defaults(func=lambda args: print("\n".join(__import__("monai_umed.protectors", fromlist=["names"]).names())) or 0)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="protect and restore embedded synthetic 2D and 3D datasets")
    p.add_argument("--output", default=None, help="folder for the demo (default: a new temporary folder)")
    p.add_argument("--method", default="noise")
    p.add_argument("--epsilon", default="4/255")
    p.add_argument("--epochs", type=int, default=None)
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from monai_umed.data.datalist import load_dataset
    from monai_umed.data.formats import codec_for
    from monai_umed.data.synthetic import make_demo_dataset
    from monai_umed.intensity import parse_epsilon
    from monai_umed.key import restore_dataset
    from monai_umed.pipeline import protect_dataset

    root = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="monai-umed-demo-"))
    if root.exists() and any(root.iterdir()):
        raise InputError("demo output folder is not empty", root)
    rows = []
    for sd, rgb in ((2, True), (3, False)):
        data = make_demo_dataset(root / f"data{sd}d", spatial_dims=sd, rgb=rgb, num_classes=1 if sd == 2 else 2)
        out = root / f"protected{sd}d"
        s = protect_dataset(data, out, args.method, epsilon=parse_epsilon(args.epsilon), epochs=args.epochs, progress=False)
        r = restore_dataset(out, s["key"], root / f"restored{sd}d", progress=False)
        spec, exact = load_dataset(data), True
        for c in spec.cases:
            a = codec_for(str(data / c.image)).read(str(data / c.image)).array
            b = codec_for(str(Path(r["output"]) / c.image)).read(str(Path(r["output"]) / c.image)).array
            exact &= a.dtype == b.dtype and np.array_equal(a, b)
        rows.append((f"{sd}D {'RGB PNG' if sd == 2 else 'NIfTI (2 classes)'}", s["protected"], s["psnr_mean"],
                     s["max_abs_delta"], "yes" if exact else "NO", s["seconds"]))
    print(f"monai-umed {__version__} demo, method {args.method}, epsilon {args.epsilon}, in {root}\n")
    print(f"{'dataset':24} {'images':>6} {'PSNR dB':>8} {'max|d|':>7} {'exact restore':>14} {'seconds':>8}")
    for name, n, psnr, md, ok, sec in rows:
        print(f"{name:24} {n:6d} {psnr:8.2f} {md:7.3g} {ok:>14} {sec:8.1f}")
    print(f"\nprotected copies: {root}/protected2d, {root}/protected3d (keys beside them, *.umedkey)")
    return 0 if all(r[4] == "yes" for r in rows) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monai-umed", description="Unlearnable medical segmentation datasets for MONAI.")
    parser.add_argument("--version", action="version", version=f"monai-umed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_protect, _add_restore, _add_verify, _add_demo, _add_methods):
        add(sub)
    for name in _EXTRA_COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.add_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``monai-umed``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("once", UserWarning)
            warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
            return int(args.func(args) or 0)
    except InputError as e:
        for line in getattr(e, "problems", []):  # a key check: one line per damaged or mismatching case or part
            print(f"monai-umed: error: {line}", file=sys.stderr)
        print(f"monai-umed: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("monai-umed: interrupted; run the same command with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
