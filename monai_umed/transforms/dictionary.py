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

"""Dictionary transforms: protection inside a MONAI ``Compose`` of dictionaries."""

from __future__ import annotations

from typing import Any, Hashable, Mapping

import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import InvertibleTransform, MapTransform

from monai_umed.protectors.base import Protector
from monai_umed.transforms.array import ContourBand, Protect, TextureBound

__all__ = [
    "ProtectD",
    "ProtectDict",
    "Protectd",
    "ContourBandd",
    "ContourBandD",
    "ContourBandDict",
    "TextureBoundd",
    "TextureBoundD",
    "TextureBoundDict",
    "UMedProtectd",
    "UMedProtectD",
    "UMedProtectDict",
]


class Protectd(MapTransform, InvertibleTransform):
    """Dictionary-based wrapper of :py:class:`monai_umed.transforms.Protect`.

    Images must already be normalised to ``[0, 1]`` (e.g. ``ScaleIntensityRanged``) and be in the label's grid.
    ``Compose.inverse`` removes the perturbation exactly.

    Note:
        ``Invertd`` inverts *every* invertible transform applied to a key, including this one: keep protection
        out of the chain that ``Invertd`` undoes, or the "inverted" output is the unprotected image.

    Args:
        keys: image keys to protect.
        protector: a fitted protector.
        label_key: key of the label map passed to the protector (None for label-free methods).
        case_id_key: key holding a stable case identifier; defaults to the image's ``filename_or_obj``.
        clip: clip to ``[0, 1]`` after adding the perturbation.
        allow_missing_keys: don't raise an exception if a key is missing.

    Example::

        pipeline = Compose([LoadImaged(["image", "label"], ensure_channel_first=True),
                            ScaleIntensityd("image"),
                            Protectd("image", protector=protectors.get("noise"), label_key="label")])
    """

    backend = Protect.backend

    def __init__(
        self,
        keys: KeysCollection,
        protector: Protector,
        label_key: str | None = "label",
        case_id_key: str | None = None,
        clip: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.protect = Protect(protector, clip=clip)
        self.label_key = label_key
        self.case_id_key = case_id_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        label = d.get(self.label_key) if self.label_key is not None else None
        case_id = str(d[self.case_id_key]) if self.case_id_key is not None and self.case_id_key in d else None
        for key in self.key_iterator(d):
            d[key] = self.protect(d[key], label=label, case_id=case_id)
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.protect.inverse(d[key])
        return d


ProtectD = ProtectDict = Protectd


class ContourBandd(MapTransform):
    """Dictionary-based wrapper of :py:class:`monai_umed.transforms.ContourBand`: writes the band of each label key
    to a new key (the label itself is left unchanged).

    Args:
        keys: label keys.
        radius: band radius in voxels.
        radius_mm: band radius in mm (uses the label's ``pixdim``).
        per_class: union of the per-class bands.
        output_postfix: the band of ``key`` goes to ``f"{key}_{output_postfix}"``.
        allow_missing_keys: don't raise an exception if a key is missing.

    Example::

        Compose([LoadImaged(["image", "label"], ensure_channel_first=True), ContourBandd("label", radius=2)])
        # adds data["label_band"]
    """

    backend = ContourBand.backend

    def __init__(
        self,
        keys: KeysCollection,
        radius: float = 2,
        radius_mm: float | None = None,
        per_class: bool = True,
        output_postfix: str = "band",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.band = ContourBand(radius=radius, radius_mm=radius_mm, per_class=per_class)
        self.output_postfix = output_postfix

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[f"{key}_{self.output_postfix}"] = self.band(d[key])
        return d


class TextureBoundd(MapTransform):
    """Dictionary-based wrapper of :py:class:`monai_umed.transforms.TextureBound`: writes the bound of each image key
    to a new key.

    Args:
        keys: image keys.
        label_key: key of the label map that defines the ROI.
        window: texture window ``k``.
        b_min: bound in the flattest ROI regions.
        quantiles: ROI texture-energy quantiles mapped to ``b_min`` and 1.
        output_postfix: the bound of ``key`` goes to ``f"{key}_{output_postfix}"``.
        allow_missing_keys: don't raise an exception if a key is missing.
    """

    backend = TextureBound.backend

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        window: int = 5,
        b_min: float = 0.25,
        quantiles: tuple[float, float] = (0.0, 1.0),
        output_postfix: str = "bound",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.bound = TextureBound(window=window, b_min=b_min, quantiles=quantiles)
        self.label_key = label_key
        self.output_postfix = output_postfix

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[f"{key}_{self.output_postfix}"] = self.bound(d[key], d[self.label_key])
        return d


class UMedProtectd(Protectd):
    """:py:class:`Protectd` with a UMed protector: adds UMed's contour- and texture-aware perturbation to the
    image keys of a MONAI dictionary pipeline; ``inverse`` removes it exactly.

    Give either a fitted (or loaded) ``protector`` or UMed parameters plus a ``state`` from
    :meth:`~monai_umed.protectors.umed.UMedProtector.state_dict` (e.g. read from the restoration key).

    Note:
        As with ``Protectd``, keep this transform out of a chain that ``Invertd`` undoes, or the "inverted"
        output is the unprotected image.

    Args:
        keys: image keys to protect (normalised to ``[0, 1]``, in the label's grid).
        protector: a fitted :class:`~monai_umed.protectors.umed.UMedProtector`.
        state: a UMed ``state_dict`` to load when ``protector`` is None.
        label_key: key of the label map.
        case_id_key: key holding a stable case identifier.
        clip: clip to ``[0, 1]``.
        allow_missing_keys: don't raise an exception if a key is missing.
        umed_params: UMed parameters used to build the protector when ``protector`` is None.

    Raises:
        ValueError: neither a protector nor a state, or a protector of another method.

    Example::

        p = UMedProtector(epsilon=4 / 255).fit(train_samples)
        pipeline = Compose([LoadImaged(["image", "label"], ensure_channel_first=True),
                            ScaleIntensityd("image"), UMedProtectd("image", protector=p)])
    """

    def __init__(
        self,
        keys: KeysCollection,
        protector: Protector | None = None,
        state: Mapping[str, Any] | None = None,
        label_key: str | None = "label",
        case_id_key: str | None = None,
        clip: bool = True,
        allow_missing_keys: bool = False,
        **umed_params: Any,
    ) -> None:
        from monai_umed.protectors.umed import UMedProtector

        if protector is None:
            if state is None:
                raise ValueError("UMedProtectd needs a fitted UMed protector or its state_dict")
            protector = UMedProtector(**umed_params).load_state_dict(state)
        if not isinstance(protector, UMedProtector):
            raise ValueError(f"UMedProtectd needs a UMed protector, got {type(protector).__name__}")
        super().__init__(keys, protector=protector, label_key=label_key, case_id_key=case_id_key, clip=clip,
                         allow_missing_keys=allow_missing_keys)


ContourBandD = ContourBandDict = ContourBandd
TextureBoundD = TextureBoundDict = TextureBoundd
UMedProtectD = UMedProtectDict = UMedProtectd
