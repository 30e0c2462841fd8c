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

"""Write hand-made, label-coded shortcuts at an exact PSNR: how strong a cue must be before a victim takes it.

No protector is fitted. Every training image gets a pattern that *is* its label, laid on the labelled pixels
only (``--background``: on every pixel, the background with the sign of an even class):

- ``shift``: a class-wise intensity offset, ``+a`` on odd classes and ``-a`` on even ones (a perfect per-pixel
  label code, at the lowest spatial frequency);
- ``checker``: the same signs times a voxel-parity checkerboard (the highest frequency the grid holds; flips and
  90-degree rotations keep it up to its sign);
- ``dots``: the same signs times an egg-crate of blobs, ``prod_d cos(2 pi u_d / period)``, ``u`` the coordinate on
  the victim's ``grid`` (so the period is in the victim's pixels whatever the file's size): a mid-frequency cue
  whose blobs no rotation, flip or mild blur changes in kind;
- ``rings``: the same signs times concentric rings, ``cos(2 pi r / period)`` with ``r`` the distance from the
  image's centre in the victim's pixels: locally one clean grating, and rotations about the centre, flips and
  90-degree rotations leave it as it is;
- ``band``: the same signs times one fixed random field (seed 0) whose spectrum is an isotropic ring around
  ``1 / period`` cycles per victim pixel, shared by every case: a texture with no orientation, at a frequency
  blur and low-resolution simulation keep when the period is long enough.

The amplitude ``a`` is chosen per case so that the written file has exactly the requested whole-image PSNR in the
judge's own definition (:func:`~monai_umed.evaluation.metrics.data_range`: dtype range for integer files, ``max -
min`` otherwise); integer files are rounded and clipped to their dtype, every file keeps its template's header.
Labels are copied. Judge the copy like any protected one::

    python benchmarks/shortcut_oracles.py ../shared/data/hippocampus /tmp/oracle_shift40 --pattern shift --psnr 40
    monai-umed evaluate ../shared/data/hippocampus /tmp/oracle_shift40 --epochs 8 --threads 1

    # a grid lattice along the quiet colour direction, screened by the owner's self-check (docs/methods.md,
    # twelfth session); pass a protected copy instead of the dataset to write the code over its protection
    python benchmarks/shortcut_oracles.py ../shared/data/kvasir_seg /tmp/oracle_dots8q --pattern dots --period 8 \
        --colour quiet --psnr 50
    monai-umed check /tmp/oracle_dots8q --clean ../shared/data/kvasir_seg --threads 1

If a victim trained on such files keeps its clean Dice, no perturbation of that energy on that footprint is a
shortcut for it either: this is the bound behind the 3D rows of docs/methods.md (ninth session).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai_umed.colour import quiet_colour  # noqa: E402
from monai_umed.data.formats import atomic_path, codec_for, copy_atomic  # noqa: E402
from monai_umed.errors import InputError  # noqa: E402
from monai_umed.evaluation.metrics import data_range, psnr, read_native  # noqa: E402
from monai_umed.evaluation.train import find_dataset_json, load_split  # noqa: E402

#: the hand-made patterns
PATTERNS = ("shift", "checker", "dots", "rings", "band")


def band_field(shape: tuple[int, ...], grid: int, period: float, seed: int = 0) -> np.ndarray:
    """A unit-RMS random field of ``shape`` whose spectrum is an isotropic ring at ``1 / period`` cycles per pixel
    of a ``grid``-sized victim image (relative width 0.3); drawn once on that grid and resampled to ``shape``, so
    every file gets the same texture as the victim sees it.

    Args:
        shape: spatial shape of the file.
        grid: the victim's grid size per axis.
        period: ring period in the victim's pixels (> 2).
        seed: the field's seed.
    """
    from scipy.ndimage import zoom

    rng = np.random.default_rng(seed)
    white = rng.standard_normal((grid,) * len(shape))
    freqs = np.meshgrid(*[np.fft.fftfreq(grid)] * len(shape), indexing="ij")
    radius = np.sqrt(sum(f ** 2 for f in freqs))
    f0 = 1.0 / float(period)
    ring = np.exp(-0.5 * ((radius - f0) / (0.3 * f0)) ** 2)
    field = np.real(np.fft.ifftn(np.fft.fftn(white) * ring))
    field = zoom(field, [s / grid for s in shape], order=3, grid_mode=True, mode="grid-wrap")
    return field / np.sqrt((field ** 2).mean())


def oracle_pattern(label: np.ndarray, kind: str, grid: int = 128, period: float = 8.0,
                   background: bool = False) -> np.ndarray:
    """The unit pattern of a label map (``1 x spatial``, 2D or 3D): 0 on the background, ``+-1`` on the labels.

    Args:
        label: channel-first integer label map.
        kind: ``shift`` (``+1`` on odd classes, ``-1`` on even ones), ``checker`` (those signs times the voxel
            parity ``(-1) ** (i + j [+ k])``), ``dots`` (those signs times an egg-crate of ``period`` victim
            pixels), ``rings`` (those signs times rings of ``period`` victim pixels about the centre) or ``band``
            (those signs times :func:`band_field`).
        grid: the victim's grid size per axis (``dots``, ``rings``, ``band``).
        period: the pattern's period in the victim's pixels (``dots``, ``rings``, ``band``).
        background: lay the pattern on the background too, with the sign of an even class (``-1``): every pixel
            carries the code, at a lower amplitude for the same PSNR.

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind not in PATTERNS:
        raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {kind!r}")
    y = np.asarray(label).astype(np.int64)
    sign = np.where(y % 2 == 1, 1.0, -1.0)
    if not background:
        sign = np.where(y > 0, sign, 0.0)
    if kind == "checker":
        parity = np.indices(y.shape[1:]).sum(0) % 2
        sign = sign * np.where(parity == 0, 1.0, -1.0)[None]
    elif kind in ("dots", "rings"):
        # every pixel centre in the victim's pixels
        coords = np.meshgrid(*[(np.arange(n) + 0.5) * grid / n for n in y.shape[1:]], indexing="ij")
        if kind == "dots":
            code = np.prod([np.cos(2 * np.pi * c / float(period)) for c in coords], axis=0)
        else:  # rings about the image's centre
            code = np.cos(2 * np.pi * np.sqrt(sum((c - grid / 2) ** 2 for c in coords)) / float(period))
        sign = sign * code[None]
    elif kind == "band":
        sign = sign * band_field(y.shape[1:], grid, period)[None]
    return sign


