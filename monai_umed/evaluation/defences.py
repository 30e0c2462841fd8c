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

"""Defences an unauthorised trainer may apply to the training images (METHODS.md section 4, item 5).

A defence is selected by name, optionally with parameters: ``"jpeg"``, ``"jpeg:quality=50"``,
``"gaussian_blur:sigma=0.5"``, ``"adv_train:eps=4/255,steps=5"``. It acts on the victim's training pipeline:

============== ======================================================================== =========== ==========
name           what the trainer does                                                     defaults    at test
============== ======================================================================== =========== ==========
none           nothing (the default row)
gaussian_blur  Gaussian smoothing of the native image (MONAI ``GaussianSmooth``)          sigma=1.0   no
median         median filter, window ``2 * radius + 1`` (MONAI ``MedianSmooth``)          radius=1    no
jpeg           JPEG re-encoding (Pillow), 2D images with 1 or 3 channels only             quality=75  no
grayscale      RGB -> luminance (ITU-R 601), replicated to 3 channels, RGB only                      yes
strong_aug     elastic deformation, intensity scale/shift jitter and gamma, per sample    see below   no
adv_train      L-inf PGD adversarial training in the victim's input space                 eps=eps/2   no
bit_depth      intensities re-quantised to ``2 ** bits`` levels over the image's range    bits=4      no
nnunet         nnU-Net v2's default augmentation (:mod:`~monai_umed.evaluation.nnunet_aug`) see there   no
nnunet_spatial its spatial part only (rotation, scaling, elastic)                        see there   no
nnunet_intens. ``nnunet_intensity``: its intensity and resolution part only              see there   no
pattern_subt.  ``pattern_subtract``: an attacker who estimates a pattern shared by the       grid=128    no
               training images and subtracts it first (:mod:`~monai_umed.evaluation.adaptive`)
============== ======================================================================== =========== ==========

Deterministic defences (blur, median, JPEG, grayscale) transform the *native* image right after it is read, so
their result is cached once per case. ``at_test`` says whether the same filter is also applied to the clean test
images before inference: by default only for ``grayscale`` (a network trained on gray images is deployed on gray
images); every default can be changed with ``at_test=1`` / ``at_test=0``. ``strong_aug`` adds random transforms
after intensity scaling (``elastic_prob=0.3``, ``jitter=0.1``, ``gamma=0.7-1.5`` as ``gamma_lo``/``gamma_hi``,
``prob=0.5``). ``adv_train`` is applied by the training loop (:mod:`monai_umed.evaluation.train`): each batch is
replaced by a PGD adversarial batch (``steps=3`` steps of ``alpha = 2.5 * eps / steps``), with ``eps`` stated in
normalised ``[0, 1]`` units (default: half the protection budget) and scaled by each sample's intensity range in
the victim's input space. The ``nnunet`` family are random transforms too, and ask for nnU-Net's z-score
normalisation (:attr:`Defence.intensity`); ``pattern_subtract`` works on the whole training list at once
(:attr:`Defence.dataset_level`), so the judge applies it before the victim's pipeline.

Example::

    d = get_defence("jpeg:quality=50", spatial_dims=2, channels=3)
    transforms = d.preprocess("image")  # [JpegCompressd(...)]
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type

from monai_umed.evaluation.adaptive import PATTERN_DEFAULTS, check_pattern_params
from monai_umed.evaluation.nnunet_aug import NNUNET_DEFAULTS, nnunet_augment
from monai_umed.intensity import parse_epsilon

__all__ = [
    "DEFENCES",
    "Defence",
    "get_defence",
    "pgd_attack",
    "JpegCompress",
    "JpegCompressd",
    "JpegCompressD",
    "JpegCompressDict",
    "Grayscale",
    "Grayscaled",
    "BitDepth",
    "BitDepthd",
    "GrayscaleD",
    "GrayscaleDict",
]

#: Names understood by :func:`get_defence`.
DEFENCES = ("none", "gaussian_blur", "median", "jpeg", "grayscale", "strong_aug", "adv_train", "bit_depth", "nnunet",
            "nnunet_spatial", "nnunet_intensity", "pattern_subtract")

#: Defences whose random transforms are nnU-Net's (:func:`~monai_umed.evaluation.nnunet_aug.nnunet_augment`).
_NNUNET_PART = {"nnunet": "all", "nnunet_spatial": "spatial", "nnunet_intensity": "intensity"}

_DEFAULTS: dict[str, dict[str, Any]] = {
    "none": {},
    "gaussian_blur": {"sigma": 1.0, "at_test": False},
    "median": {"radius": 1, "at_test": False},
    "jpeg": {"quality": 75, "at_test": False},
    "grayscale": {"at_test": True},
    "strong_aug": {"prob": 0.5, "elastic_prob": 0.3, "jitter": 0.1, "gamma_lo": 0.7, "gamma_hi": 1.5},
    "adv_train": {"eps": None, "steps": 3, "alpha": None},
    "bit_depth": {"bits": 4, "at_test": False},
    **{name: dict(NNUNET_DEFAULTS) for name in _NNUNET_PART},
    "pattern_subtract": dict(PATTERN_DEFAULTS),
}


class JpegCompress(Transform):
    """Re-encode a channel-first 2D image as JPEG and decode it again (a lossy "shortcut squeezing" defence).

    8-bit images are encoded as they are; other dtypes are mapped linearly from their min/max to 0..255, encoded,
    decoded and mapped back (so values are re-quantised to 256 levels). The dtype and shape are kept.

    Args:
        quality: JPEG quality, 1..95 (Pillow's scale).

    Raises:
        ValueError: a 3D image, or a channel count other than 1 or 3.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, quality: int = 75) -> None:
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must lie in 1..100, got {quality}")
        self.quality = int(quality)

    def __call__(self, img: Any) -> Any:
        from PIL import Image

        arr = np.asarray(img.detach().cpu() if isinstance(img, torch.Tensor) else img)
        if arr.ndim != 3:
            raise ValueError(f"the jpeg defence works on channel-first 2D images, got shape {arr.shape}")
        if arr.shape[0] not in (1, 3):
            raise ValueError(f"the jpeg defence needs 1 or 3 channels, got {arr.shape[0]}")
        if arr.dtype == np.uint8:
            u8, lo, scale = arr, 0.0, 1.0
        else:
            lo, hi = float(arr.min()), float(arr.max())
            scale = (hi - lo) / 255.0 if hi > lo else 1.0
            u8 = np.clip(np.rint((arr.astype(np.float64) - lo) / scale), 0, 255).astype(np.uint8)
        hwc = np.ascontiguousarray(np.moveaxis(u8, 0, -1))
        pil = Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc, mode="L" if hwc.shape[-1] == 1 else "RGB")
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=self.quality)
        buf.seek(0)
        dec = np.asarray(Image.open(buf).convert(pil.mode))
        dec = dec[..., None] if dec.ndim == 2 else dec
        out = np.moveaxis(dec, -1, 0)
        if arr.dtype != np.uint8:
            out = (out.astype(np.float64) * scale + lo).astype(arr.dtype)
        return convert_to_dst_type(out, img, dtype=arr.dtype)[0]


