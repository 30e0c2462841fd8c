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

"""Embedded demo data: small synthetic segmentation datasets made with MONAI's ``create_test_image_2d/3d``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["make_demo_dataset"]


def make_demo_dataset(
    root: str | os.PathLike,
    spatial_dims: int = 2,
    n_train: int = 8,
    n_test: int = 2,
    size: int | None = None,
    rgb: bool = False,
    num_classes: int = 1,
    seed: int = 0,
) -> Path:
    """Write an MSD-style dataset of random ellipses/spheres with labels.

    2D images are 8-bit PNG (grey or RGB), 3D images are int16 NIfTI with a 1.5 mm affine; labels are uint8 with
    classes ``1..num_classes``.

    Args:
        root: folder to create (must not exist or be empty).
        spatial_dims: 2 or 3.
        n_train: cases in the ``training`` list.
        n_test: cases in the ``test`` list.
        size: image side (default 64 in 2D, 32 in 3D).
        rgb: three-channel 2D images.
        num_classes: foreground classes.
        seed: random seed.

    Returns:
        The dataset folder (holding ``dataset.json``).
    """
    import nibabel as nib
    from monai.data import create_test_image_2d, create_test_image_3d
    from PIL import Image

    root = Path(root)
    size = size or (64 if spatial_dims == 2 else 32)
    rs = np.random.RandomState(seed)
    rad = max(size // 5, 4)
    lists: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
    ext = ".png" if spatial_dims == 2 else ".nii.gz"
    for split, n in (("training", n_train), ("test", n_test)):
        sub = "Tr" if split == "training" else "Ts"
        (root / f"images{sub}").mkdir(parents=True, exist_ok=True)
        (root / f"labels{sub}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            name = f"case_{split[:2]}{i:03d}{ext}"
            if spatial_dims == 2:
                img, seg = create_test_image_2d(size, size, num_objs=4, rad_max=rad, rad_min=rad - 2, noise_max=0.3,
                                                num_seg_classes=num_classes, random_state=rs)
                img8 = np.clip(img * 200 + 20, 0, 255).astype(np.uint8)
                if rgb:
                    img8 = np.stack([img8, np.clip(img8 * 0.8, 0, 255), np.clip(img8 * 0.6 + 30, 0, 255)], -1).astype(np.uint8)
                # PIL wants (rows, cols); MONAI's PILReader transposes back, so labels and images stay aligned
                Image.fromarray(np.ascontiguousarray(np.swapaxes(img8, 0, 1))).save(root / f"images{sub}" / name)
                Image.fromarray(np.ascontiguousarray(seg.T.astype(np.uint8))).save(root / f"labels{sub}" / name)
            else:
                img, seg = create_test_image_3d(size, size, size, num_objs=4, rad_max=rad, rad_min=rad - 2, noise_max=0.3,
                                                num_seg_classes=num_classes, random_state=rs)
                affine = np.diag([1.5, 1.5, 1.5, 1.0])
                nib.save(nib.Nifti1Image((img * 1000 - 200).astype(np.int16), affine), root / f"images{sub}" / name)
                nib.save(nib.Nifti1Image(seg.astype(np.uint8), affine), root / f"labels{sub}" / name)
            lists[split].append({"image": f"images{sub}/{name}", "label": f"labels{sub}/{name}"})
    datalist = {
        "name": f"monai-umed synthetic {spatial_dims}D demo",
        "tensorImageSize": f"{spatial_dims}D",
        "modality": {"0": "RGB" if rgb else ("synthetic" if spatial_dims == 2 else "MRI")},
        "labels": {"0": "background", **{str(c): f"object{c}" for c in range(1, num_classes + 1)}},
        **lists,
    }
    (root / "dataset.json").write_text(json.dumps(datalist, indent=1))
    return root
