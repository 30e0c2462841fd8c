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

"""A bounded pool of I/O threads whose results are taken in the order the work was submitted.

The protection loop (:mod:`monai_umed.pipeline`) decodes the next batch and encodes, hashes and writes the previous
one on these threads while the perturbation runs on the calling thread. Decoders, PNG/zlib encoders, ``hashlib`` and
NumPy release the GIL on big buffers, so the work overlaps even though it is Python that drives it.

What makes the output independent of the threads: every task works on its own case and writes its own files; results
(and errors) are taken from :class:`OrderedWindow` in submission order, so a failing case is reported as in a
sequential run; and on any exit the queued tasks are cancelled and the running ones waited for, so nothing is written
after the loop has returned or raised. ``threads=0`` runs each task at once in the calling thread: the sequential
reference that a threaded run matches byte for byte.

Example::

    with IOPool(2) as pool:
        window = OrderedWindow()
        for item in items:
            window.append(pool.submit(work, item))
            for result in window.pop_ready(keep=4):  # at most 4 tasks left behind
                ...
        for result in window.pop_ready(keep=0):
            ...
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

__all__ = ["IOPool", "OrderedWindow", "default_io_threads"]


def default_io_threads() -> int:
    """I/O threads when none are asked for: one per core this process may use, at most 4 (the thread that perturbs
    mostly waits for its accelerator or its own intra-op threads, and a cheap perturbation leaves it idle)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


class IOPool:
    """A thread pool for decode/encode/write tasks that never outlives its ``with`` block.

    Args:
        threads: worker threads; 0 runs every task in the calling thread when it is submitted (its exception, if
            any, is kept in the returned future, as a worker's would be).

    Raises:
        ValueError: a negative thread count.
    """

    def __init__(self, threads: int) -> None:
        if threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        self.threads = int(threads)
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="monai-umed-io") if self.threads else None

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on a worker (or at once, with no threads); returns its future."""
        if self._executor is not None:
            return self._executor.submit(fn, *args, **kwargs)
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - kept for .result(), as a worker thread would; interrupts propagate
            future.set_exception(e)
        return future

    def close(self) -> None:
        """Cancel the tasks not yet started and wait for the running ones (each finishes its case or fails)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> "IOPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class OrderedWindow:
    """Futures in submission order; results are taken oldest first, so errors surface in that order too."""

    def __init__(self) -> None:
        self._futures: deque[Future] = deque()

    def __len__(self) -> int:
        return len(self._futures)

    def append(self, future: Future) -> None:
        self._futures.append(future)

    def pop_ready(self, keep: int) -> Iterator[Any]:
        """Results of the oldest futures: every finished one at the front, and more (waiting for them) until at
        most ``keep`` are left.

        Raises:
            Exception: the exception of the first future (in submission order) that failed.
        """
        while self._futures and (len(self._futures) > keep or self._futures[0].done()):
            yield self._futures.popleft().result()
