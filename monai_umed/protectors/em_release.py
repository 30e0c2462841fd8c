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

"""EM's and SALM's release stage (``release=True``, ours): their min-min run *through* the release path.

Instead of EM's work-grid loop, the min-min runs through the release path exactly as UMed's release stage
(:class:`~monai_umed.protectors.refine.ReleaseRefiner`, shared code): one perturbation per case on a coarse work grid
(``refine_size``), written as ``quantise(x + clamp(upsample(d), -limit, limit))`` with the budget map
``limit = epsilon`` on the method's footprint (EM: every voxel; SALM: its sparse mask) at native resolution, floored to
whole grey levels for 8-bit data, and viewed by the surrogate as a trainer sees it (8-bit rounding, anti-aliased
resize to ``victim_grids``, per-image normalisation, flips, rot90). ``min_psnr`` adds a per-case energy budget that
holds on the written (rounded) values. EM's own work-grid loop and its ``random_resample`` stand-in are skipped. A
case not seen in fit gets ``steps`` refinement steps against the frozen refinement surrogate. Select it from the
command line with ``--param em.release=true --param em.min_psnr=50``.

With ``refine_tile`` (ours, UMed's 2D default) the stage refines one class-wise tile shared by every case instead of
one perturbation per case (:class:`~monai_umed.protectors.refine_shared.SharedTileRefiner`), laid on the method's
footprint and scaled to each case's energy budget; a case not seen in fit gets the fitted tile. A shared pattern that
explains every label is a shortcut a victim learns in a few epochs, where per-case perturbations have to be memorised
one by one (docs/methods.md).

The mixin :class:`EMReleaseStage` relies on :class:`~monai_umed.protectors.em.EMProtector` (through
:class:`~monai_umed.protectors.pgd.SampleWiseProtector`) for the fitting schedule, the input checks and the
surrogate's settings; a method changes its footprint by overriding :meth:`EMReleaseStage.release_footprint` and
:meth:`EMReleaseStage._fit_footprint` (as :class:`~monai_umed.protectors.salm.SALMProtector` does).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from monai_umed.masks import texture_bound
from monai_umed.protectors.pgd import WorkSet, linf_bound
from monai_umed.protectors.refine import (
    RefinedStage,
    RefineSettings,
    ReleaseRefiner,
    as_bool,
    as_texture_bound,
    as_tile,
    as_victim_grids,
    as_work_size,
    auto_tile,
    auto_victim_grids,
    auto_work_size,
    cap_energy,
    floor_to_levels,
    psnr_energy,
)
from monai_umed.protectors.refine_build import build_refiner
from monai_umed.protectors.refine_shared import SharedTileRefiner
from monai_umed.protectors.release import ReleasePath

__all__ = ["EMReleaseStage", "RELEASE_PARAMS"]

#: the release-stage parameters (recorded by ``params`` and restored from a state by ``load_state_dict``)
RELEASE_PARAMS = ("release", "min_psnr", "victim_grids", "refine_rounds", "refine_pgd", "refine_surrogate_epochs",
                  "refine_reset", "refine_stop", "refine_size", "refine_tile", "refine_tile_classwise",
                  "refine_tile_background", "refine_texture")


class EMReleaseStage(RefinedStage):
    """Mixin of :class:`~monai_umed.protectors.em.EMProtector` (and so of SALM): the release stage's parameters,
    state, budget maps, refinement and perturbations."""

    #: grey levels of the training data (255 for 8-bit images, None for float data), set by ``fit``
    levels: int | None = None
    #: label classes seen at native resolution by the release stage
    refine_classes: int | None = None

    # -- parameters and state ---------------------------------------------------------------------------------------
    def _init_release(
        self,
        release: bool | str,
        min_psnr: float | str | None,
        victim_grids: Any,
        refine_rounds: int,
        refine_pgd: int,
        refine_surrogate_epochs: int,
        refine_reset: int,
        refine_stop: float,
        refine_size: int | str | None,
        refine_tile: int | str = 0,
        refine_tile_classwise: bool | str = True,
        refine_tile_background: bool | str = True,
        refine_texture: Any = None,
    ) -> None:
        """Parse and validate the release-stage parameters (see :class:`~monai_umed.protectors.em.EMProtector`).

        Raises:
            ValueError: a parameter out of range.
        """
        self.release = as_bool(release)
        self.min_psnr = None if min_psnr in (None, "", "none", 0) else float(min_psnr)
        if self.min_psnr is not None and self.min_psnr <= 0:
            raise ValueError(f"min_psnr must be positive (dB) or None, got {min_psnr}")
        self.victim_grids = as_victim_grids(victim_grids)
        self.refine_rounds = int(refine_rounds)
        self.refine_pgd = int(refine_pgd)
        self.refine_surrogate_epochs = int(refine_surrogate_epochs)
        self.refine_reset = int(refine_reset)
        self.refine_stop = float(refine_stop)
        self.refine_size = as_work_size(refine_size)
        self.refine_tile = as_tile(refine_tile)
        self.refine_tile_classwise = as_bool(refine_tile_classwise)
        self.refine_tile_background = as_bool(refine_tile_background)
        self.refine_texture = as_texture_bound(refine_texture)
        if self.refine_rounds < 1:
            raise ValueError(f"refine_rounds must be >= 1, got {refine_rounds}")
        if self.refine_size is not None and self.refine_size != "auto" and self.refine_size < 8:
            raise ValueError(f"refine_size must be auto, None or >= 8, got {refine_size}")
        self._refine_settings(2)  # validates the release-stage parameters
        self._release_path(2)
        self.refiner = None
        self.levels = None
        self.refine_classes = None

    def _release_params(self) -> dict[str, Any]:
        """The release-stage parameters as ``params`` records them (:data:`RELEASE_PARAMS`, in that order)."""
        return {
            "release": self.release,
            "min_psnr": self.min_psnr,
            "victim_grids": self.victim_grids if self.victim_grids == "auto" else list(self.victim_grids),
            "refine_rounds": self.refine_rounds,
            "refine_pgd": self.refine_pgd,
            "refine_surrogate_epochs": self.refine_surrogate_epochs,
            "refine_reset": self.refine_reset,
            "refine_stop": self.refine_stop,
            "refine_size": self.refine_size,
            "refine_tile": self.refine_tile,
            "refine_tile_classwise": self.refine_tile_classwise,
            "refine_tile_background": self.refine_tile_background,
            "refine_texture": None if self.refine_texture is None else [self.refine_texture[0],
                                                                        *self.refine_texture[1]],
        }

    def _release_state(self) -> dict[str, Any]:
        """The release stage's part of ``state_dict``: grey levels, label classes and the refiner's state."""
        return {
            "levels": self.levels,
            "refine_classes": self.refine_classes,
            "refine": None if self.refiner is None else self.refiner.state_dict(),
        }

    def _load_release_params(self, params: Mapping[str, Any]) -> None:
        """Take the release-stage parameters recorded in a state's ``params`` (any one of them: all are taken, the
        missing ones keep their current values)."""
        p = dict(params)
        if not any(k in p for k in RELEASE_PARAMS):
            self.release = False  # a state from before the release stage (SALM's defaults now turn it on)
            return
        self.release = as_bool(p.get("release", self.release))
        self.min_psnr = p.get("min_psnr", self.min_psnr)
        self.victim_grids = as_victim_grids(p.get("victim_grids", self.victim_grids))
        self.refine_size = as_work_size(p.get("refine_size", self.refine_size))
        self.refine_tile = as_tile(p.get("refine_tile", self.refine_tile))
        self.refine_tile_classwise = as_bool(p.get("refine_tile_classwise", self.refine_tile_classwise))
        self.refine_tile_background = as_bool(p.get("refine_tile_background", self.refine_tile_background))
        if "refine_texture" in p:
            self.refine_texture = as_texture_bound(p["refine_texture"])
        for key in ("refine_rounds", "refine_pgd", "refine_surrogate_epochs", "refine_reset", "refine_stop"):
            if key in p:
                setattr(self, key, type(getattr(self, key))(p[key]))

    def _load_release_state(self, state: Mapping[str, Any]) -> None:
        """Restore the release stage's part of a state (after the method's own state: the refiner needs the channels
        and classes)."""
        self.levels = state.get("levels")
        self.refine_classes = state.get("refine_classes")
        self.refiner = None
        if state.get("refine") is not None:
            self.refiner = self._new_refiner()
            self.refiner.load_state_dict(state["refine"])

    def _resume(self, checkpoint: Path, ws: WorkSet) -> None:
        """Resume the work-grid stage; the parameters given to this fit win over those recorded in the checkpoint
        (e.g. more ``refine_rounds`` than the interrupted fit had)."""
        mine = {k: getattr(self, k) for k in RELEASE_PARAMS}
        super()._resume(checkpoint, ws)
        for k, v in mine.items():
            setattr(self, k, v)

    # -- footprint and budget ---------------------------------------------------------------------------------------
    def _fit_footprint(self, ws: WorkSet, batches: list[list[int]], checkpoint: Path | None, progress: bool) -> None:
        """What the method learns before the release stage to know its footprint. EM's footprint is every voxel:
        nothing (its work-grid surrogate is dropped); SALM runs its own min-min for its sparse mask."""
        self.surrogate = None

    def release_footprint(self, image: torch.Tensor, label: torch.Tensor | None, case_id: str | None) -> torch.Tensor:
        """The voxels the release stage may change in a case (1 x spatial bool, native grid); EM: all of them.

        Args:
            image: C x spatial image in ``[0, 1]``.
            label: its 1 x spatial labels.
            case_id: the case (a training case or an unseen one).
        """
        return torch.ones((1,) + tuple(image.shape[1:]), dtype=torch.bool, device=image.device)

    def release_budget(self, image: torch.Tensor, label: torch.Tensor | None, case_id: str | None,
                       written: bool = True) -> torch.Tensor:
        """A case's budget map for the release stage (C x spatial, native grid): ``epsilon`` on
        :meth:`release_footprint`, 0 elsewhere, floored to whole grey levels for 8-bit data; with ``refine_texture``,
        the map a perturbation is written on is ``epsilon`` times UMed's texture-aware bound ``B``
        (:func:`~monai_umed.masks.texture_bound`: 0 outside the labelled structures, ``b_min`` on their flattest
        voxels, 1 on their most textured ones) before the floor.

        Args:
            image: C x spatial image in ``[0, 1]``.
            label: its 1 x spatial labels.
            case_id: the case (a training case or an unseen one).
            written: the map the perturbation is written on (True) or the one a shared tile is fitted on (False: the
                footprint alone, as UMed fits its tile on the whole structure before laying it on its texture).

        Raises:
            ValueError: ``refine_texture`` without a label.
        """
        mask = self.release_footprint(image, label, case_id).to(image.device)
        if self.refine_texture is None or not written:
            eps = float(floor_to_levels(torch.tensor(self.epsilon, dtype=torch.float64), self.levels))
            eps = linf_bound(eps)  # the float32 value at or below it
            return (mask.to(torch.float32) * eps).expand(image.shape[0], *mask.shape[1:])
        if label is None:
            raise ValueError(f"{self.name}: refine_texture needs the case's label")
        b_min, quantiles = self.refine_texture
        # texture_bound's default window is UMed's texture_window default
        bound = texture_bound(image.float(), torch.as_tensor(label).to(image.device), b_min=b_min, quantiles=quantiles)
        return floor_to_levels(bound.mul_(mask).mul_(linf_bound(self.epsilon)), self.levels, inplace=True)

    # -- the refiner ------------------------------------------------------------------------------------------------
    def _sd(self) -> int:
        return int(self.spatial_dims or 2)

    def _refine_settings(self, sd: int) -> RefineSettings:
        size = auto_work_size(sd, self.refine_size)
        return RefineSettings(rounds=self.refine_rounds, pgd_steps=self.refine_pgd,
                              surrogate_epochs=self.refine_surrogate_epochs, stop_dice=self.refine_stop,
                              batch_size=self._batch_size(), work_size=size, unseen_steps=self.steps,
                              reset_every=self.refine_reset, shared_tile=auto_tile(sd, self.refine_tile),
                              shared_classwise=self.refine_tile_classwise,
                              shared_background=self.refine_tile_background)

    def _release_path(self, sd: int) -> ReleasePath:
        grids = auto_victim_grids(sd, self.victim_grids)
        return ReleasePath(grids=grids, normalise="minmax" if sd == 2 else "zscore")

    def _new_refiner(self) -> ReleaseRefiner:
        sd = self._sd()
        classes = int(self.refine_classes or self.num_classes or 2)
        return build_refiner(sd, int(self.in_channels or 1), classes, self._release_path(sd),
                             self._refine_settings(sd), surrogate_channels=self.surrogate_channels, lr=self.lr,
                             device=self.device, seed=self.seed, tag=f"{self.name}-refine", levels=self.levels)

    # -- fitting and protection -------------------------------------------------------------------------------------
    def _fit_release(self, samples: Sequence[Mapping[str, Any]], checkpoint: str | os.PathLike | None,
                     progress: bool) -> None:
        """Refine one perturbation per training case through the release path inside its budget map (checkpointed
        in ``<checkpoint>.refine``, resumed from it).

        Args:
            samples: the training cases (as for ``fit``).
            checkpoint: the fit's checkpoint (None: none).
            progress: log one line per round.
        """
        images, labels, limits, ids = [], [], [], []
        classes = int(self.num_classes or 2)
        for i, s in enumerate(samples):
            img = torch.as_tensor(s["image"]).detach().float().cpu()
            lab = torch.as_tensor(s["label"]).detach().long().cpu()
            cid = str(s.get("case_id") if s.get("case_id") is not None else f"case_{i:06d}")
            # a shared tile is fitted on the whole footprint and then laid on its texture (refine_texture)
            limits.append(self.release_budget(img, lab, cid, written=not auto_tile(self._sd(), self.refine_tile)))
            images.append(img)
            labels.append(lab)
            ids.append(cid)
            classes = max(classes, int(lab.max()) + 1)
        self.refine_classes = classes
        self.refiner = self._new_refiner()
        log = (lambda line: tqdm.write(f"{self.name} refine: {line}")) if progress else None
        ckpt = None if checkpoint is None else f"{os.fspath(checkpoint)}.refine"
        energy = psnr_energy(self.min_psnr)
        energies = None if energy is None else [energy] * len(ids)
        self.refiner.fit(images, labels, limits, ids, checkpoint=ckpt, log=log, energies=energies,
                         progress=f"{self.name} refine" if progress else None)
        if isinstance(self.refiner, SharedTileRefiner) and self.refine_texture is not None:
            written = [self.release_budget(x, y, cid) for x, y, cid in zip(images, labels, ids)]
            self.refiner.lay(labels, written, ids, energies)

    def _release_perturbation(
        self, image: torch.Tensor, label: torch.Tensor | None, case_id: str | None
    ) -> torch.Tensor:
        """A case's perturbation in the release stage, as written: the refined one (a training case) or one refined
        for ``steps`` steps against the frozen release-stage surrogate (an unseen case); clipped, rounded to the
        data's grey levels and, with ``min_psnr``, energy-capped.

        Raises:
            RuntimeError: the protector was not fitted.
            ValueError: bad shapes, missing label or channels that differ from the training data.
        """
        energy = psnr_energy(self.min_psnr)
        self._check_inputs(image, label)
        if self.refiner is None or not self.fitted:
            raise RuntimeError(f"{self.name}: call fit() (or load_state_dict) before perturbation()")
        if int(image.shape[0]) != self.in_channels:
            raise ValueError(f"{self.name}: {image.shape[0]} channels, expected {self.in_channels}")
        x = image.detach().float()
        cid = None if case_id is None else str(case_id)
        limit = self.release_budget(x, label, cid).contiguous()
        if cid is not None and cid in self.refiner.deltas:
            d = self.refiner.deltas[cid].float().to(x.device)
        else:
            with torch.enable_grad():
                d = self.refiner.refine_case(x, torch.as_tensor(label), limit, cid or "", energy=energy).to(x.device)
        delta = ReleaseRefiner.native_delta(d[None], limit[None])[0]
        return cap_energy(x, delta, energy, self.levels).to(image.dtype)
