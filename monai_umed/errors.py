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

"""Errors that reach the user as one line (a key check: one line per problem, then the summary) and exit code 2."""

from __future__ import annotations

from typing import Sequence

__all__ = ["InputError", "KeyMismatchError", "KeyDamagedError"]


class InputError(ValueError):
    """Bad user input (missing/corrupt file, shape mismatch, bad option, ...).

    The message names the file and the cause; the command line prints it on one line and exits with code 2.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class KeyMismatchError(InputError):
    """A restoration key that does not belong to the protected dataset it is applied to.

    Args:
        message: what is wrong, on one line.
        path: the key file.
        problems: one line per mismatching (or damaged) case or part of the key, each naming it (``path: `` is
            put in front of each); the command line prints each on its own line before ``message``.
    """

    def __init__(self, message: str, path: str | None = None, problems: Sequence[str] = ()) -> None:
        super().__init__(message, path)
        self.problems = [f"{self.path}: {p}" if self.path else p for p in problems]


class KeyDamagedError(KeyMismatchError):
    """A restoration key with a damaged part: a member that fails its checksum or cannot be read.

    ``problems`` names each damaged case (its delta) or part (``key.json``, ``protector.pt``).
    """
