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

"""Judging protection (METHODS.md section 4): victim training, metrics, defences, reports and figures.

``evaluate(clean, protected, ...)`` is the whole job behind ``monai-umed evaluate``; the pieces are importable on
their own: :mod:`~monai_umed.evaluation.train` (victim recipe, cache), :mod:`~monai_umed.evaluation.metrics`
(PSNR, SSIM, max |delta|, Dice), :mod:`~monai_umed.evaluation.defences` (what an unauthorised trainer may do),
:mod:`~monai_umed.evaluation.report` and :mod:`~monai_umed.evaluation.figure`.
"""

from __future__ import annotations

from monai_umed.evaluation.command import DEFAULT_EPOCHS, evaluate, imperceptibility, pair_training_lists
from monai_umed.evaluation.defences import (
    DEFENCES,
    Defence,
    Grayscale,
    GrayscaleD,
    Grayscaled,
    GrayscaleDict,
    JpegCompress,
    JpegCompressD,
    JpegCompressd,
    JpegCompressDict,
    get_defence,
    pgd_attack,
)
from monai_umed.evaluation.metrics import (
    case_imperceptibility,
    data_range,
    dice_per_class,
    max_abs_delta,
    psnr,
    ssim,
    summarise_dice,
    summarise_imperceptibility,
)
from monai_umed.evaluation.report import REPORT_KEYS
from monai_umed.evaluation.train import VictimConfig, evaluate_victim, make_config, train_victim

__all__ = [
    "DEFAULT_EPOCHS", "DEFENCES", "REPORT_KEYS", "Defence", "Grayscale", "GrayscaleD", "GrayscaleDict", "Grayscaled",
    "JpegCompress", "JpegCompressD", "JpegCompressDict", "JpegCompressd", "VictimConfig", "case_imperceptibility",
    "data_range", "dice_per_class", "evaluate", "evaluate_victim", "get_defence", "imperceptibility",
    "make_config", "max_abs_delta", "pair_training_lists", "pgd_attack", "psnr", "ssim", "summarise_dice",
    "summarise_imperceptibility", "train_victim",
]
