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

"""Speed and memory of ``protect`` and of victim training: one table, CPU and (when CUDA is present) GPU.

Rows:

- ``floor``: a plain decode + encode of the same images: PIL decodes each Kvasir JPEG, PIL encodes it as PNG (the
  codec's settings) into a file. It is measured in the worker of each ``protect`` run that is compared with it, once
  right before and once right after the run, and averaged: floor and run share the machine's load.
- ``protect METHOD (apply)``: :func:`monai_umed.pipeline.protect_dataset` on the Kvasir subset (``--cases`` training
  images) with a method that fits nothing, or with an already fitted protector (its state read back from the key of
  the ``fit + apply`` run); cases/s, ``of floor`` = floor seconds / protect seconds (1 = as fast as the floor) and
  ``CPU`` = the same with CPU seconds (all threads): the ratio a machine with no spare core gives, since the I/O
  threads overlap decoding and writing with the perturbation only where a core is free.
- ``protect METHOD (fit + apply)``: the same with fitting (``--fit-epochs``, ``--param``), cases/s over the whole run.
- ``victim``: seconds per epoch of the evaluation's victim (:func:`monai_umed.evaluation.train.train_victim`, UNet)
  on the Kvasir subset resized to 128 and 256 px and on ``--cases-3d`` Hippocampus volumes at their own size,
  averaged over ``--victim-epochs`` epochs. On CUDA the victim takes its on-device data path (training cache on the
  GPU, ``ThreadDataLoader``, random transforms on the GPU); ``--victim-fast`` takes that path on the CPU as well (it
  draws the same samples; the rows are then labelled ``fast path``).
- ``CT``: a synthetic 512 x 512 x 300 int16 CT (HU, a spherical label; made here) protected with UMed with the
  generators alone (``refine_rounds=0``: the refinement stage is far too slow for such a volume on a CPU) and one
  fitting epoch; seconds and peak host memory.

Every row runs in its own process (this script with ``--worker``), timed after its imports, so that its peak host
memory is its own: the maximum resident set of that process (``wait4``), which includes the interpreter, PyTorch and
MONAI (about 0.3 GB). Peak device memory is ``torch.cuda.max_memory_allocated``. Threads: whatever the environment
sets (``OMP_NUM_THREADS``); the I/O threads of ``protect`` are its default (one per core, at most 4).

Example::

    OMP_NUM_THREADS=1 python benchmarks/speed.py                      # Kvasir 100 + Hippocampus 32 + the CT case
    python benchmarks/speed.py --skip-ct --skip-victims --cases 200   # protect rows only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
GB = 1e9


# -- data -----------------------------------------------------------------------------------------------------------
def make_kvasir_subset(source: Path, root: Path, n: int) -> Path:
    """Copy the first ``n`` training cases of an MSD-style 2D dataset (Kvasir-SEG) into ``root`` with a dataset.json."""
    meta = json.loads((source / "dataset.json").read_text())
    cases = meta["training"][:n]
    for case in cases:
        for k in ("image", "label"):
            (root / case[k]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / case[k], root / case[k])
    sub = {k: v for k, v in meta.items() if k not in ("training", "validation", "test")}
    (root / "dataset.json").write_text(json.dumps({**sub, "training": cases}, indent=1))
    return root


def _floor(dataset: Path, scratch: Path) -> tuple[float, float]:
    """Seconds (wall, CPU) to decode every training image of ``dataset`` with PIL and encode it as PNG into a file."""
    import numpy as np
    from PIL import Image

    images = [dataset / c["image"] for c in json.loads((dataset / "dataset.json").read_text())["training"]]
    scratch.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    for i, path in enumerate(images):
        with Image.open(path) as im:
            a = np.asarray(im)
        Image.fromarray(a).save(scratch / f"{i:06d}.png", format="PNG")
    seconds = time.perf_counter() - t0, time.process_time() - c0
    shutil.rmtree(scratch, ignore_errors=True)
    return seconds


def _fitted(key: Path, method: str, device: str) -> Any:
    """The fitted protector stored in a key."""
    import io

    import torch

    from monai_umed import protectors
    from monai_umed.key import read_protector_state

    state = read_protector_state(key)
    if state is None:
        raise SystemExit(f"{key}: holds no fitted protector")
    return protectors.get(method, device=device).load_state_dict(
        torch.load(io.BytesIO(state), map_location="cpu", weights_only=False))


def _protect_row(args: argparse.Namespace) -> dict[str, Any]:
    from monai_umed import protectors
    from monai_umed.pipeline import protect_dataset

    work, dataset = Path(args.workdir), Path(args.dataset)
    params = json.loads(args.params)
    out = work / f"{args.method}-{args.kind}-{args.device}"
    protector = _fitted(work / f"{args.method}-fit-{args.device}.umedkey", args.method, args.device) \
        if args.kind == "apply" and protectors.get(args.method).fits else None
    floor0 = _floor(dataset, work / "floor") if args.kind == "apply" else None
    cpu0 = time.process_time()
    s = protect_dataset(dataset, out, args.method, epochs=args.fit_epochs, params=params, device=args.device,
                        progress=False, protector=protector)
    cpu = time.process_time() - cpu0
    floor1 = _floor(dataset, work / "floor") if args.kind == "apply" else None
    shutil.rmtree(out, ignore_errors=True)
    if args.kind == "apply":  # a fit row's key stays: it holds the fitted protector of the apply row
        Path(s["key"]).unlink(missing_ok=True)
    result = {"cases": s["protected"], "seconds": s["seconds"], "cpu_seconds": cpu, "psnr_mean": s["psnr_mean"]}
    if floor0 is not None and floor1 is not None:
        result["floor_seconds"] = (floor0[0] + floor1[0]) / 2
        result["floor_cpu_seconds"] = (floor0[1] + floor1[1]) / 2
    return result


def _victim_row(args: argparse.Namespace) -> dict[str, Any]:
    from monai_umed.evaluation.train import describe_data, load_split, make_config, train_victim

    size = int(args.size) if args.size else None
    train = load_split(args.dataset, "training")[: args.cases]
    cfg = make_config("unet", describe_data(args.dataset, train, size), epochs=args.epochs, image_size=size)
    _, info = train_victim(train, cfg, device=args.device, use_cache=False, progress=False,
                           fast=True if args.fast else None)
    return {"cases": len(train), "epoch_seconds": info["epoch_seconds"], "load_seconds": info["load_seconds"],
            "patch": list(cfg.patch_size), "batch": cfg.batch_size, "fast": info["fast"]}


def _ct_row(args: argparse.Namespace) -> dict[str, Any]:
    from monai_umed.pipeline import protect_dataset

    out = Path(args.workdir) / f"ct-{args.device}"
    s = protect_dataset(args.dataset, out, "umed", epochs=args.fit_epochs, params=json.loads(args.params),
                        device=args.device, progress=False)
    shutil.rmtree(out, ignore_errors=True)
    Path(s["key"]).unlink(missing_ok=True)
    return {"cases": s["protected"], "seconds": s["seconds"], "psnr_mean": s["psnr_mean"]}


def _worker(args: argparse.Namespace) -> None:
    import torch

    import monai.transforms  # noqa: F401  (start-up is not what is measured)
    from monai_umed import pipeline  # noqa: F401

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    row = {"protect": _protect_row, "victim": _victim_row, "ct": _ct_row}[args.worker](args)
    row["device_peak_gb"] = torch.cuda.max_memory_allocated() / GB if cuda else None
    row["torch_threads"] = torch.get_num_threads()
    Path(args.result).write_text(json.dumps(row))


# -- driver ---------------------------------------------------------------------------------------------------------
def _run_worker(label: str, argv: list[str], result: Path) -> dict[str, Any]:
    """Run one row in its own process; returns its result with its wall time and peak resident memory."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv, "--result", str(result)], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{label}: worker failed with exit code {proc.returncode}")
    row = json.loads(result.read_text())
    row.update(wall_seconds=time.perf_counter() - t0, host_peak_gb=usage.ru_maxrss * 1024 / GB,
               process_cpu_seconds=usage.ru_utime + usage.ru_stime)
    print(f"  {label}: done in {row['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
    return row


def _cell(row: dict[str, Any] | None, kind: str) -> str:
    if row is None:
        return "-"
    if kind == "cases":
        text = f"{row['cases'] / row['seconds']:.2f} cases/s"
        if "floor_seconds" in row:
            text += (f" ({row['floor_seconds'] / row['seconds']:.2f} of floor; CPU "
                     f"{row['floor_cpu_seconds'] / row['cpu_seconds']:.2f})")
        return text
    if kind == "floor":
        return f"{row['cases'] / row['floor_seconds']:.2f} cases/s"
    if kind == "epoch":
        e = row["epoch_seconds"]
        return f"{sum(e) / len(e):.2f} s/epoch"
    return f"{row['seconds']:.0f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kvasir", type=Path, default=SHARED / "kvasir_seg", help="Kvasir-SEG (MSD layout)")
    parser.add_argument("--hippocampus", type=Path, default=SHARED / "hippocampus", help="3D dataset for the victim")
    parser.add_argument("--cases", type=int, default=100, help="Kvasir training images protected and trained on")
    parser.add_argument("--cases-3d", type=int, default=32, help="Hippocampus volumes the 3D victim trains on")
    parser.add_argument("--methods", default="noise,umed", help="comma-separated; fitted ones get both rows")
    parser.add_argument("--fit-epochs", type=int, default=1, help="fitting epochs of fitted methods")
    parser.add_argument("--param", action="append", default=None, metavar="KEY=VALUE",
                        help="UMed setting for the Kvasir rows (repeatable; default refine_rounds=0)")
    parser.add_argument("--victim-epochs", type=int, default=2, help="epochs timed per victim")
    parser.add_argument("--victim-fast", action="store_true",
                        help="victims take the on-device data path (ThreadDataLoader) on the CPU too (CUDA's default)")
    parser.add_argument("--ct-shape", type=int, nargs=3, default=(512, 512, 300))
    parser.add_argument("--devices", default="auto", help="auto (cpu, and cuda when present) or e.g. cpu")
    parser.add_argument("--skip-ct", action="store_true")
    parser.add_argument("--skip-victims", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write every row's measurements here")
    parser.add_argument("--ct-params", default='{"refine_rounds": 0}', help="UMed settings of the CT row (JSON)")
    # worker mode: one row, started by the driver
    for name in ("--worker", "--method", "--kind", "--dataset", "--device", "--result", "--size"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--fast", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0

    sys.path.insert(0, str(REPO))
    import torch

    from monai_umed import protectors
    from monai_umed.cli import parse_param
    from monai_umed.io_pool import default_io_threads

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto" else \
        args.devices.split(",")
    methods = [m for m in args.methods.split(",") if m]
    umed_params = dict(parse_param(p) for p in (args.param or ["refine_rounds=0"]))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="monai-umed-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    kvasir = make_kvasir_subset(args.kvasir, work / "kvasir", args.cases)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    order: list[str] = []

    def run(key: str, device: str, argv: list[str]) -> None:
        if key not in order:
            order.append(key)
        rows[(key, device)] = _run_worker(f"{key} [{device}]", [*argv, "--device", device, "--workdir", str(work)],
                                          work / f"{len(rows):03d}.json")

    try:
        for device in devices:
            for method in methods:
                fits = protectors.get(method).fits
                params = json.dumps(umed_params if method == "umed" else {})
                base = ["--worker", "protect", "--method", method, "--dataset", str(kvasir), "--params", params,
                        "--fit-epochs", str(args.fit_epochs)]
                if fits:
                    run(f"protect {method} (fit + apply)", device, [*base, "--kind", "fit"])
                run(f"protect {method} (apply{', fitted' if fits else ''})", device, [*base, "--kind", "apply"])
            if not args.skip_victims:
                fast = (", fast path", ["--fast"]) if args.victim_fast else ("", [])
                for size in (128, 256):
                    run(f"victim UNet 2D {size} px, {args.cases} images{fast[0]}", device,
                        ["--worker", "victim", "--dataset", str(args.kvasir), "--size", str(size), "--cases",
                         str(args.cases), "--epochs", str(args.victim_epochs), *fast[1]])
                run(f"victim UNet 3D native, {args.cases_3d} Hippocampus volumes{fast[0]}", device,
                    ["--worker", "victim", "--dataset", str(args.hippocampus), "--cases", str(args.cases_3d),
                     "--epochs", str(args.victim_epochs), *fast[1]])
            if not args.skip_ct:
                ct = work / "ct"
                if not (ct / "dataset.json").is_file():
                    from monai_umed.data.synthetic import make_synthetic_ct

                    make_synthetic_ct(ct, tuple(args.ct_shape))
                settings = "(generators, 1 epoch)" if json.loads(args.ct_params) == {"refine_rounds": 0} else \
                    f"{args.ct_params}, 1 epoch"
                run(f"CT {'x'.join(map(str, args.ct_shape))} int16, umed {settings}", device,
                    ["--worker", "ct", "--dataset", str(ct), "--params", args.ct_params, "--fit-epochs", "1"])
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    load1 = os.getloadavg()

    first = next(iter(rows.values()))
    print(f"\nmonai-umed speed: {os.cpu_count()} cores, load average {load0[0]:.2f} at start and {load1[0]:.2f} at end;"
          f" torch {torch.__version__}, {first['torch_threads']} torch thread(s) (OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}), {default_io_threads()} I/O thread(s)")
    print(f"Kvasir: {args.cases} training images (352x352 RGB JPEG); fitted methods: {args.fit_epochs} epoch(s), "
          f"umed {json.dumps(umed_params)}; victims: {args.victim_epochs} epoch(s)\n")
    kinds = {"floor": "floor", "protect": "cases", "victim": "epoch", "CT": "seconds"}
    head = ["measurement"] + [h for d in devices for h in (d.upper(), "peak host") + (("peak device",) if d == "cuda"
                                                                                        else ())]
    lines = [head, ["---"] * len(head)]
    floor_row = next((rows[(k, "cpu")] for k in order if (k, "cpu") in rows and "floor_seconds" in rows[(k, "cpu")]),
                     None)
    if floor_row is not None:
        lines.append(["floor: PIL decode + PNG encode (same images)", _cell(floor_row, "floor"), "-"]
                     + ["-"] * (len(head) - 3))
    for key in order:
        line = [key]
        for d in devices:
            row = rows.get((key, d))
            line += [_cell(row, kinds[key.split()[0]]), f"{row['host_peak_gb']:.2f} GB" if row else "-"]
            if d == "cuda":
                line.append(f"{row['device_peak_gb']:.2f} GB" if row and row["device_peak_gb"] is not None else "-")
        lines.append(line)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    for r in lines:
        cells = ["-" * w if c == "---" else c.ljust(w) for c, w in zip(r, widths)]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        measured = {f"{k} [{d}]": v for (k, d), v in rows.items()}
        args.json.write_text(json.dumps({"load": [load0, load1], "rows": measured}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
