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

"""DICOM codec: MONAI layout, stored values, element-preserving writes, SEG and label-map alignment, discovery."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dicom_utils import compare_datasets, make_ct_series, make_seg, sitk_series  # noqa: E402

from monai_umed.data.dicom import DicomCodec, discover_series  # noqa: E402
from monai_umed.data.formats import codec_for, load_with_monai  # noqa: E402
from monai_umed.errors import InputError  # noqa: E402

LIVER = Path("/work/shared/data/dicom_ct_liver")
PIXEL_DATA = 0x7FE00010


@pytest.fixture(scope="module")
def codec() -> DicomCodec:
    return DicomCodec()


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    """4 slices of 20 rows x 24 columns, int16, intercept -1024, InstanceNumber against position."""
    folder = tmp_path_factory.mktemp("ct") / "case01"
    files, volume, datasets = make_ct_series(folder)
    mask = np.zeros(volume.shape, dtype=np.uint8)
    mask[1, 3:9, 4:12] = 1
    mask[2, 5:15, 2:7] = 2
    mask[2, 6:8, 3:5] = 1  # segment 1 inside segment 2: the higher number wins
    return {"folder": folder, "files": files, "volume": volume, "datasets": datasets, "mask": mask}


def _expected_label(mask: np.ndarray) -> np.ndarray:
    return mask.transpose(2, 1, 0)[None].astype(np.int64)


def test_codec_registered():
    assert isinstance(codec_for(["a.dcm", "b.dcm"]), DicomCodec)
    assert isinstance(codec_for("slice.dcm"), DicomCodec)


def test_read_layout_stored_values_and_monai(codec, ct):
    files = ct["files"]
    img = codec.read([str(f) for f in files[::-1]])  # input order must not matter
    assert img.fmt == "dicom" and img.modality == "CT" and img.spatial_dims == 3
    assert img.array.dtype == np.int16 and img.array.shape == (1, 24, 20, 4)
    np.testing.assert_array_equal(img.array[0], ct["volume"].transpose(2, 1, 0))  # [c, r, k] = pixel_array_k[r, c]
    assert (img.slope, img.intercept) == (1.0, -1024.0)
    assert img.extra["slice_files"] == [str(f) for f in files]
    assert [img.extra["slice_files"][k] for k in img.extra["slice_of_file"]] == [str(f) for f in files[::-1]]
    assert img.extra["files"] == [str(f) for f in files[::-1]]
    assert img.extra["sop_instance_uids"] == [ds.SOPInstanceUID for ds in ct["datasets"][::-1]]  # input order
    # MONAI's own reading of the folder gives the physical volume in the same layout and geometry
    decoded, meta = load_with_monai(ct["folder"], "ITKReader")
    np.testing.assert_array_equal(decoded, img.array.astype(np.int32) - 1024)
    np.testing.assert_allclose(np.asarray(img.meta["affine"]), np.asarray(meta["affine"]))
    np.testing.assert_allclose(np.asarray(img.meta["affine"])[:3, 3], [30.0, 40.0, 12.0])  # RAS of the first slice
    assert img.meta["filename_or_obj"] == str(files[-1])
    # a folder holding one series reads the same
    np.testing.assert_array_equal(codec.read(str(ct["folder"])).array, img.array)


def test_single_slice_is_2d(codec, tmp_path):
    import nibabel as nib
    from PIL import Image

    files, volume, datasets = make_ct_series(tmp_path / "one", n_slices=1, prefix="one")
    img = codec.read([str(files[0])])
    assert img.spatial_dims == 2 and img.array.shape == (1, 24, 20)
    np.testing.assert_array_equal(img.array[0], volume[0].T)
    out = tmp_path / "out" / "one.dcm"
    codec.write(str(files[0]), str(out), img.array + np.int16(3))
    np.testing.assert_array_equal(pydicom.dcmread(out).pixel_array, volume[0] + 3)
    # labels of a single slice: SEG, NIfTI on the slice's geometry, PNG (MONAI's 2D layout)
    mask = np.zeros((1, 20, 24), np.uint8)
    mask[0, 2:9, 5:20] = 1
    expected = mask[0].T[None].astype(np.int64)
    seg = make_seg(tmp_path / "seg.dcm", datasets, mask)
    np.testing.assert_array_equal(codec.read_label(str(seg), img), expected)
    nib.save(nib.Nifti1Image(mask[0].T.copy(), np.asarray(img.meta["affine"], float)), tmp_path / "lab.nii.gz")
    np.testing.assert_array_equal(codec.read_label(str(tmp_path / "lab.nii.gz"), img), expected)
    Image.fromarray(mask[0]).save(tmp_path / "lab.png")
    np.testing.assert_array_equal(codec.read_label(str(tmp_path / "lab.png"), img), expected)


@pytest.mark.parametrize("orientation", [(1, 0, 0, 0, -1, 0), (np.cos(0.5), np.sin(0.5), 0, 0, 0, -1)])
def test_other_orientations_mr_uint16(codec, tmp_path, orientation):
    """Normal against +z and an oblique plane; unsigned MR without rescale: GDCM's order, labels still aligned."""
    import nibabel as nib

    files, volume, datasets = make_ct_series(tmp_path / "mr", orientation=orientation, prefix="mr", signed=False,
                                             intercept=0.0, modality="MR", n_slices=3)
    img = codec.read([str(f) for f in files[::-1]])
    assert img.modality == "MR" and img.array.dtype == np.uint16 and (img.slope, img.intercept) == (1.0, 0.0)
    np.testing.assert_array_equal(img.array[0], volume.transpose(2, 1, 0))
    assert img.extra["slice_files"] == [str(f) for f in files]
    mask = np.zeros(volume.shape, np.uint8)
    mask[1:3, 2:10, 3:9] = 1
    seg = make_seg(tmp_path / "seg.dcm", datasets, mask)
    np.testing.assert_array_equal(codec.read_label(str(seg), img), _expected_label(mask))
    affine = np.asarray(img.meta["affine"], dtype=np.float64)
    flip = np.diag([1.0, 1.0, -1.0, 1.0])
    flip[2, 3] = volume.shape[0] - 1
    nib.save(nib.Nifti1Image(np.ascontiguousarray(mask.transpose(2, 1, 0)[:, :, ::-1]), affine @ flip),
             tmp_path / "lab.nii.gz")
    np.testing.assert_array_equal(codec.read_label(str(tmp_path / "lab.nii.gz"), img), _expected_label(mask))
    outs = [str(tmp_path / "out" / f.name) for f in files]
    codec.write([str(f) for f in files], outs, img.array + np.uint16(1))
    np.testing.assert_array_equal(codec.read(outs).array, img.array + 1)


