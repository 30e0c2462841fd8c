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

"""The :class:`Protector` interface shared by every method (DESIGN.md, "The Protector interface").

A protector works in the normalised ``[0, 1]`` space of :mod:`monai_umed.intensity` on channel-first tensors
``image`` (C x spatial) and integer ``label`` (1 x spatial), 2D or 3D. ``fit`` learns from training samples
(a no-op for surrogate-free methods); ``perturbation`` returns ``delta`` with ``|delta| <= epsilon`` and the image's
shape. Randomness for a case is derived from ``(seed, case_id)`` only, never from call order, so an interrupted and
resumed run writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from typing import Any, Iterable, Mapping, Sequence

import torch

__all__ = ["Protector", "resolve_device", "case_seed", "working_set_on"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> CUDA when available, CPU otherwise."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def working_set_on(device: str | torch.device, tensors: Iterable[torch.Tensor], fraction: float = 0.5,
                   extra_bytes: int = 0) -> bool:
    """Whether a fit should keep its whole working set (``tensors``) on ``device`` for the fit's duration.

    True when ``device`` is a CUDA device and the tensors' bytes (plus ``extra_bytes``, e.g. what the fit will add)
    fit in ``fraction`` of its free memory (``torch.cuda.mem_get_info``); the fit then moves them there once instead
    of once per batch. False on the CPU (already there), on a device whose free memory is unknown (e.g. MPS) and
    when the set does not fit (the fit keeps its per-batch transfers).

    Args:
        device: the fit's device.
        tensors: what would be moved.
        fraction: the share of the free device memory the working set may take.
        extra_bytes: bytes the fit will allocate beside ``tensors`` on the device.
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return False
    need = int(extra_bytes) + sum(t.numel() * t.element_size() for t in tensors)
    try:
        free, _total = torch.cuda.mem_get_info(dev)
    except (RuntimeError, AssertionError, ValueError):  # no usable CUDA runtime
        return False
    return need <= float(fraction) * free


