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

"""Synthetic DICOM series and DICOM-SEG objects for the tests (pydicom + highdicom)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["make_ct_series", "make_seg", "compare_datasets", "sitk_series"]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def make_ct_series(
    folder: str | Path,
    n_slices: int = 4,
    rows: int = 20,
    cols: int = 24,
    *,
    seed: int = 0,
    prefix: str = "ct",
    origin: Sequence[float] = (-30.0, -40.0, 12.0),
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    pixel_spacing: Sequence[float] = (0.8, 0.7),
    slice_step: float = 2.5,
    intercept: float = -1024.0,
    bits_stored: int = 16,
    signed: bool = True,
    reverse_instance_numbers: bool = True,
    name_order: Sequence[int] | None = None,
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_uid: str | None = None,
    modality: str = "CT",
    transfer_syntax: str | None = None,
) -> tuple[list[Path], np.ndarray, list[Any]]:
    """Write a single-frame CT series with pydicom.

    Slice ``k`` sits at ``origin + k * slice_step * normal``. By default ``InstanceNumber`` runs against the
    position and file names are shuffled, so readers must order slices by geometry.

    Returns:
        (files in slice order, stored volume ``(n_slices, rows, cols)``, datasets in slice order).
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lo, hi = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
    lo, hi = max(lo, -1000), min(hi, 3000)
    dtype = np.int16 if signed else np.uint16
    volume = rng.integers(lo, hi + 1, size=(n_slices, rows, cols)).astype(dtype)
    series_uid = series_uid or generate_uid(entropy_srcs=[prefix, str(seed), "series"])
    study_uid = study_uid or generate_uid(entropy_srcs=[prefix, str(seed), "study"])
    frame_uid = frame_uid or generate_uid(entropy_srcs=[prefix, str(seed), "frame"])
    iop = np.asarray(orientation, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    order = list(name_order) if name_order is not None else [(3 * k + 1) % n_slices for k in range(n_slices)]
    if sorted(order) != list(range(n_slices)):
        order = list(range(n_slices))
    files, datasets = [], []
    for k in range(n_slices):
        sop_uid = generate_uid(entropy_srcs=[prefix, str(seed), "sop", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = folder / f"{prefix}_{order[k]:03d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber = "A1"
        ds.Modality = modality
        ds.Manufacturer = "monai-umed tests"
        ds.ReferringPhysicianName = ""
        ds.PatientName = "Synthetic^Patient"
        ds.PatientID = f"{prefix}-{seed}"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.SliceThickness = slice_step
        ds.KVP = 120
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 3
        ds.InstanceNumber = (n_slices - k) if reverse_instance_numbers else (k + 1)
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin, dtype=float) + k * slice_step * normal]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 1 if signed else 0
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        item = pydicom.Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "113691", "DCM", "IEC Body Dosimetry Phantom"
        ds.AnatomicRegionSequence = DicomSequence([item])
        block = ds.private_block(0x0029, "MONAI_UMED_TEST", create=True)
        block.add_new(0x01, "LO", f"private value {k}")
        ds.PixelData = volume[k].astype(dtype).tobytes()
        if transfer_syntax is not None and transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        datasets.append(pydicom.dcmread(path))
    return files, volume, datasets


def make_seg(path: str | Path, source: Sequence[Any], mask: np.ndarray, *, seed: int = 0) -> Path:
    """Write a BINARY DICOM-SEG with highdicom.

    Args:
        path: output file.
        source: the source image datasets in slice order.
        mask: ``(n_slices, rows, cols)`` label map, 0 = background, 1..K = segment numbers.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    n_seg = int(mask.max())
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=s,
            segment_label=f"class {s}",
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Organ,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for s in range(1, n_seg + 1)
    ]
    seg = hd.seg.Segmentation(
        source_images=list(source),
        pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(entropy_srcs=["seg-series", str(seed)]),
        series_number=100,
        sop_instance_uid=generate_uid(entropy_srcs=["seg-sop", str(seed)]),
        instance_number=1,
        manufacturer="monai-umed tests",
        manufacturer_model_name="synthetic",
        software_versions="0",
        device_serial_number="0",
    )
    seg.save_as(str(path))
    return Path(path)


def compare_datasets(a: Any, b: Any, ignore: Sequence[int] = ()) -> list[str]:
    """Tags (as strings) whose presence, VR or value differ between two datasets, file meta included."""
    skip = set(ignore)
    diffs = []
    for x, y in ((a, b), (a.file_meta, b.file_meta)):
        tags = set(x.keys()) | set(y.keys())
        for t in sorted(tags):
            if int(t) in skip:
                continue
            if t not in x or t not in y:
                diffs.append(f"{t} missing")
            elif x[t].VR != y[t].VR or x[t].value != y[t].value:
                diffs.append(str(t))
    if getattr(a, "preamble", None) != getattr(b, "preamble", None):
        diffs.append("preamble")
    return diffs


def sitk_series(folder: str | Path) -> tuple[np.ndarray, tuple[str, ...], list[str]]:
    """SimpleITK ``ImageSeriesReader`` on the series GDCM finds in ``folder``: (z, y, x) array, files, series ids."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    ids = list(reader.GetGDCMSeriesIDs(str(folder)))
    names = reader.GetGDCMSeriesFileNames(str(folder))
    reader.SetFileNames(names)
    return sitk.GetArrayFromImage(reader.Execute()), tuple(names), ids