def test_write_round_trip(codec, ct, tmp_path):
    import monai.transforms as mt

    files = [str(f) for f in ct["files"]]
    img = codec.read(files)
    same = [str(tmp_path / "same" / Path(f).name) for f in files]
    assert codec.write(files, same, img.array) == {"sop_instance_uids": img.extra["sop_instance_uids"]}
    for f, o in zip(files, same):
        assert Path(f).read_bytes() == Path(o).read_bytes()
    src_sitk, _, _ = sitk_series(ct["folder"])
    out_sitk, names, ids = sitk_series(tmp_path / "same")
    assert len(ids) == 1 and len(names) == 4
    np.testing.assert_array_equal(out_sitk, src_sitk)

    rng = np.random.default_rng(1)
    new = (img.array + rng.integers(-3, 4, size=img.array.shape)).astype(np.int16)
    outs = [str(tmp_path / "prot" / Path(f).name) for f in files]
    codec.write(files, outs, new)
    for k, (f, o) in enumerate(zip(files, outs)):
        a, b = pydicom.dcmread(f), pydicom.dcmread(o)
        assert compare_datasets(a, b, ignore=[PIXEL_DATA]) == []
        np.testing.assert_array_equal(b.pixel_array, new[0, :, :, k].T)
        assert b.pixel_array.dtype == np.int16
    np.testing.assert_array_equal(codec.read(outs).array, new)
    out_sitk, names, ids = sitk_series(tmp_path / "prot")
    assert len(ids) == 1 and len(names) == 4
    np.testing.assert_array_equal(out_sitk, new[0].transpose(2, 1, 0).astype(np.int32) - 1024)
    loaded = mt.LoadImage(image_only=True, ensure_channel_first=True, dtype=None)(str(tmp_path / "prot"))
    np.testing.assert_array_equal(np.asarray(loaded), new.astype(np.int32) - 1024)


