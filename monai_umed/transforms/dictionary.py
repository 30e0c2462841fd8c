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

from typing import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform

from monai_umed.protectors.base import Protector
from monai_umed.transforms.array import Protect

__all__ = ["ProtectD", "ProtectDict", "Protectd"]


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
