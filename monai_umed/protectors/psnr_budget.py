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

"""A dataset's PSNR budget: a per-case floor chosen so that the written files reach a mean PSNR.

Imperceptibility is usually stated as the mean PSNR over a dataset's files, with a lower bound for any single case
(for example a mean of at least 50 dB with no case below 48 dB). A per-case floor of 50 dB leaves that mean budget
unspent: a case with a small label cannot use its 50 dB of energy (its budget map bounds it first, at 52-60 dB on
Kvasir-SEG), so the mean lands above 51 dB while the cases with large labels, whose perturbation is spread thinnest,
sit at the floor. Here every case is first made at the lowest floor ``min_psnr`` (as much energy as any case may
get), then all are brought down together to one floor ``f``: the lowest for which the mean over the files is at
least the target. A case whose map already keeps it above ``f`` keeps its perturbation; the others are scaled down
to ``f``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from monai_umed.protectors.refine import cap_energy
from monai_umed.protectors.release import psnr

__all__ = ["floor_for_mean", "written_psnr"]


def written_psnr(x: torch.Tensor, delta: torch.Tensor, energy: float | None, levels: int | None) -> float:
    """The PSNR (dB, peak 1) of a case's perturbation as it will be written (:func:`~monai_umed.protectors.refine.
    cap_energy`: clipped, rounded to ``levels`` grey levels and capped at ``energy``); ``inf`` when nothing changes."""
    return float(psnr(cap_energy(x, delta, energy, levels)[None])[0])


def floor_for_mean(psnrs: Sequence[float], lowest: float, mean: float, margin: float = 0.01) -> float:
    """The lowest per-case floor ``f >= lowest`` (dB) at which the cases' mean PSNR is at least ``mean``.

    Args:
        psnrs: each case's PSNR at the floor ``lowest`` (its perturbation with the most energy it may have). A case
            at ``p`` there has ``max(f, p)`` at a floor ``f``: its budget map, not the floor, holds it above ``f``.
            Unchanged cases (``inf``) are left out of the mean, as the judge leaves them out
            (:func:`~monai_umed.evaluation.metrics.summarise_imperceptibility`).
        lowest: the floor no case may go below (``min_psnr``).
        mean: the target mean (``mean_psnr``).
        margin: dB added to the target, for what rounding in the written files may take back.

    Returns:
        The floor (``lowest`` when the cases already reach the mean there; at most ``mean + margin``).
    """
    p = [float(v) for v in psnrs if math.isfinite(float(v))]
    target = float(mean) + margin
    lo, hi = float(lowest), max(float(lowest), target)

    def achieved(f: float) -> float:
        return sum(max(f, v) for v in p) / len(p)

    if not p or achieved(lo) >= target:
        return lo
    for _ in range(60):  # achieved() is continuous and increasing in f, and achieved(hi) >= target
        mid = 0.5 * (lo + hi)
        if achieved(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi

