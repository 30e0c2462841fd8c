# Copyright (c) monai-umed contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""The MONAI Label app end to end: a real ``monailabel start_server`` on loopback serving synthetic studies.

The server tests run in the label environment (``monai-umed[label]``, see README "MONAI Label") and are skipped
where MONAI Label is not installed; the option tests run anywhere. Each server is stopped (its whole process
group) whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_umed.errors import InputError
from monai_umed.label import write_app
from monai_umed.label.options import ProtectOptions, find_state_file, load_protector
from monai_umed.protectors.noise import NoiseProtector

try:  # the server tests need the label environment (extra monai-umed[label]); the option tests run anywhere
    import monailabel  # noqa: F401
    import requests
except ImportError:
    requests = None
needs_server = pytest.mark.skipif(requests is None, reason="MONAI Label is not installed (extra monai-umed[label], "
                                  "see README)")

EPSILON = 4 / 255
STARTUP_S = 120
JOB_S = 90
# study -> (dtype, label tag or None)
STUDIES = {"case0": (np.int16, "final"), "case1": (np.int16, "final"), "case2": (np.uint8, "original"),
           "case3": (np.int16, None)}
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def _make_studies(root: Path) -> None:
    """MONAI Label local datastore: images in the folder, labels under labels/final and labels/original."""
    from monai.data import create_test_image_3d

    for i, (name, (dtype, tag)) in enumerate(STUDIES.items()):
        img, seg = create_test_image_3d(24, 20, 12, num_objs=3, rad_max=5, rad_min=2, noise_max=0.3,
                                        random_state=np.random.RandomState(i))
        scale = 200 if dtype == np.uint8 else 1500
        nib.save(nib.Nifti1Image((img * scale + 20).astype(dtype), AFFINE), root / f"{name}.nii.gz")
        if tag:
            (root / "labels" / tag).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(seg.astype(np.uint8), AFFINE), root / "labels" / tag / f"{name}.nii.gz")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server's process group (uvicorn and anything it started); kill it if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=15)


def _array(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj.get_unscaled())


def _budget(original: np.ndarray) -> float:
    """Largest stored-unit change allowed by EPSILON (METHODS.md 0): uint8 -> dtype range, else 0.5/99.5
    percentiles; floored to whole grey levels."""
    if original.dtype == np.uint8:
        return float(np.floor(EPSILON * 255 + 1e-9))
    lo, hi = np.percentile(original.astype(np.float64), [0.5, 99.5])
    return float(np.floor(EPSILON * (hi - lo) + 1e-9))


