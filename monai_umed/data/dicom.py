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

"""DICOM series: reading through MONAI, pixel-replaced copies that keep every element, labels, discovery.

Layout of a series (what :meth:`DicomCodec.read` returns, identical to ``monai.transforms.LoadImage`` with
``ITKReader`` -- MONAI's default reader for DICOM folders -- on a folder holding exactly that series):

- 3D (two or more slices): ``array[0, c, r, k] = pixel_array(file_k)[r, c]``: axis 1 is the DICOM column index,
  axis 2 the row index, axis 3 the slice index with slices sorted by ascending position along the slice normal
  ``cross(row direction, column direction)`` (GDCM's order). ``ImageData.extra["slice_files"][k]`` is the file
  of slice ``k``.
- 2D (a series of one single-frame file): ``array[0, c, r] = pixel_array[r, c]`` (MONAI's ``(1, cols, rows, 1)``
  volume with the trailing singleton slice axis dropped; the 4x4 affine is kept).

The array holds the *stored* values (pydicom ``pixel_array``, the file's dtype: ``int16``, ``uint16``, ...);
physical values are ``array * slope + intercept`` (``RescaleSlope``/``RescaleIntercept``), and reading checks that
this equals what MONAI decodes. Writing replaces ``PixelData`` only; a template whose transfer syntax is
compressed is written uncompressed as Explicit VR Little Endian. Multi-frame (enhanced) objects and colour
(``SamplesPerPixel > 1``) images are not supported and are reported as such.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from monai_umed.data.codec import Codec, ImageData, atomic_path, check_image, check_label, load_with_monai
from monai_umed.errors import InputError

__all__ = ["DicomCodec", "discover_series", "DICOM_EXTENSIONS", "LABEL_MAP_EXTENSIONS"]

PathLike = str | os.PathLike

DICOM_EXTENSIONS = (".dcm", ".dicom")
LABEL_MAP_EXTENSIONS = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd")

# objects that carry no image to protect (they may still carry pixel data, e.g. RTDOSE grids)
_NON_IMAGE_MODALITIES = frozenset(
    {"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "RTDOSE", "SR", "PR", "KO", "REG", "FID", "RWV", "DOC", "PLAN", "AU"}
)
_SEG_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"})

# geometric tolerances: millimetres for positions, unitless for direction cosines / voxel-grid transforms
_POS_TOL_MM = 1e-2
_DIR_TOL = 1e-3
_GRID_ROT_TOL = 1e-2
_GRID_SHIFT_TOL = 0.1


# ----------------------------------------------------------------------------------------------------------------
# header helpers


def _is_dicom_name(path: PathLike) -> bool:
    return str(path).lower().endswith(DICOM_EXTENSIONS)


def _dcmread(path: PathLike, *, header_only: bool = False) -> Any:
    """``pydicom.dcmread`` with one-line errors naming the file.

    Files without the 128-byte preamble are read with ``force=True``; a dataset with neither ``SOPInstanceUID``
    nor a File Meta ``MediaStorageSOPClassUID`` (which a ``DICOMDIR`` has) is rejected as not being DICOM.

    Raises:
        InputError: unreadable, truncated or non-DICOM file.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=header_only)
        except InvalidDicomError:
            ds = pydicom.dcmread(str(path), stop_before_pixels=header_only, force=True)
        meta = getattr(ds, "file_meta", None)
        if "SOPInstanceUID" not in ds and not (meta is not None and "MediaStorageSOPClassUID" in meta):
            raise InvalidDicomError("no SOPInstanceUID")
    except FileNotFoundError as e:
        raise InputError("file not found", path) from e
    except Exception as e:  # pydicom raises many types on corrupt files
        msg = str(e).splitlines()[0] if str(e) else ""
        raise InputError(f"unreadable or corrupt DICOM file ({type(e).__name__}: {msg})", path) from e
    return ds


def _is_image(ds: Any) -> bool:
    modality = str(ds.get("Modality", "")).upper()
    if modality in _NON_IMAGE_MODALITIES or str(ds.get("SOPClassUID", "")) in _SEG_SOP_CLASSES:
        return False
    return "Rows" in ds and "Columns" in ds and "SeriesInstanceUID" in ds and "BitsAllocated" in ds


def _is_seg(ds: Any) -> bool:
    return str(ds.get("Modality", "")).upper() == "SEG" or str(ds.get("SOPClassUID", "")) in _SEG_SOP_CLASSES


def _orientation(ds: Any) -> np.ndarray | None:
    iop = ds.get("ImageOrientationPatient")
    return None if iop is None or len(iop) != 6 else np.asarray([float(v) for v in iop])


def _position(ds: Any) -> np.ndarray | None:
    ipp = ds.get("ImagePositionPatient")
    return None if ipp is None or len(ipp) != 3 else np.asarray([float(v) for v in ipp])


def _normal(iop: np.ndarray) -> np.ndarray:
    n = np.cross(iop[:3], iop[3:])
    return n / max(np.linalg.norm(n), 1e-12)