def add_at_psnr(image: np.ndarray, pattern: np.ndarray, target: float) -> np.ndarray:
    """``image + a * pattern`` in the image's dtype, with ``a`` such that the result's PSNR (judge's range) is
    ``target`` dB before rounding; integer images are rounded and clipped to their dtype.

    Args:
        image: channel-first stored values.
        pattern: unit pattern broadcastable to ``image`` (all zero: the image is returned unchanged).
        target: the whole-image PSNR in dB.
    """
    x = np.asarray(image)
    p = np.broadcast_to(np.asarray(pattern, np.float64), x.shape)
    power = float((p ** 2).mean())
    if power == 0:
        return x.copy()
    a = data_range(x) * 10.0 ** (-float(target) / 20.0) / np.sqrt(power)
    out = x.astype(np.float64) + a * p
    if x.dtype.kind in "ui":
        info = np.iinfo(x.dtype)
        out = np.clip(np.round(out), info.min, info.max)
    return out.astype(x.dtype)


def write_oracle(dataset: str | Path, out: str | Path, kind: str, target: float, grid: int = 128,
                 period: float = 8.0, background: bool = False, colour: str = "uniform") -> dict:
    """Write the training list of ``dataset`` with ``kind``'s pattern at ``target`` dB into ``out``
    (``grid``, ``period``, ``background``: see :func:`oracle_pattern`). ``colour``: ``uniform`` (the same pattern
    on every channel) or ``quiet`` (the channels weighted by :func:`quiet_colour` of the training images).

    Returns:
        ``psnr_mean``, ``psnr_min`` and ``psnr_roi_mean`` of the written files (read back as the judge reads them)
        and the number of cases.

    Raises:
        InputError: ``out`` is the dataset itself or already holds a dataset.
        ValueError: an unknown ``colour`` (before anything is written).
    """
    if colour not in ("uniform", "quiet"):
        raise ValueError(f"colour must be uniform or quiet, got {colour!r}")
    src = find_dataset_json(dataset)
    out = Path(out)
    if out.resolve() == src.parent.resolve():
        raise InputError("the output folder is the dataset itself; choose another", str(out))
    if (out / "dataset.json").exists():
        raise InputError("the output folder already holds a dataset; choose an empty one", str(out))
    meta = json.loads(src.read_text())
    training = []
    psnrs, rois = [], []
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    cases = load_split(dataset, "training")
    # a first pass over the images for the direction, since the first file written needs it
    weights = (quiet_colour(codec_for(Path(it["image"])).read(Path(it["image"])).array for it in cases)
               if colour == "quiet" else np.ones(1))
    for it in cases:
        image, label = Path(it["image"]), Path(it["label"])
        codec = codec_for(image)
        stored = codec.read(image).array
        y = read_native(label)
        unit = oracle_pattern(y, kind, grid, period, background)
        unit = unit * weights.reshape((-1,) + (1,) * (unit.ndim - 1))
        written = add_at_psnr(stored, unit, target)
        rel_img, rel_lab = Path("imagesTr") / image.name, Path("labelsTr") / label.name
        codec.write(image, out / rel_img, written)
        copy_atomic(label, out / rel_lab)
        # PSNR as the judge reads both files (LoadImage may scale stored values; the codec writes stored ones)
        clean, back = read_native(image), read_native(out / rel_img)
        psnrs.append(psnr(clean, back))
        rois.append(psnr(clean, back, mask=y > 0))
        training.append({"image": f"./{rel_img.as_posix()}", "label": f"./{rel_lab.as_posix()}"})
    meta = {**{k: v for k, v in meta.items() if k not in ("training", "test")}, "training": training,
            "description": f"{meta.get('description', '')} [shortcut oracle: {kind} at {target} dB]".strip()}
    with atomic_path(out / "dataset.json") as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=1))
    finite = [v for v in rois if np.isfinite(v)]
    return {"cases": len(training), "psnr_mean": float(np.mean(psnrs)), "psnr_min": float(np.min(psnrs)),
            "psnr_roi_mean": float(np.mean(finite)) if finite else float("nan")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", help="clean MSD-style dataset (folder with dataset.json)")
    p.add_argument("out", help="new folder for the written copy")
    p.add_argument("--pattern", choices=PATTERNS, default="shift")
    p.add_argument("--psnr", type=float, default=50.0, help="whole-image PSNR of every written file (dB)")
    p.add_argument("--grid", type=int, default=128, help="the victim's grid size per axis (dots, rings, band)")
    p.add_argument("--period", type=float, default=8.0, help="period in the victim's pixels (dots, rings, band)")
    p.add_argument("--background", action="store_true",
                   help="lay the pattern on the background too, with the opposite sign of class 1")
    p.add_argument("--colour", choices=("uniform", "quiet"), default="uniform",
                   help="uniform: the same pattern on every channel; quiet: along the colour direction the "
                        "training images vary least")
    a = p.parse_args(argv)
    if a.period <= 2:
        p.error("--period must be above 2 victim pixels (the grid's Nyquist)")
    try:
        res = write_oracle(a.dataset, a.out, a.pattern, a.psnr, a.grid, a.period, a.background, a.colour)
    except InputError as e:
        print(f"shortcut_oracles: {e}", file=sys.stderr)
        return 2
    print(f"[oracle] {a.pattern} at {a.psnr:g} dB: {res['cases']} cases, PSNR mean {res['psnr_mean']:.2f} "
          f"(min {res['psnr_min']:.2f}, ROI {res['psnr_roi_mean']:.2f}) -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
