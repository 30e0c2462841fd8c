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

"""nnU-Net v2 classes of the judge: a short-schedule trainer and a fingerprint extractor (needs ``nnunetv2``).

``nnUNetTrainerShort`` is nnU-Net's default ``nnUNetTrainer`` (network, loss, deep supervision, augmentation,
SGD with poly learning rate, oversampling of the foreground) with fewer epochs and iterations: nnU-Net's 1000 epochs
of 250 iterations are for a GPU. nnU-Net's ``nnUNetv2_train`` finds trainers inside the ``nnunetv2`` package only,
so :mod:`~monai_umed.nnunet.worker` instantiates this one directly.
"""

from __future__ import annotations

import sys

import torch
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from monai_umed.nnunet import SHORT_EPOCHS, SHORT_ITERATIONS

__all__ = ["nnUNetTrainerShort", "FingerprintExtractor", "MAX_SAMPLES_PER_CASE"]

#: Foreground intensities sampled per case for the fingerprint, at most (see :class:`FingerprintExtractor`).
MAX_SAMPLES_PER_CASE = 10**6


class nnUNetTrainerShort(nnUNetTrainer):
    """nnU-Net's default trainer on a short schedule: ``num_epochs`` epochs of ``num_iterations_per_epoch``.

    The constructor is nnU-Net's own (nnU-Net rebuilds trainers from the arguments it records in checkpoints), so
    the schedule is set afterwards with :meth:`set_schedule`; until then it is :data:`SHORT_EPOCHS` x
    :data:`SHORT_ITERATIONS`. Each finished epoch prints one ``[nnunet]`` line to stderr, the judge's progress.
    """

    def __init__(self, plans: dict, configuration: str, fold: int | str, dataset_json: dict,
                 device: torch.device = torch.device("cuda")) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.set_schedule(SHORT_EPOCHS, SHORT_ITERATIONS)

    def set_schedule(self, epochs: int, iterations: int, val_iterations: int | None = None) -> None:
        """Train ``epochs`` epochs of ``iterations`` batches, with ``val_iterations`` validation batches after each
        (default: a fifth of ``iterations``, nnU-Net's 250:50).

        Raises:
            ValueError: a count below 1.
        """
        val_iterations = max(1, int(iterations) // 5) if val_iterations is None else int(val_iterations)
        if min(int(epochs), int(iterations), val_iterations) < 1:
            raise ValueError(f"epochs, iterations and validation iterations must be at least 1, got {epochs}, "
                             f"{iterations}, {val_iterations}")
        self.num_epochs = int(epochs)
        self.num_iterations_per_epoch = int(iterations)
        self.num_val_iterations_per_epoch = val_iterations
        # no intermediate checkpoint_latest: a short run is rerun rather than resumed (best and final are kept)
        self.save_every = self.num_epochs + 1

    def on_epoch_end(self) -> None:
        epoch = self.current_epoch
        super().on_epoch_end()
        log = self.logger.get_checkpoint()
        seconds = log["epoch_end_timestamps"][-1] - log["epoch_start_timestamps"][-1]
        print(f"[nnunet] epoch {epoch + 1}/{self.num_epochs}: train loss {log['train_losses'][-1]:.4f}, "
              f"val loss {log['val_losses'][-1]:.4f}, pseudo Dice {log['mean_fg_dice'][-1]:.4f}, {seconds:.1f} s",
              file=sys.stderr, flush=True)


class FingerprintExtractor(DatasetFingerprintExtractor):
    """nnU-Net's ``DatasetFingerprintExtractor``, sampling at most :data:`MAX_SAMPLES_PER_CASE` foreground
    intensities per case.

    nnU-Net spreads 1e8 samples (drawn with replacement) over the training cases: 1e6 or fewer per case from 100
    cases on, where nothing changes, but 2.5e7 per case for a 4-case dataset, which costs half a minute and gigabytes
    for a few hundred foreground pixels. The intensity statistics (mean, std, percentiles) are estimates either way.
    """

    def __init__(self, dataset_name_or_id: str | int, num_processes: int = 8, verbose: bool = False) -> None:
        super().__init__(dataset_name_or_id, num_processes, verbose)
        self.num_foreground_voxels_for_intensitystats = min(self.num_foreground_voxels_for_intensitystats,
                                                            MAX_SAMPLES_PER_CASE * max(1, len(self.dataset)))
