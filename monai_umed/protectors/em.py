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

"""EM: sample-wise error-minimising noise (Huang et al., "Unlearnable Examples: Making Personal Data Unexploitable",
ICLR 2021), adapted to segmentation (METHODS.md section 3).

Min-min: each round trains the surrogate UNet on the perturbed training images, stops once its training Dice reaches
``stop_dice``, and otherwise runs ``steps`` PGD *descent* steps of size ``alpha`` on ``DiceCE(f(x + delta), y)`` for
every case, ``|delta|_inf <= epsilon``. Noise starts uniform in ``[-epsilon, epsilon]``. The PGD objective sees the
same random flips and down/up-resizing as the surrogate (ours), so the shortcut survives a victim's preprocessing.

Release stage (``release=True``, ours): the min-min runs *through* the release path instead, exactly as UMed's
release stage (:class:`~monai_umed.protectors.refine.ReleaseRefiner`, shared code): one perturbation per case on a
coarse work grid (``refine_size``), written as ``quantise(x + clamp(upsample(d), -limit, limit))`` with the budget map
``limit = epsilon`` on the method's footprint (EM: every voxel; SALM: its sparse mask) at native resolution, floored to
whole grey levels for 8-bit data, and viewed by the surrogate as a trainer sees it (8-bit rounding, anti-aliased
resize to ``victim_grids``, per-image normalisation, flips, rot90). ``min_psnr`` adds a per-case energy budget that
holds on the written (rounded) values. EM's own work-grid loop and its ``random_resample`` stand-in are skipped. A
case not seen in fit gets ``steps`` refinement steps against the frozen refinement surrogate. Select it from the
command line with ``--param em.release=true --param em.min_psnr=50``.

Example::

    p = EMProtector(epsilon=8 / 255, rounds=10, steps=10)
    p.fit([{"image": x, "label": y, "case_id": "c0"}, ...])  # x: (C, H, W[, D]) in [0, 1]; y: (1, H, W[, D])
    delta = p.perturbation(x, y, case_id="c0")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from monai_umed.protectors.base import case_seed
from monai_umed.protectors.pgd import SampleWiseProtector, WorkSet, _Batch, linf_bound, pgd
from monai_umed.protectors.refine import (
    RefineSettings,
    ReleaseRefiner,
    auto_victim_grids,
    auto_work_size,
    cap_energy,
    floor_to_levels,
    grey_levels,
    psnr_energy,
)
from monai_umed.protectors.release import ReleasePath
from monai_umed.protectors.surrogate import Surrogate

__all__ = ["EMProtector"]

#: the release-stage parameters (recorded by ``params`` and restored from a state by ``load_state_dict``)
RELEASE_PARAMS = ("release", "min_psnr", "victim_grids", "refine_rounds", "refine_pgd", "refine_surrogate_epochs",
                  "refine_reset", "refine_stop", "refine_size")


def _as_bool(value: Any) -> bool:
    """``True``/``False`` from a bool, a number or a command-line string (``true``, ``false``, ``1``, ``0``...)."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("true", "yes", "on", "1"):
            return True
        if v in ("false", "no", "off", "0", "", "none"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    return bool(value)


def _as_grids(value: Any) -> Any:
    """``victim_grids``: ``auto``, or a tuple of grid sizes from an int, a list or a string such as ``128,256``
    (empty, None or ``none``: the images' own grid)."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        value = [v for v in value.replace("x", ",").split(",") if v.strip() and v.strip().lower() != "none"]
    if value is None or value is False:
        return ()
    if isinstance(value, (int, float)):
        value = (value,)
    return tuple(int(float(v)) for v in value)


def _as_size(value: Any) -> Any:
    """``refine_size``: ``auto``, None (native grid) or a positive int."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v == "auto":
            return "auto"
        if v in ("", "none", "native"):
            return None
    return None if value is None else int(value)


class EMProtector(SampleWiseProtector):
    """Sample-wise error-minimising noise with alternating surrogate training.

    Args:
        epsilon: L-inf budget in normalised units (default ``8/255``).
        alpha: PGD step; default ``epsilon / 10``.
        steps: PGD steps per round (default 10).
        rounds: maximum number of rounds (default 10); ``epochs``, when given, replaces it.
        train_steps: surrogate batches per round; ``None`` (default) = one pass over the training cases.
        stop_dice: stop when the surrogate's Dice on (a fixed subset of up to 64) perturbed training cases reaches
            this value (default 0.99).
        release: run the min-min through the release path (:class:`~monai_umed.protectors.refine.ReleaseRefiner`,
            UMed's release stage) instead of EM's work-grid loop (default False: the published method).
        min_psnr: per-case PSNR floor (dB) of the written perturbation: an energy budget in the release stage and a
            cap on what ``perturbation`` returns (default None: the L-inf budget alone).
        victim_grids: the grid sizes (longest side) the release path expects a trainer to resize to (``auto``:
            128 in 2D, the native grid in 3D).
        refine_rounds: release-stage min-min rounds (default 12).
        refine_pgd: release-stage PGD steps per case and round (default 2).
        refine_surrogate_epochs: release-stage surrogate passes over the training set per round (default 3).
        refine_reset: re-initialise the release-stage surrogate every this many rounds (default 3; 0: never).
        refine_stop: stop the release stage when its surrogate's training Dice over a round reaches this (0.95).
        refine_size: longest side of the release-stage work grid (``auto``: 128 in 2D, native in 3D; see
            :func:`~monai_umed.protectors.refine.auto_work_size`).
        kwargs: see :class:`~monai_umed.protectors.pgd.SampleWiseProtector` (``work_size``, ``batch_size``,
            ``surrogate_channels``, ``lr``, ``augment``, ``resample_prob``, ``resample_scale``, ``spatial_dims``,
            ``seed``, ``epochs``, ``device``).

    Shapes: ``image`` C x spatial (2D or 3D) in ``[0, 1]``, ``label`` 1 x spatial; the returned delta has the image's
    shape. A case not seen in fit gets ``steps`` x (rounds run) PGD steps against the final, frozen surrogate (with
    ``release``: ``steps`` refinement steps through the release path against the release-stage surrogate).
    """

    name = "em"
    resume_bounds = ("epochs", "refine_rounds")

    def __init__(
        self,
        epsilon: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        rounds: int = 10,
        train_steps: int | None = None,
        stop_dice: float = 0.99,
        release: bool = False,
        min_psnr: float | None = None,
        victim_grids: Any = "auto",
        refine_rounds: int = 12,
        refine_pgd: int = 2,
        refine_surrogate_epochs: int = 3,
        refine_reset: int = 3,
        refine_stop: float = 0.95,
        refine_size: int | str | None = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(epsilon=epsilon, alpha=alpha, steps=steps, **kwargs)
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.rounds = int(rounds)
        self.train_steps = None if train_steps is None else int(train_steps)
        self.stop_dice = float(stop_dice)
        self.release = _as_bool(release)
        self.min_psnr = None if min_psnr in (None, "", "none", 0) else float(min_psnr)
        if self.min_psnr is not None and self.min_psnr <= 0:
            raise ValueError(f"min_psnr must be positive (dB) or None, got {min_psnr}")
        self.victim_grids = _as_grids(victim_grids)
        self.refine_rounds = int(refine_rounds)
        self.refine_pgd = int(refine_pgd)
        self.refine_surrogate_epochs = int(refine_surrogate_epochs)
        self.refine_reset = int(refine_reset)
        self.refine_stop = float(refine_stop)
        self.refine_size = _as_size(refine_size)
        if self.refine_rounds < 1:
            raise ValueError(f"refine_rounds must be >= 1, got {refine_rounds}")
        if self.refine_size is not None and self.refine_size != "auto" and self.refine_size < 8:
            raise ValueError(f"refine_size must be auto, None or >= 8, got {refine_size}")
        self._refine_settings(2)  # validates the release-stage parameters
        self._release_path(2)
        #: the release stage's refiner (None unless fitted or loaded with ``release``)
        self.refiner: ReleaseRefiner | None = None
        #: grey levels of the training data (255 for 8-bit images, None for float data), set by ``fit``
        self.levels: int | None = None
        #: label classes seen at native resolution by the release stage
        self.refine_classes: int | None = None

    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "rounds": self.rounds,
            "train_steps": self.train_steps,
            "stop_dice": self.stop_dice,
            "release": self.release,
            "min_psnr": self.min_psnr,
            "victim_grids": self.victim_grids if self.victim_grids == "auto" else list(self.victim_grids),
            "refine_rounds": self.refine_rounds,
            "refine_pgd": self.refine_pgd,
            "refine_surrogate_epochs": self.refine_surrogate_epochs,
            "refine_reset": self.refine_reset,
            "refine_stop": self.refine_stop,
            "refine_size": self.refine_size,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "levels": self.levels,
            "refine_classes": self.refine_classes,
            "refine": None if self.refiner is None else self.refiner.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> "EMProtector":
        """Restore a fitted protector; the release-stage parameters recorded in ``state`` win (a key rebuilds it).

        Raises:
            ValueError: the state belongs to another method.
        """
        p = dict(state.get("params", {}))
        if any(k in p for k in RELEASE_PARAMS):
            self.release = _as_bool(p.get("release", self.release))
            self.min_psnr = p.get("min_psnr", self.min_psnr)
            self.victim_grids = _as_grids(p.get("victim_grids", self.victim_grids))
            self.refine_size = _as_size(p.get("refine_size", self.refine_size))
            for key in ("refine_rounds", "refine_pgd", "refine_surrogate_epochs", "refine_reset", "refine_stop"):
                if key in p:
                    setattr(self, key, type(getattr(self, key))(p[key]))
        super().load_state_dict(state)
        self.levels = state.get("levels")
        self.refine_classes = state.get("refine_classes")
        self.refiner = None
        if state.get("refine") is not None:
            self.refiner = self._new_refiner()
            self.refiner.load_state_dict(state["refine"])
        return self

    # -- fitting ------------------------------------------------------------------------------------------------------
    def fit(
        self,
        samples: Sequence[Mapping[str, Any]],
        *,
        progress: bool = True,
        checkpoint: str | os.PathLike | None = None,
    ) -> "EMProtector":
        """Learn one perturbation per training case (see the module docstring); with ``release`` the release stage
        follows (checkpointed in ``<checkpoint>.refine``, resumed from it).

        Args:
            samples: dicts with ``image`` (C x spatial in [0, 1]), ``label`` (1 x spatial int) and a unique
                ``case_id``.
            progress: show progress bars (and one line per release-stage round).
            checkpoint: fitting checkpoint, resumed from when it exists.
        """
        self.refiner, self.refine_classes = None, None
        super().fit(samples, progress=progress, checkpoint=checkpoint)
        self.levels = grey_levels([s["image"] for s in samples])
        if self.release:
            self.fitted = False
            self._fit_release(samples, checkpoint, progress)
            self.fitted = True
        return self

    def _fit(self, ws: WorkSet, batches: list[list[int]], checkpoint: Path | None, progress: bool) -> None:
        if self.release:
            self._fit_footprint(ws, batches, checkpoint, progress)
            return
        self._run_min_min(ws, batches, checkpoint, progress)

    def _resume(self, checkpoint: Path, ws: WorkSet) -> None:
        """Resume the work-grid stage; the parameters given to this fit win over those recorded in the checkpoint
        (e.g. more ``refine_rounds`` than the interrupted fit had)."""
        mine = {k: getattr(self, k) for k in RELEASE_PARAMS}
        super()._resume(checkpoint, ws)
        for k, v in mine.items():
            setattr(self, k, v)

    def _run_min_min(self, ws: WorkSet, batches: list[list[int]], checkpoint: Path | None, progress: bool) -> None:
        """EM's min-min on the work grid (``rounds``, or ``epochs`` when given)."""
        rounds = int(self.epochs) if self.epochs is not None else self.rounds
        self._min_min(ws, batches, rounds, self.train_steps, self.stop_dice, checkpoint, progress)

    # -- the release stage --------------------------------------------------------------------------------------------
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

    def release_budget(self, image: torch.Tensor, label: torch.Tensor | None, case_id: str | None) -> torch.Tensor:
        """A case's budget map for the release stage (C x spatial, native grid): ``epsilon`` on
        :meth:`release_footprint`, 0 elsewhere, floored to whole grey levels for 8-bit data."""
        eps = float(floor_to_levels(torch.tensor(self.epsilon, dtype=torch.float64), self.levels))
        eps = linf_bound(eps)  # the float32 value at or below it
        mask = self.release_footprint(image, label, case_id).to(image.device)
        return (mask.to(torch.float32) * eps).expand(image.shape[0], *mask.shape[1:])

    def _sd(self) -> int:
        return int(self.spatial_dims or 2)

    def _refine_settings(self, sd: int) -> RefineSettings:
        size = auto_work_size(sd, self.refine_size)
        return RefineSettings(rounds=self.refine_rounds, pgd_steps=self.refine_pgd,
                              surrogate_epochs=self.refine_surrogate_epochs, stop_dice=self.refine_stop,
                              batch_size=self._batch_size(), work_size=size, unseen_steps=self.steps,
                              reset_every=self.refine_reset)

    def _release_path(self, sd: int) -> ReleasePath:
        grids = auto_victim_grids(sd, self.victim_grids)
        return ReleasePath(grids=grids, normalise="minmax" if sd == 2 else "zscore")

    def _new_refiner(self) -> ReleaseRefiner:
        sd = self._sd()
        classes = int(self.refine_classes or self.num_classes or 2)
        sur = Surrogate(sd, int(self.in_channels or 1), classes, channels=self.surrogate_channels, lr=self.lr,
                        device=self.device, seed=case_seed(self.seed, f"{self.name}-refine") % (2**31))
        return ReleaseRefiner(sur, self._release_path(sd), self._refine_settings(sd), levels=self.levels,
                              seed=self.seed)

    def _fit_release(self, samples: Sequence[Mapping[str, Any]], checkpoint: str | os.PathLike | None,
                     progress: bool) -> None:
        """Refine one perturbation per training case through the release path inside its budget map."""
        images, labels, limits, ids = [], [], [], []
        classes = int(self.num_classes or 2)
        for i, s in enumerate(samples):
            img = torch.as_tensor(s["image"]).detach().float().cpu()
            lab = torch.as_tensor(s["label"]).detach().long().cpu()
            cid = str(s.get("case_id") if s.get("case_id") is not None else f"case_{i:06d}")
            limits.append(self.release_budget(img, lab, cid))
            images.append(img)
            labels.append(lab)
            ids.append(cid)
            classes = max(classes, int(lab.max()) + 1)
        self.refine_classes = classes
        self.refiner = self._new_refiner()
        log = (lambda line: tqdm.write(f"{self.name} refine: {line}")) if progress else None
        ckpt = None if checkpoint is None else f"{os.fspath(checkpoint)}.refine"
        energy = psnr_energy(self.min_psnr)
        self.refiner.fit(images, labels, limits, ids, checkpoint=ckpt, log=log,
                         energies=None if energy is None else [energy] * len(ids))

    # -- perturbation -------------------------------------------------------------------------------------------------
    def perturbation(
        self, image: torch.Tensor, label: torch.Tensor | None = None, case_id: str | None = None
    ) -> torch.Tensor:
        """The case's perturbation (see :meth:`SampleWiseProtector.perturbation`); with ``release`` the refined one
        (a training case) or one refined for ``steps`` steps against the frozen release-stage surrogate (an unseen
        case), as written: clipped, rounded to the data's grey levels and, with ``min_psnr``, energy-capped.

        Raises:
            RuntimeError: the protector was not fitted.
            ValueError: bad shapes, missing label or channels that differ from the training data.
        """
        energy = psnr_energy(self.min_psnr)
        if not self.release:
            delta = super().perturbation(image, label, case_id)
            if energy is None:
                return delta
            return cap_energy(image.detach().float(), delta.float(), energy, self.levels).to(image.dtype)
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

    def _unseen_steps(self) -> int:
        return self.steps * max(1, int(self.progress_state.get("pgd_rounds", 0)))

    def _update_mask(self, b: _Batch):
        """Per-step update mask (None: every voxel); SALM overrides it."""
        return None

    def _attack(self, b: _Batch, generator: torch.Generator, steps: int) -> torch.Tensor:
        sur = self.surrogate
        sur.model.eval()

        def objective(x_adv: torch.Tensor) -> torch.Tensor:
            xv, yv = self._views(x_adv, b.y, generator)
            return sur.loss(xv, yv)

        return pgd(objective, b.x, b.delta, epsilon=self.epsilon, alpha=self.alpha, steps=steps, descend=True,
                   update_mask=self._update_mask(b), valid=b.valid)
