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
  these in-memory images *without* random augmentation. The images should already be on the victim's grid, the grid
  the protector was fitted on (the published code resizes the dataset once, then protects and trains at that size):
  :func:`victim_grid_dataset` writes that copy of a 2D dataset, and ``benchmarks/efficacy.py`` fits a row's
  protector on it for its ``paper`` rows. On a dataset at another size the victim's own anti-aliased resize (linear,
  so resizing ``x + delta`` equals adding the resized perturbation) attenuates what the protector made.
  A method that fails this protocol is mis-implemented; one that passes it but fails ``release`` loses its effect
  in quantisation, resampling or augmentation.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from monai_umed.errors import InputError

__all__ = ["PROTOCOLS", "paper_training_list", "victim_grid_dataset"]

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
    from monai_umed.data.datalist import load_dataset
    from monai_umed.key import load_protector, read_key
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


#: 2D formats :func:`victim_grid_dataset` reads and writes (with PIL, keeping the files' own axis order).
_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def victim_grid_dataset(dataset: str | os.PathLike, out: str | os.PathLike, image_size: int | Sequence[int]) -> Path:
    """A copy of a 2D dataset whose training images and labels are already on the victim's grid.

    The paper protocol perturbs images *on the grid the protector was fitted on and the victim trains on* (as the
    published code does: the dataset is resized once, then protected and trained on at that size). This writes that
    dataset: each training image resized as the victim resizes it (MONAI ``Resize``, bilinear with anti-aliasing),
    rounded back to 8-bit PNG, each label with nearest neighbours; the test list links the original files, so the
    test images and their scoring are the same as under the release protocol. An existing complete copy is reused.

    Args:
        dataset: the clean 2D dataset (folder or dataset.json) with ``training`` and ``test`` lists.
        out: the new dataset folder.
        image_size: the victim's grid (an int for both axes, or one per axis).

    Returns:
        ``out``.

    Raises:
        InputError: a dataset that is not 2D PNG/JPEG, or without training or test cases.
    """
    from monai.transforms import Resize
    from PIL import Image

    from monai_umed.evaluation.train import find_dataset_json

    src_json = find_dataset_json(dataset)
    meta = json.loads(src_json.read_text())
    root = src_json.parent.resolve()
    out = Path(out)
    done = out / "dataset.json"
    if done.is_file():
        return out
    train, test = meta.get("training") or [], meta.get("test") or []
    if not train or not test:
        raise InputError("the paper protocol's victim-grid copy needs training and test lists", src_json)
    size = (int(image_size),) * 2 if isinstance(image_size, (int, np.integer)) else tuple(int(v) for v in image_size)
    if len(size) != 2:
        raise InputError(f"the victim-grid copy is 2D only; got image size {image_size}", src_json)
    resize_image = Resize(size, mode="bilinear", anti_aliasing=True)
    resize_label = Resize(size, mode="nearest")
    stage = out.with_name(out.name + ".partial")
    entries = []
    for e in train:
        for k in ("image", "label"):
            if Path(e[k]).suffix.lower() not in _PIL_SUFFIXES:
                raise InputError("the victim-grid copy reads 2D PNG/JPEG files only", root / e[k])
        img = np.asarray(Image.open(root / e["image"]))
        lab = np.asarray(Image.open(root / e["label"]))
        if img.dtype != np.uint8 or lab.ndim != 2:
            raise InputError("the victim-grid copy needs 8-bit images and single-channel labels", root / e["image"])
        chw = torch.from_numpy(np.ascontiguousarray(img.reshape(img.shape[:2] + (-1,)).transpose(2, 0, 1))).float()
        small = np.asarray(resize_image(chw)).round().clip(0, 255).astype(np.uint8).transpose(1, 2, 0)
        small_lab = np.asarray(resize_label(torch.from_numpy(lab[None].astype(np.float32))))[0].astype(lab.dtype)
        names = {k: Path(e[k]).with_suffix(".png").as_posix() for k in ("image", "label")}
        for k, arr in (("image", small[..., 0] if img.ndim == 2 else small), ("label", small_lab)):
            target = stage / names[k]
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(target)
        entries.append(names)
    links = []
    for e in test:
        for k in ("image", "label"):
            link = stage / os.path.normpath(e[k])
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(root / os.path.normpath(e[k]))
        links.append({k: e[k] for k in ("image", "label")})
    new_meta = {k: v for k, v in meta.items() if k not in ("training", "validation", "test", "numTraining", "numTest")}
    new_meta["description"] = f"{meta.get('description', '')} [training split on the victim grid {size}]".strip()
    new_meta.update(training=entries, test=links)
    (stage / "dataset.json").write_text(json.dumps(new_meta, indent=1))
    if out.exists():  # an interrupted earlier copy without its dataset.json
        shutil.rmtree(out)
    stage.rename(out)
    return out
