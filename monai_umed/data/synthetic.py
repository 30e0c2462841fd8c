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

"""Embedded demo data: small synthetic segmentation datasets made with MONAI's ``create_test_image_2d/3d``, and
CT-sized synthetic volumes for memory and time measurements."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["make_demo_dataset", "make_synthetic_ct"]


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


def make_synthetic_ct(
    root: str | os.PathLike,
    shape: tuple[int, int, int] = (512, 512, 300),
    radius: int = 40,
    n_cases: int = 1,
    seed: int = 0,
    suffix: str = ".nii.gz",
) -> Path:
    """An MSD-style dataset of ``n_cases`` int16 CT volumes (air -1000 HU, an elliptic body at 40 HU, uniform noise
    of +-20 HU, a sphere 60 HU brighter) with the sphere as label; 0.8 x 0.8 x 1.5 mm voxels.

    The abdominal-CT-sized default (512 x 512 x 300) is what ``benchmarks/speed.py`` and ``benchmarks/ct_memory.py``
    protect; case ``k`` draws its noise from ``seed + k`` and has its sphere shifted by ``k`` voxels along the last
    axis, so cases differ.

    Args:
        root: the dataset folder (``imagesTr``, ``labelsTr`` and ``dataset.json`` are written there).
        shape: volume shape in voxels.
        radius: the sphere's radius in voxels.
        n_cases: number of training cases.
        seed: noise seed of the first case.
        suffix: ``.nii.gz`` (compressed, as datasets are shipped) or ``.nii`` (faster to write and read).

    Returns:
        ``root``.
    """
    import nibabel as nib

    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    x, y, z = np.ogrid[: shape[0], : shape[1], : shape[2]]
    cx, cy, cz = shape[0] // 2, shape[1] // 2, shape[2] // 2
    body = ((x - cx) / (0.4 * shape[0])) ** 2 + ((y - cy) / (0.32 * shape[1])) ** 2 <= 1
    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    training = []
    for k in range(int(n_cases)):
        rs = np.random.RandomState(seed + k)
        img = np.full(shape, -1000, np.int16)
        img[np.broadcast_to(body, shape)] = 40
        img += rs.randint(-20, 21, size=shape).astype(np.int16)
        sphere = (x - cx) ** 2 + (y - cy - shape[1] // 20) ** 2 + (z - min(cz + k, shape[2] - 1)) ** 2 <= radius**2
        img[sphere] += 60
        name = f"ct_{k:03d}{suffix}"
        nib.save(nib.Nifti1Image(img, affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(sphere.astype(np.uint8), affine), root / "labelsTr" / name)
        training.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
    datalist = {"name": f"synthetic CT {'x'.join(map(str, shape))}", "modality": {"0": "CT"}, "tensorImageSize": "3D",
                "labels": {"0": "background", "1": "sphere"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(datalist, indent=1))
    return root
