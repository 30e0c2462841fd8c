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

"""MONAI Label's FastAPI app with the ``/umed`` endpoints, for ``--uvicorn_app monai_umed.label.server:app``.

``monailabel start_server`` serves ``monailabel.app:app`` by default; this module is that same app with the
monai-umed router included, so the endpoints exist from the first request (and are listed in ``/docs``).
"""

from __future__ import annotations

from monailabel.app import app

from monai_umed.label.endpoints import mount

__all__ = ["app"]

mount(app)
