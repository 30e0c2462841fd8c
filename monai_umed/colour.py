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

"""The colour direction a dataset's images vary least along.

Natural (and endoscopic, dermoscopic) colour images spend almost all their variance along a brightness-like
direction; the smallest principal component of the pixels' channel covariance is about 20 dB emptier at every
spatial frequency on Kvasir-SEG (docs/methods.md, twelfth session). A perturbation laid along it stands out to a
network at the same PSNR, so it is chosen from the training images by this rule rather than by a parameter.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

__all__ = ["quiet_colour"]


def quiet_colour(images: Iterable[Any], stride: int = 4) -> np.ndarray:
    """The colour direction images vary least along: the unit eigenvector of the smallest eigenvalue of the
    pixels' channel covariance (sign fixed so that its largest component is positive), scaled to a mean square of 1
    per channel; ``[1]`` for single-channel images.

    Moments are streamed, so only one image is in memory at a time, and accumulated in float64 in a fixed order,
    so the direction is deterministic for the same images.

    Args:
        images: channel-first images (numpy arrays or tensors), 2D or 3D.
        stride: every ``stride``-th pixel per spatial axis is used.

    Raises:
        ValueError: no images, or images with different channel counts.
    """
    count, total, outer, channels = 0, 0.0, 0.0, None
    for x in images:
        a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        if channels is not None and a.shape[0] != channels:
            raise ValueError(f"quiet_colour: images with {channels} and {a.shape[0]} channels")
        channels = a.shape[0]
        if channels == 1:
            return np.ones(1)
        px = a[(slice(None),) + (slice(None, None, int(stride)),) * (a.ndim - 1)]
        px = px.reshape(channels, -1).astype(np.float64)
        count, total, outer = count + px.shape[1], total + px.sum(1), outer + px @ px.T
    if channels is None or count == 0:
        raise ValueError("quiet_colour: no images")
    mean = total / count
    v = np.linalg.eigh(outer / count - np.outer(mean, mean))[1][:, 0]
    v = v if v[np.argmax(np.abs(v))] > 0 else -v
    return v * np.sqrt(v.size)
