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

"""Array transforms: protection of one channel-first image inside a MONAI pipeline."""

from __future__ import annotations

from typing import Any, Hashable

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, Transform
from monai.utils import TransformBackends
from monai.utils.type_conversion import convert_to_tensor

from monai_umed.protectors.base import Protector

__all__ = ["Protect", "ContourBand", "TextureBound"]


class Protect(InvertibleTransform, Transform):
    """Add a fitted protector's perturbation to a channel-first image in normalised ``[0, 1]`` units.

    ``x' = clip(x + delta, 0, 1)``; the applied change ``x' - x`` is kept (in float64) in the ``MetaTensor``'s
    ``applied_operations`` so that :meth:`inverse` gives back ``x`` exactly.

    Note:
        MONAI's ``Invertd`` calls ``inverse`` on every invertible transform recorded on a tensor, so a
        ``Protect`` left in a preprocessing chain that ``Invertd`` undoes would *remove the protection* from the
        inverted output. Apply protection in its own ``Compose`` (or before the chain that ``Invertd`` undoes).
        The stored change has the image's size, so keep protected tensors out of long-lived caches.

    Args:
        protector: a fitted :class:`~monai_umed.protectors.base.Protector`.
        clip: clip the result to ``[0, 1]``.

    Example::

        protect = Protect(protectors.get("noise", epsilon=4 / 255))
        x_protected = protect(x, label=y, case_id="case_001")
        x_back = protect.inverse(x_protected)  # equals x
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, protector: Protector, clip: bool = True) -> None:
        self.protector = protector
        self.clip = clip

    def __call__(
        self, img: NdarrayOrTensor, label: NdarrayOrTensor | None = None, case_id: str | None = None
    ) -> torch.Tensor:
        """
        Args:
            img: channel-first image in ``[0, 1]``.
            label: channel-first integer label map, when the protector needs one.
            case_id: stable case identifier (seeds per-case randomness); defaults to the image's file name.
        """
        img_t = convert_to_tensor(img, track_meta=True)
        if not torch.is_floating_point(img_t):
            img_t = img_t.float()
        if case_id is None and isinstance(img_t, MetaTensor):
            case_id = str(img_t.meta.get("filename_or_obj", "")) or None
        lab = None if label is None else torch.as_tensor(np.asarray(label) if not torch.is_tensor(label) else label)
        delta = self.protector.perturbation(img_t.as_tensor() if isinstance(img_t, MetaTensor) else img_t, lab, case_id)
        out = img_t + delta.to(device=img_t.device, dtype=img_t.dtype)
        if self.clip:
            out = out.clamp(0.0, 1.0)
        applied = out.as_tensor().double() - (img_t.as_tensor() if isinstance(img_t, MetaTensor) else img_t).double()
        out = convert_to_tensor(out, track_meta=True)
        if not isinstance(out, MetaTensor):
            out = MetaTensor(out)
        self.push_transform(out, extra_info={"delta": applied.cpu(), "case_id": case_id,
                                              "method": self.protector.name})
        return out

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        """Remove the perturbation recorded by the last ``Protect`` call on ``data``."""
        transform = self.pop_transform(data)
        return self.inverse_transform(data, transform)

    def inverse_transform(self, data: torch.Tensor, transform: dict[Hashable, Any]) -> torch.Tensor:
        delta = transform["extra_info"]["delta"].to(data.device)
        raw = data.as_tensor() if isinstance(data, MetaTensor) else data
        restored = (raw.double() - delta).to(raw.dtype)
        if isinstance(data, MetaTensor):
            out = MetaTensor(restored, meta=data.meta, applied_operations=data.applied_operations)
            return out
        return restored


class ContourBand(Transform):
    """The contour band ``dilate(M, r) AND NOT erode(M, r)`` of a label map (UMed's ``M_c``, METHODS.md section 0).

    See :func:`monai_umed.masks.contour_band`. With ``radius_mm`` the radius is in millimetres, using the label's
    spacing (``MetaTensor.pixdim``) or ``spacing``; without a known spacing the voxel ``radius`` applies.

    Args:
        radius: band radius in voxels.
        radius_mm: band radius in mm (spacing-aware, for anisotropic 3D volumes).
        spacing: voxel spacing to use when the label carries none.
        per_class: union of the per-class bands (boundaries between touching classes included).

    Example::

        band = ContourBand(radius=2)(label)  # (1, H, W[, D]) uint8 in {0, 1}
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        radius: float = 2,
        radius_mm: float | None = None,
        spacing: tuple[float, ...] | None = None,
        per_class: bool = True,
    ) -> None:
        self.radius = radius
        self.radius_mm = radius_mm
        self.spacing = spacing
        self.per_class = per_class

    def __call__(self, label: NdarrayOrTensor) -> NdarrayOrTensor:
        """
        Args:
            label: channel-first integer label map (``1 x spatial``).

        Returns:
            ``1 x spatial`` uint8 mask (1 on the band), same array type as ``label`` (metadata kept).
        """
        from monai_umed.masks import contour_band, spacing_of

        spacing = spacing_of(label) or self.spacing
        band = contour_band(label, self.radius, spacing=spacing, radius_mm=self.radius_mm, per_class=self.per_class)
        out = band.to(torch.uint8)
        if isinstance(label, MetaTensor):
            return MetaTensor(out.to(label.device), meta=label.meta)
        if isinstance(label, np.ndarray):
            return out.numpy()
        return out.to(label.device)


class TextureBound(Transform):
    """UMed's texture-aware adaptive bound ``B(x)``: local standard deviation in a ``window``, normalised to
    ``[b_min, 1]`` inside the ROI, 0 outside (METHODS.md section 1.3).

    See :func:`monai_umed.masks.texture_bound`.

    Args:
        window: odd texture window ``k``.
        b_min: bound in the flattest ROI regions.
        quantiles: ROI texture-energy quantiles mapped to ``b_min`` and 1.

    Example::

        bound = TextureBound(window=5, b_min=0.25)(image, label)  # (C, H, W[, D]) float32
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, window: int = 5, b_min: float = 0.25, quantiles: tuple[float, float] = (0.0, 1.0)) -> None:
        self.window = int(window)
        self.b_min = float(b_min)
        self.quantiles = (float(quantiles[0]), float(quantiles[1]))

    def __call__(self, img: NdarrayOrTensor, label: NdarrayOrTensor) -> torch.Tensor:
        """
        Args:
            img: channel-first image (normalised units).
            label: channel-first label map (``1 x spatial``); the ROI is ``label > 0``.

        Returns:
            float32 tensor like ``img`` (a ``MetaTensor`` with the image's metadata when ``img`` is one).
        """
        from monai_umed.masks import texture_bound

        x = convert_to_tensor(img, track_meta=False)
        lab = convert_to_tensor(label, track_meta=False)
        bound = texture_bound(x.float(), lab.to(x.device), self.window, self.b_min, self.quantiles)
        if isinstance(img, MetaTensor):
            return MetaTensor(bound, meta=img.meta)
        return bound
