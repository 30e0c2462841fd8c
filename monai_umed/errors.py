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

"""Errors that reach the user as one line and exit code 2."""

from __future__ import annotations

__all__ = ["InputError", "KeyMismatchError"]


class InputError(ValueError):
    """Bad user input (missing/corrupt file, shape mismatch, bad option, ...).

    The message names the file and the cause; the command line prints it on one line and exits with code 2.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class KeyMismatchError(InputError):
    """A restoration key that does not belong to the protected dataset it is applied to."""
