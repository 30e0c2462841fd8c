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

"""Shared machinery of the sample-wise optimisers SALM, EM, TAP and SEP (METHODS.md sections 2 and 3).

Written once and reused; a method module only states its loss and what is particular to it:

- :func:`project_linf`: projection onto the L-inf ball of radius ``epsilon`` and the ``[0, 1]`` box;
- :func:`pgd`: the sign-gradient loop (descent or ascent) with an optional per-step update mask;
- :func:`random_resample`: a differentiable stand-in of the victim's resampling (random down/up resize), so the
  learned pattern survives e.g. Kvasir-SEG's 352x352 -> 128x128 preprocessing (METHODS.md section 4.7);
- :func:`targeted_labels`: the permuted label map of TAP and SEP;
- :class:`SampleWiseProtector`: one delta per training case on a reduced *work grid*, batched optimisation
  (variable sizes padded with :func:`~monai_umed.protectors.surrogate.collate_padded` and cropped back), the
  min-min alternation with its stop criterion, surrogate pre-training on clean data with checkpoints, storage of the
  deltas keyed by ``case_id`` and a resumable fitting checkpoint.

Work grid (ours): a sample whose longest spatial side exceeds ``work_size`` is optimised on an area-downsampled copy
(aspect ratio kept); its delta is upsampled (bilinear/trilinear) to the file's grid when the case is protected. This is
what makes fitting 800 Kvasir-SEG images on two CPU cores feasible, and it gives the perturbation the low-frequency
structure that survives a victim's resize.

On an accelerator, ``fit`` keeps the work set and the deltas on the device when they fit in half of its free memory
(:func:`~monai_umed.protectors.base.working_set_on`; :attr:`SampleWiseProtector.resident` forces either way), and the
surrogate's training losses are read back once per call instead of once per step. The deltas are the same either
way; after ``fit`` and in every checkpoint and ``state_dict`` they lie on the CPU.
"""

from __future__ import annotations

import math
import os
from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from monai_umed.data.codec import atomic_path
from monai_umed.protectors.base import Protector, working_set_on
from monai_umed.protectors.surrogate import Surrogate, augment_pair, collate_padded, pad_to_multiple

__all__ = [
    "linf_bound",
    "project_linf",
    "pgd",
    "random_resample",
    "targeted_labels",
    "work_shape",
    "resize_image",
    "resize_label",
    "upsample_delta",
    "dilate",
    "WorkSet",
    "SampleWiseProtector",
]


# -- projection and the PGD loop --------------------------------------------------------------------------------------
def linf_bound(epsilon: float, dtype: torch.dtype = torch.float32) -> float:
    """The largest value of ``dtype`` that does not exceed ``epsilon`` (``float32(8/255)`` rounds up by one ulp)."""
    e = torch.tensor(float(epsilon), dtype=dtype)
    if float(e) > float(epsilon):
        e = torch.nextafter(e, torch.zeros((), dtype=dtype))
    return float(e)


