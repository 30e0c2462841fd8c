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

"""What runs inside nnU-Net v2's own process when nnU-Net judges a protected copy (``evaluate --victim nnunet``).

nnU-Net reads ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` from the environment, so the judge
(:mod:`monai_umed.evaluation.nnunet`) runs every nnU-Net step in a subprocess, ``python -m
monai_umed.nnunet.worker``, with that environment set. The modules here are that subprocess's side:

- :mod:`~monai_umed.nnunet.trainer`: ``nnUNetTrainerShort``, nnU-Net's default trainer on a short schedule, and
  a fingerprint extractor that does not oversample tiny datasets;
- :mod:`~monai_umed.nnunet.worker`: fingerprint, plan, preprocess, train on every case (fold ``all``), predict.

This package is kept apart from :mod:`monai_umed.evaluation` on purpose: nnU-Net's fingerprinting and
preprocessing start ``spawn`` worker processes, each of which imports the worker's module again, and importing
:mod:`monai_umed.evaluation` (MONAI, the victims, the defences) would cost every one of them seconds. Only the
constants below are shared with the judge; importing this package imports nothing else.
"""

from __future__ import annotations

__all__ = ["TRAINER", "PLANS", "FOLD", "SHORT_EPOCHS", "SHORT_ITERATIONS", "CPU_MAX_BATCH", "configuration_for"]

#: The trainer class the judge runs (:class:`monai_umed.nnunet.trainer.nnUNetTrainerShort`).
TRAINER = "nnUNetTrainerShort"
#: nnU-Net's default plans identifier (``ExperimentPlanner``).
PLANS = "nnUNetPlans"
#: Every training case trains the victim (nnU-Net's fold ``all``): the judge tests on the clean test list instead.
FOLD = "all"
#: The short schedule's default epochs and iterations per epoch (nnU-Net's default trainer: 1000 x 250, for a GPU).
SHORT_EPOCHS = 10
SHORT_ITERATIONS = 50
#: On a CPU the planned batch is capped at this size (nnU-Net plans it for 8 GB of GPU memory: 40 images of
#: 128 x 128 for Kvasir-SEG, about 12 s per iteration on one core); an explicit batch size wins.
CPU_MAX_BATCH = 12


def configuration_for(spatial_dims: int) -> str:
    """nnU-Net's configuration for the data: ``2d`` for 2D images, ``3d_fullres`` for volumes."""
    return "2d" if int(spatial_dims) == 2 else "3d_fullres"
