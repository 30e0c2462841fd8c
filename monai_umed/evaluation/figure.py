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

"""The evaluation figure, laid out like the qualitative figures of the UMed paper.

One row per case. The first three panels show a *training* case as released: the clean image, the perturbation
(protected minus clean, amplified so its largest value fills the display range, with the amplification and the
largest change in native units written on it) and the protected image. The last three show a clean *test* case: the
image with its ground truth, and the predictions of the victim trained on clean files and of the victim trained on
protected files, each with its Dice. 3D volumes are shown at the slice (along the last axis) with the most
foreground. Needs matplotlib.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["draw_figure", "display_slice"]


def _slice_index(label: np.ndarray | None, depth: int) -> int:
    if label is None or not np.any(label > 0):
        return depth // 2
    area = (np.asarray(label) > 0).reshape(-1, depth).sum(0)
    return int(np.argmax(area))


def display_slice(arr: np.ndarray, index: int | None = None) -> np.ndarray:
    """A channel-first 2D image or 3D volume -> a displayable ``rows x cols [x 3]`` float array.

    2D arrays from MONAI's readers are ``C x W x H``: they are transposed back to ``H x W``. 3D volumes are cut at
    ``index`` along the last axis (the middle slice when None) and shown the same way.
    """
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim == 4:
        a = a[..., a.shape[-1] // 2 if index is None else index]
    img = np.transpose(a, (2, 1, 0))  # C x W x H -> H x W x C
    return img[..., 0] if img.shape[-1] == 1 else img


def _show_range(clean: np.ndarray) -> tuple[float, float]:
    a = np.asarray(clean)
    if a.dtype == np.uint8:
        return 0.0, 255.0
    lo, hi = np.percentile(a.astype(np.float64), [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1)


def _norm(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((img - lo) / (hi - lo), 0, 1)


def draw_figure(
    path: str | os.PathLike,
    train_cases: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    test_cases: Sequence[tuple[np.ndarray, np.ndarray]],
    pred_clean: Sequence[np.ndarray],
    pred_protected: Sequence[np.ndarray],
    dice_clean: Sequence[float | None] = (),
    dice_protected: Sequence[float | None] = (),
    title: str = "",
) -> Path:
    """Draw and save the figure.

    Args:
        path: output image file (``.png``, ``.pdf``, ...).
        train_cases: ``(clean, protected, label)`` native channel-first arrays of training cases.
        test_cases: ``(image, label)`` native arrays of clean test cases.
        pred_clean: predictions (``1 x spatial``) of the clean-trained victim on ``test_cases``.
        pred_protected: predictions of the protected-trained victim.
        dice_clean: per-case mean Dice of the clean-trained victim (shown in the titles).
        dice_protected: per-case mean Dice of the protected-trained victim.
        title: figure title.

    Returns:
        The written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    rows = max(len(train_cases), len(test_cases))
    fig, axes = plt.subplots(rows, 6, figsize=(6 * 2.4, rows * 2.5), squeeze=False)
    # label colours that stand out on red endoscopy and on gray MRI/CT: cyan, yellow, magenta, green, blue
    seg_cmap = ListedColormap(["none", "#00e5ff", "#ffd60a", "#ff2d95", "#34c759", "#0a84ff"])
    for r in range(rows):
        for ax in axes[r]:
            ax.axis("off")
        if r < len(train_cases):
            clean, prot, label = train_cases[r]
            idx = _slice_index(label, clean.shape[-1]) if clean.ndim == 4 else None
            lo, hi = _show_range(clean)
            c_img, p_img = display_slice(clean, idx), display_slice(prot, idx)
            delta = np.asarray(prot, np.float64) - np.asarray(clean, np.float64)
            d_img = display_slice(delta, idx)
            m = float(np.abs(delta).max())
            axes[r, 0].imshow(_norm(c_img, lo, hi), cmap="gray", vmin=0, vmax=1)
            axes[r, 0].set_title("clean (training)", fontsize=8)
            if m > 0:
                amp = (hi - lo) / (2 * m)
                shown = np.clip(0.5 + d_img / (2 * m), 0, 1)
                axes[r, 1].imshow(shown, cmap=None if shown.ndim == 3 else "seismic", vmin=0, vmax=1)
                axes[r, 1].text(0.02, 0.98, f"x{amp:.3g}\n|delta| <= {m:.4g}", transform=axes[r, 1].transAxes,
                                fontsize=7, va="top", color="black", backgroundcolor=(1, 1, 1, 0.6))
            else:
                axes[r, 1].imshow(np.full(d_img.shape[:2], 0.5), cmap="gray", vmin=0, vmax=1)
                axes[r, 1].text(0.02, 0.98, "no change", transform=axes[r, 1].transAxes, fontsize=7, va="top")
            axes[r, 1].set_title("perturbation (amplified)", fontsize=8)
            axes[r, 2].imshow(_norm(p_img, lo, hi), cmap="gray", vmin=0, vmax=1)
            axes[r, 2].set_title("protected (released)", fontsize=8)
        if r < len(test_cases):
            image, label = test_cases[r]
            idx = _slice_index(label, image.shape[-1]) if image.ndim == 4 else None
            lo, hi = _show_range(image)
            t_img = _norm(display_slice(image, idx), lo, hi)
            panels = [(label, "test + ground truth")]
            if r < len(pred_clean):
                dc = dice_clean[r] if r < len(dice_clean) else None
                panels.append((pred_clean[r], "clean-trained victim" + ("" if dc is None else f" (Dice {dc:.2f})")))
            if r < len(pred_protected):
                dp = dice_protected[r] if r < len(dice_protected) else None
                panels.append((pred_protected[r],
                               "protected-trained victim" + ("" if dp is None else f" (Dice {dp:.2f})")))
            for k, (seg, name) in enumerate(panels):
                ax = axes[r, 3 + k]
                ax.imshow(t_img, cmap="gray", vmin=0, vmax=1)
                s = display_slice(np.asarray(seg), idx).astype(np.int64)
                ax.imshow(np.ma.masked_where(s == 0, s), cmap=seg_cmap, vmin=0, vmax=5, alpha=0.55,
                          interpolation="nearest")
                ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
