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

"""Footprint windows: the release stage of a big 3D case in memory that does not grow with the volume.

UMed's budget map is 0 outside the labelled structures and their contour band, so a case's perturbation lives in
the bounding box of its labels grown by the band's reach: its *window*. A CT volume of 512 x 512 x 300 voxels whose
organ fills a tenth of each axis has a window of a thousandth of its voxels. The release stage of such a case

- crops the image, labels and budget map to the window (the maps computed on the window plus a margin of context,
  with the whole image's texture levels, so they equal the whole-image maps there);
- splits the window into *tiles* of at most ``tile`` voxels a side, which the refinement treats as cases of their
  own: a 3D victim trains on patches too, and a batch of tiles costs the same memory whatever the volume's size;
- assembles the refined tiles into one window-sized perturbation, stored with its box, and pastes it into the
  volume when writing.

A case's energy budget (its PSNR floor, a mean over the *whole* volume) becomes a budget on the window's mean
square scaled by ``voxels(volume) / voxels(window)`` (:func:`window_energy`): outside the window nothing changes,
so the two are the same constraint; each tile gets the window's mean square budget, so their sum never exceeds it.

Boxes are ``(start, stop)`` pairs of spatial index tuples (channels excluded), and everything here is deterministic:
a window depends on the labels, the reach and the tile size only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = [
    "Box",
    "WINDOW_VOXELS",
    "auto_window",
    "as_window",
    "footprint_box",
    "window_box",
    "split_box",
    "crop",
    "paste",
    "box_voxels",
    "window_energy",
    "Windowed",
]

#: ``(start, stop)`` spatial indices of a box
Box = tuple[tuple[int, ...], tuple[int, ...]]

#: a 3D case with more voxels than this is refined in footprint windows by default (128^3: the largest volume whose
#: whole-volume refinement measured under 1.5 GB here; MSD Hippocampus, about 35 x 50 x 35, is far below it)
WINDOW_VOXELS = 128**3


def as_window(value: object) -> str | int:
    """Parse a release stage's ``refine_window`` parameter: ``auto`` (any case), or a tile side in voxels (0: refine
    every case whole)."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        value = value.strip() or 0
    tile = int(value or 0)  # type: ignore[arg-type]
    if tile < 0 or 0 < tile < 8:
        raise ValueError(f"refine_window must be auto, 0 or a tile side >= 8, got {value!r}")
    return tile


def auto_window(spatial_dims: int, shape: Sequence[int], window: str | int = "auto") -> int:
    """The tile side a case is refined in (0: the whole case, as before windows existed).

    ``auto`` is 64 for a 3D case of more than :data:`WINDOW_VOXELS` voxels and 0 otherwise (every 2D case: the 2D
    release stage resizes to a 128-px work grid and is already bounded); an int is used for every 3D case and
    ignored in 2D.
    """
    if spatial_dims != 3:
        return 0
    if window == "auto":
        return 64 if math.prod(int(s) for s in shape) > WINDOW_VOXELS else 0
    return int(window)


def footprint_box(label: torch.Tensor, reach: Sequence[int]) -> Box | None:
    """The bounding box of the labelled voxels (``label > 0``, ``1 x spatial`` or spatial) grown by ``reach`` voxels
    per axis and clipped to the image; None when nothing is labelled."""
    lab = label[0] if label.ndim == len(reach) + 1 else label
    shape = tuple(int(s) for s in lab.shape)
    fg = lab > 0
    if not bool(fg.any()):
        return None
    start, stop = [], []
    for d in range(len(shape)):
        other = tuple(k for k in range(len(shape)) if k != d)
        idx = torch.nonzero(fg.any(dim=other) if other else fg)[:, 0]
        start.append(max(0, int(idx.min()) - int(reach[d])))
        stop.append(min(shape[d], int(idx.max()) + 1 + int(reach[d])))
    return tuple(start), tuple(stop)


def window_box(box: Box | None, shape: Sequence[int], tile: int) -> Box:
    """The window of a footprint ``box`` in an image of spatial ``shape``: every axis grown to a whole number of
    ``tile`` voxels (centred, shifted to stay inside, the whole axis when the image is shorter), so that the window
    splits into equal tiles (one batch shape for the refinement). No footprint: the image's centre tile."""
    shape = tuple(int(s) for s in shape)
    if box is None:
        box = (tuple(s // 2 for s in shape), tuple(s // 2 + 1 for s in shape))
    start, stop = [], []
    for a, b, n in zip(box[0], box[1], shape):
        want = max(1, math.ceil((b - a) / tile)) * tile
        if want >= n:
            start.append(0), stop.append(n)
            continue
        lo = max(0, min(a - (want - (b - a)) // 2, n - want))
        start.append(lo), stop.append(lo + want)
    return tuple(start), tuple(stop)


def split_box(box: Box, tile: int) -> list[Box]:
    """The tiles of a window: every axis cut into ``ceil(length / tile)`` parts as equal as possible (lengths that
    differ by at most one voxel), in C order."""
    axes = []
    for a, b in zip(*box):
        k = max(1, math.ceil((b - a) / tile))
        cuts = [a + (b - a) * i // k for i in range(k + 1)]
        axes.append(list(zip(cuts[:-1], cuts[1:])))
    tiles: list[Box] = [((), ())]
    for parts in axes:
        tiles = [(s + (lo,), e + (hi,)) for s, e in tiles for lo, hi in parts]
    return tiles


def box_voxels(box: Box) -> int:
    """The number of voxels in a box."""
    return math.prod(b - a for a, b in zip(*box))


def crop(t: torch.Tensor, box: Box, offset: Sequence[int] | None = None) -> torch.Tensor:
    """``t[:, box]`` (a view) for a channel-first tensor; ``offset``: the spatial start of ``t`` itself inside the
    image the box refers to."""
    off = offset or (0,) * len(box[0])
    return t[(slice(None),) + tuple(slice(a - o, b - o) for a, b, o in zip(box[0], box[1], off))]


def paste(part: torch.Tensor, box: Box, shape: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """A zero ``C x shape`` tensor holding ``part`` (``C x box``) at ``box``."""
    out = torch.zeros((part.shape[0],) + tuple(int(s) for s in shape), dtype=dtype or part.dtype, device=part.device)
    crop(out, box).copy_(part)
    return out


def window_energy(energy: float | None, shape: Sequence[int], box: Box) -> float | None:
    """A whole-image mean square budget as a budget on the window's mean square (nothing changes outside it)."""
    if energy is None:
        return None
    return float(energy) * math.prod(int(s) for s in shape) / max(box_voxels(box), 1)


@dataclass(frozen=True)
class Windowed:
    """A ``C x shape`` tensor that is 0 outside ``box``, held as its window only (e.g. a big case's refined
    perturbation as a distillation target); :meth:`crop` gives any box of the whole tensor."""

    data: torch.Tensor
    box: Box
    shape: tuple[int, ...]

    def crop(self, box: Box) -> torch.Tensor:
        """The whole tensor's values in ``box`` (a new tensor)."""
        out = torch.zeros((self.data.shape[0],) + tuple(b - a for a, b in zip(*box)), dtype=self.data.dtype)
        lo = tuple(max(a, w) for a, w in zip(box[0], self.box[0]))
        hi = tuple(min(b, w) for b, w in zip(box[1], self.box[1]))
        if all(h > l for l, h in zip(lo, hi)):
            crop(out, (lo, hi), offset=box[0]).copy_(crop(self.data, (lo, hi), offset=self.box[0]))
        return out