def test_new_uids_and_restore(codec, ct, tmp_path):
    files = [str(f) for f in ct["files"]]
    img = codec.read(files)
    originals = [pydicom.dcmread(f).SOPInstanceUID for f in files]
    outs = [str(tmp_path / "p" / Path(f).name) for f in files]
    uids = codec.write(files, outs, img.array, new_uids=True)["sop_instance_uids"]
    assert len(set(uids)) == 4 and not set(uids) & set(originals)
    assert all(pydicom.uid.UID(u).is_valid for u in uids)
    assert codec.write(files, outs, img.array, new_uids=True)["sop_instance_uids"] == uids  # deterministic
    assert codec.write(files, outs, img.array, new_uids=True, uid_salt="other")["sop_instance_uids"] != uids
    codec.write(files, outs, img.array, new_uids=True)
    for f, o, u in zip(files, outs, uids):
        a, b = pydicom.dcmread(f), pydicom.dcmread(o)
        assert b.SOPInstanceUID == u and b.file_meta.MediaStorageSOPInstanceUID == u
        # the File Meta group length follows the UID's length
        assert set(compare_datasets(a, b)) - {"(0002,0000)"} == {"(0008,0018)", "(0002,0003)"}
    # restoring: the protected copies as templates, the original UIDs forced back
    back = [str(tmp_path / "r" / Path(f).name) for f in files]
    assert codec.write(outs, back, img.array, sop_instance_uids=originals)["sop_instance_uids"] == originals
    for f, r in zip(files, back):
        assert Path(f).read_bytes() == Path(r).read_bytes()
    with pytest.raises(ValueError, match="either"):
        codec.write(files, outs, img.array, new_uids=True, sop_instance_uids=originals)
    with pytest.raises(ValueError, match="3 SOP Instance UIDs"):
        codec.write(files, outs, img.array, sop_instance_uids=originals[:3])
    with pytest.raises(ValueError, match="invalid"):
        codec.write(files, outs, img.array, sop_instance_uids=["1.2.x"] * 4)


def test_write_rejects_bad_arrays(codec, ct, tmp_path):
    files = [str(f) for f in ct["files"]]
    img = codec.read(files)
    outs = [str(tmp_path / Path(f).name) for f in files]
    with pytest.raises(ValueError, match="dtype"):
        codec.write(files, outs, img.array.astype(np.int32))
    with pytest.raises(ValueError, match="shape"):
        codec.write(files, outs, img.array[..., :3])
    with pytest.raises(ValueError, match="output paths"):
        codec.write(files, outs[:2], img.array)
    assert not any(Path(o).exists() for o in outs)


def test_bits_stored_and_compressed_templates(codec, tmp_path):
    # 12 stored bits, signed, negatives stored with the high bits cleared: the convention is kept byte for byte
    files, volume, _ = make_ct_series(tmp_path / "b12", bits_stored=12, prefix="b12")
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PixelData = (np.frombuffer(ds.PixelData, np.uint16) & 0x0FFF).tobytes()
        ds.save_as(f)
    files = [str(f) for f in files]
    img = codec.read(files)
    np.testing.assert_array_equal(img.array[0], volume.transpose(2, 1, 0))
    outs = [str(tmp_path / "b12out" / Path(f).name) for f in files]
    codec.write(files, outs, img.array)
    assert all(Path(f).read_bytes() == Path(o).read_bytes() for f, o in zip(files, outs))
    bad = img.array.copy()
    bad[0, 0, 0, 0] = 2048
    with pytest.raises(ValueError, match="BitsStored=12"):
        codec.write(files, outs, bad)
    # RLE Lossless template: written as Explicit VR Little Endian, nothing else changes
    rle, volume, datasets = make_ct_series(tmp_path / "rle", prefix="rle", transfer_syntax=pydicom.uid.RLELossless)
    rle = [str(f) for f in rle]
    img = codec.read(rle)
    np.testing.assert_array_equal(img.array[0], volume.transpose(2, 1, 0))
    outs = [str(tmp_path / "rleout" / Path(f).name) for f in rle]
    codec.write(rle, outs, img.array)
    for ds, o in zip(datasets, outs):
        b = pydicom.dcmread(o)
        assert b.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert compare_datasets(ds, b, ignore=[PIXEL_DATA, 0x00020010]) == []
    np.testing.assert_array_equal(codec.read(outs).array, img.array)


