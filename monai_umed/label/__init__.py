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

"""MONAI Label app: protect what annotators labelled, from the MONAI Label server (extra ``monai-umed[label]``).

This folder is a MONAI Label app (``main.py`` holds :class:`~monai_umed.label.main.MONAIUmedApp`);
``python -m monai_umed.label APP_DIR`` writes an app folder that uses it, so the server's own files
(``model/``, ``logs/``) stay out of the installed package. Importing this package needs no MONAI Label;
its modules ``main``, ``infer``, ``endpoints`` and ``server`` do.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["APP_DIR", "write_app"]

#: the packaged app folder (``--app`` may point here directly)
APP_DIR = Path(__file__).resolve().parent

_MAIN = '''"""MONAI Label app folder for monai-umed (written by `python -m monai_umed.label`)."""

from monai_umed.label.main import MONAIUmedApp  # noqa: F401  (MONAI Label looks up the MONAILabelApp subclass)
'''


def write_app(app_dir: str | os.PathLike) -> Path:
    """Create an app folder for ``monailabel start_server --app`` whose ``main.py`` imports the monai-umed app.

    Args:
        app_dir: folder to create (may exist; an existing ``main.py`` that is not ours is left alone).

    Returns:
        The ``main.py`` path.

    Raises:
        FileExistsError: ``app_dir/main.py`` exists with other content.
    """
    main = Path(app_dir) / "main.py"
    if main.exists() and main.read_text() != _MAIN:
        raise FileExistsError(f"{main} exists and is not a monai-umed app; choose another folder")
    main.parent.mkdir(parents=True, exist_ok=True)
    main.write_text(_MAIN)
    return main