class Grayscale(Transform):
    """Replace an RGB image by its luminance ``0.299 R + 0.587 G + 0.114 B``, replicated to 3 channels.

    The channel count stays 3, so the victim keeps its input layer; integer images are rounded back to their dtype.

    Raises:
        ValueError: an image that does not have 3 channels.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]
    weights = (0.299, 0.587, 0.114)

    def __call__(self, img: Any) -> Any:
        t = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
        if t.shape[0] != 3:
            raise ValueError(f"the grayscale defence needs RGB (3-channel) images, got {t.shape[0]} channel(s)")
        w = torch.tensor(self.weights, dtype=torch.float64).reshape((3,) + (1,) * (t.ndim - 1))
        y = (t.double() * w).sum(0, keepdim=True).expand_as(t)
        if not t.dtype.is_floating_point:
            y = torch.round(y)
        y = y.to(t.dtype).contiguous()
        return convert_to_dst_type(y, img, dtype=y.dtype if isinstance(img, torch.Tensor) else np.asarray(img).dtype)[0]


class JpegCompressd(MapTransform):
    """Dictionary form of :class:`JpegCompress`.

    Args:
        keys: keys of the images to re-encode.
        quality: JPEG quality.
        allow_missing_keys: do not raise on missing keys.
    """

    backend = JpegCompress.backend

    def __init__(self, keys: KeysCollection, quality: int = 75, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.compress = JpegCompress(quality)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.compress(d[key])
        return d


class Grayscaled(MapTransform):
    """Dictionary form of :class:`Grayscale`.

    Args:
        keys: keys of the RGB images.
        allow_missing_keys: do not raise on missing keys.
    """

    backend = Grayscale.backend

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.gray = Grayscale()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.gray(d[key])
        return d


class BitDepth(Transform):
    """Re-quantise intensities to ``2 ** bits`` levels (bit-depth reduction, "feature squeezing", Xu et al. 2018).

    The image's range ``[min, max]`` is split into ``2 ** bits - 1`` equal steps and every value rounded to the
    nearest level; the result is float32 in the image's own range (8-bit data with ``bits=4`` keeps 16 grey levels).

    Args:
        bits: 1..16.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, bits: int = 4) -> None:
        if not 1 <= int(bits) <= 16:
            raise ValueError(f"bit_depth needs 1 <= bits <= 16, got {bits}")
        self.bits = int(bits)

    def __call__(self, img: Any) -> Any:
        x = torch.as_tensor(np.asarray(img.detach().cpu() if isinstance(img, torch.Tensor) else img),
                            dtype=torch.float32)
        lo, hi = x.min(), x.max()
        steps = 2 ** self.bits - 1
        scale = (hi - lo).clamp_min(1e-12) / steps
        out = torch.round((x - lo) / scale) * scale + lo
        return convert_to_dst_type(out, img, dtype=torch.float32)[0]