def case_seed(seed: int, case_id: str | None, salt: str = "") -> int:
    """A 63-bit seed derived from the run seed and a case identifier (stable across processes and runs)."""
    h = hashlib.sha256(f"{int(seed)}|{salt}|{case_id or ''}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class Protector(ABC):
    """Base class of all protection methods.

    Subclasses set ``name``, ``requires_label`` (False only for methods that ignore labels) and ``fits``
    (True when :meth:`fit` learns something), and implement :meth:`perturbation`; fitted methods also override
    :meth:`fit`, :meth:`state_dict` and :meth:`load_state_dict`.

    Args:
        epsilon: L-inf budget in normalised units (``8/255`` by default).
        spatial_dims: 2 or 3; inferred from the first sample when None.
        seed: run seed; per-case randomness comes from :func:`case_seed`.
        epochs: upper bound on any fitting (ignored by methods that fit nothing).
        device: ``auto`` | ``cpu`` | ``cuda``.
    """

    name: str = "base"
    requires_label: bool = True
    fits: bool = False

    def __init__(
        self,
        epsilon: float = 8 / 255,
        spatial_dims: int | None = None,
        seed: int = 0,
        epochs: int | None = None,
        device: str | torch.device | None = "auto",
    ) -> None:
        if not 0.0 <= float(epsilon) <= 1.0:
            raise ValueError(f"epsilon must lie in [0, 1] (normalised units), got {epsilon}")
        if spatial_dims not in (None, 2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.epsilon = float(epsilon)
        self.spatial_dims = spatial_dims
        self.seed = int(seed)
        self.epochs = epochs
        self.device = resolve_device(device)
        self.fitted = not self.fits

    # -- the contract -------------------------------------------------------------------------------------------
    def fit(
        self,
        samples: Sequence[Mapping[str, Any]],
        *,
        progress: bool = True,
        checkpoint: str | os.PathLike | None = None,
    ) -> "Protector":
        """Learn the perturbation from training samples.

        Args:
            samples: a sequence (``len`` and indexing) of dicts with ``image`` (C x spatial float in [0, 1]),
                ``label`` (1 x spatial int) and ``case_id``.
            progress: show a progress bar.
            checkpoint: file where fitting methods save their state periodically and from which they resume
                when it exists (an interrupted ``monai-umed protect --resume`` passes the same file).

        The default, for surrogate-free methods, only records ``spatial_dims``.
        """
        for s in samples:
            self._set_spatial_dims(s["image"])
            break
        self.fitted = True
        return self

    def fit_sample(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """What :meth:`fit` keeps of one training sample, called as each case is decoded: a caller that streams a
        dataset (``protect``) keeps only this, so a method that needs part of a big case lets the rest go. The
        default keeps the whole sample.

        Args:
            sample: ``image``, ``label``, ``case_id`` and optionally ``spacing`` and ``meta`` (as for :meth:`fit`).

        Returns:
            A sample :meth:`fit` accepts in its place.
        """
        return dict(sample)

    @abstractmethod
    def perturbation(
        self, image: torch.Tensor, label: torch.Tensor | None = None, case_id: str | None = None
    ) -> torch.Tensor:
        """Return ``delta`` (same shape as ``image``, normalised units, ``|delta| <= epsilon``).

        Args:
            image: channel-first float tensor in ``[0, 1]``.
            label: channel-first integer label map (``1 x spatial``), or None for methods that need none.
            case_id: stable identifier of the case; seeds its randomness.
        """

    def perturbation_batch(
        self,
        images: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor | None],
        case_ids: Sequence[str | None],
    ) -> list[torch.Tensor]:
        """Perturbations for several cases; methods with a batched forward pass override this."""
        return [self.perturbation(i, l_, c) for i, l_, c in zip(images, labels, case_ids)]

    def state_dict(self) -> dict[str, Any]:
        """What :meth:`fit` learned plus the parameters needed to rebuild the protector."""
        return {"name": self.name, "params": self.params(), "spatial_dims": self.spatial_dims}

    def load_state_dict(self, state: Mapping[str, Any]) -> "Protector":
        if state.get("name", self.name) != self.name:
            raise ValueError(f"state of protector {state.get('name')!r} cannot be loaded into {self.name!r}")
        self.spatial_dims = state.get("spatial_dims", self.spatial_dims)
        self.fitted = True
        return self

    def params(self) -> dict[str, Any]:
        """JSON-serialisable parameters, recorded in the manifest."""
        return {"epsilon": self.epsilon, "seed": self.seed, "epochs": self.epochs}

    def fit_report(self) -> dict[str, Any] | None:
        """How the fit went, for the owner (the key and ``protect``'s summary); None where the method has nothing to
        report (surrogate-free methods, or no release stage). See :meth:`ReleaseRefiner.fit_report
        <monai_umed.protectors.refine.ReleaseRefiner.fit_report>`."""
        return None

    # -- helpers for subclasses ---------------------------------------------------------------------------------
    def generator(self, case_id: str | None, salt: str = "", device: torch.device | str = "cpu") -> torch.Generator:
        """A torch generator seeded from ``(seed, case_id, salt)``."""
        g = torch.Generator(device=device)
        g.manual_seed(case_seed(self.seed, case_id, salt))
        return g

    def _set_spatial_dims(self, image: torch.Tensor) -> int:
        sd = image.ndim - 1
        if sd not in (2, 3):
            raise ValueError(f"expected a channel-first 2D or 3D image, got shape {tuple(image.shape)}")
        if self.spatial_dims is None:
            self.spatial_dims = sd
        elif self.spatial_dims != sd and self.fits:  # what a fitted method learned is tied to its dimensionality
            raise ValueError(f"{self.name} was set up for spatial_dims={self.spatial_dims}, got a {sd}D image")
        return sd

    def _check_inputs(self, image: torch.Tensor, label: torch.Tensor | None) -> None:
        self._set_spatial_dims(image)
        if self.requires_label and label is None:
            raise ValueError(f"protector {self.name!r} needs a label map")
        if label is not None and tuple(label.shape[1:]) != tuple(image.shape[1:]):
            raise ValueError(f"label shape {tuple(label.shape)} does not match image shape {tuple(image.shape)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"