@contextlib.contextmanager
def _running_server(root: Path, studies: Path, *extra: str) -> Iterator[str]:
    """``monailabel start_server`` with the monai-umed app on a free loopback port; yields its URL and stops the
    server's whole process group on exit, whatever happened."""
    app = write_app(root / "app").parent
    port = _free_port()
    exe = Path(sys.executable).with_name("monailabel")
    cmd = [str(exe) if exe.exists() else (shutil.which("monailabel") or "monailabel"), "start_server",
           "--app", str(app), "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port), *extra]
    env = dict(os.environ, MONAILABEL_PYEXE=sys.executable, MONAI_LABEL_SESSION_PATH=str(root / "sessions"),
               MONAI_LABEL_TRACKING_ENABLED="false", PYTHONUNBUFFERED="1")
    log = root / "server.log"
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"monailabel start_server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(f"{url}/info/", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                pytest.fail(f"monailabel start_server not up after {STARTUP_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The server the custodian starts: router included with --uvicorn_app, defaults from --conf."""
    root = tmp_path_factory.mktemp("label")
    studies = root / "studies"
    studies.mkdir()
    _make_studies(studies)
    originals = {f.relative_to(studies).as_posix(): f.read_bytes() for f in studies.rglob("*.nii.gz")}
    conf = ["--uvicorn_app", "monai_umed.label.server:app", "--conf", "method", "noise", "--conf", "epsilon", "4/255",
            # MONAI Label's launcher script splits arguments on spaces: JSON without spaces
            "--conf", "params", '{"region":"roi"}', "--conf", "releases", str(root / "releases")]
    with _running_server(root, studies, *conf) as url:
        yield {"url": url, "root": root, "studies": studies, "originals": originals}


def _wait(url: str, job: dict[str, Any]) -> dict[str, Any]:
    deadline, seen = time.time() + JOB_S, []
    while True:
        r = requests.get(f"{url}/umed/jobs/{job['id']}", timeout=10)
        assert r.status_code == 200, r.text
        status = r.json()
        seen.append((status["state"], status["done"], status["total"]))
        assert 0 <= status["done"] <= status["total"]
        if status["state"] in ("done", "failed"):
            status["seen"] = seen
            return status
        assert time.time() < deadline, f"job not finished after {JOB_S} s: {status}"
        time.sleep(0.25)


@needs_server
def test_info_lists_app_and_labelled_studies(server: dict[str, Any]) -> None:
    info = requests.get(f"{server['url']}/info/", timeout=10).json()
    assert info["name"] == "monai-umed"
    assert info["models"]["protect"]["type"] == "others"
    assert info["models"]["protect"]["config"]["method"] == "noise"
    umed = requests.get(f"{server['url']}/umed/info", timeout=10).json()
    assert umed["labelled"] == ["case0", "case1", "case2"]  # case3 has no saved label
    assert umed["images"] == 4
    assert "noise" in umed["methods"]
    assert umed["options"]["epsilon"] == pytest.approx(EPSILON)


@needs_server
def test_infer_protect_returns_protected_study(server: dict[str, Any]) -> None:
    url, studies = server["url"], server["studies"]
    r = requests.post(f"{url}/infer/protect", params={"image": "case0", "output": "image"}, timeout=60)
    assert r.status_code == 200, r.text
    out = server["root"] / "preview_case0.nii.gz"
    out.write_bytes(r.content)
    original, label = _array(studies / "case0.nii.gz"), _array(studies / "labels/final/case0.nii.gz")
    protected = _array(out)
    assert protected.dtype == original.dtype and protected.shape == original.shape
    np.testing.assert_array_equal(nib.load(str(out)).affine, nib.load(str(studies / "case0.nii.gz")).affine)
    delta = protected.astype(np.int64) - original.astype(np.int64)
    assert np.abs(delta).max() <= _budget(original)
    assert np.count_nonzero(delta[label > 0]) > 0.5 * np.count_nonzero(label)  # the ROI is perturbed
    assert not delta[label == 0].any()  # region=roi (server --conf params): only inside the saved label

    # per-request options override the server's; the details come back as JSON
    r = requests.post(f"{url}/infer/protect", params={"image": "case2", "output": "json"},
                      files={"params": (None, json.dumps({"epsilon": "2/255", "seed": 3}))}, timeout=60)
    assert r.status_code == 200, r.text
    details = r.json()
    assert details["method"] == "noise" and details["label_tag"] == "original"
    assert details["params"]["epsilon"] == pytest.approx(2 / 255) and details["params"]["seed"] == 3
    assert details["max_abs_delta"] <= 2  # uint8: 2/255 of the dtype range

    # a study without a saved label is refused with the reason, and the datastore is left as it was
    r = requests.post(f"{url}/infer/protect", params={"image": "case3", "output": "json"}, timeout=60)
    assert r.status_code == 400 and "no saved label" in r.json()["detail"]
    for rel, data in server["originals"].items():
        assert (studies / rel).read_bytes() == data, f"{rel} was modified"
    assert not (studies / "labels" / "original" / "case0.nii.gz").exists()  # the result is never saved as a label


@needs_server
def test_export_progress_and_restore(server: dict[str, Any]) -> None:
    url, root, studies = server["url"], server["root"], server["studies"]
    release = root / "releases" / "release1"
    r = requests.post(f"{url}/umed/export", json={"output": "release1"}, timeout=30)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "export" and job["total"] == 3 and job["request"]["output"] == str(release)
    status = _wait(url, job)
    assert status["state"] == "done", status
    assert status["done"] == status["total"] == 3 and status["progress"] == 1.0
    assert status["result"]["protected"] == 3 and status["result"]["studies"] == ["case0", "case1", "case2"]

    # release: MSD layout with the labelled studies only, manifest, key beside it (not inside)
    key = Path(status["result"]["key"])
    assert key == release.with_name("release1.umedkey") and key.is_file()
    assert not list(release.rglob("*.umedkey")) and not release.with_name("release1.studies").exists()
    datalist = json.loads((release / "dataset.json").read_text())
    assert [e["image"] for e in datalist["training"]] == [f"imagesTr/case{i}.nii.gz" for i in range(3)]
    manifest = json.loads((release / "manifest.json").read_text())
    assert len(manifest["cases"]) == 3 and manifest["summary"]["method"] == "noise"
    assert all(c["protected"] for c in manifest["cases"])
    tags = {"case0": "final", "case1": "final", "case2": "original"}
    for name, tag in tags.items():
        original = _array(studies / f"{name}.nii.gz")
        protected = _array(release / "imagesTr" / f"{name}.nii.gz")
        assert protected.dtype == original.dtype and protected.shape == original.shape
        delta = protected.astype(np.int64) - original.astype(np.int64)
        assert delta.any() and np.abs(delta).max() <= _budget(original), name
        label = studies / "labels" / tag / f"{name}.nii.gz"
        assert (release / "labelsTr" / f"{name}.nii.gz").read_bytes() == label.read_bytes(), name
    # the viewer's preview is exactly what the release holds
    np.testing.assert_array_equal(_array(root / "preview_case0.nii.gz"), _array(release / "imagesTr/case0.nii.gz"))

    # the key verifies, and restores the original arrays exactly
    r = requests.post(f"{url}/umed/verify", json={"release": str(release)}, timeout=30)
    assert r.status_code == 200 and r.json()["cases"] == 3, r.text
    r = requests.post(f"{url}/umed/restore", json={"release": "release1", "output": "restored1"}, timeout=30)
    assert r.status_code == 202, r.text
    status = _wait(url, r.json())
    assert status["state"] == "done" and status["result"]["restored"] == 3, status
    restored = root / "releases" / "restored1"
    for name in tags:
        a, b = _array(studies / f"{name}.nii.gz"), _array(restored / "imagesTr" / f"{name}.nii.gz")
        assert a.dtype == b.dtype and np.array_equal(a, b), name
        np.testing.assert_array_equal(nib.load(str(restored / "imagesTr" / f"{name}.nii.gz")).affine,
                                      nib.load(str(studies / f"{name}.nii.gz")).affine)

    # a tampered copy of the release does not match its key
    tampered = root / "releases" / "tampered"
    shutil.copytree(release, tampered)
    shutil.copyfile(studies / "case1.nii.gz", tampered / "imagesTr" / "case1.nii.gz")
    r = requests.post(f"{url}/umed/verify", json={"release": str(tampered), "key": str(key)}, timeout=30)
    assert r.status_code == 409 and "case1" in r.json()["detail"]


@needs_server
def test_bad_requests_are_refused(server: dict[str, Any]) -> None:
    url, studies = server["url"], server["studies"]
    r = requests.post(f"{url}/umed/export", json={"output": str(studies / "inside")}, timeout=30)
    assert r.status_code == 400 and "outside the studies folder" in r.json()["detail"]
    r = requests.post(f"{url}/umed/export", json={"output": "x", "method": "no-such-method"}, timeout=30)
    assert r.status_code == 400 and "unknown protection method" in r.json()["detail"]
    r = requests.post(f"{url}/umed/export", json={"outptu": "x"}, timeout=30)
    assert r.status_code == 422
    assert requests.get(f"{url}/umed/jobs/nosuchjob", timeout=10).status_code == 404
    assert not (studies / "inside").exists()


def test_options_merge_conf_and_request(tmp_path: Path) -> None:
    conf = {"method": "noise", "epsilon": "4/255", "seed": "3", "params": '{"region":"roi"}', "label_tag": "final",
            "model": "models/p.pt"}
    o = ProtectOptions.from_sources(conf, {"epsilon": 0.01, "params": {"extra": 1}, "model": "/etc/passwd"}, tmp_path)
    assert (o.method, o.epsilon, o.seed, o.label_tag) == ("noise", 0.01, 3, "final")
    assert o.params == {"region": "roi", "extra": 1}
    assert o.model == str(tmp_path / "models/p.pt")  # server option only, relative to the app folder
    assert {"method", "epsilon", "seed", "params"} <= o.explicit and "epochs" not in o.explicit
    d = ProtectOptions.from_sources({}, {})
    assert (d.method, d.epsilon, d.epochs, d.seed, d.intensity) == (None, 8 / 255, None, 0, "auto")
    for bad in ({"epsilon": "eight"}, {"epsilon": 2}, {"epochs": "1.5"}, {"label_tag": "draft"},
                {"params": "region=roi"}, {"device": "tpu"}):
        with pytest.raises(InputError, match=f"'{next(iter(bad))}'"):
            ProtectOptions.from_sources(bad, None)


def _bundle(root: Path, **params: Any) -> Path:
    (root / "models").mkdir(parents=True)
    torch.save(NoiseProtector(**params).state_dict(), root / "models" / "protector.pt")
    return root


def test_load_protector_from_bundle_models(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle", epsilon=2 / 255, region="roi", seed=5)
    assert find_state_file(bundle) == bundle / "models" / "protector.pt"
    p = load_protector(ProtectOptions.from_sources({"model": str(bundle)}))
    assert (p.name, p.epsilon, p.region, p.seed, p.fitted) == ("noise", 2 / 255, "roi", 5, True)
    p = load_protector(ProtectOptions.from_sources({"model": str(bundle)}, {"epsilon": "1/255"}))
    assert (p.epsilon, p.region, p.seed) == (1 / 255, "roi", 5)  # explicit options override the saved ones
    with pytest.raises(InputError, match="method 'noise'"):
        load_protector(ProtectOptions.from_sources({"model": str(bundle), "method": "umed"}))
    torch.save({"name": "noise"}, bundle / "models" / "other.pt")
    with pytest.raises(InputError, match="several fitted protectors"):
        find_state_file(bundle)
    with pytest.raises(InputError, match="not found"):
        find_state_file(tmp_path / "missing")


@needs_server
def test_plain_server_with_bundle_model(tmp_path: Path) -> None:
    """A plain ``monailabel start_server --app ... --studies ...`` (no --uvicorn_app) gets the /umed endpoints from
    the app itself, and ``--conf model`` loads a protector from a bundle's models/ folder."""
    studies = tmp_path / "studies"
    studies.mkdir()
    _make_studies(studies)
    bundle = _bundle(tmp_path / "bundle", epsilon=2 / 255, region="roi", seed=5)
    with _running_server(tmp_path, studies, "--conf", "model", str(bundle)) as url:
        umed = requests.get(f"{url}/umed/info", timeout=10)
        assert umed.status_code == 200, umed.text
        assert umed.json()["labelled"] == ["case0", "case1", "case2"]
        assert umed.json()["options"]["model"] == str(bundle)
        r = requests.post(f"{url}/infer/protect", params={"image": "case1", "output": "image"}, timeout=60)
        assert r.status_code == 200, r.text
        out = tmp_path / "case1_protected.nii.gz"
        out.write_bytes(r.content)
        delta = _array(out).astype(np.int64) - _array(studies / "case1.nii.gz").astype(np.int64)
        label = _array(studies / "labels/final/case1.nii.gz")
        assert delta.any() and not delta[label == 0].any()  # the bundle's protector: region=roi
        r = requests.post(f"{url}/infer/protect", params={"image": "case1", "output": "json"}, timeout=60)
        assert r.json()["params"] == {"epsilon": 2 / 255, "seed": 5, "epochs": None, "region": "roi"}
