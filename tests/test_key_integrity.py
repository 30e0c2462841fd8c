# Copyright (c) monai-umed contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""Trust in the key: a full ``verify`` that names damaged or mismatching cases, a ``restore`` that refuses a damaged
key cleanly (or skips what is damaged), an idempotent ``--resume`` and one process per run (the run lock)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from monai_umed.cli import main
from monai_umed.data.datalist import load_dataset
from monai_umed.data.formats import codec_for
from monai_umed.key import check_key, read_key, write_key
from monai_umed.pipeline import RunLock, protect_dataset
from monai_umed.protectors.base import Protector

REPO = Path(__file__).resolve().parents[1]


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def cli(capsys: pytest.CaptureFixture, *args: Any) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return rc, out, err


def error_lines(err: str) -> list[str]:
    lines = err.strip().splitlines()
    assert lines and all(line.startswith("monai-umed: error:") for line in lines), err
    return lines


def member_offset(key: Path, member: str) -> tuple[int, int]:
    """Offset and size of a member's stored data inside the key file."""
    with zipfile.ZipFile(key) as z:
        info = z.getinfo(member)
    raw = key.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


def flip(key: Path, dest: Path, member: str, where: float = 0.5) -> Path:
    """A copy of ``key`` with one bit flipped at fraction ``where`` of ``member``'s stored data."""
    start, size = member_offset(key, member)
    raw = bytearray(key.read_bytes())
    raw[start + min(size - 1, int(size * where))] ^= 0x10
    dest.write_bytes(bytes(raw))
    return dest


def same_arrays(a: Path, b: Path) -> bool:
    x, y = codec_for(str(a)).read(str(a)).array, codec_for(str(b)).read(str(b)).array
    return x.dtype == y.dtype and np.array_equal(x, y)


def assert_restored(data: Path, restored: Path, missing: set[str] = frozenset()) -> None:
    """Every case but ``missing`` restored bit for bit; the cases in ``missing`` left out entirely."""
    for case in load_dataset(data).cases:
        if case.case_id in missing:
            assert not (restored / case.image).exists() and not (restored / case.label).exists(), case.case_id
        else:
            assert same_arrays(data / case.image, restored / case.image), case.case_id
            assert (data / case.label).read_bytes() == (restored / case.label).read_bytes()


