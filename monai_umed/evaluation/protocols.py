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

"""The two judging protocols (METHODS.md section 4, "What a working public implementation does").

- ``release`` (default): the victim trains on the *written files* through its own pipeline (resize, intensity
  scaling, random crops, flips and rotations). This is what users of the product get.
- ``paper``: the published protocol. The fitted protector (read from the restoration key) perturbs every clean
  training image in float, in the normalised space; nothing is rounded to the file's dtype, and the victim trains on
  these in-memory images on its grid (its own anti-aliased resize, which is linear, so resizing ``x + delta``
  equals adding the resized perturbation to the resized image) *without* random augmentation.
  A method that fails this protocol is mis-implemented; one that passes it but fails ``release`` loses its effect
  in quantisation, resampling or augmentation.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch

from monai_umed.errors import InputError

__all__ = ["PROTOCOLS", "paper_training_list"]

PROTOCOLS = ("release", "paper")


def paper_training_list(
    clean_dataset: str | os.PathLike,
    key: str | os.PathLike,
    device: str = "auto",
    batch_size: int = 8,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The paper protocol's training list: each clean training image plus the key's protector's float perturbation.

    Args:
        clean_dataset: the original dataset (folder or dataset.json).
        key: the restoration key of a protected copy of it (it holds the method, parameters and fitted state).
        device: where the protector runs.
        batch_size: cases per :meth:`~monai_umed.protectors.base.Protector.perturbation_batch` call.
        progress: show a progress bar.

    Returns:
        ``{"image": C x spatial float32 array in [0, 1], "label": 1 x spatial int array, "case_id", "psnr"}`` per
        training case, in datalist order (``psnr``: of the float perturbation, peak 1).

    Raises:
        InputError: not a key, a key whose protector cannot be rebuilt, or a dataset without training cases.
    """
    from monai_umed.bundle import load_protector
    from monai_umed.data.datalist import load_dataset
    from monai_umed.key import read_key
    from monai_umed.pipeline import load_case

    record = read_key(key)
    protector = load_protector(key, device=device)
    spec = load_dataset(str(clean_dataset))
    cases = [c for c in spec.cases if c.split == "training"]
    if not cases:
        raise InputError("the dataset has no training cases", str(clean_dataset))
    intensity = str(record.get("intensity") or "auto")
    items: list[dict[str, Any]] = []
    chunks: Sequence[int] = range(0, len(cases), batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="paper protocol: perturbing", unit="batch", leave=False)
    for i in chunks:
        loaded = [load_case(spec, c, intensity) for c in cases[i:i + batch_size]]
        with torch.no_grad():
            deltas = protector.perturbation_batch([lc.tensor for lc in loaded], [lc.label for lc in loaded],
                                                  [lc.case.case_id for lc in loaded])
        for lc, d in zip(loaded, deltas):
            x = (lc.tensor.float() + d.float().cpu()).clamp(0.0, 1.0)
            mse = float(((x - lc.tensor.float()) ** 2).double().mean())
            items.append({"image": x.numpy().astype(np.float32), "label": lc.label.numpy(),
                          "case_id": lc.case.case_id, "psnr": float("inf") if mse == 0 else -10.0 * np.log10(mse)})
    return items
