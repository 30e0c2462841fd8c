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

"""Error-minimising refinement of one *shared* texture for every case (a segmentation analogue of class-wise noise).

:class:`~monai_umed.protectors.refine.ReleaseRefiner` gives every case its own work-grid perturbation, which a victim
has to memorise case by case. Class-wise unlearnable noise is a shortcut instead: one pattern explains the label of
every sample, so a network learns it with a single filter, before the real features. Here the pattern is a small
tile of ``tile`` work-grid cells per axis, repeated over the whole work grid and cut by each case's budget map (so it
lies on the label's footprint only), each case scaled to its energy budget. The tile is optimised by the same min-min
through the release path: every PGD batch takes one sign step on the tile (of ``step_fraction / 10`` of the largest
budget, since the tile sees many batches per round) against the frozen surrogate. The cases' stored perturbations are
the tiled pattern, so writing, keys and restore are those of the per-case refiner; a case not seen in fit gets the
tile itself (:meth:`SharedTileRefiner.unseen`).

With ``colour="quiet"`` the tile has one channel laid along the colour direction the training images vary least
along (:func:`~monai_umed.colour.quiet_colour`, computed in :meth:`SharedTileRefiner.fit` and kept in the key):
that direction is about 20 dB emptier than brightness at every spatial frequency, so the same energy stands out more
to a network (docs/methods.md, twelfth and thirteenth sessions).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from monai_umed.colour import quiet_colour
from monai_umed.protectors.pgd import work_shape
from monai_umed.protectors.refine import ReleaseRefiner, as_tile_colour, stack_scalars, upsample_limit

__all__ = ["SharedTileRefiner", "lowpass_tile", "symmetrise", "tile_pattern"]


def tile_pattern(tile: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Repeat a ``C x t x t (x t)`` tile over the spatial ``shape`` (cut at the far edges)."""
    reps = [1] + [-(-int(s) // int(t)) for s, t in zip(shape, tile.shape[1:])]
    full = tile.repeat(*reps)
    return full[(slice(None),) + tuple(slice(0, int(s)) for s in shape)]


def lowpass_tile(tile: torch.Tensor, spatial_dims: int, harmonics: int) -> torch.Tensor:
    """A tile (spatial axes last) with only its spatial frequencies of at most ``harmonics`` cycles per tile along
    every axis kept (the tiling is periodic, so this is exact on the repeated pattern); ``harmonics`` 0 keeps all.

    With ``harmonics=1`` an ``8``-cell tile is a lattice of period 8 only: the finer periods a fit otherwise
    prefers (4 on Kvasir-SEG) are the first that blur, low-resolution simulation and scaling remove.
    """
    if harmonics <= 0:
        return tile
    axes = tuple(range(tile.ndim - spatial_dims, tile.ndim))
    spec = torch.fft.fftn(tile.double(), dim=axes)
    keep = torch.ones(tile.shape[-spatial_dims:], dtype=torch.bool, device=tile.device)
    for i, n in enumerate(tile.shape[-spatial_dims:]):
        k = torch.fft.fftfreq(n, d=1.0 / n, device=tile.device).abs() <= harmonics
        keep = keep & k.view(*([1] * i), n, *([1] * (spatial_dims - i - 1)))
    return torch.fft.ifftn(spec * keep, dim=axes).real.to(tile.dtype)


def symmetrise(tile: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """The mean of a tile (spatial axes last) over the flips of every spatial axis and the swap of the first two: a
    pattern the victim's flips and 90-degree rotations leave unchanged (up to a shift of the tiling), so a network
    needs one detector for it, not eight."""
    axes = list(range(tile.ndim - spatial_dims, tile.ndim))
    views = []
    for swap in (False, True):
        base = tile.transpose(axes[0], axes[1]) if swap else tile
        for m in range(2**spatial_dims):
            flip = [a for i, a in enumerate(axes) if m >> i & 1]
            views.append(base.flip(flip) if flip else base)
    return torch.stack(views).mean(0)


class SharedTileRefiner(ReleaseRefiner):
    """Min-min of one tiled pattern shared by all cases (see the module docstring).

    Args:
        args, kwargs: those of :class:`~monai_umed.protectors.refine.ReleaseRefiner`.
        tile: the tile's side in work-grid cells.
        classwise: one tile per class, each laid on its own class's pixels.
        symmetric: keep the tile(s) symmetric under flips and 90-degree rotations (:func:`symmetrise`).
        fill: scale each case's pattern up to its energy budget as well as down.
        background: with ``classwise``, lay a tile on the background class too; False leaves it unperturbed (its
            tile stays zero).
        colour: ``free`` (one tile per image channel) or ``quiet`` (a one-channel tile along the colour direction
            the training images vary least along; :data:`~monai_umed.protectors.refine.TILE_COLOURS`).
        harmonics: keep only the tile's spatial frequencies up to this many cycles per tile (:func:`lowpass_tile`;
            0: all).
    """

    def __init__(self, *args: Any, tile: int = 4, classwise: bool = False, symmetric: bool = False,
                 fill: bool = False, background: bool = True, colour: str = "free", harmonics: int = 0,
                 **kwargs: Any) -> None:  # noqa: D107
        super().__init__(*args, **kwargs)
        if int(tile) < 1:
            raise ValueError(f"refine: the shared tile must be at least 1 cell, got {tile}")
        self.colour = as_tile_colour(colour)
        self.harmonics = int(harmonics)
        #: with ``colour="quiet"``, the channel weights the one-channel tile is laid along (C, mean square 1)
        self.colour_vector: torch.Tensor | None = None
        self.tile = int(tile)
        self.classwise = bool(classwise)
        self.symmetric = bool(symmetric)
        self.fill = bool(fill)
        self.background = bool(background)
        self.pattern: torch.Tensor | None = None

    def _budget(self, d: torch.Tensor, lim: torch.Tensor, energy: torch.Tensor | None, sync: bool = True) -> torch.Tensor:
        """Each case's tiled pattern brought inside its energy budget; with ``fill``, first scaled *up* towards it too
        (a few passes, since the map clamps part of what grows), so that every case spends its whole budget even
        while the tile is faint or the map cuts it."""
        if self.fill and energy is not None:
            e = energy.double()
            for _ in range(4):
                m = self.native_delta(d, lim).double().pow(2).flatten(1).mean(1)
                f = torch.where(m > 0, torch.sqrt(e / m.clamp_min(1e-30)), torch.ones_like(m)).to(d.dtype)
                d = d * f.view(-1, *([1] * (d.ndim - 1)))
        return self.project_energy(d, lim, energy, "scale", sync=sync)

    def _tiles(self) -> int:
        """How many tiles: one per class (``classwise``) or one."""
        return int(getattr(self.surrogate.model, "out_channels", 2)) if self.classwise else 1

    def _fractions(self, y: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor | None:
        """Each class's share of every work-grid cell (B x K x work spatial; None: one tile for all)."""
        if not self.classwise:
            return None
        onehot = F.one_hot(y[:, 0].long(), self._tiles()).movedim(-1, 1).to(dtype)
        if not self.background:
            onehot[:, 0] = 0
        return onehot if tuple(onehot.shape[2:]) == tuple(shape) else F.interpolate(onehot, size=tuple(shape),
                                                                                    mode="area")

    def _coloured(self, t: torch.Tensor) -> torch.Tensor:
        """The tile(s) ``t`` (K x 1 x tile along :attr:`colour_vector`, or K x C x tile) in every image channel."""
        if self.colour_vector is None:
            return t
        v = self.colour_vector.to(t.device, t.dtype)
        return t * v.view(1, -1, *([1] * (t.ndim - 2)))

    def _spread(self, t: torch.Tensor, frac: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """The tile(s) ``t`` (K x C x tile, or K x 1 x tile with a colour) laid over a batch shaped like ``like``:
        one tile repeated everywhere, or each class's tile weighted by the class's share of each cell."""
        t = self._coloured(t)
        if frac is None:
            return tile_pattern(t[0], like.shape[2:])[None].expand_as(like)
        tiled = torch.stack([tile_pattern(tk, like.shape[2:]) for tk in t])  # K x C x work spatial
        return (frac[:, :, None] * tiled[None]).sum(1)

    def _cases(self, d: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The shared pattern as a batch shaped like ``d`` (B x C x work spatial) for labels ``y``."""
        assert self.pattern is not None
        return self._spread(self.pattern.to(d.device, d.dtype), self._fractions(y, d.shape[2:], d.dtype), d)

    def _step(self, t: torch.Tensor, grad: torch.Tensor, alpha: Any, top: Any) -> torch.Tensor:
        """One descent step of the tile(s) ``t`` (K x C x tile) inside ``[-top, top]``.

        ``sign`` (:attr:`RefineSettings.step`): every cell moves by ``alpha``; the tile saturates at ``+-top`` within a
        round, a pattern with sharp cell-to-cell jumps. ``scaled``: steepest descent in the energy's own (L2)
        geometry: the step follows the gradient normalised per tile, and each tile is then scaled back to a root mean
        square of ``top / sqrt(2)`` (a sinusoid of amplitude ``top``), so the tile is a *direction* the per-case energy
        budget scales. The gradient reaches the tile through the trainer's anti-aliased resize, so this step keeps
        what a victim sees: a saturated sign tile loses more than half of its energy in that resize and in the
        rounding of the file, a smooth one a quarter or less. Measured on Kvasir-SEG (docs/methods.md, fourth
        session) the smooth tile nevertheless protected less than the sign tile (21.9 / 28.6 % against 15.3 / 5.6 %
        for two victim seeds): it looks more like image content, so ``sign`` stays the default.
        """
        # a quiet-colour tile is kept a texture (zero mean over its cells): unconstrained, the fit on Kvasir-SEG
        # drove both class tiles to one flat chroma offset (every cell at -top; the surrogate's training Dice
        # stalled at 0.65 over 12 rounds, thirteenth session), a cue victims do not learn at 50 dB
        zero_mean = self.colour_vector is not None
        spatial = tuple(range(2, t.ndim))
        if zero_mean:
            grad = grad - grad.mean(spatial, keepdim=True)
        # every cell of a tile is inside its footprint: the per-case refiner's direction, normalised per tile
        new = t - alpha * self._direction(grad, torch.ones_like(grad))
        if zero_mean:
            new = new - new.mean(spatial, keepdim=True)
        new = lowpass_tile(new, len(spatial), self.harmonics)
        if self.settings.step == "sign":
            return new.clamp(-top, top)
        rms = new.pow(2).mean(tuple(range(1, t.ndim)), keepdim=True).sqrt()
        new = torch.where(rms > 0, new * (top / math.sqrt(2.0)) / rms.clamp_min(1e-12), new)
        return new.clamp(-top, top)

    def _descend(self, x, y, d, lim, g, steps, energy=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``steps`` sign steps on the shared tile (one per call of the loss), each through a fresh random view; returns
        the batch's projected perturbations made from the updated tile and the ``steps`` losses (a device tensor).
        During a resident fit the tile stays on the device and the step size is never read back to the host."""
        lazy = self._lazy
        if self.pattern is None:
            channels = d.shape[1] if self.colour_vector is None else 1
            self.pattern = torch.zeros((self._tiles(), channels) + (self.tile,) * (d.ndim - 2),
                                       device=d.device if lazy else None)
        frac = self._fractions(y, d.shape[2:], d.dtype)
        top_t = upsample_limit(lim, d.shape[2:]).max()
        if self.colour_vector is not None:  # the coloured tile's largest channel reaches the map's top, no further
            top_t = top_t / float(self.colour_vector.abs().max())
        if lazy:  # the same float64 arithmetic as on the host, rounded to the tile's dtype where it is applied
            top = top_t
            alpha = (top_t.double() * self.settings.step_fraction / 10.0).to(top_t.dtype)
        else:
            top = float(top_t)
            alpha = top * self.settings.step_fraction / 10.0
        losses = []
        for _ in range(steps):
            t = self.pattern.to(d.device).clone().requires_grad_(True)
            full = self._spread(t, frac, d)
            with torch.no_grad():  # the energy projection is a per-case scale: keep it out of the gradient
                proj = self._budget(full.detach(), lim, energy, sync=not lazy)
                n = full.detach().flatten(1).norm(dim=1)
                # a zero tile (the first step) keeps scale 1, or its gradient would vanish with it
                f = torch.where(n > 0, proj.flatten(1).norm(dim=1) / n.clamp_min(1e-12), torch.ones_like(n))
            xv, yv = self._view(x, y, full * f.view(-1, *([1] * (d.ndim - 1))), lim, g)
            loss = self.surrogate.loss(xv, yv)
            (grad,) = torch.autograd.grad(loss, t)
            with torch.no_grad():
                new = self._step(t, grad, alpha, top).detach()
                if self.symmetric:
                    new = symmetrise(new, d.ndim - 2)
                self.pattern = new if lazy else new.cpu()
            losses.append(loss.detach())
        with torch.no_grad():
            out = self._budget(self._cases(d, y), lim, energy, sync=not lazy)
        return out.detach(), stack_scalars(losses, d.device)

    def unseen(self, image: torch.Tensor, label: torch.Tensor, limit: torch.Tensor,
               energy: float | None = None) -> torch.Tensor:
        """A case not seen in fit gets the same shared pattern as the fitted ones: the tile(s) laid over its work grid
        (by its labels when class-wise), scaled to its energy budget. No optimisation and no generator is needed.

        Args:
            image: C x spatial image (its shape sets the work grid).
            label: 1 x spatial labels.
            limit: C x spatial budget map.
            energy: the case's largest mean squared perturbation (None: the map alone bounds it).

        Returns:
            The case's work-grid perturbation (C x work spatial, on the CPU).
        """
        if self.pattern is None:
            raise RuntimeError("the shared tile is not fitted yet")
        shape = work_shape(image.shape[1:], self.settings.work_size)
        d = torch.zeros((1, image.shape[0]) + shape)
        e = None if energy is None else torch.tensor([float(energy)], dtype=torch.float64)
        cases = self._cases(d, torch.as_tensor(label).cpu()[None])
        return self._budget(cases, limit.cpu()[None].float(), e)[0]

    def refine_case(self, image: torch.Tensor, label: torch.Tensor, limit: torch.Tensor, case_id: str,
                    init: torch.Tensor | None = None, steps: int | None = None,
                    energy: float | None = None) -> torch.Tensor:
        """An unseen case gets the fitted tile (:meth:`unseen`): no optimisation, so protecting a case never moves
        the shared pattern that every written case carries (:meth:`_descend` would step it). ``case_id``, ``init``
        and ``steps`` are ignored."""
        return self.unseen(image, label, limit, energy)

    def _perturbed(self) -> bool:
        """Whether the shared tile exists and is non-zero (every case's perturbation is made from it)."""
        return self.pattern is not None and bool(self.pattern.any())

    def _to_host(self) -> None:
        super()._to_host()
        if self.pattern is not None:
            self.pattern = self.pattern.cpu()

    def fit(
        self,
        images: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor],
        limits: Sequence[torch.Tensor],
        case_ids: Sequence[str],
        checkpoint: str | os.PathLike | None = None,
        log: Callable[[str], None] | None = None,
        energies: Sequence[float] | None = None,
        progress: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """:meth:`ReleaseRefiner.fit`, then every case's perturbation made again from the final tile (cases visited
        early in the last round were made from an older one). With ``colour="quiet"`` the colour direction is
        first computed from ``images`` (a resumed fit keeps the one its checkpoint holds)."""
        if self.colour == "quiet" and self.colour_vector is None:
            self.colour_vector = torch.as_tensor(quiet_colour(images), dtype=torch.float32)
        super().fit(images, labels, limits, case_ids, checkpoint=checkpoint, log=log, energies=energies,
                    progress=progress)
        return self.lay(labels, limits, case_ids, energies)

    def lay(self, labels: Sequence[torch.Tensor], limits: Sequence[torch.Tensor], case_ids: Sequence[str],
            energies: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
        """Make every case's stored perturbation from the fitted tile(s), laid on the budget map ``limits`` (the one
        it was fitted on, or another one it is written on) and scaled to the case's energy budget.

        Args:
            labels: 1 x spatial labels per case.
            limits: C x spatial budget maps per case.
            case_ids: the cases (already fitted: their work grid is that of their stored perturbation).
            energies: per-case largest mean squared perturbation (None: the maps alone bound it).

        Returns:
            The stored perturbations (``deltas``).
        """
        if self.pattern is None:
            return self.deltas
        for i, (y, lim, cid) in enumerate(zip(labels, limits, case_ids)):
            d = self.deltas[cid].float()[None]
            e = None if energies is None else torch.tensor([float(energies[i])], dtype=torch.float64)
            cases = self._cases(d, torch.as_tensor(y)[None])
            self.deltas[cid] = self._budget(cases, lim[None].float(), e)[0].to(torch.float16)
        return self.deltas

    def state_dict(self) -> dict[str, Any]:
        pattern = None if self.pattern is None else self.pattern.cpu()
        return {**super().state_dict(), "pattern": pattern, "tile": self.tile, "classwise": self.classwise,
                "symmetric": self.symmetric, "fill": self.fill, "background": self.background,
                "colour": self.colour, "colour_vector": self.colour_vector, "harmonics": self.harmonics}

    def load_state_dict(self, state: Mapping[str, Any]) -> "SharedTileRefiner":
        super().load_state_dict(state)
        pattern = state.get("pattern")
        # keys written before per-class tiles hold one C x tile pattern
        self.pattern = pattern[None] if pattern is not None and pattern.ndim == self.surrogate.spatial_dims + 1 else pattern
        # keys written before the colour option held a tile per channel
        self.colour = str(state.get("colour", "free"))
        self.harmonics = int(state.get("harmonics", 0))
        vector = state.get("colour_vector")
        self.colour_vector = None if vector is None else torch.as_tensor(vector, dtype=torch.float32)
        return self