def test_read_label_seg(codec, ct, tmp_path):
    files = [str(f) for f in ct["files"]]
    seg = make_seg(tmp_path / "seg.dcm", ct["datasets"], ct["mask"])
    img = codec.read(files)
    lab = codec.read_label(str(seg), img)
    assert lab.dtype == np.int64
    np.testing.assert_array_equal(lab, _expected_label(ct["mask"]))
    # protected copies with new UIDs: the SEG still references the old ones, frames fall back to positions
    outs = [str(tmp_path / "p" / Path(f).name) for f in files]
    codec.write(files, outs, img.array, new_uids=True)
    np.testing.assert_array_equal(codec.read_label(str(seg), codec.read(outs)), lab)
    with pytest.raises(InputError, match="DICOM-SEG"):
        codec.read_label(files[0], img)


def test_read_label_maps(codec, ct, tmp_path):
    import nibabel as nib
    import SimpleITK as sitk

    img = codec.read([str(f) for f in ct["files"]])
    expected = _expected_label(ct["mask"])
    affine = np.asarray(img.meta["affine"], dtype=np.float64)
    lab = expected[0].astype(np.uint8)
    nib.save(nib.Nifti1Image(lab, affine), tmp_path / "same.nii.gz")
    np.testing.assert_array_equal(codec.read_label(str(tmp_path / "same.nii.gz"), img), expected)
    # axes permuted and one flipped, with the matching affine: realigned to the image grid
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, lab.shape[0] - 1
    perm = np.eye(4)[[1, 0, 2, 3]]
    other = np.flip(lab, 0).transpose(1, 0, 2)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(other), affine @ flip @ perm), tmp_path / "perm.nii")
    np.testing.assert_array_equal(codec.read_label(str(tmp_path / "perm.nii"), img), expected)
    # NRRD written by SimpleITK on the series' own geometry
    ref = sitk.ReadImage([str(f) for f in ct["files"]])
    sl = sitk.GetImageFromArray(ct["mask"].astype(np.uint8))  # (z, y, x)
    sl.CopyInformation(ref)
    sitk.WriteImage(sl, str(tmp_path / "lab.nrrd"))
    np.testing.assert_array_equal(codec.read_label(str(tmp_path / "lab.nrrd"), img), expected)
    # half a voxel off: refused instead of silently misaligned
    shifted = affine.copy()
    shifted[:3, 3] += affine[:3, 0] * 0.5
    nib.save(nib.Nifti1Image(lab, shifted), tmp_path / "shift.nii.gz")
    with pytest.raises(InputError, match="shifted"):
        codec.read_label(str(tmp_path / "shift.nii.gz"), img)


