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

"""The surrogate segmentation network that fitted protectors optimise against (METHODS.md section 0).

One MONAI ``UNet`` (2D or 3D) trained with ``DiceCELoss`` on pixel labels, plus the padding/collation and the
label-consistent augmentation every min-min method needs. Written once, used by UMed, SALM, EM, TAP and SEP.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

__all__ = ["Surrogate", "pad_to_multiple", "collate_padded", "augment_pair", "foreground_dice", "dice_counts",
           "dice_from_counts"]


def pad_to_multiple(x: torch.Tensor, k: int, shape: Sequence[int] | None = None) -> torch.Tensor:
    """Zero-pad the spatial dims of a channel-first (or batched, ``ndim`` given by ``len(shape)``) tensor at the end.

    Args:
        x: tensor whose trailing dims are spatial.
        k: pad each spatial size up to a multiple of ``k``.
        shape: explicit target spatial shape (each entry must be >= the current size); overrides ``k``.
    """
    sd = len(shape) if shape is not None else x.ndim - 1
    cur = x.shape[-sd:]
    target = list(shape) if shape is not None else [-(-s // k) * k for s in cur]
    pad: list[int] = []
    for s, t in zip(reversed(cur), reversed(target)):
        pad += [0, int(t - s)]
    return F.pad(x, pad) if any(pad) else x


def collate_padded(
    images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], k: int = 8
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, ...]]]:
    """Stack variable-size channel-first samples into a batch, zero-padded to a common multiple of ``k``.

    Returns:
        ``(images BxCx..., labels Bx1x..., original spatial shapes)``; crop outputs back with the shapes.
    """
    shapes = [tuple(i.shape[1:]) for i in images]
    target = [-(-max(s[d] for s in shapes) // k) * k for d in range(len(shapes[0]))]
    x = torch.stack([pad_to_multiple(i, k, target) for i in images])
    y = torch.stack([pad_to_multiple(torch.as_tensor(l_), k, target) for l_ in labels])
    return x, y, shapes


def foreground_dice(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Mean foreground Dice of a batch prediction (argmax labels), over the classes present in either map."""
    k = int(max(int(y.max()), int(pred.max()), 1))
    vals = []
    for c in range(1, k + 1):
        p, t = pred == c, y == c
        denom = int(p.sum() + t.sum())
        if denom:
            vals.append(2.0 * float((p & t).sum()) / denom)
    return sum(vals) / len(vals) if vals else 1.0


def dice_counts(pred: torch.Tensor, y: torch.Tensor, classes: int) -> torch.Tensor:
    """Per foreground class ``1 .. classes - 1``: the overlap and the summed sizes of ``pred`` and ``y`` (a
    ``(classes - 1) x 2`` int64 tensor on their device, no host round trip). :func:`dice_from_counts` turns it into
    :func:`foreground_dice`'s value when no label reaches ``classes`` (a network with ``classes`` outputs)."""
    rows = []
    for c in range(1, max(int(classes), 2)):
        p, t = pred == c, y == c
        rows.append(torch.stack([(p & t).sum(), p.sum() + t.sum()]))
    return torch.stack(rows)


def dice_from_counts(counts: Sequence[Sequence[int]]) -> float:
    """:func:`foreground_dice` from host :func:`dice_counts` (``counts.tolist()``), with the same arithmetic."""
    vals = [2.0 * float(inter) / int(denom) for inter, denom in counts if int(denom)]
    return sum(vals) / len(vals) if vals else 1.0


def augment_pair(
    x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips along each spatial axis and a random 90-degree in-plane rotation, applied identically to a
    batch of images ``x`` (B x C x ...) and labels ``y``; differentiable with respect to ``x``."""
    sd = x.ndim - 2
    r = torch.rand(sd + 1, generator=generator)
    for d in range(sd):
        if r[d] < 0.5:
            x, y = x.flip(2 + d), y.flip(2 + d)
    # rot90 keeps the grid exact; only when the first two spatial axes are square (otherwise batch shapes change)
    if r[sd] < 0.5 and x.shape[2] == x.shape[3]:
        x, y = x.rot90(1, (2, 3)), y.rot90(1, (2, 3))
    return x, y


class Surrogate:
    """A MONAI UNet with its optimiser and loss.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        num_classes: label classes including background (at least 2).
        channels: UNet channels per level (its length sets the depth; inputs are padded to ``2**(len-1)``).
        lr: Adam learning rate.
        device: torch device.
        seed: seeds the weight initialisation.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        channels: Sequence[int] = (16, 32, 64, 128),
        lr: float = 1e-3,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = UNet(
                spatial_dims=spatial_dims,
                in_channels=in_channels,
                out_channels=max(2, num_classes),
                channels=tuple(channels),
                strides=(2,) * (len(channels) - 1),
                num_res_units=1,
            ).to(device)
        self.multiple = 2 ** (len(channels) - 1)
        self.spatial_dims = spatial_dims
        self.device = torch.device(device)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Forward a batch whose spatial sizes are multiples of :attr:`multiple` (see :func:`collate_padded`)."""
        return self.model(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """DiceCE loss of the surrogate on a batch (differentiable w.r.t. ``x`` and the weights)."""
        return self.loss_fn(self.model(x), y.long())

    def train_step(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None,
                   augment: bool = True, as_tensor: bool = False) -> float | torch.Tensor:
        """One Adam step on ``(x, y)`` (detached), with :func:`augment_pair` when ``augment``; returns the loss (a
        detached 0-dim tensor on the device with ``as_tensor``: no host round trip)."""
        x, y = x.detach(), y.detach()
        if augment:
            x, y = augment_pair(x, y, generator)
        return self.step(x, y, as_tensor=as_tensor)[0]

    def step(self, x: torch.Tensor, y: torch.Tensor,
             as_tensor: bool = False) -> tuple[float | torch.Tensor, torch.Tensor]:
        """One Adam step on ``(x, y)`` as given (no augmentation); returns the loss (a float, or with ``as_tensor``
        a detached 0-dim tensor on the device, so the caller decides when to wait for it) and the detached logits."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(x.detach())
        loss = self.loss_fn(logits, y.detach().long())
        loss.backward()
        self.optimizer.step()
        return (loss.detach() if as_tensor else float(loss.detach())), logits.detach()

    @torch.no_grad()
    def dice(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Mean foreground Dice of the surrogate's argmax prediction on a batch (the min-min stop criterion)."""
        self.model.eval()
        pred = self.model(x).argmax(1, keepdim=True)
        k = int(max(int(y.max()), int(pred.max()), 1))
        dices = []
        for c in range(1, k + 1):
            p, t = pred == c, y == c
            denom = p.sum() + t.sum()
            if denom > 0:
                dices.append(float(2 * (p & t).sum() / denom))
        return sum(dices) / len(dices) if dices else 1.0

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
