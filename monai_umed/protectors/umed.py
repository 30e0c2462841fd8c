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

"""UMed: contour- and texture-aware unlearnable perturbations (METHODS.md section 1).

Lin et al., "Safeguarding Medical Image Segmentation Datasets against Unauthorized Training via Contour- and
Texture-Aware Perturbations", arXiv 2403.14250 (2024).

Two learned perturbators, confined to the labelled structures:

- ``G_c`` (contour): ``delta_c = eps_c * tanh(F_c(x, M_c, M_roi)) * M_c``, ``F_c`` an encoder-decoder of central
  difference convolutions (:class:`~monai_umed.networks.generator.PerturbationGenerator`, ``theta``), ``M_c`` the
  contour band of radius ``contour_radius`` around every labelled class.
- ``G_t`` (texture): ``delta_t = eps_t * B(x) * tanh(F_t(x, M_roi)) * M_roi`` with the texture-aware adaptive
  bound ``B`` (:func:`~monai_umed.masks.texture_bound`): local standard deviation normalised to ``[b_min, 1]``.
- ``delta = clip(x + delta_c + delta_t, 0, 1) - x`` after projecting the sum voxel-wise onto
  ``|delta| <= eps_c`` on the band and ``|delta| <= eps_t * B`` elsewhere in the ROI; 0 everywhere else.

The masks and budget maps live in the mixin :class:`~monai_umed.protectors.umed_maps.UMedBudgetMaps`, the release
stage (refinement through the release path, distillation, energy cap) in
:class:`~monai_umed.protectors.umed_release.UMedReleaseStage`; this module holds the generators, their fit and the
protector's parameters and state.

Distance measure: L-inf, per voxel and region as above (``eps_c = eps_t = epsilon`` by default), in the normalised
``[0, 1]`` space. The generators are fitted by min-min against a MONAI UNet surrogate (``DiceCELoss``): ``n_gen``
Adam steps on the generators minimising the surrogate's loss on the protected image, then ``n_sur`` steps on the
surrogate, for ``epochs`` passes or until the surrogate's training Dice exceeds ``stop_dice``.

Surviving the unauthorised trainer's preprocessing (METHODS.md section 4.7) is part of the objective (ours): every
protected training patch passes through a differentiable stand-in of common preprocessing before the surrogate sees
it (:func:`~monai_umed.protectors.standin.preprocess_standin`): random down-resize (``F.interpolate``: area, Gaussian
anti-aliasing + linear as MONAI's ``Resize``, or antialiased bilinear; scale drawn log-uniformly from ``resize_aug``),
random intensity renormalisation (none, min-max, z-score) and, for 8-bit data, the rounding of the written file
(straight-through, :func:`~monai_umed.protectors.release.quantise_st`). Flips and 90-degree rotations are applied
to ``(x', y)`` as well. The generators run at ``1 / gen_scale`` of the native resolution and their output is
upsampled (bilinear/trilinear) before the masks and the budget are applied, which both cuts CPU cost and gives the
perturbation the low-frequency structure that resampling preserves; masks and budgets stay at native resolution.

After fitting, protection is one forward pass of the two generators per case, batched by shape, under
``torch.no_grad``, with sliding windows (``monai.inferers.sliding_window_inference``) for images larger than
``sw_roi_size``.

Args (defaults):
    epsilon (8/255), epsilon_c (None: epsilon), epsilon_t (None: epsilon), contour_radius (2 voxels), contour_radius_mm
    (None; with a known spacing the band radius in mm), theta (0.7; 0 = plain convolutions), mode (``both`` |
    ``contour`` | ``texture``), texture_window (5), b_min (0.25), texture_quantiles ((0.05, 0.95)), tile_bound
    (``auto``: the 2D shared tile is written on ``b_min = 0``, quantiles (0.25, 0.95)), min_psnr (50 dB per case; None
    disables), mean_psnr (None), mix (0), surrogate_reset (0), epochs (None: 6 in 2D, 10 in 3D), n_gen (1), n_sur (1),
    stop_dice (0.99), lr (2e-3, generators), surrogate_lr (1e-3), batch_size (8), patch_size (None: 96 in 2D, 48 in 3D),
    resize_aug (``auto``: scales ``(0.3, 0.6)`` in 2D, none in 3D; ``False`` disables it; a pair gives the range),
    gen_scale (None: 2), channels ((16, 32, 64)), surrogate_channels ((16, 32, 64, 128)), quantise_levels (``auto``: 255
    for 8-bit data, else none), sw_roi_size (None: twice the training patch at generator resolution), sw_overlap (0.25),
    infer_batch_size (8), spatial_dims, seed (0), device (``auto``).

Shapes: ``image`` ``(C, H, W[, D])`` float in ``[0, 1]``; ``label`` ``(1, H, W[, D])`` int; ``delta`` like ``image``.

Example::

    p = UMedProtector(epsilon=4 / 255, epochs=8).fit(train_samples, checkpoint="umed.ckpt")
    delta = p.perturbation(image, label, case_id="case_001")
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from tqdm.auto import tqdm

from monai_umed.data.codec import atomic_path
from monai_umed.masks import sample_spacing, spacing_of
from monai_umed.networks.generator import PerturbationGenerator
from monai_umed.protectors.base import Protector, case_seed
from monai_umed.protectors.refine import (
    ReleaseRefiner,
    as_bool,
    as_texture_quantiles,
    as_tile,
    as_tile_colour,
    as_victim_grids,
    as_work_size,
    auto_tile_bound,
    grey_levels,
)
from monai_umed.protectors.refine_window import Windowed, as_window, auto_window, crop, footprint_box, paste
from monai_umed.protectors.release import quantise_st
from monai_umed.protectors.release_augment import as_release_augment
from monai_umed.protectors.standin import mix_batch, preprocess_standin
from monai_umed.protectors.surrogate import Surrogate, foreground_dice
from monai_umed.protectors.umed_maps import UMedBudgetMaps
from monai_umed.protectors.umed_release import UMedReleaseStage

__all__ = ["UMedProtector"]

_MODES = ("both", "contour", "texture")


def _as_float_pair(value: Any, name: str) -> tuple[float, float] | None:
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("none", "false", "off", "0")):
        return None
    if isinstance(value, str):
        value = [float(v) for v in value.replace(":", ",").split(",") if v.strip()]
    if isinstance(value, (int, float)):
        value = (float(value), 1.0)
    vals = tuple(float(v) for v in value)
    if len(vals) != 2 or not 0.0 < vals[0] <= vals[1]:
        raise ValueError(f"{name} must be a pair 0 < low <= high, got {value!r}")
    return vals  # type: ignore[return-value]


def _as_int_tuple(value: Any, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [int(float(v)) for v in value.replace("x", ",").split(",") if v.strip()]
    if isinstance(value, (int, float)):
        value = (int(value),)
    vals = tuple(int(v) for v in value)
    if not vals or any(v < 1 for v in vals):
        raise ValueError(f"{name} must be positive integers, got {value!r}")
    return vals


class UMedProtector(UMedReleaseStage, UMedBudgetMaps, Protector):
    """Contour- and texture-aware perturbation generators fitted by min-min (UMed); see the module docstring.

    Args:
        epsilon: L-inf budget in normalised units (default for both regions).
        epsilon_c: budget on the contour band (``None``: ``epsilon``).
        epsilon_t: budget scale inside the ROI, multiplied by the texture bound ``B`` (``None``: ``epsilon``).
        contour_radius: contour band radius in voxels.
        contour_radius_mm: band radius in mm, used when the image's spacing is known (``MetaTensor`` ``pixdim`` or a
            ``spacing`` entry in the training samples); overrides ``contour_radius``.
        theta: CDC ``theta`` of the contour generator (0: plain convolutions, the ablation).
        mode: ``both`` (UMed), ``contour`` (``G_c`` only) or ``texture`` (``G_t`` only).
        texture_window: window ``k`` of the local standard deviation.
        b_min: texture bound in the flattest ROI regions.
        texture_quantiles: ROI texture-energy quantiles mapped to ``b_min`` and 1.
        min_psnr: the lowest PSNR (dB) of any written case: a per-case budget on the perturbation's energy (None:
            the budget maps alone bound it).
        mean_psnr: with the release stage, the mean PSNR (dB) the written training files must reach (None: every
            case at ``min_psnr``). The cases are fitted at ``min_psnr``, then brought down together to the lowest
            common floor at which their mean reaches ``mean_psnr`` (:mod:`~monai_umed.protectors.psnr_budget`);
            cases not seen in fit get that floor. ``mean_psnr=50, min_psnr=48`` spends the budget that a 50 dB
            floor leaves to cases whose map keeps them above it.
        epochs: generator min-min passes over the training samples (``None``: 1 in 2D and 2 in 3D with the release
            stage, which distils the generators afterwards; 6 in 2D and 10 in 3D without it).
        n_gen: generator steps per batch.
        n_sur: surrogate steps per batch.
        stop_dice: stop when the surrogate's mean training Dice over an epoch exceeds this.
        mix: probability, per training patch, that its perturbation is fitted on top of another patch of the batch
            (same target): the perturbation must then encode the label by itself instead of amplifying the
            image's own features, which a victim would also find in clean images.
        surrogate_reset: re-initialise the surrogate every this many batches (0: never), so the generators keep
            fitting a network early in its training, as a victim's is.
        lr: Adam learning rate of the generators.
        surrogate_lr: Adam learning rate of the surrogate.
        batch_size: training patches per step.
        patch_size: training patch size in native voxels (int or one per dim; ``None``: 96 in 2D, 48 in 3D,
            clipped to the largest training image).
        resize_aug: scale range of the random down-resize stand-in, ``auto``, or ``False``.
        gen_scale: the generators run at ``1 / gen_scale`` of the native resolution (``None``: 2).
        channels: generator channels per level.
        surrogate_channels: surrogate UNet channels per level.
        quantise_levels: simulate rounding to ``levels`` grey levels while fitting (``auto``: 255 when every
            training image is a multiple of 1/255, i.e. came from an 8-bit file; ``None``/0: off).
        sw_roi_size: sliding-window size at generator resolution for protection (``None``: twice the training patch).
        sw_overlap: sliding-window overlap.
        infer_batch_size: cases (or windows) per generator forward when protecting.
        refine_rounds: rounds of the per-case error-minimising refinement through the release path
            (:mod:`~monai_umed.protectors.refine`) inside the budget map, after the generators are fitted (``None``:
            12; 0 disables it and protects with the generators alone).
        refine_pgd: refinement PGD steps per case and round.
        refine_surrogate_epochs: refinement surrogate passes over the training set per round.
        refine_stop: stop refining when the refinement surrogate's training Dice over a round reaches this.
        refine_size: longest side of the refinement work grid (``auto``: 128 in 2D, native in 3D; see
            :func:`~monai_umed.protectors.refine.auto_work_size`).
        refine_steps: refinement PGD steps for a case not seen in fit, on top of the generators' output.
        refine_reset: re-initialise the refinement surrogate every this many rounds (0: never).
        refine_energy: ``scale`` or ``sparse``: how the refinement keeps a case inside its energy budget
            (:class:`~monai_umed.protectors.refine.RefineSettings`).
        refine_step: ``sign`` or ``scaled``: the refinement's descent step
            (:attr:`~monai_umed.protectors.refine.RefineSettings.step`).
        refine_step_fraction: the refinement's descent step as a fraction of the case's budget map
            (:attr:`~monai_umed.protectors.refine.RefineSettings.step_fraction`).
        refine_tile: 0 (one refined perturbation per case) or the side, in work-grid cells, of one refined texture
            tile shared by every case (:mod:`~monai_umed.protectors.refine_shared`); ``auto``: 4 in 2D (measured on
            Kvasir-SEG: 77.6 -> 15.3 % class-wise, against 35.2 % per case), 0 in 3D (neither protects on
            Hippocampus; docs/methods.md).
        refine_tile_classwise: with ``refine_tile``, one tile per class, each on its own class's pixels.
        refine_tile_symmetric: with ``refine_tile``, keep the tile symmetric under flips and 90-degree rotations.
        refine_tile_fill: with ``refine_tile``, scale each case's pattern up to its energy budget, not only down.
        refine_tile_colour: with ``refine_tile``, ``free`` (a tile per image channel) or ``quiet`` (one tile along
            the colour direction the training images vary least along, computed from them and kept in the key).
        refine_tile_harmonics: with ``refine_tile``, keep only the tile's spatial frequencies up to this many cycles
            per tile (0: all; 1 with an 8-cell tile: a lattice of period 8 only).
        tile_bound: with ``refine_tile``, the texture bound the fitted tile is *written* on (``auto``: ``b_min = 0``
            and quantiles ``(0.25, 0.95)``: the flattest quarter of the ROI left alone; ``fit``: the fitting bound;
            or ``"b_min,low,high"``; :func:`~monai_umed.protectors.refine.auto_tile_bound`).
        refine_window: the side, in voxels, of the tiles a big 3D case is refined in, inside its footprint window
            (:mod:`~monai_umed.protectors.refine_window`: the release stage's memory then follows the labelled
            structures, not the volume); ``auto``: 64 for a 3D case of more than 128^3 voxels, the whole case
            otherwise (every 2D case, MSD Hippocampus); 0: every case whole.
        distil_epochs: epochs of distilling the generators from the refined perturbations (regression on training
            patches), so that unseen cases get the refined kind of perturbation in one pass.
        victim_grids: the victim grids (longest side) the refinement expects a trainer to resize to (``auto``:
            ``(128,)`` in 2D, the native grid in 3D; ``none``: native); each extra grid is an expectation the
            refinement pays for (``(128, 256)`` costs about twice as much).
        release_normalise: the trainer's intensity normalisation in the release path (``auto``: ``minmax`` in 2D,
            ``zscore`` in 3D; or ``random``, ``none``).
        release_jitter: mild intensity jitter in the release path (gain ``1 +- j``, offset ``+- j / 2``).
        release_augment: a strong trainer's augmentation in the release path
            (:mod:`~monai_umed.protectors.release_augment`): ``none``, ``nnunet`` (rotation, scaling, noise, blur,
            brightness, contrast, low resolution, gamma, so the perturbation survives nnU-Net-style training),
            ``jpeg`` (a differentiable JPEG re-encoding of the written image) or ``nnunet_jpeg`` (both).
        spatial_dims: 2 or 3 (inferred from the data when None).
        seed: run seed (initialisation, patch sampling, augmentation).
        device: ``auto`` | ``cpu`` | ``cuda``.

    Raises:
        ValueError: a bad mode, budget or size.
    """

    name = "umed"
    requires_label = True
    fits = True

    def __init__(
        self,
        epsilon: float = 8 / 255,
        epsilon_c: float | None = None,
        epsilon_t: float | None = None,
        contour_radius: float = 2,
        contour_radius_mm: float | None = None,
        theta: float = 0.7,
        mode: str = "both",
        texture_window: int = 5,
        b_min: float = 0.25,
        texture_quantiles: Sequence[float] | str = (0.05, 0.95),
        min_psnr: float | None = 50.0,
        mean_psnr: float | None = None,
        epochs: int | None = None,
        n_gen: int = 1,
        n_sur: int = 1,
        stop_dice: float = 0.99,
        mix: float = 0.0,
        surrogate_reset: int = 0,
        lr: float = 2e-3,
        surrogate_lr: float = 1e-3,
        batch_size: int = 8,
        patch_size: int | Sequence[int] | str | None = None,
        resize_aug: Any = "auto",
        gen_scale: float | None = None,
        channels: Sequence[int] | str = (16, 32, 64),
        surrogate_channels: Sequence[int] | str = (16, 32, 64, 128),
        quantise_levels: int | str | None = "auto",
        sw_roi_size: int | Sequence[int] | str | None = None,
        sw_overlap: float = 0.25,
        infer_batch_size: int = 8,
        refine_rounds: int | None = None,
        refine_pgd: int = 2,
        refine_surrogate_epochs: int = 3,
        refine_stop: float = 0.95,
        refine_size: int | str | None = "auto",
        refine_steps: int = 0,
        refine_reset: int = 3,
        refine_energy: str = "scale",
        refine_step: str = "sign",
        refine_step_fraction: float = 0.5,
        refine_tile: int | str = "auto",
        refine_tile_classwise: bool = True,
        refine_tile_symmetric: bool = False,
        refine_tile_fill: bool = False,
        refine_tile_colour: str = "free",
        refine_tile_harmonics: int = 0,
        tile_bound: str | Sequence[float] | None = "auto",
        refine_window: int | str = "auto",
        distil_epochs: int = 2,
        victim_grids: Any = "auto",
        release_normalise: str = "auto",
        release_jitter: float = 0.0,
        release_augment: str = "none",
        spatial_dims: int | None = None,
        seed: int = 0,
        device: str | torch.device | None = "auto",
    ) -> None:
        super().__init__(epsilon=epsilon, spatial_dims=spatial_dims, seed=seed, epochs=epochs, device=device)
        self.epsilon_c = self.epsilon if epsilon_c is None else float(epsilon_c)
        self.epsilon_t = self.epsilon if epsilon_t is None else float(epsilon_t)
        for n, v in (("epsilon_c", self.epsilon_c), ("epsilon_t", self.epsilon_t)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{n} must lie in [0, 1] (normalised units), got {v}")
        if str(mode) not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}")
        self.mode = str(mode)
        self.contour_radius = float(contour_radius)
        self.contour_radius_mm = None if contour_radius_mm in (None, "", "none") else float(contour_radius_mm)
        if self.contour_radius < 0 or (self.contour_radius_mm is not None and self.contour_radius_mm < 0):
            raise ValueError("contour radius must be >= 0")
        self.theta = float(theta)
        if not 0.0 <= self.theta <= 1.0:
            raise ValueError(f"theta must lie in [0, 1], got {theta}")
        self.texture_window = int(texture_window)
        self.b_min = float(b_min)
        if not 0.0 <= self.b_min <= 1.0:
            raise ValueError(f"b_min must lie in [0, 1], got {b_min!r}")
        self.texture_quantiles = as_texture_quantiles(texture_quantiles)
        self.min_psnr = None if min_psnr in (None, "", "none", 0) else float(min_psnr)
        self.mean_psnr = None if mean_psnr in (None, "", "none", 0) else float(mean_psnr)
        if self.mean_psnr is not None and (self.min_psnr is None or self.mean_psnr < self.min_psnr):
            raise ValueError(f"mean_psnr ({self.mean_psnr}) needs a min_psnr at or below it, got {self.min_psnr}")
        #: the per-case floor (dB) fitted for ``mean_psnr`` (None: ``min_psnr``)
        self.psnr_floor: float | None = None
        self.n_gen, self.n_sur = int(n_gen), int(n_sur)
        if self.n_gen < 1 or self.n_sur < 0:
            raise ValueError("n_gen must be >= 1 and n_sur >= 0")
        self.stop_dice = float(stop_dice)
        self.mix = float(mix)
        self.surrogate_reset = int(surrogate_reset)
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"mix must lie in [0, 1], got {mix}")
        self.lr, self.surrogate_lr = float(lr), float(surrogate_lr)
        self.batch_size = int(batch_size)
        self.patch_size = _as_int_tuple(patch_size, "patch_size")
        if isinstance(resize_aug, str) and resize_aug.lower() == "auto":
            self.resize_aug: Any = "auto"
        else:
            self.resize_aug = _as_float_pair(resize_aug, "resize_aug")
        self.gen_scale = None if gen_scale in (None, "", "none") else float(gen_scale)
        if self.gen_scale is not None and self.gen_scale < 1.0:
            raise ValueError(f"gen_scale must be >= 1, got {gen_scale}")
        self.channels = _as_int_tuple(channels, "channels")
        self.surrogate_channels = _as_int_tuple(surrogate_channels, "surrogate_channels")
        if isinstance(quantise_levels, str) and quantise_levels.lower() == "auto":
            self.quantise_levels: Any = "auto"
        else:
            self.quantise_levels = int(quantise_levels) if quantise_levels not in (None, "", "none") else 0
        self.sw_roi_size = _as_int_tuple(sw_roi_size, "sw_roi_size")
        self.sw_overlap = float(sw_overlap)
        self.infer_batch_size = max(1, int(infer_batch_size))
        self.refine_rounds = None if refine_rounds in (None, "", "auto") else int(refine_rounds)
        self.refine_pgd = int(refine_pgd)
        self.refine_surrogate_epochs = int(refine_surrogate_epochs)
        self.refine_stop = float(refine_stop)
        self.refine_size: Any = as_work_size(refine_size)
        self.refine_steps = int(refine_steps)
        self.distil_epochs = int(distil_epochs)
        self.refine_reset = int(refine_reset)
        self.refine_energy = str(refine_energy)
        self.refine_step = str(refine_step)
        self.refine_step_fraction = float(refine_step_fraction)
        self.refine_tile: int | str = as_tile(refine_tile)
        self.refine_tile_classwise = as_bool(refine_tile_classwise)
        self.refine_tile_symmetric = as_bool(refine_tile_symmetric)
        self.refine_tile_fill = as_bool(refine_tile_fill)
        self.refine_tile_colour = as_tile_colour(refine_tile_colour)
        self.refine_tile_harmonics = int(refine_tile_harmonics)
        auto_tile_bound(tile_bound, 0)  # validates it; ``auto`` resolves once the spatial dims are known
        self.tile_bound: str | Sequence[float] | None = tile_bound
        self.refine_window: int | str = as_window(refine_window)
        if self.distil_epochs < 0 or self.refine_steps < 0:
            raise ValueError("distil_epochs and refine_steps must be >= 0")
        self.victim_grids: Any = as_victim_grids(victim_grids)
        self.release_normalise = str(release_normalise)
        self.release_jitter = float(release_jitter)
        self.release_augment = as_release_augment(release_augment)
        self._refine_settings(2)  # validates the refinement parameters
        self._release_path(2)
        self.refiner: ReleaseRefiner | None = None
        self.windows: dict[str, Any] = {}
        self.in_channels: int | None = None
        self.num_classes: int | None = None
        self.gen_c: PerturbationGenerator | None = None
        self.gen_t: PerturbationGenerator | None = None
        self.history: list[dict[str, float]] = []
        self._levels_resolved: int = 0

    @property
    def max_epsilon(self) -> float:
        """The largest per-voxel change UMed can make (the pipeline clamps quantised perturbations to it)."""
        return max(self.epsilon_c, self.epsilon_t) if self.mode == "both" else (
            self.epsilon_c if self.mode == "contour" else self.epsilon_t)

    # -- resolved settings -----------------------------------------------------------------------------------------
    def _sd(self) -> int:
        if self.spatial_dims is None:
            raise RuntimeError("spatial_dims is not known yet: fit the protector or pass spatial_dims")
        return int(self.spatial_dims)

    def _epochs(self) -> int:
        if self.epochs is not None:
            return int(self.epochs)
        if self.refine_rounds != 0:  # the release stage refines and then distils the generators: a short start
            return 1 if self._sd() == 2 else 2
        return 6 if self._sd() == 2 else 10

    def _gen_scale(self) -> float:
        return self.gen_scale if self.gen_scale is not None else 2.0

    def _resize_range(self) -> tuple[float, float] | None:
        if self.resize_aug == "auto":
            return (0.3, 0.6) if self._sd() == 2 else None
        return self.resize_aug

    def _patch(self, max_shape: Sequence[int]) -> tuple[int, ...]:
        sd = self._sd()
        p = self.patch_size or ((96,) if sd == 2 else (48,))
        p = tuple(p) * sd if len(p) == 1 else tuple(p)
        if len(p) != sd:
            raise ValueError(f"patch_size {self.patch_size} does not have {sd} entries")
        return tuple(min(a, int(b)) for a, b in zip(p, max_shape))

    # -- networks --------------------------------------------------------------------------------------------------
    def _build(self, in_channels: int, num_classes: int) -> None:
        sd = self._sd()
        self.in_channels, self.num_classes = int(in_channels), int(num_classes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(case_seed(self.seed, "umed-generators"))
            self.gen_c = PerturbationGenerator(sd, in_channels + 2, in_channels, self.channels, self.theta)
            self.gen_t = PerturbationGenerator(sd, in_channels + 1, in_channels, self.channels, 0.0)
        self.gen_c.to(self.device)
        self.gen_t.to(self.device)

    def _gen_inputs(self, x: torch.Tensor, m_c: torch.Tensor, m_roi: torch.Tensor) -> torch.Tensor:
        """Generator input ``[x, M_c, M_roi]`` at generator resolution."""
        parts = [x, m_c, m_roi]
        s = self._gen_scale()
        if s > 1.0:  # area pooling works channel by channel: pooling each part spares a native-size concatenation
            size = [max(1, int(round(n / s))) for n in x.shape[2:]]
            parts = [F.interpolate(p.to(x.dtype), size=size, mode="area") for p in parts]
        return torch.cat([p.to(x.dtype) for p in parts], dim=1)

    def _gen_forward(self, inp: torch.Tensor) -> torch.Tensor:
        """Both generators on a generator-resolution input; returns ``[raw_c, raw_t]`` stacked on channels."""
        assert self.gen_c is not None and self.gen_t is not None
        c = self.in_channels or (inp.shape[1] - 2)
        outs = []
        outs.append(self.gen_c(inp) if self.mode != "texture" else torch.zeros_like(inp[:, :c]))
        outs.append(self.gen_t(torch.cat([inp[:, :c], inp[:, c + 1: c + 2]], 1)) if self.mode != "contour"
                    else torch.zeros_like(inp[:, :c]))
        return torch.cat(outs, dim=1)

    def _raw(
        self, inp: torch.Tensor, native: Sequence[int], sliding: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generator outputs upsampled to the native size: ``(raw_c, raw_t)``."""
        c = int(self.in_channels or 1)
        out = self._upsample(self._raw_small(inp, sliding), native)
        return out[:, :c], out[:, c:]

    def _raw_small(self, inp: torch.Tensor, sliding: bool = False) -> torch.Tensor:
        """Both generators' outputs ``[raw_c, raw_t]`` at generator resolution (sliding windows when asked)."""
        if sliding:
            return sliding_window_inference(inp, self._sw_roi(), self.infer_batch_size, self._gen_forward,
                                            overlap=self.sw_overlap, mode="gaussian", padding_mode="replicate")
        return self._gen_forward(inp)

    def _upsample(self, out: torch.Tensor, native: Sequence[int]) -> torch.Tensor:
        """Generator-resolution outputs to the native size (bilinear/trilinear; unchanged when already there)."""
        if tuple(out.shape[2:]) == tuple(native):
            return out
        mode = "bilinear" if self._sd() == 2 else "trilinear"
        return F.interpolate(out, size=tuple(native), mode=mode, align_corners=False)

    def _apply(self, x: torch.Tensor, small: torch.Tensor, a_c: torch.Tensor, a_t: torch.Tensor,
               limit: torch.Tensor) -> torch.Tensor:
        """:meth:`_combine` of the generator-resolution outputs ``small`` without gradients, one generator's output
        upsampled at a time and every step in place: the same values, with about two native-size volumes of
        temporaries instead of eight (what lets a 512 x 512 x 300 CT protect in a few GB)."""
        c = int(self.in_channels or 1)
        native = x.shape[2:]
        delta = self._upsample(small[:, :c], native).tanh_().mul_(a_c)
        delta.add_(self._upsample(small[:, c:], native).tanh_().mul_(a_t))
        torch.minimum(delta, limit, out=delta)
        torch.maximum(delta, limit.neg(), out=delta)
        return delta.add_(x).clamp_(0.0, 1.0).sub_(x)

    def _sw_roi(self) -> tuple[int, ...]:
        sd = self._sd()
        if self.sw_roi_size is not None:
            r = self.sw_roi_size
            return tuple(r) * sd if len(r) == 1 else tuple(r)
        p = self.patch_size or ((96,) if sd == 2 else (48,))
        p = tuple(p) * sd if len(p) == 1 else tuple(p)
        return tuple(max(8, int(2 * v / self._gen_scale())) for v in p)

    # -- fitting ---------------------------------------------------------------------------------------------------
    def _scan(
        self, samples: Sequence[Mapping[str, Any]]
    ) -> tuple[list[dict[str, Any]], int, int, list[tuple[int, ...]], int]:
        """One pass over the samples: per-case whole-image quantities (spacing, texture stats, energy scale),
        channels, classes, shapes and quantisation levels."""
        cache, shapes = [], []
        channels, k, eight_bit = None, 1, True
        for s in samples:
            img = torch.as_tensor(s["image"])
            lab = torch.as_tensor(s["label"])
            self._check_inputs(img, lab)
            if channels is None:
                channels = int(img.shape[0])
            elif int(img.shape[0]) != channels:
                raise ValueError(f"{s.get('case_id')}: {img.shape[0]} channels, expected {channels}")
            if not torch.isfinite(img).all():
                raise ValueError(f"{s.get('case_id')}: image contains NaN or infinite values")
            k = max(k, int(lab.max()))
            if eight_bit:  # a :meth:`fit_sample` crop says whether its whole image is 8-bit
                eight_bit = bool(s["levels_ok"]) if "levels_ok" in s else grey_levels([img]) is not None
            spacing = sample_spacing(s, sd=img.ndim - 1)
            shape = tuple(int(n) for n in s.get("window_shape") or img.shape[1:])  # the whole image's
            x, y = img.detach().float().cpu(), lab.cpu()
            if "window_box" not in s and auto_window(img.ndim - 1, shape, self.refine_window):
                # a big case: its labels' box suffices (a :meth:`fit_sample` crop already is one)
                margin = self._margin(spacing)
                box = footprint_box(y, [2 * m for m in margin])  # the band's reach, then context for its maps
                if box is not None:
                    x, y = crop(x, box), crop(y, box)
            m_c, m_roi = self._regions(x, y, spacing)
            stats, scale = self._case_stats(x, y, m_c, m_roi, voxels=math.prod(shape))
            cache.append({"spacing": spacing, "stats": stats, "scale": scale})
            shapes.append(tuple(img.shape[1:]))
        if channels is None:
            raise ValueError("UMed needs at least one training sample")
        if self.quantise_levels == "auto":
            levels = 255 if eight_bit else 0
        else:
            levels = int(self.quantise_levels)
        return cache, channels, k + 1, shapes, levels

    def _margin(self, spacing: Sequence[float] | None) -> list[int]:
        """Voxels of context around a crop that make its masks and texture bound equal the whole image's."""
        sd = self._sd()
        if self.contour_radius_mm is not None and spacing is not None:
            radii = [self.contour_radius_mm / float(v) for v in tuple(spacing)[:sd]]
        else:
            radii = [self.contour_radius] * sd
        return [int(math.ceil(r)) + self.texture_window // 2 + 1 for r in radii]

    def _sample_batch(
        self,
        samples: Sequence[Mapping[str, Any]],
        cache: list[dict[str, Any]],
        indices: Sequence[int],
        patch: tuple[int, ...],
        g: torch.Generator,
    ) -> tuple[torch.Tensor, ...]:
        """Native-resolution patches ``(x, y, M_c, M_roi, a_c, a_t, limit)`` (see :meth:`_case_maps`), centred on
        the ROI two times in three; images smaller than the patch are zero-padded at the end.

        Masks and budgets are computed on the crop plus a margin, with the whole image's texture statistics and
        energy scale, so they equal the whole-image maps used when protecting.
        """
        extra = "target" in samples[indices[0]]  # a per-voxel target to crop alongside (distillation)
        cols: list[list[torch.Tensor]] = [[] for _ in range(8 if extra else 7)]
        for i in indices:
            s = samples[i]
            img = torch.as_tensor(s["image"]).detach().float().cpu()
            lab = torch.as_tensor(s["label"]).detach().long().cpu()
            info = cache[i]
            shape = tuple(img.shape[1:])
            virtual = [max(n, p) for n, p in zip(shape, patch)]
            fg = torch.nonzero(lab[0] > 0)
            r = torch.rand(1 + len(shape), generator=g)
            if len(fg) and r[0] < 2 / 3:
                centre = fg[int(torch.randint(len(fg), (1,), generator=g))].tolist()
                start = [min(max(0, c - p // 2), n - p) for c, p, n in zip(centre, patch, virtual)]
            else:
                start = [int(float(r[1 + d]) * (n - p + 1)) for d, (n, p) in enumerate(zip(virtual, patch))]
            stop = [min(a + p, n) for a, p, n in zip(start, patch, shape)]
            margin = self._margin(info["spacing"])
            ext0 = [max(0, a - m) for a, m in zip(start, margin)]
            ext1 = [min(n, b + m) for b, m, n in zip(stop, margin, shape)]
            ext = (slice(None),) + tuple(slice(a, b) for a, b in zip(ext0, ext1))
            e_img, e_lab = img[ext], lab[ext]
            m_c, m_roi = self._regions(e_img, e_lab, info["spacing"])
            maps = (e_img, e_lab, m_c, m_roi) + self._maps(e_img, e_lab, m_c, m_roi, info["stats"], info["scale"])
            if extra:
                t = s["target"]  # a big case's target is held as its window
                maps = maps + (t.crop((tuple(ext0), tuple(ext1))).float() if isinstance(t, Windowed)
                               else torch.as_tensor(t).detach().float().cpu()[ext],)
            inner = (slice(None),) + tuple(slice(a - e, b - e) for a, b, e in zip(start, stop, ext0))
            dst = (slice(None),) + tuple(slice(0, b - a) for a, b in zip(start, stop))
            for col, t in zip(cols, maps):
                out = torch.zeros((t.shape[0],) + tuple(patch), dtype=t.dtype)
                out[dst] = t[inner]
                col.append(out)
        return tuple(torch.stack(col).to(self.device) for col in cols)

    def _checkpoint_state(self, sur: Surrogate, opt: torch.optim.Optimizer, epoch: int) -> dict[str, Any]:
        assert self.gen_c is not None and self.gen_t is not None
        return {
            "epoch": epoch,
            "gen_c": self.gen_c.state_dict(),
            "gen_t": self.gen_t.state_dict(),
            "opt_gen": opt.state_dict(),
            "surrogate": sur.state_dict(),
            "history": list(self.history),
            "params": self.params(),
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "levels": self._levels_resolved,
            "rng": torch.get_rng_state(),
        }

    def fit(
        self,
        samples: Sequence[Mapping[str, Any]],
        *,
        progress: bool = True,
        checkpoint: str | os.PathLike | None = None,
    ) -> "UMedProtector":
        """Fit the generators by min-min against a surrogate UNet (see the module docstring).

        Args:
            samples: sequence of dicts with ``image`` (C x spatial float in [0, 1]), ``label`` (1 x spatial int),
                ``case_id`` and optionally ``spacing``.
            progress: show tqdm progress bars.
            checkpoint: file saved at the end of every epoch (generators, surrogate, optimisers, epoch, history,
                RNG state) and resumed from when it exists; a resumed fit gives the same generators as an
                uninterrupted one.

        Returns:
            self, fitted.
        """
        if len(samples) == 0:
            raise ValueError("UMed needs at least one training sample")
        # a refit starts on the fitting bound, not on the bound an earlier tile is written on, and with no window
        self.refiner, self.windows = None, {}
        cache, channels, num_classes, shapes, levels = self._scan(samples)
        self._levels_resolved = levels
        sd = self._sd()
        max_shape = [max(s[d] for s in shapes) for d in range(sd)]
        patch = self._patch(max_shape)
        self._build(channels, num_classes)
        assert self.gen_c is not None and self.gen_t is not None
        params = [p for net, used in ((self.gen_c, self.mode != "texture"), (self.gen_t, self.mode != "contour"))
                  if used for p in net.parameters()]
        opt = torch.optim.Adam(params, lr=self.lr)
        def new_surrogate(generation: int) -> Surrogate:
            salt = "umed-surrogate" if generation == 0 else f"umed-surrogate-{generation}"
            return Surrogate(sd, channels, num_classes, channels=self.surrogate_channels, lr=self.surrogate_lr,
                             device=self.device, seed=case_seed(self.seed, salt) % (2**31))

        sur = new_surrogate(0)
        start_epoch, self.history = 0, []
        if checkpoint is not None and os.path.exists(checkpoint):
            state = torch.load(checkpoint, map_location=self.device, weights_only=False)
            bounds = ("epochs", "refine_rounds")  # upper bounds: a fit may be resumed with more
            if {k: v for k, v in state.get("params", {}).items() if k not in bounds} != {
                k: v for k, v in self.params().items() if k not in bounds
            }:
                raise ValueError(f"{checkpoint}: checkpoint was written with different UMed parameters")
            self.gen_c.load_state_dict(state["gen_c"])
            self.gen_t.load_state_dict(state["gen_t"])
            opt.load_state_dict(state["opt_gen"])
            sur.load_state_dict(state["surrogate"])
            self.history = list(state["history"])
            start_epoch = int(state["epoch"]) + 1
            torch.set_rng_state(state["rng"])
        n = len(samples)
        n_epochs = self._epochs()
        done = bool(self.history) and self.history[-1]["dice"] > self.stop_dice
        bar = tqdm(total=n_epochs, initial=start_epoch, desc="umed fit", disable=not progress, unit="epoch")
        for epoch in range(start_epoch, n_epochs):
            if done:
                break
            g = torch.Generator().manual_seed(case_seed(self.seed, f"umed-epoch-{epoch}"))
            order = torch.randperm(n, generator=g).tolist()
            batches = [order[i: i + self.batch_size] for i in range(0, n, self.batch_size)]
            gen_losses, sur_losses, dices = [], [], []
            inner = tqdm(batches, desc=f"epoch {epoch + 1}/{n_epochs}", leave=False, disable=not progress)
            for step, idx in enumerate(inner):
                it = epoch * len(batches) + step
                if self.surrogate_reset > 0 and it > 0 and it % self.surrogate_reset == 0:
                    # a fresh learner: the perturbation must be what a network picks up first, not what a
                    # well-trained surrogate already sees in the images
                    sur = new_surrogate(it // self.surrogate_reset)
                x, y, m_c, m_roi, a_c, a_t, limit = self._sample_batch(samples, cache, idx, patch, g)
                inp = self._gen_inputs(x, m_c, m_roi)
                # (a) generators: minimise the surrogate's loss on the protected, preprocessed patch
                sur.model.requires_grad_(False)
                self.gen_c.train(), self.gen_t.train()
                base = mix_batch(x, g, self.mix)
                for _ in range(self.n_gen):
                    raw_c, raw_t = self._raw(inp, x.shape[2:])
                    delta = self._combine(x, raw_c, raw_t, a_c, a_t, limit)
                    xp = quantise_st(base + delta, levels)
                    xa, ya = preprocess_standin(xp, y, g, sur.multiple, self._resize_range())
                    loss = sur.loss(xa, ya)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    gen_losses.append(float(loss.detach()))
                sur.model.requires_grad_(True)
                # (b) surrogate: learn from the protected patches (augmented)
                xp = quantise_st(base + delta.detach(), levels)
                for _ in range(self.n_sur):
                    xa, ya = preprocess_standin(xp, y, g, sur.multiple, self._resize_range())
                    l_s, logits = sur.step(xa, ya)
                    sur_losses.append(l_s)
                    dices.append(foreground_dice(logits.argmax(1, keepdim=True), ya))
                inner.set_postfix(gen=f"{gen_losses[-1]:.3f}", dice=f"{dices[-1] if dices else 0:.3f}")
            rec = {
                "epoch": epoch,
                "gen_loss": float(np.mean(gen_losses)) if gen_losses else float("nan"),
                "sur_loss": float(np.mean(sur_losses)) if sur_losses else float("nan"),
                "dice": float(np.mean(dices)) if dices else 0.0,
            }
            self.history.append(rec)
            bar.update(1)
            bar.set_postfix(gen=f"{rec['gen_loss']:.3f}", dice=f"{rec['dice']:.3f}")
            if checkpoint is not None:
                with atomic_path(checkpoint) as tmp:
                    torch.save(self._checkpoint_state(sur, opt, epoch), tmp)
            done = rec["dice"] > self.stop_dice
        bar.close()
        self._refine(samples, cache, channels, num_classes, patch, checkpoint, progress)
        self.fitted = True
        return self

    # -- protection ------------------------------------------------------------------------------------------------
    def perturbation(
        self, image: torch.Tensor, label: torch.Tensor | None = None, case_id: str | None = None
    ) -> torch.Tensor:
        """``delta`` for one case (see :meth:`perturbation_batch`)."""
        return self.perturbation_batch([image], [label], [case_id])[0]

    @torch.no_grad()
    def perturbation_batch(
        self,
        images: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor | None],
        case_ids: Sequence[str | None],
    ) -> list[torch.Tensor]:
        """One generator forward per case, cases of the same shape batched together (no padding, so a case's
        perturbation never depends on the other cases in its batch); sliding windows for large images.

        Returns:
            list of ``delta`` tensors (float32, each like its image, on the image's device).

        Raises:
            RuntimeError: the protector was not fitted (or loaded).
            ValueError: a missing label or a shape mismatch.
        """
        if self.gen_c is None or self.gen_t is None:
            raise RuntimeError("UMed is not fitted: call fit() or load_state_dict() first")
        prepared, views, view_labels, boxes = [], [], [], []
        for img, lab, cid in zip(images, labels, case_ids):
            self._check_inputs(img, lab)
            if int(img.shape[0]) != self.in_channels:
                raise ValueError(f"UMed was fitted on {self.in_channels}-channel images, got {img.shape[0]} channels")
            spacing = spacing_of(img)
            box = None if self.refiner is None else self._window(img, lab, spacing, cid)
            if box is None:
                views.append(img)
                view_labels.append(lab)
                prepared.append(self._case_maps(img, lab, full=self.refiner is not None))
            else:  # a big case is protected in its footprint window and pasted into the volume
                x_w, lab_w, maps = self._window_maps(img, lab, spacing, box)
                views.append(x_w)
                view_labels.append(lab_w)
                prepared.append(maps)
            boxes.append(box)
        self.gen_c.eval(), self.gen_t.eval()
        out: list[torch.Tensor | None] = [None] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(views):
            groups.setdefault(tuple(img.shape), []).append(i)
        roi = self._sw_roi()
        for shape, idx in groups.items():
            for j in range(0, len(idx), self.infer_batch_size):
                chunk = idx[j: j + self.infer_batch_size]
                # one case: views, not stacked copies (a big volume's maps are held once)
                x = torch.stack([torch.as_tensor(views[i]).detach().float().cpu() for i in chunk]) \
                    if len(chunk) > 1 else torch.as_tensor(views[chunk[0]]).detach().float().cpu()[None]
                x = x.to(self.device)
                m_c, m_roi, a_c, a_t, limit = ((torch.stack([prepared[i][k] for i in chunk]) if len(chunk) > 1
                                                else prepared[chunk[0]][k][None]).to(self.device) for k in range(5))
                stored = self.refiner is not None and all(
                    case_ids[i] is not None and str(case_ids[i]) in self.refiner.deltas for i in chunk)
                if stored or not bool((limit > 0).any()):  # refined training cases need no generator pass
                    deltas = torch.zeros_like(x)
                else:
                    inp = self._gen_inputs(x, m_c, m_roi)
                    sliding = any(n > r for n, r in zip(inp.shape[2:], roi))
                    if sliding and len(chunk) > 1:  # one case at a time: windows never mix cases
                        small = torch.cat([self._raw_small(inp[k: k + 1], True) for k in range(len(chunk))])
                    else:
                        small = self._raw_small(inp, sliding)
                    del inp
                    deltas = self._apply(x, small, a_c, a_t, limit)
                    del small
                if self.refiner is not None:  # the release stage: refined, distilled, energy-capped
                    for k, i in enumerate(chunk):
                        voxels = None if boxes[i] is None else math.prod(int(n) for n in images[i].shape[1:])
                        deltas[k] = self._refined(x[k], limit[k], deltas[k], view_labels[i], case_ids[i], voxels)
                for k, i in enumerate(chunk):
                    dev = images[i].device if torch.is_tensor(images[i]) else torch.device("cpu")
                    d = deltas[k].float()
                    box = boxes[i]
                    out[i] = (d if box is None else paste(d, box, images[i].shape[1:])).to(dev)
        return [o for o in out if o is not None]

    def budget(self, image: torch.Tensor, label: torch.Tensor, spacing: Sequence[float] | None = None) -> torch.Tensor:
        """The voxel-wise L-inf budget of a case: ``eps_c`` on the band, ``eps_t * B`` elsewhere in the ROI, 0
        outside, floored to whole grey levels for 8-bit data; without refinement also times the case's ``min_psnr``
        scale (with refinement ``min_psnr`` bounds the written perturbation's energy instead)."""
        self._set_spatial_dims(image)
        return self._case_maps(image, label, spacing, full=self.refiner is not None)[4]

    # -- state -----------------------------------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "epsilon_c": self.epsilon_c,
            "epsilon_t": self.epsilon_t,
            "contour_radius": self.contour_radius,
            "contour_radius_mm": self.contour_radius_mm,
            "theta": self.theta,
            "mode": self.mode,
            "texture_window": self.texture_window,
            "b_min": self.b_min,
            "texture_quantiles": list(self.texture_quantiles),
            "tile_bound": self.tile_bound,
            "min_psnr": self.min_psnr,
            "mean_psnr": self.mean_psnr,
            "n_gen": self.n_gen,
            "n_sur": self.n_sur,
            "stop_dice": self.stop_dice,
            "mix": self.mix,
            "surrogate_reset": self.surrogate_reset,
            "lr": self.lr,
            "surrogate_lr": self.surrogate_lr,
            "batch_size": self.batch_size,
            "patch_size": None if self.patch_size is None else list(self.patch_size),
            "resize_aug": self.resize_aug if self.resize_aug in ("auto", None) else list(self.resize_aug),
            "gen_scale": self.gen_scale,
            "channels": list(self.channels or ()),
            "surrogate_channels": list(self.surrogate_channels or ()),
            "quantise_levels": self.quantise_levels,
            "sw_roi_size": None if self.sw_roi_size is None else list(self.sw_roi_size),
            "sw_overlap": self.sw_overlap,
            "infer_batch_size": self.infer_batch_size,
            "refine_rounds": self.refine_rounds,
            "refine_pgd": self.refine_pgd,
            "refine_surrogate_epochs": self.refine_surrogate_epochs,
            "refine_stop": self.refine_stop,
            "refine_size": self.refine_size,
            "refine_steps": self.refine_steps,
            "distil_epochs": self.distil_epochs,
            "refine_reset": self.refine_reset,
            "refine_energy": self.refine_energy,
            "refine_step": self.refine_step,
            "refine_step_fraction": self.refine_step_fraction,
            "refine_tile": self.refine_tile,
            "refine_tile_classwise": self.refine_tile_classwise,
            "refine_tile_symmetric": self.refine_tile_symmetric,
            "refine_tile_fill": self.refine_tile_fill,
            "refine_tile_colour": self.refine_tile_colour,
            "refine_tile_harmonics": self.refine_tile_harmonics,
            "refine_window": self.refine_window,
            "victim_grids": self.victim_grids if self.victim_grids == "auto" else list(self.victim_grids),
            "release_normalise": self.release_normalise,
            "release_jitter": self.release_jitter,
            "release_augment": self.release_augment,
            "spatial_dims": self.spatial_dims,
        }

    def state_dict(self) -> dict[str, Any]:
        """Generator weights and everything needed to protect new cases without refitting."""
        state = super().state_dict()
        if self.gen_c is not None and self.gen_t is not None:
            state.update({
                "in_channels": self.in_channels,
                "num_classes": self.num_classes,
                "levels": self._levels_resolved,
                "gen_c": {k: v.detach().cpu() for k, v in self.gen_c.state_dict().items()},
                "gen_t": {k: v.detach().cpu() for k, v in self.gen_t.state_dict().items()},
                "history": list(self.history),
                "refine": None if self.refiner is None else self.refiner.state_dict(),
                "refine_windows": {k: [list(a), list(b)] for k, (a, b) in self.windows.items()},
                "distil_history": list(self.distil_history),
                "psnr_floor": self.psnr_floor,
            })
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> "UMedProtector":
        """Restore a fitted UMed (from :meth:`state_dict`); the parameters recorded in ``state`` win.

        Raises:
            ValueError: the state belongs to another method or holds no generators.
        """
        super().load_state_dict(state)
        if "gen_c" not in state:
            raise ValueError("UMed state holds no generators: it was saved before fitting")
        p = dict(state.get("params", {}))
        for key in ("epsilon", "epsilon_c", "epsilon_t", "contour_radius", "contour_radius_mm", "theta", "mode",
                    "texture_window", "b_min", "min_psnr", "mean_psnr", "gen_scale",
                    "sw_overlap"):
            if key in p:
                setattr(self, key, p[key])
        if "texture_quantiles" in p:
            self.texture_quantiles = as_texture_quantiles(p["texture_quantiles"])
        for key in ("channels", "surrogate_channels", "patch_size", "sw_roi_size"):
            if key in p:
                setattr(self, key, None if p[key] is None else tuple(int(v) for v in p[key]))
        for key in ("seed", "epochs", "infer_batch_size", "refine_rounds", "refine_pgd", "refine_surrogate_epochs",
                    "refine_stop", "refine_size", "refine_reset", "refine_energy", "refine_step", "release_normalise",
                    "release_jitter", "release_augment", "refine_step_fraction", "refine_tile",
                    "refine_tile_classwise", "refine_tile_symmetric", "refine_tile_fill", "refine_tile_colour",
                    "refine_tile_harmonics", "tile_bound", "refine_window"):
            if key in p:
                setattr(self, key, p[key])
        if "victim_grids" in p:
            self.victim_grids = as_victim_grids(p["victim_grids"])
        if "mean_psnr" not in p:  # a state written before the mean budget existed held every case at min_psnr
            self.mean_psnr = None
        if "tile_bound" not in p:  # a state written before the write bound existed wrote the tile on its fitting map
            self.tile_bound = "fit"
        if "refine_tile" not in p:  # a state written before the shared tile existed refined every case on its own
            self.refine_tile, self.refine_tile_classwise = 0, False
        if "refine_window" not in p:  # a state written before windows existed refined and protected cases whole
            self.refine_window = 0
        if "release_augment" not in p:  # a state written before it existed fitted through flips and rotations only
            self.release_augment = "none"
        self.windows = {str(k): (tuple(int(v) for v in a), tuple(int(v) for v in b))
                        for k, (a, b) in dict(state.get("refine_windows") or {}).items()}
        self._levels_resolved = int(state.get("levels", 0))
        self._build(int(state["in_channels"]), int(state["num_classes"]))
        assert self.gen_c is not None and self.gen_t is not None
        self.gen_c.load_state_dict(state["gen_c"])
        self.gen_t.load_state_dict(state["gen_t"])
        self.history = list(state.get("history", []))
        self.refiner, self.distil_history = None, list(state.get("distil_history", []))
        floor = state.get("psnr_floor")
        self.psnr_floor = None if floor is None else float(floor)
        if state.get("refine") is not None:
            self.refiner = self._new_refiner(self._sd(), int(state["in_channels"]), int(state["num_classes"]))
            self.refiner.load_state_dict(state["refine"])
        self.fitted = True
        return self