class BitDepthd(MapTransform):
    """Dictionary version of :class:`BitDepth`."""

    backend = BitDepth.backend

    def __init__(self, keys: KeysCollection, bits: int = 4, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.t = BitDepth(bits)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.t(d[key])
        return d


JpegCompressD = JpegCompressDict = JpegCompressd
GrayscaleD = GrayscaleDict = Grayscaled
BitDepthD = BitDepthDict = BitDepthd


def _parse_value(text: str) -> Any:
    t = text.strip()
    if t.lower() in ("true", "yes", "on"):
        return True
    if t.lower() in ("false", "no", "off"):
        return False
    if "/" in t:
        return parse_epsilon(t)
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError as e:
        raise ValueError(f"defence parameter value {text!r} is not a number") from e


@dataclass
class Defence:
    """A defence and its parameters (build it with :func:`get_defence`).

    Attributes:
        name: one of :data:`DEFENCES`.
        params: the complete parameters (defaults filled in).
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """A short row label such as ``jpeg(quality=50)``."""
        if self.name in _NNUNET_PART or self.dataset_level:  # many parameters: show what differs
            shown = {k: v for k, v in self.params.items() if v != _DEFAULTS[self.name].get(k)}
        else:
            shown = {k: v for k, v in self.params.items() if k != "at_test" or v != _DEFAULTS[self.name].get(k)}
        if not shown:
            return self.name
        text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        return f"{self.name}({text})"

    @property
    def at_test(self) -> bool:
        """Whether the deterministic filter is also applied to the test images before inference."""
        return bool(self.params.get("at_test", False))

    @property
    def adversarial(self) -> bool:
        return self.name == "adv_train"

    @property
    def dataset_level(self) -> bool:
        """Whether the defence needs the whole training list at once (applied by the judge before the pipeline)."""
        return self.name == "pattern_subtract"

    @property
    def intensity(self) -> str | None:
        """The victim's intensity scaling the defence's recipe expects (``intensity="auto"`` picks it), or None."""
        return "zscore" if self.name in _NNUNET_PART else None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params), "label": self.label}

    def preprocess(self, keys: KeysCollection = "image") -> list[Transform]:
        """Deterministic transforms applied to the native training images right after reading."""
        from monai.transforms import EnsureTyped, GaussianSmoothd, MedianSmoothd

        if self.name == "gaussian_blur":
            return [EnsureTyped(keys, dtype=torch.float32), GaussianSmoothd(keys, sigma=float(self.params["sigma"]))]
        if self.name == "median":
            return [EnsureTyped(keys, dtype=torch.float32), MedianSmoothd(keys, radius=int(self.params["radius"]))]
        if self.name == "jpeg":
            return [JpegCompressd(keys, quality=int(self.params["quality"]))]
        if self.name == "grayscale":
            return [Grayscaled(keys)]
        if self.name == "bit_depth":
            return [BitDepthd(keys, bits=int(self.params["bits"]))]
        return []

    def augment(self, spatial_dims: int, image_key: str = "image", label_key: str = "label") -> list[Transform]:
        """Random transforms added after intensity scaling (``strong_aug`` and the ``nnunet`` family)."""
        if self.name in _NNUNET_PART:
            return nnunet_augment(spatial_dims, _NNUNET_PART[self.name], image_key, label_key, **self.params)
        if self.name != "strong_aug":
            return []
        from monai.transforms import (
            Rand2DElasticd,
            Rand3DElasticd,
            RandAdjustContrastd,
            RandScaleIntensityd,
            RandShiftIntensityd,
        )

        p = self.params
        keys = [image_key, label_key]
        if spatial_dims == 2:
            elastic = Rand2DElasticd(keys, spacing=(16, 16), magnitude_range=(1, 2), prob=float(p["elastic_prob"]),
                                     mode=("bilinear", "nearest"), padding_mode="zeros")
        else:
            elastic = Rand3DElasticd(keys, sigma_range=(5, 7), magnitude_range=(50, 150),
                                     prob=float(p["elastic_prob"]), mode=("bilinear", "nearest"),
                                     padding_mode="zeros")
        return [
            elastic,
            RandScaleIntensityd(image_key, factors=float(p["jitter"]), prob=float(p["prob"])),
            RandShiftIntensityd(image_key, offsets=float(p["jitter"]), prob=float(p["prob"])),
            RandAdjustContrastd(image_key, gamma=(float(p["gamma_lo"]), float(p["gamma_hi"])), prob=float(p["prob"])),
        ]

    def check(self, spatial_dims: int, channels: int) -> None:
        """Raise ``ValueError`` when the defence cannot apply to images of this kind."""
        if self.name == "jpeg" and (spatial_dims != 2 or channels not in (1, 3)):
            raise ValueError(f"the jpeg defence needs 2D images with 1 or 3 channels (got {spatial_dims}D, "
                             f"{channels} channel(s))")
        if self.name == "grayscale" and channels != 3:
            raise ValueError(f"the grayscale defence needs RGB images (got {channels} channel(s))")


def get_defence(
    spec: str | Defence,
    epsilon: float = 8 / 255,
    spatial_dims: int | None = None,
    channels: int | None = None,
) -> Defence:
    """Build a :class:`Defence` from ``"name"`` or ``"name:key=value,key=value"``.

    Args:
        spec: the defence name with optional parameters, or a :class:`Defence` (returned checked).
        epsilon: the protection budget in normalised units (``adv_train`` defaults to ``epsilon / 2``).
        spatial_dims: when given with ``channels``, check the defence applies to such images.
        channels: image channels.

    Raises:
        ValueError: unknown name or parameter, a bad value, or a defence that does not apply to the data.
    """
    if isinstance(spec, Defence):
        d = spec
    else:
        name, _, rest = str(spec).strip().partition(":")
        name = name.strip().lower().replace("-", "_")
        if name not in _DEFAULTS:
            raise ValueError(f"unknown defence {name!r}; choose from {', '.join(DEFENCES)}")
        params = dict(_DEFAULTS[name])
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or key not in params:
                allowed = ", ".join(params) or "none"
                raise ValueError(f"bad parameter {item!r} for defence {name!r} (parameters: {allowed})")
            params[key] = _parse_value(value)
        if name == "adv_train":
            if params["eps"] is None:
                params["eps"] = float(epsilon) / 2
            params["eps"] = float(params["eps"])
            params["steps"] = int(params["steps"])
            if params["steps"] < 1 or not 0 < params["eps"] <= 1:
                raise ValueError(f"adv_train needs steps >= 1 and 0 < eps <= 1, got {params}")
            if params["alpha"] is None:
                params["alpha"] = 2.5 * params["eps"] / params["steps"]
            params["alpha"] = float(params["alpha"])
        if name == "gaussian_blur" and float(params["sigma"]) <= 0:
            raise ValueError(f"gaussian_blur needs sigma > 0, got {params['sigma']}")
        if name == "median" and int(params["radius"]) < 1:
            raise ValueError(f"median needs radius >= 1, got {params['radius']}")
        if name == "jpeg" and not 1 <= int(params["quality"]) <= 100:
            raise ValueError(f"jpeg needs 1 <= quality <= 100, got {params['quality']}")
        if name == "bit_depth" and not 1 <= int(params["bits"]) <= 16:
            raise ValueError(f"bit_depth needs 1 <= bits <= 16, got {params['bits']}")
        if name in _NNUNET_PART:
            nnunet_augment(2, _NNUNET_PART[name], **params)  # checks the values
        if name == "pattern_subtract":
            check_pattern_params(params)
        if "at_test" in params:
            params["at_test"] = bool(params["at_test"])
        d = Defence(name, params)
    if spatial_dims is not None and channels is not None:
        d.check(spatial_dims, channels)
    return d


def pgd_attack(
    model: torch.nn.Module,
    loss_fn: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    alpha: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L-inf PGD that *maximises* the training loss, for adversarial training (Madry et al., ICLR 2018).

    ``eps`` and ``alpha`` are fractions of each sample's intensity range (``max - min`` of that sample in the
    victim's input space), so ``eps = 4/255`` is 4 grey levels for images scaled to ``[0, 1]``. The start point is
    uniform in the ball; the result is clipped to the sample's original range.

    Args:
        model: the victim (its train/eval mode is left as it is).
        loss_fn: ``loss_fn(logits, y)``.
        x: batch ``B x C x spatial``.
        y: label batch ``B x 1 x spatial``.
        eps: budget as a fraction of the range.
        steps: PGD steps.
        alpha: step size as a fraction of the range.
        generator: seeds the random start.

    Returns:
        The adversarial batch (detached).
    """
    dims = tuple(range(1, x.ndim))
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    rng = (hi - lo).clamp_min(1e-6)
    e, a = eps * rng, alpha * rng
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    adv = (x + (2 * noise - 1) * e).clamp(lo, hi).detach()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = loss_fn(model(adv), y)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = adv.detach() + a * grad.sign()
        adv = torch.min(torch.max(adv, x - e), x + e).clamp(lo, hi).detach()
    return adv

