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

"""MONAI transforms of monai-umed (array and dictionary forms)."""

from __future__ import annotations

from monai_umed.transforms.array import ContourBand, Protect, TextureBound
from monai_umed.transforms.dictionary import (
    ContourBandD,
    ContourBandd,
    ContourBandDict,
    ProtectD,
    Protectd,
    ProtectDict,
    TextureBoundD,
    TextureBoundd,
    TextureBoundDict,
    UMedProtectD,
    UMedProtectd,
    UMedProtectDict,
)

__all__ = [
    "Protect",
    "ProtectD",
    "ProtectDict",
    "Protectd",
    "ContourBand",
    "ContourBandd",
    "ContourBandD",
    "ContourBandDict",
    "TextureBound",
    "TextureBoundd",
    "TextureBoundD",
    "TextureBoundDict",
    "UMedProtectd",
    "UMedProtectD",
    "UMedProtectDict",
]
