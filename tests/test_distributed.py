# Copyright (c) monai-umed contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""torchrun: sharded protection, one fit for every rank, DDP fitting, failures and resume.

The multi-process tests start ``python -m torch.distributed.run --nproc_per_node 2`` on loopback (gloo, CPU) and
compare with a one-process run of the same job. Run as a script under torchrun, this file is the worker of
:func:`test_ddp_fit_and_fit_failure` (see ``_worker``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
import torch

from monai_umed import distributed, protectors
from monai_umed.data.datalist import load_dataset
from monai_umed.data.formats import codec_for
from monai_umed.data.synthetic import make_demo_dataset
from monai_umed.errors import InputError
from monai_umed.intensity import quantise
from monai_umed.key import read_protector_state, restore_dataset, verify_key
from monai_umed.pipeline import load_case, protect_dataset
from monai_umed.protectors.base import Protector

REPO = Path(__file__).resolve().parents[1]
UMED_TINY = {"channels": [4, 8, 8], "surrogate_channels": [4, 8, 8], "patch_size": 24, "batch_size": 4}


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def decoded(path: Path) -> np.ndarray:
    return codec_for(str(path)).read(str(path)).array


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(args: Sequence[Any], cwd: Path, console: bool = False, timeout: float = 300
             ) -> subprocess.CompletedProcess:
    """Run ``monai-umed ARGS`` (or a script) on 2 processes with torchrun on loopback."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    script = Path(sys.executable).parent / "monai-umed"
    if console and script.is_file():
        target = ["--no-python", str(script)]  # the console script
    elif args and str(args[0]).endswith(".py"):
        target = []
    else:
        target = ["-m", "monai_umed"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", distributed.TIMEOUT_ENV: "120"}
    return subprocess.run([*launcher, *target, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_exact_restore(data: Path, out: Path, key: Path, dest: Path) -> None:
    verify_key(out, key)
    restore_dataset(out, key, dest, progress=False)
    for case in load_dataset(data).cases:
        a, b = decoded(data / case.image), decoded(dest / case.image)
        assert a.dtype == b.dtype and np.array_equal(a, b), case.case_id


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """2D RGB PNG: 5 training cases (an odd number: unequal shards) and 2 test cases."""
    return make_demo_dataset(tmp_path / "ds", spatial_dims=2, n_train=5, n_test=2, size=24, rgb=True)


# -- one process: the helpers degrade to rank 0 of 1 -----------------------------------------------------------------
def test_helpers_in_one_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched() and not distributed.init_process_group("cpu")
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert not distributed.is_distributed()
    assert distributed.shard([3, 1, 2]) == [3, 1, 2] and distributed.shard([1, 2, 3], pad=True) == [1, 2, 3]
    sampler = distributed.distributed_sampler(list(range(5)), shuffle=True, seed=3)
    sampler.set_epoch(1)
    assert sorted(sampler) == [0, 1, 2, 3, 4]
    net = torch.nn.Linear(2, 2)
    assert distributed.wrap_ddp(net) is net and distributed.unwrap(net) is net
    obj = {"a": 1}
    assert distributed.broadcast_object(obj) is obj and distributed.all_gather_object(obj) == [obj]
    distributed.barrier()
    with pytest.raises(ValueError, match="inner"), distributed.stage("testing", tmp_path):
        raise ValueError("inner")
    assert not list(tmp_path.glob("abort-*"))  # nothing to report to in one process
    distributed.check_abort(tmp_path, "testing")
    err = distributed.RankFailedError(1, 2, "protecting", "x.png: unreadable", "rerun with --resume")
    assert isinstance(err, InputError)
    assert str(err) == "rank 1 of 2 failed while protecting: x.png: unreadable; rerun with --resume"
    assert not distributed.supports_distributed_fit(protectors.get("noise"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert distributed.launched()
    with pytest.raises(InputError, match="start the job with torchrun"):
        distributed.init_process_group("cpu")


# -- two processes ----------------------------------------------------------------------------------------------
def test_noise_two_processes_match_one_byte_for_byte(data: Path, tmp_path: Path) -> None:
    one = Path(protect_dataset(data, tmp_path / "one", "noise", split="training", batch_size=2,
                               progress=False)["output"])
    r = torchrun(["protect", data, tmp_path / "two", "--method", "noise", "--split", "training", "--batch-size", "2",
                  "--quiet"], tmp_path)
    assert r.returncode == 0, r.stderr
    two = tmp_path / "two"
    assert tree_digest(two) == tree_digest(one)  # images, labels, copied test cases, dataset.json, manifest.json
    assert not (tmp_path / "two.partial").exists() and not (tmp_path / "two.umedkey.parts").exists()
    assert "protected 5 of 7 images with noise" in r.stdout
    assert_exact_restore(data, two, tmp_path / "two.umedkey", tmp_path / "restored")


def test_rank_failure_stops_job_and_resume_completes(data: Path, tmp_path: Path) -> None:
    one = Path(protect_dataset(data, tmp_path / "one", "noise", split="training", batch_size=1,
                               progress=False)["output"])
    # with one case per batch, rank 1 protects cases 1 and 3 of the five: case 3 is unreadable
    bad = data / "imagesTr" / "case_tr003.png"
    good = bad.read_bytes()
    bad.write_bytes(b"not an image")
    args = ["protect", data, tmp_path / "two", "--method", "noise", "--split", "training", "--batch-size", "1",
            "--quiet"]
    r = torchrun(args, tmp_path)
    assert r.returncode != 0
    assert f"rank 1 of 2 failed while protecting: {bad}: unreadable or corrupt image" in r.stderr, r.stderr
    assert "rerun with --resume" in r.stderr
    stage, work = tmp_path / "two.partial", tmp_path / "two.umedkey.parts"
    assert not (tmp_path / "two").exists() and not (tmp_path / "two.umedkey").exists()
    assert stage.is_dir() and not (stage / "manifest.json").exists() and not (stage / "dataset.json").exists()
    done = {int(f.stem) for f in (work / "cases").glob("*.json")}
    assert 1 in done and 3 not in done  # rank 1's first case is kept, its failed case is not
    bad.write_bytes(good)
    r = torchrun([*args, "--resume"], tmp_path, console=True)  # the console script under torchrun
    assert r.returncode == 0, r.stderr
    assert tree_digest(tmp_path / "two") == tree_digest(one)
    assert not stage.exists() and not work.exists()
    assert_exact_restore(data, tmp_path / "two", tmp_path / "two.umedkey", tmp_path / "restored")


def test_umed_two_processes(data: Path, tmp_path: Path) -> None:
    if "umed" not in protectors.names():
        pytest.skip("the umed protector is not registered in this checkout")
    one = protect_dataset(data, tmp_path / "one", "umed", epochs=1, params=UMED_TINY, split="training", progress=False)
    params = [a for k, v in UMED_TINY.items() for a in ("--param", f"{k}={json.dumps(v)}")]
    r = torchrun(["protect", data, tmp_path / "two", "--method", "umed", "--epochs", "1", *params,
                  "--split", "training", "--quiet"], tmp_path)
    assert r.returncode == 0, r.stderr
    two, key = tmp_path / "two", tmp_path / "two.umedkey"
    m1 = json.loads((Path(one["output"]) / "manifest.json").read_text())
    m2 = json.loads((two / "manifest.json").read_text())
    assert [(c["case_id"], c["protected"], c.get("source_sha256")) for c in m2["cases"]] == [
        (c["case_id"], c["protected"], c.get("source_sha256")) for c in m1["cases"]]
    assert m2["summary"]["method"] == "umed" and m2["summary"]["params"] == m1["summary"]["params"]
    assert m2["summary"]["protected"] == 5 and all(np.isfinite(c["psnr"]) for c in m2["cases"] if c["protected"])
    assert_exact_restore(data, two, key, tmp_path / "restored")
    # every rank protected with the one fitted state stored in the key: recompute each case from it
    state = torch.load(io.BytesIO(read_protector_state(key)), map_location="cpu", weights_only=False)
    p = protectors.get("umed", epochs=1, **UMED_TINY).load_state_dict(state)
    spec = load_dataset(data)
    for case in [c for c in m2["cases"] if c["protected"]]:
        lc = load_case(spec, next(c for c in spec.cases if c.case_id == case["case_id"]))
        delta = p.perturbation(lc.tensor, lc.label, lc.case.case_id)
        expected, _ = quantise(lc.image.array, delta.numpy(), lc.mapping, p.epsilon, source=lc.paths[0])
        assert np.array_equal(expected, decoded(two / case["output"][0])), case["case_id"]


# -- DDP fitting (the worker runs under torchrun) ---------------------------------------------------------------
class _Shift(torch.nn.Module):
    """One learnable offset per class, ``delta = eps * tanh(w[label])``."""

    def __init__(self, epsilon: float) -> None:
        super().__init__()
        self.epsilon = epsilon
        self.w = torch.nn.Parameter(torch.zeros(2))

    def forward(self, label: torch.Tensor) -> torch.Tensor:
        return self.epsilon * torch.tanh(self.w[(label > 0).long()])


class ShiftProtector(Protector):
    """A fitted protector whose ``fit`` trains with DDP and a DistributedSampler: per-class offsets that pull each
    class's mean intensity towards 0.5 (a real, tiny optimisation that exercises the distributed helpers)."""

    name = "shift"
    fits = True
    distributed_fit = True

    def __init__(self, fail_fit: bool = False, record: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail_fit, self.record = fail_fit, record
        self.distributed_fit = not fail_fit  # the failing variant is fitted by rank 0 alone
        self.net = _Shift(self.epsilon)

    def fit(self, samples: Sequence[dict[str, Any]], *, progress: bool = True,
            checkpoint: Any = None) -> "ShiftProtector":
        if self.fail_fit:
            raise RuntimeError("boom in fit")
        self._set_spatial_dims(samples[0]["image"])
        model = distributed.wrap_ddp(self.net)
        opt = torch.optim.SGD(model.parameters(), lr=5.0)
        sampler = distributed.distributed_sampler(samples, shuffle=True, seed=self.seed)
        seen: list[str] = []
        for epoch in range(self.epochs or 3):
            sampler.set_epoch(epoch)
            for i in sampler:
                x, y = samples[i]["image"][None], samples[i]["label"][None]
                loss = ((x + model(y) - 0.5) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                seen.append(samples[i]["case_id"])
        if self.record:
            Path(self.record, f"fit-rank{distributed.rank()}.json").write_text(
                json.dumps({"w": self.net.w.tolist(), "seen": seen}))
        self.fitted = True
        return self

    def perturbation(self, image: torch.Tensor, label: torch.Tensor | None = None,
                     case_id: str | None = None) -> torch.Tensor:
        self._check_inputs(image, label)
        with torch.no_grad():
            return self.net(label.cpu()).to(torch.float32).expand_as(image).clone()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "w": self.net.w.detach().clone()}

    def load_state_dict(self, state: Any) -> "ShiftProtector":
        super().load_state_dict(state)
        with torch.no_grad():
            self.net.w.copy_(state["w"])
        return self


def _worker(data: Path, folder: Path) -> None:
    """Under torchrun: (a) a fit that fails on rank 0 while rank 1 waits, (b) a DDP fit, then protection."""
    r = int(os.environ["RANK"])
    try:
        protect_dataset(data, folder / "failed", protector=ShiftProtector(fail_fit=True), progress=False)
    except Exception as e:  # noqa: BLE001 - each rank records what it saw
        (folder / f"fail-rank{r}.txt").write_text(f"{type(e).__name__}: {e}")
    p = ShiftProtector(epochs=3, record=str(folder), seed=7)
    s = protect_dataset(data, folder / "ddp", protector=p, split="training", progress=False)
    (folder / f"summary-rank{r}.json").write_text(json.dumps(s, default=str))
    (folder / f"used-rank{r}.json").write_text(json.dumps(p.net.w.tolist()))


def test_ddp_fit_and_fit_failure(data: Path, tmp_path: Path) -> None:
    r = torchrun([Path(__file__), data, tmp_path], tmp_path)
    assert r.returncode == 0, r.stderr
    # after the DDP fit the process group is still freed at exit, joining gloo's threads before Python finalises
    assert "still referenced after destroy_process_group" not in r.stderr, r.stderr
    # (a) rank 0 failed in fit; rank 1, waiting for the fitted state, stopped with an error naming rank 0
    assert (tmp_path / "fail-rank0.txt").read_text() == "RuntimeError: boom in fit"
    msg = (tmp_path / "fail-rank1.txt").read_text()
    assert msg.startswith("RankFailedError: rank 0 of 2 failed while fitting: RuntimeError: boom in fit"), msg
    assert not (tmp_path / "failed").exists() and (tmp_path / "failed.umedkey.parts").is_dir()
    # (b) DDP: each rank saw its DistributedSampler share (3 of 5, padded) and ended with the same weights
    fits = [json.loads((tmp_path / f"fit-rank{k}.json").read_text()) for k in (0, 1)]
    assert fits[0]["w"] == fits[1]["w"] and fits[0]["w"] != [0.0, 0.0]
    assert [len(f["seen"]) for f in fits] == [9, 9]
    train_ids = {c.case_id for c in load_dataset(data).cases if c.split == "training"}
    assert {c for f in fits for c in f["seen"][:3]} == train_ids
    used = [json.loads((tmp_path / f"used-rank{k}.json").read_text()) for k in (0, 1)]
    assert used[0] == used[1] == fits[0]["w"]
    summaries = [json.loads((tmp_path / f"summary-rank{k}.json").read_text()) for k in (0, 1)]
    assert [s.pop("rank") for s in summaries] == [0, 1] and summaries[0] == summaries[1]
    assert summaries[0]["world_size"] == 2 and summaries[0]["protected"] == 5
    assert_exact_restore(data, tmp_path / "ddp", tmp_path / "ddp.umedkey", tmp_path / "restored")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