def _slice_order(headers: Sequence[Any], files: Sequence[PathLike]) -> list[int]:
    """Order of the files of one series by ascending position along the slice normal (GDCM's order).

    Returns:
        ``order`` with ``order[k]`` = index (into ``files``) of slice ``k``.

    Raises:
        InputError: missing or inconsistent orientation/position, or two slices at the same position.
    """
    if len(headers) == 1:
        return [0]
    iop0 = _orientation(headers[0])
    keys = []
    for ds, f in zip(headers, files):
        iop, ipp = _orientation(ds), _position(ds)
        if iop is None or ipp is None:
            raise InputError("slice has no ImagePositionPatient/ImageOrientationPatient; cannot order the series", f)
        if iop0 is None or not np.allclose(iop, iop0, atol=_DIR_TOL):
            raise InputError(f"slice orientation {iop.tolist()} differs from the series' first slice", f)
        keys.append(float(ipp @ _normal(iop0)))
    order = sorted(range(len(files)), key=lambda i: (keys[i], str(files[i])))
    for a, b in zip(order[:-1], order[1:]):
        if abs(keys[a] - keys[b]) < 1e-4:
            raise InputError(f"two slices at the same position ({files[a]} and {files[b]})", files[b])
    return order


def _stored_dtype(ds: Any, path: PathLike) -> np.dtype:
    bits, rep = int(ds.get("BitsAllocated", 0)), int(ds.get("PixelRepresentation", 0))
    if bits not in (8, 16, 32):
        raise InputError(f"unsupported BitsAllocated {bits} (8, 16 or 32)", path)
    return np.dtype(f"{'i' if rep == 1 else 'u'}{bits // 8}")


def _stored_range(ds: Any) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", ds.BitsAllocated))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _rescale(ds: Any) -> tuple[float, float]:
    slope = ds.get("RescaleSlope", 1.0)
    inter = ds.get("RescaleIntercept", 0.0)
    return float(slope if slope not in (None, "") else 1.0), float(inter if inter not in (None, "") else 0.0)


def _as_file_list(path: Any) -> list[str]:
    if isinstance(path, (list, tuple)):
        return [str(p) for p in path]
    return [str(path)]


# ----------------------------------------------------------------------------------------------------------------
# codec


