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

"""MONAI Label infer task ``protect`` (type "others"): the protected version of one study's image.

``POST /infer/protect?image=<study id>&output=image`` returns the image a release would hold for that study,
in the study's own format, with its saved label (``final``, else ``original``) as the ROI. Options come from the
server's ``--conf`` and, per request, from the ``params`` form field (``{"method": "noise", "epsilon": "4/255"}``).
The result is an *image*, never saved as a label.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple, Union

from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from monai_umed.errors import InputError
from monai_umed.label.service import ProtectionService

__all__ = ["ProtectInfer"]


class ProtectInfer(InferTask):
    """Protect one study for viewing in the client.

    Args:
        service: the app's :class:`~monai_umed.label.service.ProtectionService`.
        dimension: spatial dimensions shown to clients (the task itself handles 2D and 3D images).
    """

    def __init__(self, service: ProtectionService, dimension: int = 3) -> None:
        d = service.defaults
        super().__init__(
            type=InferType.OTHERS,
            labels=None,
            dimension=dimension,
            description="Protected version of the study's image (unlearnable example; monai-umed), with its saved "
            "label as the ROI",
            config={
                "method": d.method or "noise", "epsilon": d.epsilon, "epochs": d.epochs, "seed": d.seed,
                "params": dict(d.params), "label_tag": d.label_tag, "intensity": d.intensity,
            },
        )
        self.service = service

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: Dict[str, Any]) -> Tuple[Union[str, None], Dict[str, Any]]:
        """Run on a request prepared by :meth:`monailabel.interfaces.app.MONAILabelApp.infer`.

        ``request["image"]`` is the image file, ``request["image_id"]`` the study id (set by the app), and
        ``request["label"]`` an uploaded label file when the client sent one.

        Returns:
            ``(protected image file, details)``.

        Raises:
            MONAILabelException: invalid input (no saved label, bad option, unreadable file), with the reason.
        """
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, "protect needs an image (a study id or a file)")
        label = request.get("label") if isinstance(request.get("label"), str) else None
        try:
            return self.service.protect_study(image, request.get("image_id"), label, request)
        except (InputError, ValueError) as e:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, str(e)) from e