def project_linf(delta: torch.Tensor, image: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Project ``delta`` onto ``{|delta| <= epsilon} ∩ {0 <= image + delta <= 1}``.

    Args:
        delta: perturbation, any shape broadcastable with ``image``.
        image: the clean image in ``[0, 1]``.
        epsilon: L-inf radius (normalised units).

    Returns:
        The projected perturbation; an entry that is exactly 0 stays exactly 0; ``|delta| <= epsilon`` holds in
        float64 too (see :func:`linf_bound`).
    """
    e = linf_bound(epsilon, delta.dtype) if delta.is_floating_point() else float(epsilon)
    d = delta.clamp(-e, e)
    d = (image + d).clamp(0.0, 1.0) - image
    # the subtraction can overshoot by one float ulp: clamp again
    return d.clamp(-e, e)


def pgd(
    objective: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    delta: torch.Tensor,
    *,
    epsilon: float,
    alpha: float,
    steps: int,
    descend: bool = True,
    update_mask: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Projected sign-gradient descent (or ascent) on a batch of perturbations.

    Each step: ``delta <- Proj(delta -/+ alpha * sign(grad) * M)`` where ``M = update_mask(grad, delta)`` (1 when
    None) and ``Proj`` is :func:`project_linf`.

    Args:
        objective: maps the perturbed batch ``image + delta`` to a scalar loss.
        image: clean batch (B x C x spatial) in ``[0, 1]``.
        delta: initial perturbation, same shape.
        epsilon: L-inf budget.
        alpha: step size.
        steps: number of steps.
        descend: minimise the objective (error-minimising / targeted) when True, maximise it otherwise.
        update_mask: optional function ``(grad, delta) -> mask`` broadcastable to ``delta``; entries where it is 0
            are not updated at that step (SALM's significance mask).
        valid: optional mask (B x 1 x spatial) of real voxels; padding added for batching keeps ``delta = 0``.

    Returns:
        The final perturbation (detached).
    """
    sign = -1.0 if descend else 1.0
    delta = delta.detach()
    with torch.enable_grad():
        for _ in range(int(steps)):
            delta.requires_grad_(True)
            loss = objective(image + delta)
            (grad,) = torch.autograd.grad(loss, delta)
            step = alpha * grad.sign()
            if update_mask is not None:
                step = step * update_mask(grad, delta.detach())
            delta = project_linf(delta.detach() + sign * step, image, epsilon)
            if valid is not None:
                delta = delta * valid
    return delta.detach()


def random_resample(
    x: torch.Tensor, generator: torch.Generator, scale: Sequence[float] = (0.5, 1.0), p: float = 0.5
) -> torch.Tensor:
    """Differentiable stand-in of a victim's resampling: with probability ``p``, area-downsample the batch by a
    random factor in ``scale`` and resize it back (bilinear/trilinear), a low-pass filter like a victim's resize.

    Args:
        x: batch (B x C x spatial).
        generator: CPU generator (the only source of randomness).
        scale: range of the down-scaling factor.
        p: probability of resampling.
    """
    r = torch.rand(2, generator=generator)
    if p <= 0 or float(r[0]) >= p:
        return x
    s = float(scale[0]) + (float(scale[1]) - float(scale[0])) * float(r[1])
    shape = tuple(x.shape[2:])
    small = tuple(max(1, int(round(d * s))) for d in shape)
    if small == shape:
        return x
    mode = "bilinear" if x.ndim == 4 else "trilinear"
    return F.interpolate(F.interpolate(x, size=small, mode="area"), size=shape, mode=mode, align_corners=False)


def targeted_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """TAP's wrong target: binary -> swap foreground and background; K+1 classes -> ``(y + 1) mod (K + 1)``."""
    if num_classes <= 2:
        return 1 - y.clamp(0, 1)
    return (y + 1) % num_classes


# -- grids ------------------------------------------------------------------------------------------------------------
def work_shape(shape: Sequence[int], work_size: int | None) -> tuple[int, ...]:
    """The work-grid shape: ``shape`` scaled so its longest side is at most ``work_size`` (None: unchanged)."""
    shape = tuple(int(s) for s in shape)
    if work_size is None or max(shape) <= work_size:
        return shape
    f = work_size / max(shape)
    return tuple(max(1, int(round(s * f))) for s in shape)


def resize_image(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Area-resize a channel-first image to ``shape`` (identity when the shape already matches)."""
    if tuple(x.shape[1:]) == tuple(shape):
        return x
    return F.interpolate(x[None].float(), size=tuple(shape), mode="area")[0]


def resize_label(y: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of a channel-first label map to ``shape``."""
    if tuple(y.shape[1:]) == tuple(shape):
        return y
    return F.interpolate(y[None].float(), size=tuple(shape), mode="nearest-exact")[0].round().to(y.dtype)


def upsample_delta(delta: torch.Tensor, shape: Sequence[int], mode: str = "linear") -> torch.Tensor:
    """Resize a channel-first work-grid perturbation to the file's grid (``linear`` or ``nearest``).

    Linear interpolation keeps every value inside ``[min, max]`` of the input, so the L-inf budget still holds.
    """
    if tuple(delta.shape[1:]) == tuple(shape):
        return delta
    if mode == "nearest":
        return F.interpolate(delta[None].float(), size=tuple(shape), mode="nearest-exact")[0]
    m = "bilinear" if delta.ndim == 3 else "trilinear"
    return F.interpolate(delta[None].float(), size=tuple(shape), mode=m, align_corners=False)[0]


def dilate(mask: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Binary dilation of a (B x 1 x spatial) mask with a full ``(2r+1)^d`` neighbourhood, 2D or 3D."""
    if radius <= 0:
        return mask.bool()
    pool = F.max_pool2d if mask.ndim == 4 else F.max_pool3d
    return pool(mask.float(), kernel_size=2 * radius + 1, stride=1, padding=radius) > 0


# -- the sample-wise base class ---------------------------------------------------------------------------------------
@dataclass
class WorkSet:
    """Training samples on the work grid.

    Attributes:
        case_ids: one per sample, unique.
        images: channel-first float images on the work grid.
        labels: channel-first integer labels on the work grid.
        shapes: spatial shapes on the file's grid.
    """

    case_ids: list[str] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.case_ids)


@dataclass
class _Batch:
    idx: list[int]
    x: torch.Tensor
    y: torch.Tensor
    delta: torch.Tensor
    valid: torch.Tensor
    shapes: list[tuple[int, ...]]
    selected: torch.Tensor | None = None


class SampleWiseProtector(Protector):
    """Base class of the methods that learn one perturbation per training case (SALM, EM, TAP, SEP).

    Subclasses implement :meth:`_fit` (the schedule) and :meth:`_attack` (the PGD objective for one batch), and may
    override :meth:`_init_delta` and :meth:`_native_delta`.

    ``fit`` stores one delta per ``case_id`` (on the work grid, float16); ``perturbation`` looks it up. A case not seen
    in ``fit`` is optimised on its own against the fitted, frozen surrogate with the same objective (randomness from
    :meth:`~monai_umed.protectors.base.Protector.generator` of its ``case_id``, so the result does not depend on call
    order).

    Args:
        epsilon: L-inf budget (normalised units).
        alpha: PGD step size; ``None`` -> ``epsilon * alpha_fraction`` of the method.
        steps: PGD steps (per round for min-min methods).
        work_size: longest spatial side of the work grid (default 64; ``None``: the file's own grid).
        batch_size: cases per batch of surrogate training and PGD; ``None`` (default) -> 16 in 2D, 4 in 3D (a whole
            3D volume per case: smaller batches give the surrogate more updates per pass at the same cost).
        surrogate_channels: channels per level of the surrogate UNet.
        lr: surrogate learning rate.
        augment: random flips / 90-degree rotations in surrogate training and in the PGD objective.
        resample_prob: probability of the random down/up resize stand-in (:func:`random_resample`) per step.
        resample_scale: its range of down-scaling factors.
        kwargs: ``spatial_dims``, ``seed``, ``epochs``, ``device`` (see :class:`~monai_umed.protectors.base.Protector`).
    """

    fits = True
    alpha_fraction: float = 0.1
    #: where ``fit`` keeps the work set and the deltas: None decides with
    #: :func:`~monai_umed.protectors.base.working_set_on` (on an accelerator, if they fit), True keeps them on the
    #: device (on the CPU only the code path changes), False moves every batch there and back
    resident: bool | None = None
    #: set while a resident fit runs: new deltas stay on the device
    _resident: bool = False
    #: parameters that are upper bounds on fitting: a checkpoint written with other values is resumed all the same
    resume_bounds: tuple[str, ...] = ("epochs",)

    def __init__(
        self,
        epsilon: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        work_size: int | None = 64,
        batch_size: int | None = None,
        surrogate_channels: Sequence[int] = (16, 32, 64, 128),
        lr: float = 1e-3,
        augment: bool = True,
        resample_prob: float = 0.5,
        resample_scale: Sequence[float] = (0.5, 1.0),
        **kwargs: Any,
    ) -> None:
        super().__init__(epsilon=epsilon, **kwargs)
        if steps < 0 or (batch_size is not None and batch_size < 1):
            raise ValueError(f"steps must be >= 0 and batch_size >= 1, got steps={steps}, batch_size={batch_size}")
        if work_size is not None and work_size < 8:
            raise ValueError(f"work_size must be None or >= 8, got {work_size}")
        self.alpha_given = alpha
        self.alpha = float(alpha) if alpha is not None else self.epsilon * self.alpha_fraction
        self.steps = int(steps)
        self.work_size = None if work_size is None else int(work_size)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.surrogate_channels = tuple(int(c) for c in surrogate_channels)
        self.lr = float(lr)
        self.augment = bool(augment)
        self.resample_prob = float(resample_prob)
        self.resample_scale = (float(resample_scale[0]), float(resample_scale[1]))
        self.in_channels: int | None = None
        self.num_classes: int | None = None
        self.surrogate: Surrogate | None = None
        self.deltas: dict[str, torch.Tensor] = {}
        self.progress_state: dict[str, Any] = {}

    # -- parameters and state ---------------------------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        return {
            **super().params(),
            "alpha": self.alpha_given,
            "steps": self.steps,
            "work_size": self.work_size,
            "batch_size": self.batch_size,
            "surrogate_channels": list(self.surrogate_channels),
            "lr": self.lr,
            "augment": self.augment,
            "resample_prob": self.resample_prob,
            "resample_scale": list(self.resample_scale),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "surrogate": None if self.surrogate is None else self.surrogate.state_dict(),
            "deltas": {k: v.cpu() for k, v in self.deltas.items()},
            "progress": dict(self.progress_state),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> "SampleWiseProtector":
        super().load_state_dict(state)
        self.in_channels = state["in_channels"]
        self.num_classes = state["num_classes"]
        if state.get("surrogate") is not None:
            self.surrogate = self._new_surrogate()
            self.surrogate.load_state_dict(state["surrogate"])
        self.deltas = {str(k): v for k, v in state.get("deltas", {}).items()}
        self.progress_state = dict(state.get("progress", {}))
        return self

    # -- hooks for subclasses ---------------------------------------------------------------------------------------
    @abstractmethod
    def _fit(self, ws: WorkSet, batches: list[list[int]], checkpoint: Path | None, progress: bool) -> None:
        """The method's schedule over the training work set (fills :attr:`deltas`)."""

    @abstractmethod
    def _attack(self, b: _Batch, generator: torch.Generator, steps: int) -> torch.Tensor:
        """Run the method's PGD on one padded batch and return the new (padded) perturbation."""

    def _unseen_steps(self) -> int:
        """PGD steps spent on a case not seen in ``fit``."""
        return self.steps

    def _init_delta(self, x: torch.Tensor, case_id: str) -> torch.Tensor:
        """Initial perturbation of one case on the work grid: uniform in ``[-epsilon, epsilon]`` (EM's choice)."""
        g = self.generator(case_id, "init")
        u = torch.rand(tuple(x.shape), generator=g, dtype=torch.float32)
        return project_linf((2 * u - 1) * self.epsilon, x, self.epsilon)

    def _native_delta(self, delta_w: torch.Tensor, image: torch.Tensor, case_id: str | None) -> torch.Tensor:
        """Work-grid delta -> the file's grid (SALM also applies its mask here)."""
        return upsample_delta(delta_w.float(), image.shape[1:])

    # -- fit --------------------------------------------------------------------------------------------------------
    def fit(
        self,
        samples: Sequence[Mapping[str, Any]],
        *,
        progress: bool = True,
        checkpoint: str | os.PathLike | None = None,
    ) -> "SampleWiseProtector":
        """Learn one perturbation per training case.

        Args:
            samples: dicts with ``image`` (C x spatial in [0, 1]), ``label`` (1 x spatial int) and a unique
                ``case_id``.
            progress: show tqdm progress bars.
            checkpoint: file where the fitting state is saved after every round; when it exists, fitting resumes
                from it (and produces the same result as an uninterrupted run).

        Raises:
            ValueError: no samples, duplicate case ids, missing labels, inconsistent channels or dimensions, or a
                checkpoint written for other parameters or cases.
        """
        ws = self.prepare(samples)
        if len(ws) == 0:
            raise ValueError(f"{self.name}: fit needs at least one training sample")
        ckpt = Path(checkpoint) if checkpoint is not None else None
        self.surrogate = self._new_surrogate()
        self.deltas, self.progress_state = {}, {}
        if ckpt is not None and ckpt.is_file():
            self._resume(ckpt, ws)
        self.progress_state.setdefault("cases", list(ws.case_ids))
        batches = self._batches(ws)
        if not self._place(ws):
            self._fit(ws, batches, ckpt, progress)
        else:
            self._resident = True
            try:
                self._fit(ws, batches, ckpt, progress)
            finally:
                self._resident = False
                self._to_host()
        self.fitted = True
        return self

    def _place(self, ws: WorkSet) -> bool:
        """Whether ``fit`` keeps the work set and the deltas on the device (:attr:`resident`); if so, moves them."""
        resident = self.resident
        if resident is None:
            images = sum(x.numel() for x in ws.images)
            resident = working_set_on(self.device, [*ws.images, *ws.labels, *self.deltas.values()],
                                      extra_bytes=2 * images)  # the float16 deltas still to be made
        if not resident:
            return False
        ws.images = [x.to(self.device) for x in ws.images]
        ws.labels = [y.to(self.device) for y in ws.labels]
        self.deltas = {k: v.to(self.device) for k, v in self.deltas.items()}
        return True

    def _to_host(self) -> None:
        """Bring what a resident fit left on the device back to the CPU (the deltas; SALM adds its masks)."""
        self.deltas = {k: v.cpu() for k, v in self.deltas.items()}

    def _held(self, t: torch.Tensor) -> torch.Tensor:
        """Where a fit keeps a per-case result: on the device during a resident fit, on the CPU otherwise."""
        return t if self._resident else t.cpu()

    def prepare(self, samples: Sequence[Mapping[str, Any]], for_fit: bool = True) -> WorkSet:
        """Move samples to the work grid (area-downsampled images, nearest-neighbour labels).

        Args:
            samples: dicts with ``image``, ``label`` and ``case_id``.
            for_fit: record ``in_channels`` and ``num_classes`` from the samples (fit); otherwise check them.
        """
        ws = WorkSet()
        seen: set[str] = set()
        max_label = 0
        for i, s in enumerate(samples):
            image = torch.as_tensor(s["image"]).detach().float().cpu()
            label = s.get("label")
            cid = str(s.get("case_id") if s.get("case_id") is not None else f"case_{i:06d}")
            if label is None:
                raise ValueError(f"{self.name}: case {cid!r} has no label map")
            label = torch.as_tensor(label).detach().cpu()
            self._check_inputs(image, label)
            if torch.isnan(image).any():
                raise ValueError(f"{self.name}: case {cid!r} contains NaN")
            if cid in seen:
                raise ValueError(f"{self.name}: duplicate case_id {cid!r}")
            seen.add(cid)
            if self.in_channels is None or (for_fit and i == 0):
                self.in_channels = int(image.shape[0])
            if int(image.shape[0]) != self.in_channels:
                raise ValueError(f"{self.name}: case {cid!r} has {image.shape[0]} channels, expected {self.in_channels}")
            shape = tuple(image.shape[1:])
            ws_shape = work_shape(shape, self.work_size)
            ws.case_ids.append(cid)
            ws.images.append(resize_image(image, ws_shape).clamp(0, 1))
            lab = resize_label(label.long(), ws_shape)
            max_label = max(max_label, int(lab.max()))
            ws.labels.append(lab.to(torch.uint8) if max_label < 256 else lab)
            ws.shapes.append(shape)
        if for_fit:
            self.num_classes = max(2, max_label + 1)
        elif self.num_classes is not None and max_label >= self.num_classes:
            raise ValueError(f"{self.name}: label {max_label} was not among the {self.num_classes} classes seen in fit")
        return ws

    def _batch_size(self) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return 4 if self.spatial_dims == 3 else 16

    def _new_surrogate(self) -> Surrogate:
        return Surrogate(
            spatial_dims=int(self.spatial_dims or 2),
            in_channels=int(self.in_channels or 1),
            num_classes=int(self.num_classes or 2),
            channels=self.surrogate_channels,
            lr=self.lr,
            device=self.device,
            seed=self.seed,
        )

    def _batches(self, ws: WorkSet) -> list[list[int]]:
        """Fixed batches: samples sorted by work-grid shape (less padding), then chunked; deterministic."""
        order = sorted(range(len(ws)), key=lambda i: (tuple(ws.images[i].shape[1:]), i))
        bs = self._batch_size()
        return [order[i : i + bs] for i in range(0, len(order), bs)]

    def _collate(self, ws: WorkSet, idx: Sequence[int], deltas: Sequence[torch.Tensor] | None = None) -> _Batch:
        k = self.surrogate.multiple if self.surrogate is not None else 1
        x, y, shapes = collate_padded([ws.images[i] for i in idx], [ws.labels[i].long() for i in idx], k)
        target = x.shape[2:]
        if deltas is None:
            deltas = [self.deltas[ws.case_ids[i]].float() for i in idx]
        delta = torch.stack([pad_to_multiple(d.float().to(x.device), k, target) for d in deltas])
        valid = torch.stack([pad_to_multiple(torch.ones((1,) + tuple(s), device=x.device), k, target) for s in shapes])
        dev = self.device
        return _Batch(list(idx), x.to(dev), y.to(dev), delta.to(dev), valid.to(dev), shapes)

    def _store(self, ws: WorkSet, b: _Batch, delta: torch.Tensor) -> None:
        for j, i in enumerate(b.idx):
            crop = (slice(None),) + tuple(slice(0, s) for s in b.shapes[j])
            self.deltas[ws.case_ids[i]] = self._held(delta[j][crop].detach()).to(torch.float16)

    def _views(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The random view the surrogate sees: flips / rot90 (when ``augment``) and the resample stand-in."""
        if self.augment:
            x, y = augment_pair(x, y, generator)
        return random_resample(x, generator, self.resample_scale, self.resample_prob), y

    # -- building blocks used by the schedules ----------------------------------------------------------------------
    def _ensure_deltas(self, ws: WorkSet) -> None:
        for i, cid in enumerate(ws.case_ids):
            if cid not in self.deltas:  # made on the CPU (its generator's stream), kept where the work set lies
                init = self._init_delta(ws.images[i].cpu(), cid).to(torch.float16)
                self.deltas[cid] = init.to(ws.images[i].device)

    def _train_surrogate(self, ws: WorkSet, batches: list[list[int]], steps: int, key: str, perturbed: bool,
                         surrogate: Surrogate | None = None) -> float:
        """``steps`` Adam steps of the surrogate on shuffled batches of (perturbed or clean) work images.

        Returns:
            the mean training loss (read back from the device once, after the last step).
        """
        sur = surrogate or self.surrogate
        g = self.generator(key, "train")
        order = torch.randperm(len(batches), generator=g).tolist()
        losses = []
        for n in range(int(steps)):
            idx = batches[order[n % len(order)]]
            zeros = None if perturbed else [torch.zeros_like(ws.images[i]) for i in idx]
            b = self._collate(ws, idx, zeros)
            x = (b.x + b.delta).clamp(0, 1)
            x = random_resample(x, g, self.resample_scale, self.resample_prob)
            losses.append(sur.train_step(x, b.y, generator=g, augment=self.augment, as_tensor=True))
        values = torch.stack(losses).tolist() if losses else []
        return float(sum(values) / max(1, len(values)))

    def _surrogate_dice(self, ws: WorkSet, batches: list[list[int]], max_cases: int = 64) -> float:
        """Mean foreground Dice of the surrogate on perturbed training cases (a fixed subset of ``max_cases``)."""
        flat = [i for bt in batches for i in bt]
        stride = max(1, math.ceil(len(flat) / max_cases))
        subset = flat[::stride]
        dices = []
        bs = self._batch_size()
        for s in range(0, len(subset), bs):
            b = self._collate(ws, subset[s : s + bs])
            dices.append(self.surrogate.dice((b.x + b.delta).clamp(0, 1), b.y))
        return float(sum(dices) / len(dices))

    def _attack_all(self, ws: WorkSet, batches: list[list[int]], key: str, steps: int, progress: bool,
                    start: int = 0, on_batch: Callable[[int], None] | None = None) -> None:
        """Run :meth:`_attack` over all batches from batch ``start`` (randomness keyed by ``key`` and batch index)."""
        for bi in tqdm(range(start, len(batches)), desc=f"{self.name} pgd", leave=False, disable=not progress,
                       initial=start, total=len(batches)):
            b = self._collate(ws, batches[bi])
            delta = self._attack(b, self.generator(f"{key}|batch{bi}", "pgd"), steps)
            self._store(ws, b, delta)
            if on_batch is not None:
                on_batch(bi)

    def _pretrain(self, ws: WorkSet, batches: list[list[int]], epochs: int, checkpoint: Path | None,
                  progress: bool, snapshots: Sequence[int] = ()) -> list[dict[str, torch.Tensor]]:
        """Train the surrogate on clean work images for ``epochs`` epochs (TAP, SEP), resuming from the recorded
        epoch, and keep a copy of its weights after each epoch listed in ``snapshots`` (1-based; SEP's checkpoints).

        Returns:
            the weight snapshots, oldest first.
        """
        snaps: list[dict[str, torch.Tensor]] = list(self.progress_state.get("snapshots", []))
        start = int(self.progress_state.get("pretrain_epoch", 0))
        bar = tqdm(range(start, epochs), desc=f"{self.name} surrogate", disable=not progress, initial=start,
                   total=epochs)
        for e in bar:
            loss = self._train_surrogate(ws, batches, len(batches), f"pretrain|epoch{e}", perturbed=False)
            bar.set_postfix(loss=f"{loss:.3f}")
            if (e + 1) in set(snapshots):
                snaps.append({k: v.detach().cpu().clone() for k, v in self.surrogate.model.state_dict().items()})
            self.progress_state.update(pretrain_epoch=e + 1, snapshots=snaps)
            self._save(checkpoint)
        return snaps

    def _min_min(self, ws: WorkSet, batches: list[list[int]], rounds: int, train_steps: int | None,
                 stop_dice: float, checkpoint: Path | None, progress: bool) -> None:
        """Error-minimising alternation (EM, SALM): each round trains the surrogate on the perturbed data, stops when
        its training Dice reaches ``stop_dice``, and otherwise runs ``steps`` PGD descent steps on every case.

        Args:
            rounds: upper bound on the rounds.
            train_steps: surrogate batches per round (None: one epoch).
            stop_dice: the stop criterion on the surrogate's Dice on perturbed training cases.
        """
        self._ensure_deltas(ws)
        n_train = len(batches) if train_steps is None else int(train_steps)
        start = int(self.progress_state.get("round", 0))
        bar = tqdm(range(start, rounds), desc=f"{self.name} rounds", disable=not progress, initial=start, total=rounds)
        for r in bar:
            if self.progress_state.get("stopped"):
                break
            self._train_surrogate(ws, batches, n_train, f"round{r}", perturbed=True)
            dice = self._surrogate_dice(ws, batches)
            bar.set_postfix(dice=f"{dice:.3f}")
            if dice >= stop_dice:
                self.progress_state.update(round=r + 1, dice=dice, stopped=True)
                self._save(checkpoint)
                break
            self._attack_all(ws, batches, f"round{r}", self.steps, progress)
            self.progress_state.update(round=r + 1, dice=dice, pgd_rounds=int(self.progress_state.get("pgd_rounds", 0)) + 1)
            self._save(checkpoint)

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def _fit_state(self) -> dict[str, Any]:
        return self.state_dict()

    def _save(self, checkpoint: Path | None) -> None:
        """Write the fitting state atomically (temporary name, then rename)."""
        if checkpoint is not None:
            with atomic_path(checkpoint) as tmp:
                torch.save(self._fit_state(), tmp)

    def _resume(self, checkpoint: Path, ws: WorkSet) -> None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if state.get("name") != self.name:
            raise ValueError(f"{checkpoint}: checkpoint of method {state.get('name')!r}, not {self.name!r}")
        bounds = self.resume_bounds  # upper bounds: a fit may be resumed with more
        mine = {k: v for k, v in self.params().items() if k not in bounds}
        theirs = {k: v for k, v in state.get("params", {}).items() if k not in bounds}
        if mine != theirs:
            raise ValueError(f"{checkpoint}: checkpoint was written with other parameters ({theirs} != {mine})")
        cases = state.get("progress", {}).get("cases")
        if cases is not None and list(cases) != list(ws.case_ids):
            raise ValueError(f"{checkpoint}: checkpoint was written for other training cases")
        self.load_state_dict(state)
        self.fitted = False

    # -- perturbation -----------------------------------------------------------------------------------------------
    def perturbation(
        self, image: torch.Tensor, label: torch.Tensor | None = None, case_id: str | None = None
    ) -> torch.Tensor:
        """The learned perturbation of a training case (looked up by ``case_id``), or, for a case not seen in fit,
        a per-case optimisation against the frozen surrogate.

        Raises:
            RuntimeError: the protector was not fitted.
            ValueError: bad shapes, missing label or channels that differ from the training data.
        """
        self._check_inputs(image, label)
        if self.surrogate is None or not self.fitted:
            raise RuntimeError(f"{self.name}: call fit() (or load_state_dict) before perturbation()")
        cid = None if case_id is None else str(case_id)
        if cid is not None and cid in self.deltas:
            delta_w = self.deltas[cid].float()
        else:
            delta_w = self._optimise_unseen(image, label, cid)
        img = image.detach().float()
        delta = self._native_delta(delta_w.to(img.device), img, cid)
        return project_linf(delta, img, self.epsilon).to(image.dtype)

    def _optimise_unseen(self, image: torch.Tensor, label: torch.Tensor | None, case_id: str | None) -> torch.Tensor:
        ws = self.prepare([{"image": image, "label": label, "case_id": case_id or ""}], for_fit=False)
        delta0 = [self._init_delta(ws.images[0], ws.case_ids[0])]
        b = self._collate(ws, [0], delta0)
        self.surrogate.model.eval()
        delta = self._attack(b, self.generator(case_id, "unseen"), self._unseen_steps())
        crop = (slice(None),) + tuple(slice(0, s) for s in ws.images[0].shape[1:])
        return delta[0][crop].detach().to(torch.float16).float()

    def _losses_with_valid(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Cross-entropy toward ``target`` averaged over the real (unpadded) voxels of a batch."""
        ce = F.cross_entropy(logits, target[:, 0].long(), reduction="none")
        w = valid[:, 0]
        return (ce * w).sum() / w.sum().clamp_min(1.0)