class DicomCodec(Codec):
    """One DICOM series (single-frame CT, MR, ... slices) as one image.

    ``read`` goes through ``monai.transforms.LoadImage`` with ``ITKReader`` (the series' files are linked into a
    private temporary folder, so MONAI reads exactly those files as one series) and returns the stored values in
    MONAI's layout (see the module docstring). ``write`` replaces ``PixelData`` in a copy of each template slice
    file; every other element, the file meta information and the preamble are kept (an unchanged array gives a
    byte-identical file). A template stored with a compressed transfer syntax is written uncompressed (Explicit VR
    Little Endian; the encapsulation-only Extended Offset Table elements are dropped) -- those are the only
    elements besides ``PixelData`` (and the SOP Instance UIDs when asked) that change, apart from the group
    lengths that follow them.

    Labels are DICOM-SEG objects (frames matched to slices by ``ReferencedSOPInstanceUID``, falling back to
    ``ImagePositionPatient``; label value = segment number, the highest segment number wins where segments
    overlap) or NIfTI/NRRD/MetaImage label maps (voxel grid matched to the series through the affines, axes
    permuted/flipped as needed).
    """

    fmt = "dicom"
    extensions = DICOM_EXTENSIONS
    reader = "ITKReader"

    # ------------------------------------------------------------------------------------------------ read

    def _resolve(self, path: Any) -> list[str]:
        files = _as_file_list(path)
        if len(files) == 1 and Path(files[0]).is_dir():
            series = discover_series(files[0])
            if len(series) != 1:
                raise InputError(f"folder holds {len(series)} image series; pass the list of one series' files",
                                 files[0])
            files = [str(Path(files[0]) / f) for f in series[0]["files"]]
        if not files:
            raise InputError("empty list of DICOM files")
        return files

    def read(self, path: Any) -> ImageData:
        """Read one series.

        Args:
            path: the series' slice files (any order), a single file, or a folder holding exactly one series.

        Returns:
            :class:`ImageData` with the stored values (see the module docstring for the layout), ``slope`` and
            ``intercept`` from ``RescaleSlope``/``RescaleIntercept``, ``modality``, MONAI's ``meta`` (affine,
            spacing; ``filename_or_obj`` is the first input file) and ``extra``:
            ``slice_files`` (slice index ``k`` -> file path: how to split the volume back into files),
            ``slice_of_file`` (input position ``i`` -> slice index), per input file in input order (the order
            :meth:`write` takes and returns): ``files``, ``sop_instance_uids``, ``positions``
            (``ImagePositionPatient``) and ``transfer_syntaxes``; and ``orientation``
            (``ImageOrientationPatient``), ``pixel_spacing``, ``series_instance_uid``, ``reader``.

        Raises:
            InputError: unreadable or corrupt file (named), mixed series, multi-frame or colour data, slices that
                disagree in size, rescale or orientation, or stored values that do not reproduce MONAI's volume.
        """
        files = self._resolve(path)
        datasets = [_dcmread(f) for f in files]
        first = datasets[0]
        for ds, f in zip(datasets, files):
            if not _is_image(ds):
                raise InputError(f"not an image object (Modality {ds.get('Modality', '?')})", f)
            if ds.SeriesInstanceUID != first.SeriesInstanceUID:
                raise InputError(f"slice belongs to series {ds.SeriesInstanceUID}, not {first.SeriesInstanceUID}", f)
            if int(ds.get("NumberOfFrames", 1) or 1) > 1:
                raise InputError("multi-frame DICOM is not supported (single-frame slices only)", f)
            if int(ds.get("SamplesPerPixel", 1)) != 1:
                raise InputError(f"{ds.SamplesPerPixel} samples per pixel: only monochrome DICOM is supported", f)
            if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
                raise InputError(
                    f"slice is {ds.Rows}x{ds.Columns}, the series' first slice {first.Rows}x{first.Columns}", f)
            if _rescale(ds) != _rescale(first):
                raise InputError(
                    f"RescaleSlope/Intercept {_rescale(ds)} differ from the first slice's {_rescale(first)}", f)
            _stored_dtype(ds, f)
        order = _slice_order(datasets, files)
        stored = []
        for k, i in enumerate(order):
            try:
                px = np.asarray(datasets[i].pixel_array)
            except Exception as e:
                cause = str(e).splitlines()[0] if str(e) else ""
                raise InputError(f"cannot decode pixel data ({type(e).__name__}: {cause})", files[i]) from e
            if px.shape != (first.Rows, first.Columns):
                raise InputError(f"pixel data has shape {px.shape}, expected {(first.Rows, first.Columns)}", files[i])
            stored.append(px.T)
        volume = np.stack(stored, axis=-1)[None]  # (1, cols, rows, slices)
        decoded, meta = self._load_monai(files)
        slope, inter = _rescale(first)
        self._check_consistency(volume, decoded, slope, inter, [files[i] for i in order], meta, datasets[order[0]])
        if volume.shape[-1] == 1:  # a single slice: 2D
            volume = volume[..., 0]
            meta["spatial_shape"] = np.asarray(volume.shape[1:])
        volume = np.ascontiguousarray(volume)
        check_image(volume, files[0])
        meta["filename_or_obj"] = str(files[0])
        slice_of_file = [0] * len(files)
        for k, i in enumerate(order):
            slice_of_file[i] = k
        iop = _orientation(first)
        spacing = first.get("PixelSpacing")
        extra = {
            "slice_files": [str(files[i]) for i in order],
            "slice_of_file": slice_of_file,
            "files": [str(f) for f in files],
            "sop_instance_uids": [str(ds.SOPInstanceUID) for ds in datasets],
            "positions": [None if _position(ds) is None else _position(ds).tolist() for ds in datasets],
            "orientation": None if iop is None else iop.tolist(),
            "pixel_spacing": None if spacing is None else [float(s) for s in spacing],
            "series_instance_uid": str(first.SeriesInstanceUID),
            "transfer_syntaxes": [str(ds.file_meta.get("TransferSyntaxUID", "")) for ds in datasets],
            "reader": self.reader,
        }
        return ImageData(volume, self.fmt, modality=str(first.get("Modality", "")) or None, slope=slope,
                         intercept=inter, meta=meta, extra=extra)

    def _load_monai(self, files: Sequence[str]) -> tuple[np.ndarray, dict]:
        """MONAI ``LoadImage`` on a private folder holding links to exactly ``files``."""
        with tempfile.TemporaryDirectory(prefix="monai-umed-dicom-") as tmp:
            for i, f in enumerate(files):
                link = Path(tmp) / f"{i:06d}.dcm"
                try:
                    link.symlink_to(Path(f).resolve())
                except OSError:  # no symlinks on this filesystem: hard link, then copy
                    try:
                        os.link(f, link)
                    except OSError:
                        import shutil

                        shutil.copyfile(f, link)
            try:
                arr, meta = load_with_monai(tmp, self.reader)
            except InputError as e:
                cause = str(e).split(": ", 1)[-1]
                raise InputError(f"MONAI {self.reader} cannot read the series: {cause}", files[0]) from e
        return arr, meta

    @staticmethod
    def _check_consistency(volume: np.ndarray, decoded: np.ndarray, slope: float, inter: float,
                           slice_files: Sequence[str], meta: dict, first_ds: Any) -> None:
        """Stored volume * slope + intercept must equal MONAI's volume, slice by slice, in the same order."""
        if decoded.shape != volume.shape:
            raise InputError(
                f"MONAI's {DicomCodec.reader} reads the series as {tuple(decoded.shape[1:])} but its "
                f"{len(slice_files)} files give {tuple(volume.shape[1:])} (slices that differ in series details "
                "such as SliceThickness?)",
                slice_files[0])
        affine = np.asarray(meta.get("affine"), dtype=np.float64)
        ipp0 = _position(first_ds)
        if ipp0 is not None and affine.shape == (4, 4):
            lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # MONAI's affine is RAS
            if not np.allclose(lps[:3, 3], ipp0, atol=_POS_TOL_MM * 10):
                raise InputError(f"MONAI's volume origin {lps[:3, 3].tolist()} is not this slice's position",
                                 slice_files[0])
            iop = _orientation(first_ds)
            if volume.shape[-1] > 1 and iop is not None and float(lps[:3, 2] @ _normal(iop)) <= 0:
                raise InputError("MONAI orders the slices against the slice normal; unsupported series", slice_files[0])
        exact = float(slope).is_integer() and float(inter).is_integer() and decoded.dtype.kind in "iu"
        for k, f in enumerate(slice_files):
            phys = volume[..., k].astype(np.float64) * slope + inter
            ref = decoded[..., k].astype(np.float64)
            if exact:
                ok = np.array_equal(phys, ref)
            else:
                ok = np.allclose(phys, ref, rtol=1e-5, atol=1e-4 * max(1.0, abs(slope)))
            if not ok:
                raise InputError("stored values * RescaleSlope + RescaleIntercept differ from MONAI's decoded slice", f)

    # ------------------------------------------------------------------------------------------------ write

    def write(self, template: Any, out: Any, array: np.ndarray, *, new_uids: bool = False,
              sop_instance_uids: Sequence[str] | None = None, uid_salt: str = "monai-umed",
              **options: Any) -> dict:
        """Write ``array`` into copies of the template series, one output file per template file.

        Args:
            template: the series' slice files (any order; slices are matched by position along the normal, the
                same order :meth:`read` uses). A single path is a one-file series.
            out: output paths, ``out[i]`` receives the copy of ``template[i]``.
            array: stored values in :meth:`read`'s layout and the template's dtype.
            new_uids: give every file a new ``SOPInstanceUID`` (and ``MediaStorageSOPInstanceUID``), derived
                deterministically by ``pydicom.uid.generate_uid(entropy_srcs=[old UID, uid_salt])``.
            sop_instance_uids: force these UIDs (template order), e.g. to put the originals back when restoring.
            uid_salt: salt for ``new_uids``.
            options: ignored (accepted for a uniform codec interface).

        Returns:
            ``{"sop_instance_uids": [UID written to out[i], ...]}``.

        Raises:
            ValueError: wrong shape or dtype, values outside ``BitsStored``, bad UIDs, or mismatched lists.
            InputError: unreadable template file.
        """
        from pydicom.uid import RE_VALID_UID, UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, generate_uid

        templates, outs = _as_file_list(template), _as_file_list(out)
        if len(templates) != len(outs):
            raise ValueError(f"{len(templates)} template files but {len(outs)} output paths")
        if new_uids and sop_instance_uids is not None:
            raise ValueError("give either new_uids=True or sop_instance_uids, not both")
        if sop_instance_uids is not None:
            sop_instance_uids = [str(u) for u in sop_instance_uids]
            if len(sop_instance_uids) != len(templates):
                raise ValueError(f"{len(sop_instance_uids)} SOP Instance UIDs for {len(templates)} files")
            bad = [u for u in sop_instance_uids if len(u) > 64 or not RE_VALID_UID.match(u)]
            if bad:
                raise ValueError(f"invalid SOP Instance UID {bad[0]!r}")
        datasets = [_dcmread(f) for f in templates]
        rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
        arr = np.asarray(array)
        expected = (1, cols, rows) if len(templates) == 1 else (1, cols, rows, len(templates))
        if arr.shape != expected:
            raise ValueError(f"{outs[0]}: array shape {arr.shape} does not match the template series {expected}")
        if arr.ndim == 3:
            arr = arr[..., None]
        order = _slice_order(datasets, templates)
        slice_of = {i: k for k, i in enumerate(order)}
        pixels = []
        for i, (ds, f, o) in enumerate(zip(datasets, templates, outs)):  # validate everything before writing
            dtype = _stored_dtype(ds, f)
            if arr.dtype != dtype:
                raise ValueError(f"{o}: array dtype {arr.dtype} is not the template's stored dtype {dtype}")
            if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
                raise ValueError(f"{o}: template slice {f} is {ds.Rows}x{ds.Columns}, not {rows}x{cols}")
            px = np.ascontiguousarray(arr[0, :, :, slice_of[i]].T)
            lo, hi = _stored_range(ds)
            if px.size and (px.min() < lo or px.max() > hi):
                raise ValueError(f"{o}: values [{px.min()}, {px.max()}] do not fit BitsStored={ds.get('BitsStored')} "
                                 f"([{lo}, {hi}]); clip before writing")
            pixels.append(px)
        written = []
        for i, (ds, px, o) in enumerate(zip(datasets, pixels, outs)):
            tsyntax = UID(str(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian)))
            raw_template = None if tsyntax.is_compressed else ds.PixelData
            if tsyntax.is_compressed:
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                for tag in (0x7FE00001, 0x7FE00002):  # Extended Offset Table (encapsulated data only)
                    if tag in ds:
                        del ds[tag]
                tsyntax = ExplicitVRLittleEndian
            ds.PixelData = self._encode(px, ds, px.dtype, raw_template, big_endian=tsyntax == ExplicitVRBigEndian)
            if raw_template is None:  # was encapsulated: native pixel data from now on
                ds["PixelData"].is_undefined_length = False
                ds["PixelData"].VR = "OW" if int(ds.BitsAllocated) > 8 else "OB"
            if sop_instance_uids is not None:
                uid = sop_instance_uids[i]
            elif new_uids:
                uid = str(generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), str(uid_salt)]))
            else:
                uid = str(ds.SOPInstanceUID)
            if uid != str(ds.SOPInstanceUID):
                ds.SOPInstanceUID = uid
                if "MediaStorageSOPInstanceUID" in ds.file_meta:
                    ds.file_meta.MediaStorageSOPInstanceUID = uid
            with atomic_path(o) as tmp:
                _save(ds, tmp)
            written.append(uid)
        return {"sop_instance_uids": written}

    @staticmethod
    def _encode(px: np.ndarray, ds: Any, dtype: np.dtype, raw_template: bytes | None, big_endian: bool) -> bytes:
        """Pixel bytes in the template's convention.

        Signed data with ``BitsStored < BitsAllocated`` is written sign-extended (two's complement over the full
        ``BitsAllocated``), unless the template stores negative values with the bits above ``BitsStored`` cleared,
        in which case that convention is kept.
        """
        bits_alloc, bits_stored = int(ds.BitsAllocated), int(ds.get("BitsStored", ds.BitsAllocated))
        out = px.astype(dtype, copy=False)
        if dtype.kind == "i" and bits_stored < bits_alloc and raw_template is not None:
            udt = np.dtype(f"{'>' if big_endian else '<'}u{bits_alloc // 8}")
            n = len(raw_template) // udt.itemsize
            raw = np.frombuffer(raw_template, dtype=udt, count=n)
            low = (1 << bits_stored) - 1
            high = int(np.iinfo(udt).max) ^ low
            has_negative = bool(np.any(raw & (1 << (bits_stored - 1))))
            extended = bool(np.any(raw & high))
            if has_negative and not extended:
                out = (out.astype(np.int64) & low).astype(udt.newbyteorder("="))
        return out.astype(out.dtype.newbyteorder(">" if big_endian else "<")).tobytes()

    # ------------------------------------------------------------------------------------------------ labels

    def read_label(self, path: Any, image: ImageData) -> np.ndarray:
        """A label volume voxel-aligned with ``image`` (channel-first ``int64``, validated by ``check_label``).

        Args:
            path: a DICOM-SEG file, a NIfTI/NRRD/MetaImage label map or, for a single-slice series, a PNG.
            image: the series as returned by :meth:`read`.

        Raises:
            InputError: unreadable label, a DICOM object that is not a SEG, frames or voxel grids that do not match
                the series.
        """
        p = str(path)
        if _is_dicom_name(p) or _has_preamble(p):
            lab = self._read_seg(p, image)
        else:
            lab = self._read_label_map(p, image)
        return check_label(lab, image, p)

    def _read_seg(self, path: str, image: ImageData) -> np.ndarray:
        seg = _dcmread(path)
        if not _is_seg(seg):
            raise InputError(f"DICOM label must be a DICOM-SEG (Modality SEG), got Modality {seg.get('Modality', '?')}",
                             path)
        extra = image.extra
        n_slices = 1 if image.spatial_dims == 2 else image.array.shape[-1]
        cols, rows = image.array.shape[1], image.array.shape[2]
        if (int(seg.Rows), int(seg.Columns)) != (rows, cols):
            raise InputError(f"SEG frames are {seg.Rows}x{seg.Columns} but the image slices are {rows}x{cols}", path)
        try:
            frames = np.asarray(seg.pixel_array)
        except Exception as e:
            raise InputError(f"cannot decode SEG pixel data ({type(e).__name__})", path) from e
        if frames.ndim == 2:
            frames = frames[None]
        if str(seg.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
            frames = frames > float(seg.get("MaximumFractionalValue", 255)) / 2
        frames = frames > 0
        per_frame = seg.get("PerFrameFunctionalGroupsSequence")
        if per_frame is None or len(per_frame) != frames.shape[0]:
            raise InputError("SEG has no PerFrameFunctionalGroupsSequence entry per frame", path)
        shared = seg.get("SharedFunctionalGroupsSequence")
        shared = shared[0] if shared else None
        seg_iop = _functional(shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        img_iop = None if extra.get("orientation") is None else np.asarray(extra["orientation"])
        slice_of_file = extra.get("slice_of_file", [])
        uid_to_slice = {u: slice_of_file[i] for i, u in enumerate(extra.get("sop_instance_uids", []))}
        positions: list[np.ndarray | None] = [None] * n_slices
        for i, p in enumerate(extra.get("positions", [])):
            positions[slice_of_file[i]] = None if p is None else np.asarray(p, dtype=np.float64)
        normal = None if img_iop is None else _normal(img_iop)
        spacing = extra.get("pixel_spacing") or [1.0, 1.0]
        label = np.zeros((cols, rows, n_slices), dtype=np.int64)
        assignments: list[tuple[int, int, int]] = []  # (segment number, frame, slice)
        for f, item in enumerate(per_frame):
            if not frames[f].any():  # empty frames need no slice
                continue
            seg_num = _functional(item, "SegmentIdentificationSequence", "ReferencedSegmentNumber")
            if seg_num is None:
                seg_num = _functional(shared, "SegmentIdentificationSequence", "ReferencedSegmentNumber")
            if seg_num is None:
                raise InputError(f"SEG frame {f} has no ReferencedSegmentNumber", path)
            iop = _functional(item, "PlaneOrientationSequence", "ImageOrientationPatient")
            iop = seg_iop if iop is None else iop
            if iop is not None and img_iop is not None and not np.allclose(np.asarray(iop, float), img_iop,
                                                                            atol=_DIR_TOL):
                raise InputError(f"SEG frame {f} orientation differs from the image's", path)
            k = None
            for uid in _frame_source_uids(item):
                if uid in uid_to_slice:
                    k = uid_to_slice[uid]
                    break
            ipp = _functional(item, "PlanePositionSequence", "ImagePositionPatient")
            ipp = None if ipp is None else np.asarray([float(v) for v in ipp])
            known = bool(positions) and all(p is not None for p in positions)
            if k is None and ipp is not None and normal is not None and known:
                d = np.asarray([abs(float((ipp - p) @ normal)) for p in positions])
                j = int(np.argmin(d))
                gaps = np.abs(np.diff([float(p @ normal) for p in positions]))
                tol = max(_POS_TOL_MM, 0.25 * float(gaps.min())) if gaps.size else max(_POS_TOL_MM, 0.25 * min(spacing))
                if d[j] <= tol:
                    k = j
            if k is None:
                raise InputError(f"SEG frame {f} matches no slice of the series (neither by SOP Instance UID nor by "
                                 "ImagePositionPatient)", path)
            if ipp is not None and positions and positions[k] is not None:
                inplane = ipp - positions[k]
                if normal is not None:
                    inplane = inplane - (inplane @ normal) * normal
                if np.linalg.norm(inplane) > 0.5 * min(spacing):
                    raise InputError(
                        f"SEG frame {f} is shifted in-plane by {np.linalg.norm(inplane):.3g} mm from its slice", path)
            assignments.append((int(seg_num), f, k))
        for seg_num, f, k in sorted(assignments):  # highest segment number wins on overlap
            label[:, :, k][frames[f].T] = seg_num
        return label[None] if image.spatial_dims == 3 else label[None, :, :, 0]

    def _read_label_map(self, path: str, image: ImageData) -> np.ndarray:
        """A label map realigned onto the image's voxel grid.

        The grid transform ``inv(image affine) @ label affine`` must be a signed axis permutation with a whole-voxel
        offset (the same grid stored in another axis order or direction); the label is then transposed/flipped into
        the image's layout. A 2D label without 3D geometry (PNG, or a 3x3 affine) for a single-slice series is taken
        in MONAI's layout as is (``(1, cols, rows)``, as MONAI reads it).
        """
        low = path.lower()
        if low.endswith((".nii", ".nii.gz")):
            reader = "NibabelReader"
        elif low.endswith((".png", ".bmp", ".jpg", ".jpeg")):
            reader = "PILReader"
        else:
            reader = "ITKReader"
        arr, meta = load_with_monai(path, reader)
        if arr.shape[0] != 1:
            raise InputError(f"label has {arr.shape[0]} channels; expected one integer label map", path)
        lab = arr[0]
        nd = image.spatial_dims
        if nd == 2 and lab.ndim == 3 and lab.shape[-1] == 1:
            lab = lab[..., 0]
        if lab.ndim != nd:
            raise InputError(f"label is {lab.ndim}D but the image is {nd}D", path)
        img_aff = np.asarray(image.meta.get("affine"), dtype=np.float64)
        lab_aff = np.asarray(meta.get("affine", np.eye(3)), dtype=np.float64)
        if nd == 2 and (reader == "PILReader" or lab_aff.shape == (3, 3)):
            return np.ascontiguousarray(lab)[None]
        if img_aff.shape != (4, 4) or lab_aff.shape != (4, 4):
            raise InputError("label map or image has no usable affine; cannot align the label", path)
        t = np.linalg.solve(img_aff, lab_aff)  # label voxel -> image voxel
        step, shift = t[:3, :nd], t[:3, 3]  # image-voxel step per label-axis step; offset of label voxel 0
        sign = np.round(step)
        ok = (np.allclose(step, sign, atol=_GRID_ROT_TOL) and not np.any(sign[nd:])
              and np.all(np.abs(sign[:nd]).sum(axis=0) == 1) and np.all(np.abs(sign[:nd]).sum(axis=1) == 1))
        if not ok:
            raise InputError("label map's voxel grid is rotated or scaled relative to the image (affines differ); "
                             "resample it onto the image grid first", path)
        if nd == 2 and abs(shift[2]) > _GRID_SHIFT_TOL:
            raise InputError(f"label map lies {shift[2]:.3g} slices off the image plane", path)
        axes = [int(np.argmax(np.abs(sign[a, :nd]))) for a in range(nd)]
        out = np.transpose(lab, axes)
        for a in range(nd):
            s = sign[a, axes[a]]
            target = 0.0 if s > 0 else out.shape[a] - 1.0
            if abs(shift[a] - target) > _GRID_SHIFT_TOL:
                raise InputError(f"label map's grid is shifted by {shift[a] - target:.3g} voxels along axis {a} "
                                 "relative to the image", path)
            if s < 0:
                out = np.flip(out, axis=a)
        if out.shape != tuple(image.array.shape[1:]):
            raise InputError(f"label shape {out.shape} (in the image's axis order) does not match image shape "
                             f"{tuple(image.array.shape[1:])}", path)
        return np.ascontiguousarray(out)[None]


def _save(ds: Any, path: PathLike) -> None:
    """Write ``ds`` as read: same preamble, file meta (as is), encoding and element order.

    Unlike ``pydicom.dcmwrite``, which drops the retired top-level group length elements ``(gggg,0000)``, they are
    written again when the dataset has them, with their values recomputed (the File Meta group length is
    recomputed by pydicom). Group lengths nested in sequence items are still dropped by pydicom.
    """
    from copy import deepcopy

    from pydicom.charset import default_encoding
    from pydicom.dataelem import DataElement
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, UID

    tsyntax = UID(str(ds.file_meta.get("TransferSyntaxUID", ""))) if hasattr(ds, "file_meta") else UID("")
    known = bool(tsyntax) and tsyntax.is_transfer_syntax and not tsyntax.is_private
    group_lengths = any(t.element == 0 and t.group > 6 for t in ds.keys())
    if not group_lengths or not known:
        ds.save_as(str(path), enforce_file_format=False)
        return
    encoding = (tsyntax.is_implicit_VR, tsyntax.is_little_endian)
    charset = ds.get("SpecificCharacterSet", default_encoding)
    body = DicomBytesIO()
    body.is_implicit_VR, body.is_little_endian = encoding
    groups: dict[int, list[Any]] = defaultdict(list)
    for tag in sorted(ds.keys()):
        groups[tag.group].append(tag)
    for group in sorted(groups):
        tags = groups[group]
        buf = DicomBytesIO()
        buf.is_implicit_VR, buf.is_little_endian = encoding
        for tag in tags:
            if tag.element != 0:
                write_data_element(buf, ds.get_item(tag), charset)
        if group > 6 and any(t.element == 0 for t in tags):
            write_data_element(body, DataElement((group << 16), "UL", len(buf.getvalue())), charset)
        body.write(buf.getvalue())
    data = body.getvalue()
    if tsyntax == DeflatedExplicitVRLittleEndian:
        compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
        data += b"\x00" * (len(data) % 2)
    with open(path, "wb") as fh:
        preamble = getattr(ds, "preamble", None)
        if preamble:
            fh.write(preamble)
            fh.write(b"DICM")
        if ds.file_meta:
            meta = DicomBytesIO()
            meta.is_implicit_VR, meta.is_little_endian = False, True
            write_file_meta_info(meta, deepcopy(ds.file_meta), enforce_standard=False)
            fh.write(meta.getvalue())
        fh.write(data)


def _functional(item: Any, seq: str, attr: str) -> Any:
    if item is None or seq not in item or not item[seq].value:
        return None
    return item[seq][0].get(attr)


def _frame_source_uids(item: Any) -> list[str]:
    uids = []
    for der in item.get("DerivationImageSequence", []) or []:
        for src in der.get("SourceImageSequence", []) or []:
            if "ReferencedSOPInstanceUID" in src:
                uids.append(str(src.ReferencedSOPInstanceUID))
    return uids


def _has_preamble(path: PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------------------
# discovery


def _label_stem(name: str) -> str:
    low = name.lower()
    for ext in LABEL_MAP_EXTENSIONS:
        if low.endswith(ext):
            return name[: len(name) - len(ext)]
    return name


def discover_series(root: PathLike) -> list[dict[str, Any]]:
    """Find the image series under a folder and pair each with its label.

    Every file is visited (hidden names skipped); files with a ``.dcm``/``.dicom`` extension or a DICOM preamble
    are read header-only and must be readable. Image objects are grouped by ``SeriesInstanceUID`` and sorted by
    position along the slice normal (``InstanceNumber`` then name when positions are missing); SEG, RT, SR and
    other non-image objects are not series. Labels, by priority:

    1. the DICOM-SEG whose ``ReferencedSeriesSequence`` (or, without it, whose frames' source images) names the
       series;
    2. the label map (``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) in the series' folder when
       that folder holds exactly one series (several there: the one whose stem is the folder's name);
    3. a label map anywhere under ``root`` whose stem (name without extension) equals the name of the series'
       folder, when that folder holds exactly one series.

    Args:
        root: the folder to search (series in sub-folders, or several series mixed in one folder).

    Returns:
        One dict per image series, sorted by first file: ``{"series_uid", "files": [paths relative to root, slice
        order], "modality", "label": path relative to root or None}``.

    Raises:
        InputError: ``root`` is not a folder, an unreadable DICOM file (named), two slices at the same position,
            or an ambiguous label (several SEGs for one series, several matching label maps, one label for two
            series).
    """
    root_p = Path(root)
    if not root_p.is_dir():
        raise InputError("not a folder", root)
    images: dict[str, list[dict[str, Any]]] = defaultdict(list)
    segs: list[tuple[str, Any]] = []
    label_maps: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root_p):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            rel = p.relative_to(root_p).as_posix()
            if name.lower().endswith(LABEL_MAP_EXTENSIONS):
                label_maps.append(rel)
                continue
            if not (_is_dicom_name(name) or _has_preamble(p)):
                continue
            ds = _dcmread(p, header_only=True)
            if _is_seg(ds):
                segs.append((rel, ds))
            elif _is_image(ds):
                number = str(ds.get("InstanceNumber", "") or "").strip()
                images[str(ds.SeriesInstanceUID)].append({
                    "rel": rel, "ds": ds, "sop": str(ds.SOPInstanceUID),
                    "instance": int(number) if number.lstrip("-").isdigit() else 0,
                })
    series: list[dict[str, Any]] = []
    sop_to_series = {}
    for uid, items in images.items():
        if all(_position(it["ds"]) is not None and _orientation(it["ds"]) is not None for it in items):
            order = _slice_order([it["ds"] for it in items], [root_p / it["rel"] for it in items])
            items = [items[i] for i in order]
        else:
            items = sorted(items, key=lambda it: (it["instance"], it["rel"]))
        for it in items:
            sop_to_series[it["sop"]] = uid
        rels = [it["rel"] for it in items]
        folder = os.path.commonpath([str(Path(r).parent) for r in rels]) if rels else "."
        series.append({"series_uid": uid, "files": rels, "modality": str(items[0]["ds"].get("Modality", "")) or None,
                       "label": None, "_folder": Path(folder).as_posix() or "."})
    # 1. DICOM-SEG by reference
    seg_for: dict[str, list[str]] = defaultdict(list)
    for rel, ds in segs:
        refs = {str(item.SeriesInstanceUID) for item in ds.get("ReferencedSeriesSequence", []) or []
                if "SeriesInstanceUID" in item}
        if not refs:
            for item in ds.get("PerFrameFunctionalGroupsSequence", []) or []:
                refs.update(sop_to_series[u] for u in _frame_source_uids(item) if u in sop_to_series)
        for uid in sorted(refs):
            seg_for[uid].append(rel)
    per_folder = Counter(s["_folder"] for s in series)
    maps_in: dict[str, list[str]] = defaultdict(list)
    for rel in label_maps:
        maps_in[(Path(rel).parent.as_posix() or ".")].append(rel)
    used: dict[str, str] = {}
    for s in series:
        cands = seg_for.get(s["series_uid"], [])
        if len(cands) > 1:
            raise InputError(f"{len(cands)} DICOM-SEG objects reference series {s['series_uid']} "
                             f"({', '.join(cands)}); keep one", root)
        label = cands[0] if cands else None
        from_seg = label is not None
        folder = s["_folder"]
        fname = Path(folder).name if folder != "." else ""
        if label is None and per_folder[folder] == 1:
            local = maps_in.get(folder, [])
            if len(local) > 1:
                local = [m for m in local if fname and _label_stem(Path(m).name) == fname]
                if len(local) > 1 or not local:
                    raise InputError(f"{len(maps_in[folder])} label maps next to series {s['series_uid']} and none "
                                     "is named after its folder; keep one", Path(root) / folder)
            if local:
                label = local[0]
            elif fname:
                named = [m for m in label_maps if _label_stem(Path(m).name) == fname]
                if len(named) > 1:
                    raise InputError(f"several label maps named {fname!r} ({', '.join(named)})", root)
                label = named[0] if named else None
        if label is not None:
            if label in used and not from_seg:
                raise InputError(f"label map {label} matches two series ({used[label]} and {s['series_uid']})", root)
            used[label] = s["series_uid"]
        s["label"] = label
    for s in series:
        del s["_folder"]
    return sorted(series, key=lambda s: (s["files"][0], s["series_uid"]))
