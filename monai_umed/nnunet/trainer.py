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

A long schedule on a CPU (hours) must survive an interrupted session: the trainer writes nnU-Net's
``checkpoint_latest.pth`` after every epoch and, beside it, the random states of ``random``, NumPy and torch at
that epoch's end (``rng_epochN.pt``: nnU-Net's sampling and augmentation draw from these global generators), so
that :meth:`nnUNetTrainerShort.resume` continues the run exactly where it stopped: the weights, the optimiser, the
learning-rate schedule and every later random draw are those of the uninterrupted run.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from monai_umed.nnunet import SHORT_EPOCHS, SHORT_ITERATIONS

__all__ = ["nnUNetTrainerShort", "FingerprintExtractor", "MAX_SAMPLES_PER_CASE", "LATEST", "FINAL"]

#: nnU-Net's checkpoint names: the last finished epoch of a run in progress, and the end of a finished run.
LATEST = "checkpoint_latest.pth"
FINAL = "checkpoint_final.pth"

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
        # checkpoint_latest after every epoch (nnU-Net writes checkpoint_final instead after the last one)
        self.save_every = 1
        self._rng_to_restore: dict | None = None

    def _rng_file(self, epoch: int) -> Path:
        return Path(self.output_folder) / f"rng_epoch{int(epoch)}.pt"

    def resume(self) -> int:
        """Continue an interrupted run of this trainer in its output folder (call before ``run_training``).

        Loads ``checkpoint_final.pth`` if the run finished, else ``checkpoint_latest.pth`` and the random states
        recorded with it; training then runs only the epochs left.

        Returns:
            the epoch training continues from (0: nothing to resume; ``num_epochs``: the run had finished).

        Raises:
            RuntimeError: a checkpoint of another schedule, or one without its random states (written by a run
                that cannot be continued exactly).
        """
        out = Path(self.output_folder)
        for name in (FINAL, LATEST):
            if (out / name).is_file():
                self.load_checkpoint(str(out / name))
                break
        else:
            return 0
        if name == FINAL:
            return self.current_epoch
        if self.current_epoch > self.num_epochs:
            raise RuntimeError(f"{out / name} is at epoch {self.current_epoch}, past this schedule's "
                               f"{self.num_epochs} epochs")
        rng = self._rng_file(self.current_epoch)
        if not rng.is_file():
            raise RuntimeError(f"{out / name} has no random states for epoch {self.current_epoch} ({rng.name})")
        self._rng_to_restore = torch.load(rng, weights_only=False)
        return self.current_epoch

    def on_train_start(self) -> None:
        super().on_train_start()
        # the uninterrupted run would be at exactly these states when its next epoch starts
        if self._rng_to_restore is not None:
            state, self._rng_to_restore = self._rng_to_restore, None
            random.setstate(state["random"])
            np.random.set_state(state["numpy"])
            torch.set_rng_state(state["torch"])

    def on_epoch_end(self) -> None:
        epoch = self.current_epoch
        # the states the next epoch starts from, written before nnU-Net's checkpoint of this epoch (nothing in
        # between draws), atomically; this epoch's own are kept until the new checkpoint is on disk
        state = {"epoch": epoch + 1, "random": random.getstate(), "numpy": np.random.get_state(),
                 "torch": torch.get_rng_state()}
        tmp = self._rng_file(epoch + 1).with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self._rng_file(epoch + 1))
        super().on_epoch_end()
        self._rng_file(epoch).unlink(missing_ok=True)
        log = self.logger.get_checkpoint()
        seconds = log["epoch_end_timestamps"][-1] - log["epoch_start_timestamps"][-1]
        print(f"[nnunet] epoch {epoch + 1}/{self.num_epochs}: train loss {log['train_losses'][-1]:.4f}, "
              f"val loss {log['val_losses'][-1]:.4f}, pseudo Dice {log['mean_fg_dice'][-1]:.4f}, {seconds:.1f} s",
              file=sys.stderr, flush=True)

    def on_train_end(self) -> None:
        super().on_train_end()  # writes checkpoint_final and removes checkpoint_latest
        for f in Path(self.output_folder).glob("rng_epoch*.pt"):
            f.unlink()


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
