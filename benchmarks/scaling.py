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

"""Cases per second of ``protect`` with 1, 2, ... processes under torchrun.

For every method and process count this launches ``python -m torch.distributed.run --nproc_per_node N`` on this
machine (loopback, gloo, CPU) with this script as the worker, which runs :func:`monai_umed.pipeline.protect_dataset`
on the whole dataset (``--split all``). Fitted methods are fitted once beforehand, in this process (``--fit-cases``
training cases, ``--epochs`` passes; fitting is not what is measured, and under torchrun it runs on rank 0 alone
whatever the number of processes), and every run protects with that state. Every process gets
``--threads-per-process`` intra-op threads (default 1, torchrun's own default), so N processes use N cores and the
outputs of all runs can be compared bit for bit (float results depend on the thread count).

Reported per run: ``job s`` (``protect_dataset`` from its start to the renamed output: loading, perturbation,
writing, fragments, manifest and key; after interpreter start-up and rendezvous), ``cases/s`` = cases / job s,
``wall s`` (the whole torchrun command, start-up included), the speed-up over one process, the CPU seconds each
rank spent in ``protect_dataset`` and ``cases/CPU-s`` (cases / CPU seconds of the busiest rank: the throughput with
one free core per process, which a busy shared machine does not give), and whether the protected arrays equal
those of the one-process run.

Example::

    python benchmarks/scaling.py                       # ../shared/data/hippocampus, noise (+ umed), 1 and 2 processes
    python benchmarks/scaling.py --methods noise --nprocs 1 2 4 --dataset /data/Task04_Hippocampus
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hippocampus"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(args: argparse.Namespace) -> None:
    """One process of a torchrun job: protect the dataset; rank 0 writes the summary."""
    import torch

    from monai_umed import protectors
    from monai_umed.pipeline import protect_dataset

    params = json.loads(args.params)
    protector = protectors.get(args.method, **params)
    if args.state:
        protector.load_state_dict(torch.load(args.state, map_location="cpu", weights_only=False))
    from monai_umed import distributed

    cpu0 = time.process_time()
    s = protect_dataset(args.dataset, args.out, protector=protector, progress=False)
    cpu = distributed.all_gather_object(time.process_time() - cpu0)
    if distributed.is_main():
        Path(args.result).write_text(json.dumps({**s, "cpu_per_rank": cpu}, default=str))


def _fit(method: str, params: dict[str, Any], dataset: Path, n_cases: int, path: Path) -> float:
    """Fit ``method`` on the first ``n_cases`` training cases, save its state; returns seconds."""
    import torch

    from monai_umed import protectors
    from monai_umed.data.datalist import load_dataset
    from monai_umed.pipeline import load_case

    spec = load_dataset(dataset)
    train = [c for c in spec.cases if c.split == "training"][:n_cases]
    items = [load_case(spec, c) for c in train]
    samples = [{"image": it.tensor, "label": it.label, "case_id": it.case.case_id} for it in items]
    t0 = time.time()
    p = protectors.get(method, **params).fit(samples, progress=False)
    seconds = time.time() - t0
    torch.save(p.state_dict(), path)
    return seconds


def _run(method: str, params: dict[str, Any], state: Path | None, nproc: int, threads: int, dataset: Path,
         work: Path) -> dict[str, Any]:
    out, result = work / f"{method}-{nproc}", work / f"{method}-{nproc}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(Path(__file__).resolve()), "--worker", "--method", method,
           "--params", json.dumps(params), "--dataset", str(dataset), "--out", str(out), "--result", str(result)]
    if state is not None:
        cmd += ["--state", str(state)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads)),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"{method} with {nproc} processes failed:\n{r.stderr[-4000:]}")
    s = json.loads(result.read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    arrays = [c.get("array_sha256_protected") for c in manifest["cases"]]
    return {"method": method, "nproc": nproc, "cases": s["protected"], "job_s": float(s["seconds"]), "wall_s": wall,
            "arrays": arrays, "psnr_mean": s["psnr_mean"], "cpu": [float(c) for c in s["cpu_per_rank"]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--methods", nargs="+", default=None, help="default: noise, and umed when registered")
    parser.add_argument("--nprocs", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--threads-per-process", type=int, default=1, help="intra-op threads of each process")
    parser.add_argument("--epochs", type=int, default=1, help="fitting passes of fitted methods (not measured)")
    parser.add_argument("--fit-cases", type=int, default=32, help="training cases for fitting (not measured)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the protected copies")
    # worker mode, used by the torchrun jobs this script starts
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--state", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0

    sys.path.insert(0, str(REPO))
    from monai_umed import protectors

    if not (args.dataset / "dataset.json").is_file():
        raise SystemExit(f"{args.dataset}: no dataset.json (pass --dataset)")
    methods = args.methods or ["noise"] + (["umed"] if "umed" in protectors.names() else [])
    work = args.workdir or Path(tempfile.mkdtemp(prefix="monai-umed-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"dataset {args.dataset}, {os.cpu_count()} CPU cores, {args.threads_per_process} thread(s) per process, "
              f"load average {load:.1f} at start")
        rows = []
        for method in methods:
            params: dict[str, Any] = {"seed": 0, "device": "cpu"}
            state = None
            if protectors.get(method).fits:
                params["epochs"] = args.epochs
                state = work / f"{method}.pt"
                secs = _fit(method, params, args.dataset, args.fit_cases, state)
                print(f"{method}: fitted once in {secs:.1f} s ({args.fit_cases} cases, {args.epochs} epoch(s)); "
                      "every run below protects with that state")
            for n in args.nprocs:
                rows.append(_run(method, params, state, n, args.threads_per_process, args.dataset, work))
                r = rows[-1]
                print(f"  {method} x{n}: {r['cases']} cases in {r['job_s']:.1f} s", flush=True)
        print(f"\n{'method':8} {'procs':>5} {'cases':>6} {'job s':>8} {'cases/s':>8} {'speed-up':>8} {'wall s':>8} "
              f"{'CPU s per rank':>16} {'cases/CPU-s':>11} {'same arrays':>11}")
        for r in rows:
            base = next(b for b in rows if b["method"] == r["method"] and b["nproc"] == min(args.nprocs))
            cpu = "/".join(f"{c:.0f}" for c in r["cpu"])
            print(f"{r['method']:8} {r['nproc']:5d} {r['cases']:6d} {r['job_s']:8.1f} {r['cases'] / r['job_s']:8.2f} "
                  f"{base['job_s'] / r['job_s']:8.2f} {r['wall_s']:8.1f} {cpu:>16} {r['cases'] / max(r['cpu']):11.2f} "
                  f"{'yes' if r['arrays'] == base['arrays'] else 'NO':>11}")
        print("\ncases/CPU-s: cases / CPU seconds of the busiest rank, i.e. the throughput with one free core per "
              "process (independent of other load on the machine); job s and cases/s are wall-clock figures.")
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
