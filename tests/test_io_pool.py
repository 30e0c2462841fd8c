# Copyright (c) monai-umed contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""The I/O thread pool: results in submission order, errors in case order, and a threaded protect run that writes
the same bytes as a sequential one, also when it is interrupted and resumed."""

from __future__ import annotations

import hashlib
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from monai_umed import pipeline
from monai_umed.blocks import c_order_blocks
from monai_umed.data.formats import codec_for
from monai_umed.errors import InputError
from monai_umed.io_pool import IOPool, OrderedWindow
from monai_umed.key import restore_dataset, verify_key
from monai_umed.pipeline import protect_dataset


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def key_members(key: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(key) as z:
        return {n: z.read(n) for n in z.namelist()}


def test_window_gives_results_in_submission_order_and_first_error_first() -> None:
    release = [threading.Event() for _ in range(4)]
    done: list[int] = []

    def task(i: int) -> int:
        release[i].wait(5)
        done.append(i)
        if i in (1, 2):
            raise OSError(f"task {i} failed")
        return i * 10

    with IOPool(4) as pool:
        window = OrderedWindow()
        for i in range(4):
            window.append(pool.submit(task, i))
        for n, i in enumerate((3, 2, 1, 0)):  # finish in reverse order
            release[i].set()
            deadline = time.monotonic() + 5
            while len(done) <= n and time.monotonic() < deadline:
                time.sleep(0.01)
        assert done == [3, 2, 1, 0]
        results = window.pop_ready(keep=0)
        assert next(results) == 0
        with pytest.raises(OSError, match="task 1"):  # not task 2, which failed first
            next(results)


def test_close_cancels_queued_tasks_and_waits_for_running_ones() -> None:
    started, finished = threading.Event(), []

    def slow(i: int) -> None:
        started.set()
        time.sleep(0.2)
        finished.append(i)

    pool = IOPool(1)
    futures = [pool.submit(slow, i) for i in range(5)]
    started.wait(5)
    pool.close()
    assert finished == [0]  # the running task ended, the queued ones never started
    assert all(f.cancelled() for f in futures[1:])


def test_no_threads_runs_inline_and_keeps_the_error_for_result() -> None:
    pool = IOPool(0)
    assert pool.submit(threading.get_ident).result() == threading.get_ident()
    failed = pool.submit(int, "not a number")
    with pytest.raises(ValueError):
        failed.result()
    with pytest.raises(ValueError):
        IOPool(-1)


@pytest.mark.parametrize("shape", [(3, 7, 5), (1, 4, 6, 5), (2, 1), (0, 3), (5,)])
@pytest.mark.parametrize("block", [1, 4, 13, 1000])
def test_c_order_blocks_cover_the_array_in_order(shape: tuple[int, ...], block: int) -> None:
    a = np.arange(int(np.prod(shape))).reshape(shape)
    pieces = [a[i].ravel() for i in c_order_blocks(shape, block)]
    assert np.array_equal(np.concatenate(pieces) if pieces else a.ravel(), a.ravel())


def test_threaded_run_writes_the_same_bytes_as_a_sequential_one(ds2d: Path, tmp_path: Path, monkeypatch) -> None:
    seq = protect_dataset(ds2d, tmp_path / "seq", "noise", seed=5, batch_size=2, progress=False, io_threads=0)
    # the first case's file is written last: the threads finish out of order
    original = pipeline._finish_case

    def first_case_late(job, out, *args):
        if out.n == 0:
            time.sleep(0.3)
        return original(job, out, *args)

    monkeypatch.setattr(pipeline, "_finish_case", first_case_late)
    par = protect_dataset(ds2d, tmp_path / "par", "noise", seed=5, batch_size=2, progress=False, io_threads=3)
    monkeypatch.setattr(pipeline, "IO_MEMORY", 1)  # every batch "big": nothing decoded ahead or written behind
    big = protect_dataset(ds2d, tmp_path / "big", "noise", seed=5, batch_size=2, progress=False, io_threads=3)
    for run in (par, big):
        assert tree_digest(tmp_path / "seq") == tree_digest(Path(run["output"]))  # manifest.json included
        a, b = key_members(Path(seq["key"])), key_members(Path(run["key"]))
        assert a == b  # every member of the key, key.json included


def test_failed_write_on_a_thread_stops_the_run_and_resume_completes_it(ds2d: Path, tmp_path: Path,
                                                                        monkeypatch) -> None:
    ref = protect_dataset(ds2d, tmp_path / "ref", "noise", seed=2, batch_size=2, progress=False, io_threads=0)
    original = pipeline._finish_case

    def disk_full_on_case_3(job, out, *args):
        if out.n == 3:
            raise InputError("no space left on device", job.stage / "x")
        return original(job, out, *args)

    monkeypatch.setattr(pipeline, "_finish_case", disk_full_on_case_3)
    out = tmp_path / "run"
    with pytest.raises(InputError, match="no space left"):
        protect_dataset(ds2d, out, "noise", seed=2, batch_size=2, progress=False, io_threads=2)
    assert not out.exists() and (tmp_path / "run.partial").is_dir()  # nothing looks complete
    work = tmp_path / "run.umedkey.parts" / "cases"
    kept = sorted(p.name for p in work.glob("*.json"))
    assert "000003.json" not in kept and {"000000.json", "000001.json"} <= set(kept)  # perturbed cases are kept

    monkeypatch.setattr(pipeline, "_finish_case", original)
    redone: list[int] = []
    monkeypatch.setattr(pipeline, "_finish_case", lambda job, o, *a: redone.append(o.n) or original(job, o, *a))
    protect_dataset(ds2d, out, "noise", seed=2, batch_size=2, progress=False, io_threads=2, resume=True)
    assert 3 in redone and not set(redone) & {int(k[:6]) for k in kept}  # finished cases were not redone
    assert tree_digest(tmp_path / "ref") == tree_digest(out)
    a, b = key_members(Path(ref["key"])), key_members(tmp_path / "run.umedkey")
    assert a == b  # every member of the key, key.json included
    verify_key(out, tmp_path / "run.umedkey")
    back = restore_dataset(out, tmp_path / "run.umedkey", tmp_path / "back", progress=False)
    assert back["restored"] == 6
    for image in sorted((ds2d / "imagesTr").glob("*.png")):
        restored = codec_for(str(image)).read(str(tmp_path / "back" / "imagesTr" / image.name)).array
        assert np.array_equal(restored, codec_for(str(image)).read(str(image)).array)
