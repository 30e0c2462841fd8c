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

"""3D scaling of UMed's defaults: peak host memory and time against voxels per volume and against cases.

Every row runs ``monai-umed protect DATA OUT --method umed`` exactly as a user would (no ``--epochs``, no
``--param``) in its own process, on synthetic int16 CTs (:func:`monai_umed.data.synthetic.make_synthetic_ct`: air,
an elliptic body, noise, a sphere of ``--radius`` voxels as the label, gzip-compressed NIfTI). The peak resident
memory is the command's own (``os.wait4``), the time its wall clock from start to exit (interpreter start-up
included). Rows:

- one case at each of ``--shapes`` (default 128^3, 256^3, 512 x 512 x 300 and 512 x 512 x 600; the same sphere in
  each, so the volume grows around the same labelled structure);
- ``--cases`` cases (default 1, 4 and 16) of ``--case-shape`` (512 x 512 x 300).

Also printed: the marginal cost of a case from the cases rows (seconds and GB per added case) and what a dataset of
``--project`` cases (default 500) would take at that pace on this machine. The table goes to stdout (Markdown) and,
with ``--json``, to a file.

Example::

    OMP_NUM_THREADS=1 python benchmarks/scaling_3d.py --workdir /tmp/scaling3d --json scaling3d.json
    python benchmarks/scaling_3d.py --shapes 96x96x96 160x160x160 --cases 1 2 --case-shape 160x160x160   # quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GB = 1e9


def _shape(text: str) -> tuple[int, int, int]:
    parts = tuple(int(v) for v in text.lower().split("x"))
    if len(parts) != 3 or min(parts) < 8:
        raise argparse.ArgumentTypeError(f"a volume shape is AxBxC with sides >= 8, got {text!r}")
    return parts  # type: ignore[return-value]


def protect_row(data: Path, out: Path) -> dict[str, Any]:
    """``monai-umed protect data out --method umed`` in its own process: wall seconds, peak RSS, exit status and
    the written files' PSNR (from the manifest)."""
    for p in (out, Path(f"{out}.partial"), Path(f"{out}.umedkey.parts")):  # a fresh run, also after an interrupted one
        shutil.rmtree(p, ignore_errors=True)
    for p in (Path(f"{out}.umedkey"), Path(f"{out}.lock")):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    cmd = [sys.executable, "-m", "monai_umed", "protect", str(data), str(out), "--method", "umed"]
    t0 = time.perf_counter()
    with open(f"{out}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    row: dict[str, Any] = {"seconds": seconds, "peak_gb": usage.ru_maxrss * 1024 / GB, "exit": proc.returncode,
                           "cpu_seconds": usage.ru_utime + usage.ru_stime}
    manifest = out / "manifest.json"
    if manifest.is_file():
        cases = json.loads(manifest.read_text())["cases"]
        psnrs = [c["psnr"] for c in cases if c.get("psnr") is not None and math.isfinite(c["psnr"])]
        row.update(cases=len(cases), psnr_mean=sum(psnrs) / max(len(psnrs), 1), psnr_min=min(psnrs, default=None))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=_shape, nargs="*",
                        default=[(128, 128, 128), (256, 256, 256), (512, 512, 300), (512, 512, 600)])
    parser.add_argument("--cases", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--case-shape", type=_shape, default=(512, 512, 300))
    parser.add_argument("--radius", type=int, default=40, help="the labelled sphere's radius (voxels)")
    parser.add_argument("--project", type=int, default=500, help="cases of the projected dataset")
    parser.add_argument("--workdir", type=Path, default=None, help="kept when given (data is reused)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from monai_umed.data.synthetic import make_synthetic_ct

    work = args.workdir or Path(tempfile.mkdtemp(prefix="umed-scaling3d-"))
    work.mkdir(parents=True, exist_ok=True)
    plan = [(f"1 x {'x'.join(map(str, s))}", s, 1) for s in args.shapes]
    plan += [(f"{n} x {'x'.join(map(str, args.case_shape))}", args.case_shape, n) for n in args.cases
             if not (n == 1 and tuple(args.case_shape) in [tuple(s) for s in args.shapes])]
    rows = []
    print(f"monai-umed 3D scaling: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    try:
        for label, shape, n in plan:
            data = work / f"ct-{'x'.join(map(str, shape))}-{n}"
            if not (data / "dataset.json").is_file():
                make_synthetic_ct(data, shape, radius=min(args.radius, min(shape) // 2 - 2), n_cases=n)
            row = {"row": label, "shape": list(shape), "n_cases": n, "voxels": math.prod(shape) * n,
                   **protect_row(data, work / f"out-{data.name}")}
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(work / f"out-{data.name}", ignore_errors=True)  # the disk, not the table, is bounded
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    lines = ["| volumes | voxels | exit | wall s | CPU s | peak host GB | PSNR mean / min (dB) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        psnr = f"{r['psnr_mean']:.2f} / {r['psnr_min']:.2f}" if r.get("psnr_min") is not None else "-"
        lines.append(f"| {r['row']} | {r['voxels'] / 1e6:.1f} M | {r['exit']} | {r['seconds']:.0f} | "
                     f"{r['cpu_seconds']:.0f} | {r['peak_gb']:.2f} | {psnr} |")
    many = sorted((r for r in rows if tuple(r["shape"]) == tuple(args.case_shape) and r["exit"] == 0),
                  key=lambda r: r["n_cases"])
    if len(many) >= 2:
        a, b = many[0], many[-1]
        dn = b["n_cases"] - a["n_cases"]
        per_s, per_gb = (b["seconds"] - a["seconds"]) / dn, (b["peak_gb"] - a["peak_gb"]) / dn
        total_h = (a["seconds"] + per_s * (args.project - a["n_cases"])) / 3600
        peak = a["peak_gb"] + per_gb * (args.project - a["n_cases"])
        lines += ["", f"Per added {'x'.join(map(str, args.case_shape))} case ({a['n_cases']} -> {b['n_cases']} cases): "
                  f"{per_s:.0f} s and {per_gb:.3f} GB of peak host memory; {args.project} cases at that pace: "
                  f"{total_h:.1f} h and {peak:.1f} GB peak on this machine."]
    print("\n".join(lines))
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "table": lines}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