def test_discover_nested_and_mixed(tmp_path):
    import nibabel as nib

    root = tmp_path / "nested"
    _, _, ds1 = make_ct_series(root / "case01", prefix="c1", seed=1)
    make_seg(root / "case01" / "seg.dcm", ds1, np.pad(np.ones((2, 4, 4), np.uint8), ((1, 1), (4, 12), (4, 16))), seed=1)
    make_ct_series(root / "case02", prefix="c2", seed=2, n_slices=3)
    nib.save(nib.Nifti1Image(np.zeros((24, 20, 3), np.uint8), np.eye(4)), root / "case02" / "mask.nii.gz")
    make_ct_series(root / "case03" / "series", prefix="c3", seed=3, n_slices=2)
    (root / "labels").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((24, 20, 2), np.uint8), np.eye(4)), root / "labels" / "series.nii.gz")
    (root / "README.txt").write_text("not dicom")
    found = discover_series(root)
    assert [s["files"][0].split("/")[0] for s in found] == ["case01", "case02", "case03"]
    assert found[0]["label"] == "case01/seg.dcm" and found[0]["modality"] == "CT"
    assert found[0]["files"] == [f"case01/c1_{i:03d}.dcm" for i in (1, 0, 3, 2)]  # slice order, not name order
    assert found[1]["label"] == "case02/mask.nii.gz" and len(found[1]["files"]) == 3
    assert found[2]["label"] == "labels/series.nii.gz"
    assert discover_series(root) == found

    mixed = tmp_path / "mixed"
    _, _, da = make_ct_series(mixed, prefix="a", seed=4, n_slices=3)
    make_ct_series(mixed, prefix="b", seed=5, n_slices=2, origin=(0.0, 0.0, -50.0))
    make_seg(mixed / "a_seg.dcm", da, np.pad(np.ones((1, 3, 3), np.uint8), ((1, 1), (2, 15), (2, 19))), seed=4)
    found = discover_series(mixed)
    assert [len(s["files"]) for s in found] == [3, 2]
    assert found[0]["label"] == "a_seg.dcm" and found[1]["label"] is None
    assert all(f.startswith("a_") for f in found[0]["files"]) and all(f.startswith("b_") for f in found[1]["files"])
    assert found[0]["series_uid"] == da[0].SeriesInstanceUID


def test_discover_dicomdir_export_and_duplicates(codec, tmp_path):
    from pydicom.fileset import FileSet

    files, volume, _ = make_ct_series(tmp_path / "src", n_slices=3, prefix="x")
    fs = FileSet()
    for f in files:
        fs.add(str(f))
    fs.write(str(tmp_path / "export"))  # DICOMDIR + extension-less files with a preamble
    found = discover_series(tmp_path / "export")
    assert len(found) == 1 and len(found[0]["files"]) == 3 and found[0]["label"] is None
    img = codec.read([str(tmp_path / "export" / f) for f in found[0]["files"]])
    np.testing.assert_array_equal(img.array[0], volume.transpose(2, 1, 0))
    ds = pydicom.dcmread(files[1])
    ds.ImagePositionPatient = pydicom.dcmread(files[0]).ImagePositionPatient
    ds.save_as(files[1])
    with pytest.raises(InputError, match="same position"):
        discover_series(tmp_path / "src")


def test_corrupt_files_are_named(codec, ct, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(ct["folder"], root)
    (root / "junk.dcm").write_bytes(b"this is not a DICOM file at all" * 8)
    with pytest.raises(InputError, match="junk.dcm"):
        discover_series(root)
    (root / "junk.dcm").unlink()
    victim = sorted(root.glob("*.dcm"))[1]
    victim.write_bytes(victim.read_bytes()[:-300])  # truncated pixel data
    assert len(discover_series(root)[0]["files"]) == 4  # headers are fine
    with pytest.raises(InputError, match=victim.name):
        codec.read([str(p) for p in sorted(root.glob("*.dcm"))])
    with pytest.raises(InputError, match="not a folder"):
        discover_series(root / "missing")


def test_real_liver_ct(codec, tmp_path):
    if not LIVER.is_dir():
        pytest.skip(f"{LIVER} not available")
    found = discover_series(LIVER)
    assert len(found) == 1 and found[0]["label"] == "liver_seg.dcm" and found[0]["modality"] == "CT"
    files = [str(LIVER / f) for f in found[0]["files"]]
    img = codec.read(files)
    assert img.array.shape == (1, 512, 512, 3) and img.array.dtype == np.int16
    seg = codec.read_label(str(LIVER / "liver_seg.dcm"), img)
    nrrd = codec.read_label(str(LIVER / "liver_seg.nrrd"), img)
    assert seg.sum() > 0
    np.testing.assert_array_equal(seg, nrrd)
    outs = [str(tmp_path / Path(f).name) for f in files]
    codec.write(files, outs, img.array)
    for f, o in zip(files, outs):
        assert compare_datasets(pydicom.dcmread(f), pydicom.dcmread(o)) == []
        assert Path(f).read_bytes() == Path(o).read_bytes()
