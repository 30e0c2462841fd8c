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

"""Datasets in: MSD ``dataset.json`` files, ``images/`` + ``labels/`` folders and folders of DICOM series.

Every layout becomes a :class:`DatasetSpec`: the dataset root and a list of :class:`Case` entries with paths
*relative to the root*, so an output tree can mirror the input tree exactly.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_umed.errors import InputError

__all__ = ["Case", "DatasetSpec", "load_dataset", "SPLITS"]

#: MSD list names, in the order cases are listed.
SPLITS = ("training", "validation", "test")
_IMAGE_SUFFIXES = (".nii", ".nii.gz", ".png", ".jpg", ".jpeg", ".bmp", ".nrrd", ".mha", ".mhd", ".dcm")


@dataclass
class Case:
    """One image (a file, or the files of one DICOM series) and its optional label.

    Attributes:
        case_id: stable identifier (the image's relative path, or the series' first file); seeds per-case randomness.
        split: ``training`` | ``validation`` | ``test``.
        image: image path relative to the dataset root, or a list of them for a DICOM series.
        label: label path relative to the root, or None.
        index: position in its split's list (to rewrite ``dataset.json``).
    """

    case_id: str
    split: str
    image: str | list[str]
    label: str | None
    index: int

    @property
    def image_files(self) -> list[str]:
        return list(self.image) if isinstance(self.image, list) else [self.image]


@dataclass
class DatasetSpec:
    """A dataset on disk.

    Attributes:
        root: absolute dataset folder.
        kind: ``msd`` | ``folders`` | ``dicom``.
        cases: all cases, in list order.
        datalist: the parsed ``dataset.json`` (or one generated for the other layouts).
        modality: modality hint (``dataset.json`` ``modality``), e.g. "MRI".
    """

    root: Path
    kind: str
    cases: list[Case]
    datalist: dict[str, Any] = field(default_factory=dict)
    modality: str | None = None

    def abspath(self, rel: str) -> Path:
        return self.root / rel

    def rewrite_datalist(self, new_paths: dict[str, str]) -> dict[str, Any]:
        """The datalist with every image/label path replaced through ``new_paths`` (old rel -> new rel)."""
        out = copy.deepcopy(self.datalist)
        for case in self.cases:
            entry = out[case.split][case.index]
            if isinstance(entry, dict):
                img = entry["image"]
                entry["image"] = [new_paths.get(p, p) for p in case.image_files] if isinstance(img, list) else new_paths.get(case.image, case.image)
                if case.label is not None:
                    entry["label"] = new_paths.get(case.label, case.label)
            else:
                out[case.split][case.index] = new_paths.get(case.image, case.image)
        return out


def _rel(root: Path, p: str, where: Path) -> str:
    """Normalise a datalist path to a POSIX path relative to ``root``; refuse paths that leave it."""
    full = Path(p) if os.path.isabs(p) else root / p
    rel = os.path.relpath(os.path.normpath(full), root)
    if rel.startswith(".."):
        raise InputError(f"path {p!r} lies outside the dataset folder; the output could not mirror it", where)
    return Path(rel).as_posix()


def _load_msd(json_path: Path) -> DatasetSpec:
    root = json_path.parent.resolve()
    try:
        with open(json_path) as f:
            datalist = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"unreadable dataset.json ({e})", json_path) from e
    if not isinstance(datalist, dict) or not any(isinstance(datalist.get(s), list) for s in SPLITS):
        raise InputError("dataset.json has no 'training', 'validation' or 'test' list", json_path)
    cases: list[Case] = []
    seen: set[str] = set()
    for split in SPLITS:
        for i, entry in enumerate(datalist.get(split) or []):
            if isinstance(entry, str):
                img, lab = entry, None
            elif isinstance(entry, dict) and "image" in entry:
                img, lab = entry["image"], entry.get("label")
            else:
                raise InputError(f"entry {i} of '{split}' has no 'image'", json_path)
            image = [_rel(root, p, json_path) for p in img] if isinstance(img, list) else _rel(root, img, json_path)
            label = None if lab is None else _rel(root, lab, json_path)
            case_id = image[0] if isinstance(image, list) else image
            if case_id in seen:
                raise InputError(f"image {case_id!r} is listed twice", json_path)
            seen.add(case_id)
            cases.append(Case(case_id, split, image, label, i))
    modality = datalist.get("modality")
    if isinstance(modality, dict):
        modality = " ".join(str(v) for v in modality.values())
    return DatasetSpec(root, "msd", cases, datalist, modality if isinstance(modality, str) else None)


def _stem(name: str) -> str:
    low = name.lower()
    for suffix in sorted(_IMAGE_SUFFIXES, key=len, reverse=True):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _load_folders(root: Path) -> DatasetSpec:
    def files(d: Path) -> dict[str, str]:
        out: dict[str, str] = {}
        for p in sorted(d.rglob("*")):
            if p.is_file() and p.name.lower().endswith(_IMAGE_SUFFIXES) and not p.name.startswith("."):
                key = _stem(p.relative_to(d).as_posix())
                if key in out:
                    raise InputError(f"two files share the name {key!r}; images and labels pair by name", p)
                out[key] = p.relative_to(root).as_posix()
        return out

    images = files(root / "images")
    labels = files(root / "labels") if (root / "labels").is_dir() else {}
    if not images:
        raise InputError("folder 'images/' holds no images", root / "images")
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise InputError(f"label {labels[orphans[0]]!r} has no image of the same name", root)
    cases, entries = [], []
    for i, (name, img) in enumerate(sorted(images.items())):
        cases.append(Case(img, "training", img, labels.get(name), i))
        entries.append({"image": img, "label": labels[name]} if name in labels else {"image": img})
    return DatasetSpec(root, "folders", cases, {"name": root.name, "training": entries})


def _load_dicom(root: Path) -> DatasetSpec:
    from monai_umed.data.dicom import discover_series

    series = discover_series(root)
    if not series:
        raise InputError("no DICOM image series found", root)
    cases, entries = [], []
    for i, s in enumerate(series):
        files = [Path(f).as_posix() for f in s["files"]]
        cases.append(Case(files[0], "training", files, s.get("label"), i))
        entries.append({"image": files, "label": s["label"]} if s.get("label") else {"image": files})
    modality = " ".join(sorted({str(s.get("modality")) for s in series if s.get("modality")})) or None
    return DatasetSpec(root, "dicom", cases, {"name": root.name, "training": entries}, modality)


def load_dataset(path: str | os.PathLike) -> DatasetSpec:
    """Detect the layout of ``path`` and list its cases.

    Args:
        path: a ``dataset.json`` file, a folder holding one, a folder with ``images/`` (and ``labels/``), or a
            folder of DICOM series.

    Raises:
        InputError: missing path, unknown layout, or a datalist that cannot be mirrored.
    """
    p = Path(path)
    if not p.exists():
        raise InputError("dataset not found", p)
    if p.is_file():
        if p.suffix.lower() != ".json":
            raise InputError("a dataset file must be an MSD-style dataset.json", p)
        return _load_msd(p)
    if (p / "dataset.json").is_file():
        return _load_msd(p / "dataset.json")
    if (p / "images").is_dir():
        return _load_folders(p.resolve())
    return _load_dicom(p.resolve())
