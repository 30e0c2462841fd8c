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

"""Evaluation reports: one JSON document with every figure, and a Markdown table beside it.

The JSON is strict (``inf`` and ``nan`` become ``null``). Its top-level keys are listed in :data:`REPORT_KEYS`;
``dice_clean``/``dice_protected`` and ``defence`` describe the first defence row (``none`` unless other defences
were asked for alone), and ``rows`` holds one entry per defence.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "REPORT_KEYS", "versions", "sanitise", "write_json", "markdown_table", "report_markdown", "write_markdown", "fmt",
]

#: Top-level keys every evaluation report holds.
REPORT_KEYS = (
    "dice_clean",
    "dice_protected",
    "dice_drop",
    "psnr",
    "psnr_roi",
    "ssim",
    "max_abs_delta",
    "max_abs_delta_rel",
    "victim",
    "protocol",
    "loss_end_clean",
    "loss_end_protected",
    "defence",
    "epochs",
    "seed",
    "image_size",
    "rows",
    "imperceptibility",
    "config",
    "datasets",
    "versions",
    "wall_time_s",
)


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the libraries that shape the figures."""
    import monai
    import torch

    import monai_umed

    out = {
        "monai_umed": monai_umed.__version__,
        "monai": monai.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    for mod in ("skimage", "einops", "nibabel", "PIL"):
        try:
            out[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            continue
    return out


def sanitise(obj: Any) -> Any:
    """Make an object strict-JSON serialisable: numpy scalars/arrays to Python, ``inf``/``nan`` to None."""
    if isinstance(obj, dict):
        return {str(k): sanitise(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitise(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return sanitise(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented strict JSON through a temporary file renamed into place."""
    return _write_text(json.dumps(sanitise(obj), indent=1, allow_nan=False) + "\n", path)


def fmt(value: Any, digits: int = 2, pct: bool = False) -> str:
    """A table cell: ``-`` for missing values, ``inf`` for identical images, fixed decimals otherwise."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, (int, float, np.floating, np.integer)):
        v = float(value) * (100.0 if pct else 1.0)
        return f"{v:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (cells converted with ``str``)."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def report_markdown(report: dict[str, Any]) -> str:
    """The Markdown summary of an evaluation report (settings, imperceptibility, one row per defence)."""
    ds = report["datasets"]
    imp = report["imperceptibility"]
    cfg = report["config"]
    nn = report.get("nnunet")
    if nn:  # nnU-Net v2 plans its own network, patch and batch: say exactly what ran
        victim = [
            f"- victim: nnU-Net v2 {nn['nnunetv2']}, trainer {nn['trainer']}, configuration {nn['configuration']}, "
            f"plans {nn['plans']}, fold {nn['fold']} (every training case), {cfg['spatial_dims']}D, patch "
            f"{nn['patch_size']}, batch {nn['batch_size']} (planned {nn['planned_batch_size']}), image size "
            f"{report['image_size'] or 'native'}",
            f"- schedule: {nn['epochs']} epochs x {nn['iterations']} iterations ({nn['val_iterations']} validation "
            f"iterations per epoch), seed {report['seed']}, device {cfg['device']}, threads {cfg['threads']}",
        ]
    else:
        victim = [
            f"- victim: {report['victim']} {cfg['victim_params']}, {cfg['spatial_dims']}D, patch {cfg['patch_size']}, "
            f"image size {report['image_size'] or 'native'}, intensity {cfg['intensity']}",
            f"- epochs {report['epochs']}, seed {report['seed']}, batch {cfg['batch_size']} x {cfg['num_samples']} "
            f"crop(s), Adam lr {cfg['lr']}, device {cfg['device']}, threads {cfg['threads']}",
        ]
    head = [
        "# Protection evaluation",
        "",
        f"- clean dataset: `{ds['clean']}` ({ds['train_cases']} training, {ds['test_cases']} test cases)",
        f"- protected dataset: `{ds['protected']}`",
        *victim,
        f"- imperceptibility over {imp['cases']} training files ({imp['identical_cases']} unchanged): "
        f"PSNR {fmt(imp['psnr'])} dB, PSNR in ROI {fmt(imp['psnr_roi'])} dB, SSIM {fmt(imp['ssim'], 4)}, "
        f"max |delta| {fmt(imp['max_abs_delta'], 1)} native units = {fmt(imp['max_abs_delta_rel'] * 255, 2)}/255 "
        f"of the range R; clean dtypes {imp['dtypes']}",
        f"- protocol {report.get('protocol', 'release')}"
        + (f": float perturbations, PSNR {fmt(imp.get('paper_psnr'))} dB (min {fmt(imp.get('paper_psnr_min'))}), "
           "no rounding, no random augmentation" if report.get("protocol") == "paper" else
           ": the written files through the victim's own pipeline"),
        f"- wall time {fmt(report['wall_time_s'], 0)} s",
        "",
    ]
    headers = ["defence", "Dice clean victim (%)", "Dice protected victim (%)", "drop (points)",
               "final loss clean", "final loss protected", "train s clean", "train s protected"]
    rows = []
    for r in report["rows"]:
        rows.append([
            r["defence"], fmt(r["dice_clean"], 2, pct=True), fmt(r["dice_protected"], 2, pct=True),
            fmt(None if r["dice_drop"] is None else r["dice_drop"] * 100, 2),
            fmt((r["clean_victim"].get("loss") or [None])[-1], 4),
            fmt((r["protected_victim"].get("loss") or [None])[-1], 4),
            fmt(r["clean_victim"]["train_seconds"], 0) + (" (cached)" if r["clean_victim"]["cached"] else ""),
            fmt(r["protected_victim"]["train_seconds"], 0) + (" (cached)" if r["protected_victim"]["cached"] else ""),
        ])
    return "\n".join(head) + "\n" + markdown_table(headers, rows) + "\n"


def write_markdown(text: str, path: str | os.PathLike) -> Path:
    """Write Markdown text through a temporary file renamed into place."""
    return _write_text(text, path)


def _write_text(text: str, path: str | os.PathLike) -> Path:
    """Write through a temporary file renamed into place, with the usual permissions (``0666 & ~umask``)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=p.suffix, dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p