@pytest.fixture
def run(ds2d: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> dict[str, Any]:
    """A finished ``noise`` run of the 6-case 2D dataset, through the command line."""
    out, key = tmp_path / "out", tmp_path / "out.umedkey"
    before = digest(ds2d)
    rc, _, err = cli(capsys, "protect", ds2d, out, "--method", "noise", "--seed", "1", "--quiet")
    assert rc == 0, err
    cases = read_key(key)["cases"]
    return {"data": ds2d, "out": out, "key": key, "cases": cases, "before": before}


def test_intact_key_full_and_quick(run: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    assert all(len(c["delta_sha256"]) == 64 for c in run["cases"] if c["protected"])
    assert read_key(run["key"])["config"]["method"] == "noise"
    manifest = json.loads((run["out"] / "manifest.json").read_text())
    assert not any("delta_sha256" in c or "delta" in c for c in manifest["cases"])  # the manifest stays public
    rc, out, _ = cli(capsys, "verify", run["out"], run["key"])
    assert rc == 0 and "key matches: 6 cases" in out and "full check" in out
    rc, out, _ = cli(capsys, "verify", run["out"], run["key"], "--quick")
    assert rc == 0 and "quick check" in out


@pytest.mark.parametrize("where", [0.0, 0.5, 0.999])
def test_flipped_delta_names_the_case(run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture,
                                      where: float) -> None:
    case = run["cases"][3]
    bad = flip(run["key"], tmp_path / "bad.umedkey", case["delta"], where)
    rc, _, err = cli(capsys, "verify", run["out"], bad)
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 2
    assert repr(case["case_id"]) in lines[0] and case["delta"] in lines[0] and "damaged" in lines[0]
    assert "1 of 6 cases cannot be restored" in lines[1]
    # the quick check reads key.json only, and says so
    rc, out, _ = cli(capsys, "verify", run["out"], bad, "--quick")
    assert rc == 0 and "quick check" in out
    # restore: a line naming the case, nothing written
    dest = tmp_path / "restored"
    rc, _, err = cli(capsys, "restore", run["out"], bad, dest, "--quiet")
    lines = error_lines(err)
    assert rc == 2 and repr(case["case_id"]) in lines[0] and "nothing was written" in lines[-1]
    assert not dest.exists() and not dest.with_name("restored.partial").exists()
    # --skip-damaged: every other case bit for bit, the damaged one listed and left out
    rc, out, err = cli(capsys, "restore", run["out"], bad, dest, "--quiet", "--skip-damaged")
    assert rc == 2 and repr(case["case_id"]) in err and "not restored" in err
    assert "1 of 6 cases NOT restored" in out and case["case_id"] in out
    assert_restored(run["data"], dest, {case["case_id"]})
    assert digest(run["data"]) == run["before"]


def test_two_damaged_deltas_each_named(run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    c1, c4 = run["cases"][1], run["cases"][4]
    bad = flip(flip(run["key"], tmp_path / "a.umedkey", c1["delta"]), tmp_path / "b.umedkey", c4["delta"], 0.2)
    rc, _, err = cli(capsys, "verify", run["out"], bad)
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 3
    assert repr(c1["case_id"]) in lines[0] and repr(c4["case_id"]) in lines[1]
    rc, _, err = cli(capsys, "restore", run["out"], bad, tmp_path / "r", "--quiet")
    assert rc == 2 and repr(c1["case_id"]) in err and repr(c4["case_id"]) in err and not (tmp_path / "r").exists()
    rc, _, _ = cli(capsys, "restore", run["out"], bad, tmp_path / "r", "--quiet", "--skip-damaged")
    assert rc == 2
    assert_restored(run["data"], tmp_path / "r", {c1["case_id"], c4["case_id"]})


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_damaged_key_json(run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture, where: float) -> None:
    bad = flip(run["key"], tmp_path / "bad.umedkey", "key.json", where)
    for args in (["verify", run["out"], bad], ["restore", run["out"], bad, tmp_path / "r", "--quiet"],
                 ["restore", run["out"], bad, tmp_path / "r", "--quiet", "--skip-damaged"]):
        rc, _, err = cli(capsys, *args)
        assert rc == 2 and len(error_lines(err)) == 1 and "key.json" in err and "damaged" in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("cut", ["empty", "half", "most"])
def test_empty_and_truncated_keys(run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture,
                                  cut: str) -> None:
    raw = run["key"].read_bytes()
    bad = tmp_path / "bad.umedkey"
    bad.write_bytes({"empty": b"", "half": raw[: len(raw) // 2], "most": raw[:-30]}[cut])
    for args in (["verify", run["out"], bad], ["verify", run["out"], bad, "--quick"],
                 ["restore", run["out"], bad, tmp_path / "r", "--quiet", "--skip-damaged"]):
        rc, _, err = cli(capsys, *args)
        assert rc == 2 and len(error_lines(err)) == 1 and "not a monai-umed key file" in err, err
    assert not (tmp_path / "r").exists()


def test_key_of_another_run(run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other = tmp_path / "other"
    assert cli(capsys, "protect", run["data"], other, "--seed", "2", "--quiet")[0] == 0
    key = tmp_path / "other.umedkey"
    rc, _, err = cli(capsys, "verify", run["out"], key)
    assert rc == 2 and len(error_lines(err)) == 1 and "none of its 6 cases matches" in err
    rc, _, err = cli(capsys, "restore", run["out"], key, tmp_path / "r", "--quiet", "--skip-damaged")
    assert rc == 2 and "key does not match" in err and not (tmp_path / "r").exists()
    # one tampered protected file: verify names its case
    img = run["out"] / run["cases"][2]["files"][0]["output"]
    img.write_bytes((other / run["cases"][2]["files"][0]["output"]).read_bytes())
    rc, _, err = cli(capsys, "verify", run["out"], run["key"])
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 2 and repr(run["cases"][2]["case_id"]) in lines[0] and "differs" in lines[0]


def test_sha256_is_checked_before_decoding(run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two deltas swapped in a rewritten key: every zip CRC is right, the per-case sha256 is not."""
    record = read_key(run["key"])
    with zipfile.ZipFile(run["key"]) as z:
        deltas = {c["delta"]: z.read(c["delta"]) for c in record["cases"]}
    names = list(deltas)
    deltas[names[0]], deltas[names[1]] = deltas[names[1]], deltas[names[0]]
    swapped = tmp_path / "swapped.umedkey"
    write_key(swapped, {k: v for k, v in record.items() if k != "format"}, deltas.items())
    rc, _, err = cli(capsys, "verify", run["out"], swapped)
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 3 and all("sha256" in line for line in lines[:2])
    rc, _, err = cli(capsys, "restore", run["out"], swapped, tmp_path / "r", "--quiet", "--skip-damaged")
    assert rc == 2
    assert_restored(run["data"], tmp_path / "r", {c["case_id"] for c in record["cases"][:2]})


def test_older_key_without_checksums(run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A key written before delta_sha256 and config existed: still read, verified by the zip CRC, resumable."""
    record = read_key(run["key"])
    with zipfile.ZipFile(run["key"]) as z:
        deltas = [(c["delta"], z.read(c["delta"])) for c in record["cases"]]
    old = {k: v for k, v in record.items() if k not in ("format", "config")}
    old["cases"] = [{k: v for k, v in c.items() if k != "delta_sha256"} for c in record["cases"]]
    write_key(run["key"], old, deltas)
    rc, out, _ = cli(capsys, "verify", run["out"], run["key"])
    assert rc == 0 and "full check" in out
    rc, out, _ = cli(capsys, "protect", run["data"], run["out"], "--seed", "1", "--resume", "--quiet")
    assert rc == 0 and "already complete" in out
    bad = flip(run["key"], tmp_path / "bad.umedkey", record["cases"][5]["delta"])
    rc, _, err = cli(capsys, "verify", run["out"], bad)
    assert rc == 2 and repr(record["cases"][5]["case_id"]) in error_lines(err)[0] and "CRC" in err
    rc, _, _ = cli(capsys, "restore", run["out"], bad, tmp_path / "r", "--quiet", "--skip-damaged")
    assert rc == 2
    assert_restored(run["data"], tmp_path / "r", {record["cases"][5]["case_id"]})


class _Fitted(Protector):
    """A tiny fitted protector: a learnt constant offset (so that the key holds a protector.pt)."""

    name = "tiny-fitted"
    fits = True

    def fit(self, samples: Any, *, progress: bool = True, checkpoint: Any = None) -> "_Fitted":
        self._set_spatial_dims(samples[0]["image"])
        self.offset = torch.full((64,), self.epsilon)  # a state worth storing
        self.fitted = True
        return self

    def perturbation(self, image: torch.Tensor, label: torch.Tensor | None = None,
                     case_id: str | None = None) -> torch.Tensor:
        return torch.full_like(image, float(self.offset[0]))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "offset": self.offset}

    def load_state_dict(self, state: Any) -> "_Fitted":
        super().load_state_dict(state)
        self.offset = state["offset"]
        return self


def test_damaged_protector_state(ds2d: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    s = protect_dataset(ds2d, tmp_path / "out", protector=_Fitted(epsilon=4 / 255), progress=False)
    key, out = Path(s["key"]), Path(s["output"])
    assert len(read_key(key)["protector_sha256"]) == 64
    assert check_key(out, key).ok
    bad = flip(key, tmp_path / "bad.umedkey", "protector.pt")
    rc, _, err = cli(capsys, "verify", out, bad)
    lines = error_lines(err)
    assert rc == 2 and "protector.pt" in lines[0] and "0 of 6 cases cannot be restored" in lines[-1]
    rc, _, err = cli(capsys, "restore", out, bad, tmp_path / "r", "--quiet")
    assert rc == 2 and "protector.pt" in err and not (tmp_path / "r").exists()
    # restoring does not need the protector: --skip-damaged restores every case and warns
    rc, text, err = cli(capsys, "restore", out, bad, tmp_path / "r", "--quiet", "--skip-damaged")
    assert rc == 0 and "warning" in err and "protector.pt" in err and "bit for bit" in text
    assert_restored(ds2d, tmp_path / "r")


def test_resume_of_a_finished_run(run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tree = digest(run["out"])
    key_bytes = run["key"].read_bytes()
    args = ["protect", run["data"], run["out"], "--method", "noise", "--seed", "1", "--quiet"]
    rc, out, _ = cli(capsys, *args, "--resume")
    assert rc == 0 and "already complete" in out and "nothing to do" in out
    assert digest(run["out"]) == tree and run["key"].read_bytes() == key_bytes  # nothing rewritten
    assert not (tmp_path / "out.lock").exists() and not (tmp_path / "out.partial").exists()
    # other settings: the clear error stays
    rc, _, err = cli(capsys, *args[:-3], "--seed", "2", "--quiet", "--resume")
    assert rc == 2 and "already exists" in err and "complete" in err and "params" in err
    # without --resume: refused as before
    rc, _, err = cli(capsys, *args)
    assert rc == 2 and "already exists" in err
    # a damaged key of a finished run is not reported as success
    run["key"].write_bytes(flip(run["key"], tmp_path / "bad.umedkey", run["cases"][0]["delta"]).read_bytes())
    rc, _, err = cli(capsys, *args, "--resume")
    assert rc == 2 and repr(run["cases"][0]["case_id"]) in err
    assert digest(run["data"]) == run["before"]


def _interrupted_run(data: Path, out: Path, capsys: pytest.CaptureFixture) -> tuple[Path, bytes]:
    """An interrupted run: the last case is unreadable, so the run stops with its other cases finished."""
    bad = data / load_dataset(data).cases[-1].image
    good = bad.read_bytes()
    bad.write_bytes(b"not an image")
    rc, _, err = cli(capsys, "protect", data, out, "--batch-size", "1", "--quiet")
    assert rc == 2 and "unreadable" in err
    assert out.with_name("out.partial").is_dir() and not out.exists()
    return bad, good


def test_second_process_on_the_same_run_is_refused(ds2d: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    bad, good = _interrupted_run(ds2d, out, capsys)
    bad.write_bytes(good)
    before = digest(ds2d)
    work = tmp_path / "out.umedkey.parts"
    fragments = digest(work)
    # a real second process holds the run's lock, as a running `protect` does
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom monai_umed.pipeline import RunLock\n"
         "RunLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in (["--resume"], []):
            rc, _, err = cli(capsys, "protect", ds2d, out, "--batch-size", "1", "--quiet", *extra)
            assert rc == 2 and len(error_lines(err)) == 1, err
            assert "another process" in err and f"pid {holder.pid}" in err, err
        assert digest(work) == fragments and not out.exists()  # the refused process wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the kernel drops the lock, the stale file stays
        holder.wait()
    assert (tmp_path / "out.lock").exists()
    rc, _, err = cli(capsys, "protect", ds2d, out, "--batch-size", "1", "--quiet", "--resume")
    assert rc == 0, err
    assert not (tmp_path / "out.lock").exists() and not work.exists()
    assert cli(capsys, "restore", out, tmp_path / "out.umedkey", tmp_path / "r", "--quiet")[0] == 0
    assert_restored(ds2d, tmp_path / "r")
    assert digest(ds2d) == before


def test_a_real_protect_process_is_refused_while_the_run_is_locked(ds2d: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    bad, good = _interrupted_run(ds2d, out, capsys)
    bad.write_bytes(good)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    with RunLock(out):  # this process runs the job
        r = subprocess.run([sys.executable, "-m", "monai_umed", "protect", str(ds2d), str(out), "--resume", "--quiet"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "another process" in r.stderr
        assert f"pid {os.getpid()}" in r.stderr
    assert not (tmp_path / "out.lock").exists()
    assert cli(capsys, "protect", ds2d, out, "--batch-size", "1", "--resume", "--quiet")[0] == 0
