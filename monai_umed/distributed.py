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

"""Running a job on several processes or machines with ``torchrun`` (DESIGN.md, "Scale-out").

``torchrun --nproc_per_node N -m monai_umed protect ...`` starts N copies of the command with ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`init_process_group` turns them into a
``torch.distributed`` process group (gloo on CPU, NCCL on CUDA, one GPU per local rank). Outside ``torchrun``
every helper here degrades to the one-process answer (rank 0 of 1), so code written with them runs unchanged in
both settings.

Helpers for fitting (used by protectors whose ``fit`` trains with ``DistributedDataParallel``; such a protector
sets the class attribute ``distributed_fit = True``, see :func:`supports_distributed_fit`):
:func:`wrap_ddp`, :func:`unwrap`, :func:`distributed_sampler`, :func:`shard`, :func:`barrier`,
:func:`broadcast_object`, :func:`all_gather_object`.

Failure handling (used by :func:`monai_umed.pipeline.protect_dataset`): the job runs in phases. :func:`stage`
wraps a phase; a rank that fails in it writes ``abort-rank<r>.json`` into the job's shared work folder (so the
other ranks stop after their current batch, :func:`check_abort`) and every rank then exchanges its status in one
collective, so that *every* rank ends the phase with an error naming the rank that failed and its cause, instead
of hanging. Ranks that wait for rank 0 alone (fitting, finalising) poll the work folder with :func:`wait_for`,
which has no time limit of its own: ``torchrun`` stops the whole job when a process dies. Collectives time out
after ``MONAI_UMED_DIST_TIMEOUT`` seconds (default 1800).

Several machines need the output and key folders on a filesystem that every machine sees at the same path.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import json
import os
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from monai_umed.errors import InputError

__all__ = [
    "RankFailedError",
    "launched",
    "init_process_group",
    "is_distributed",
    "rank",
    "world_size",
    "local_rank",
    "is_main",
    "barrier",
    "broadcast_object",
    "all_gather_object",
    "shard",
    "distributed_sampler",
    "wrap_ddp",
    "unwrap",
    "supports_distributed_fit",
    "stage",
    "check_abort",
    "clear_abort",
    "wait_for",
    "TIMEOUT_ENV",
]

T = TypeVar("T")

TIMEOUT_ENV = "MONAI_UMED_DIST_TIMEOUT"
_ABORT_GLOB = "abort-rank*.json"


class RankFailedError(InputError):
    """Another rank of a ``torchrun`` job failed, so this rank stops too.

    The message names the failing rank, the phase and the cause on one line (the failing rank itself reports its
    own error). It derives from :class:`~monai_umed.errors.InputError` so that the command line prints it as one
    line and exits with code 2.
    """

    def __init__(self, failed_rank: int, world: int, phase: str, cause: str, hint: str = "") -> None:
        self.failed_rank, self.world, self.phase, self.cause = failed_rank, world, phase, cause
        who = f"rank {failed_rank} of {world} failed" if failed_rank >= 0 else f"the job of {world} processes stopped"
        super().__init__(f"{who} while {phase}: {cause}" + (f"; {hint}" if hint else ""))


# -- process group ---------------------------------------------------------------------------------------------------
def launched() -> bool:
    """True when the environment describes a job of more than one process (``torchrun`` sets ``WORLD_SIZE``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def _timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        seconds = float(raw)
    except ValueError as e:
        raise InputError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from e
    if seconds <= 0:
        raise InputError(f"{TIMEOUT_ENV} must be positive, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def init_process_group(device: str | torch.device | None = "auto") -> bool:
    """Join the ``torchrun`` job described by the environment, once.

    The backend is NCCL when ``device`` resolves to CUDA (each process then uses GPU ``LOCAL_RANK``), gloo
    otherwise. Nothing happens outside ``torchrun`` (``WORLD_SIZE`` unset or 1) or when a process group already
    exists (a caller that set one up itself keeps it).

    Args:
        device: ``auto`` | ``cpu`` | ``cuda``, as given to the protector.

    Returns:
        True when this call created the process group (it is destroyed at interpreter exit).

    Raises:
        InputError: ``torchrun`` variables are incomplete, or ``torch.distributed`` is unavailable.
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise InputError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise InputError(f"WORLD_SIZE > 1 but {', '.join(missing)} is not set: start the job with torchrun")
    from monai_umed.protectors.base import resolve_device

    cuda = resolve_device(device).type == "cuda"
    backend = "nccl" if cuda and dist.is_nccl_available() else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank())
    # torch.distributed.nn takes ``group.WORLD`` as the default argument of its functions, evaluated when it is
    # first imported, and DistributedDataParallel imports it (through torch._dynamo) at its first construction.
    # Imported after the group exists, it would hold the group until the process ends, so that _destroy could not
    # free it; imported now, its defaults are None.
    import torch.distributed.nn  # noqa: F401

    dist.init_process_group(backend=backend, timeout=_timeout())
    atexit.register(_destroy)
    return True


def _destroy() -> None:
    """Destroy the process group at interpreter exit, and with it the backend's threads, while Python still runs.

    gloo runs every collective on a worker thread, which may let go of a finished collective (and of its tensors)
    only after the caller waiting for it has moved on. A tensor that Python dropped first is then freed by that
    thread, which must take the GIL: if it gets the GIL only once the interpreter has begun to finalise, Python ends
    the thread with ``pthread_exit``, whose unwinding through a C++ destructor calls ``std::terminate``, and a rank
    that has done all its work aborts ("terminate called without an active exception", exit code -6) instead of
    exiting 0. Only freeing the backend joins those threads, and ``destroy_process_group`` frees it only when nothing
    else holds the group: hence the early import in :func:`init_process_group`, and the collection here of the
    reference cycles that may still hold it (a ``DistributedDataParallel`` wrapper no longer used).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    me, group = rank(), weakref.ref(dist.group.WORLD)
    dist.destroy_process_group()
    gc.collect()
    if group() is not None:  # its threads outlive this handler: say why, should the exit abort
        warnings.warn(f"rank {me}: the torch.distributed process group is still referenced after "
                      "destroy_process_group() (a DistributedDataParallel model kept alive?); its worker threads may "
                      "abort the interpreter's exit", RuntimeWarning, stacklevel=1)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes in the job (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """Rank on this machine (``LOCAL_RANK``, 0 when unset): the GPU index this process uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0, the process that prints, fits alone and finalises."""
    return rank() == 0


# -- collectives (no-ops in one process) ------------------------------------------------------------------------------
def barrier() -> None:
    """Wait until every rank gets here (subject to the process group timeout)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (any picklable object)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# -- fitting helpers --------------------------------------------------------------------------------------------------
def shard(items: Sequence[T], pad: bool = False) -> list[T]:
    """This rank's share ``items[rank::world]`` of a list every rank holds in the same order.

    Args:
        items: the full list.
        pad: repeat items from the start so every rank gets the same number (``ceil(len / world)``), as
            ``DistributedSampler`` does; needed when every rank must run the same number of DDP steps.

    Returns:
        This rank's items (the whole list in one process).
    """
    items = list(items)
    world = world_size()
    if pad and items and len(items) % world:
        items = items + items[: world - len(items) % world]
    return items[rank()::world]


def distributed_sampler(
    dataset: Any, shuffle: bool = True, seed: int = 0, drop_last: bool = False
) -> torch.utils.data.DistributedSampler:
    """A ``DistributedSampler`` over ``dataset`` for this rank (1 replica, rank 0, outside a process group).

    Call ``sampler.set_epoch(epoch)`` at every epoch so that the shuffle changes; every rank must use the same
    ``seed``. Each rank sees ``ceil(len(dataset) / world)`` samples per epoch, so with a per-rank batch size ``b``
    the effective batch of a DDP step is ``b * world`` and an epoch has ``world`` times fewer steps.
    """
    return torch.utils.data.DistributedSampler(
        dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=int(seed), drop_last=drop_last
    )


def wrap_ddp(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` inside a process group, ``model`` itself otherwise.

    The model must already be on its device (``device_ids`` is set to the current GPU for CUDA models). DDP
    broadcasts rank 0's parameters at construction, so every rank starts from the same weights, and averages
    gradients in ``backward``. Extra keyword arguments (``find_unused_parameters``, ...) go to DDP.
    """
    if not is_distributed():
        return model
    if any(p.requires_grad for p in model.parameters()):
        dev = next(model.parameters()).device
        if dev.type == "cuda":
            kwargs.setdefault("device_ids", [dev.index if dev.index is not None else torch.cuda.current_device()])
        return torch.nn.parallel.DistributedDataParallel(model, **kwargs)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (``model`` itself otherwise)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def supports_distributed_fit(protector: Any) -> bool:
    """True when ``protector.fit`` trains with DDP across ranks (class attribute ``distributed_fit = True``).

    Such a ``fit`` is called on every rank with the same samples; it wraps its networks with :func:`wrap_ddp`,
    draws its batches with :func:`distributed_sampler` (or :func:`shard` with ``pad=True``), writes its checkpoint
    on rank 0 only and reads it on every rank. Other fitted protectors are fitted by rank 0 alone while the other
    ranks wait; the pipeline then gives every rank rank 0's fitted state.
    """
    return bool(getattr(protector, "distributed_fit", False))


# -- failure handling -------------------------------------------------------------------------------------------------
def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"


def check_abort(folder: str | os.PathLike | None, phase: str, hint: str = "") -> None:
    """Raise :class:`RankFailedError` when another rank has reported a failure in ``folder``.

    Called between batches, so that the job stops soon after one rank fails (no-op in one process).
    """
    if folder is None or not is_distributed():
        return
    for f in sorted(Path(folder).glob(_ABORT_GLOB)):
        try:
            info = json.loads(f.read_text())
        except (OSError, ValueError):
            continue  # being written; the next check reads it
        if int(info.get("rank", -1)) != rank():
            raise RankFailedError(int(info["rank"]), world_size(), str(info.get("phase", phase)),
                                  str(info.get("error")), hint)


def clear_abort(folder: str | os.PathLike) -> None:
    """Remove failure reports left by an earlier, failed run (rank 0, before the other ranks look)."""
    for f in Path(folder).glob(_ABORT_GLOB):
        f.unlink(missing_ok=True)


def _report(folder: str | os.PathLike | None, phase: str, exc: BaseException) -> None:
    if folder is None or not Path(folder).is_dir():
        return
    path = Path(folder) / f"abort-rank{rank()}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps({"rank": rank(), "phase": phase, "error": _describe(exc)}))
        os.replace(tmp, path)
    except OSError as e:  # best effort: the status exchange still carries the error to the other ranks
        warnings.warn(f"rank {rank()}: could not write the abort report {path}: {e}", stacklevel=2)


def wait_for(
    condition: Callable[[], bool], folder: str | os.PathLike | None, phase: str, poll: float = 0.5, hint: str = ""
) -> None:
    """Wait (without a time limit) until ``condition()`` holds, while watching ``folder`` for failure reports.

    Used by ranks that wait for rank 0 to fit or finalise, which may take far longer than a collective's timeout.
    If rank 0 dies without a report, ``torchrun`` stops this process.

    Raises:
        RankFailedError: another rank reported a failure.
    """
    while not condition():
        check_abort(folder, phase, hint)
        time.sleep(poll)


@contextlib.contextmanager
def stage(phase: str, folder: str | os.PathLike | None = None, sync: bool = True, hint: str = "") -> Iterator[None]:
    """Run one phase of a job on every rank and fail on every rank when one rank fails.

    A rank whose body raises reports the error in ``folder`` (when given). With ``sync`` every rank then exchanges
    its status: a rank whose body succeeded raises :class:`RankFailedError` naming the first rank that failed and
    its cause; a failed rank re-raises its own exception. Without ``sync`` the report is all that happens; use it for
    a phase only rank 0 runs (the others learn of the failure through :func:`wait_for`) and for a phase whose body
    runs collectives of its own, such as a DDP fit: ranks left inside those collectives by a failed rank cannot take
    part in a status exchange, and ``torchrun`` stops them when the failed process exits. Outside a process group
    this is a no-op.

    Args:
        phase: what the phase does, for messages (``"protecting"``).
        folder: the job's shared work folder for failure reports, or None.
        sync: exchange statuses at the end (a collective: every rank must enter the same synchronised stages).
        hint: appended to the message of :class:`RankFailedError` (what to do next).

    Raises:
        RankFailedError: another rank failed in this phase, or contact with another rank was lost.
    """
    if not is_distributed():
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except KeyboardInterrupt:
        raise  # every rank receives the interrupt; a status exchange could wait for ranks already gone
    except Exception as e:  # noqa: BLE001 - reported to the other ranks, then re-raised
        error = e
        if not isinstance(e, RankFailedError):
            _report(folder, phase, e)
    if sync:
        mine: dict[str, Any] | None = None
        if isinstance(error, RankFailedError):  # learnt from elsewhere: pass the root cause on
            mine = {"rank": error.failed_rank, "phase": error.phase, "error": error.cause, "secondary": True}
        elif error is not None:
            mine = {"rank": rank(), "phase": phase, "error": _describe(error), "secondary": False}
        try:
            statuses = all_gather_object(mine)
        except Exception as e:  # noqa: BLE001 - a rank died or hung past the timeout
            if error is not None:
                raise error from None
            raise RankFailedError(-1, world_size(), phase, f"lost contact with another rank ({type(e).__name__}: {e})",
                                  hint) from e
        failures = [s for s in statuses if s is not None]
        if error is None and failures:
            first = next((s for s in failures if not s["secondary"]), failures[0])
            raise RankFailedError(first["rank"], world_size(), first["phase"], first["error"], hint)
    if error is not None:
        raise error
