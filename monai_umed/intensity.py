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

"""Native <-> normalised intensity mapping and quantisation back to the source dtype (METHODS.md section 0).

All perturbation budgets are stated in a normalised ``[0, 1]`` space per channel. ``stored`` values are what the
file holds (NIfTI raw data before ``scl_slope``, DICOM stored values before ``RescaleSlope``); ``physical`` values
are ``stored * slope + intercept`` (HU for CT). A :class:`IntensityMapping` maps stored -> normalised through a
per-channel physical window ``[lo, hi]`` and is recorded per case so the mapping can be reproduced and inverted.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from monai_umed.blocks import c_order_blocks

__all__ = ["IntensityMapping", "compute_mapping", "quantise", "quantise_blocks", "budget_in_stored", "parse_epsilon",
           "ct_window"]

#: Default CT window in HU (METHODS.md section 0).
ct_window = (-1024.0, 3071.0)


@dataclass
class IntensityMapping:
    """An invertible affine map from stored values to the normalised ``[0, 1]`` space.

    Args:
        lo: physical value mapped to 0, one per channel.
        hi: physical value mapped to 1, one per channel.
        slope: stored -> physical slope (DICOM RescaleSlope, NIfTI scl_slope; 1 when absent).
        intercept: stored -> physical intercept.
        dtype: numpy dtype name of the stored array.
        method: how ``lo``/``hi`` were chosen (``dtype``, ``window``, ``minmax`` or ``percentile``).
    """

    lo: list[float]
    hi: list[float]
    dtype: str
    method: str
    slope: float = 1.0
    intercept: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)

    def _bounds(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (-1,) + (1,) * (ndim - 1)
        return np.asarray(self.lo, np.float64).reshape(shape), np.asarray(self.hi, np.float64).reshape(shape)

    def to_normalised(self, stored: np.ndarray) -> np.ndarray:
        """Channel-first stored array -> float32 normalised array (not clipped: values outside the window map outside [0, 1]).

        Computed block by block in float64 (the same values as on the whole array), so a big volume needs its float32
        result and a block of temporaries, not several float64 copies of itself.
        """
        lo, hi = self._bounds(stored.ndim)
        if stored.ndim < 2 or lo.shape[0] not in (1, stored.shape[0]):
            return ((stored.astype(np.float64) * self.slope + self.intercept - lo) / (hi - lo)).astype(np.float32)
        out = np.empty(stored.shape, np.float32)
        for c in range(stored.shape[0]):
            lo_c, hi_c = lo.flat[c % lo.shape[0]], hi.flat[c % hi.shape[0]]
            for idx in c_order_blocks(stored.shape[1:]):
                i = (c,) + idx
                out[i] = (stored[i].astype(np.float64) * self.slope + self.intercept - lo_c) / (hi_c - lo_c)
        return out

    def to_stored(self, normalised: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_normalised`, in float64 (no rounding)."""
        lo, hi = self._bounds(normalised.ndim)
        return ((normalised.astype(np.float64) * (hi - lo) + lo) - self.intercept) / self.slope

    def scale(self, ndim: int = 1) -> np.ndarray:
        """Stored units per normalised unit, per channel, broadcastable to a channel-first array of ``ndim``."""
        lo, hi = self._bounds(ndim)
        return (hi - lo) / abs(self.slope)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IntensityMapping":
        return cls(**d)


def parse_epsilon(value: str | float) -> float:
    """Parse a budget given as ``"8/255"`` or a float in normalised units."""
    if isinstance(value, (int, float)):
        eps = float(value)
    else:
        text = str(value).strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                eps = float(num) / float(den)
            else:
                eps = float(text)
        except (ValueError, ZeroDivisionError) as e:
            raise ValueError(f"epsilon {value!r} is not a number or a fraction like 8/255") from e
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"epsilon {value!r} must lie in [0, 1] (normalised units)")
    return eps


def compute_mapping(
    stored: np.ndarray,
    policy: str = "auto",
    modality: str | None = None,
    slope: float = 1.0,
    intercept: float = 0.0,
    window: Sequence[float] | None = None,
    percentiles: Sequence[float] = (0.5, 99.5),
) -> IntensityMapping:
    """Choose the native -> normalised mapping for one channel-first stored array.

    ``auto`` follows METHODS.md: CT (``modality`` containing "CT") -> fixed HU ``window`` (default -1024..3071);
    8-bit integer images -> the dtype range; anything else (MRI, 16-bit, float) -> per-volume, per-channel
    percentiles. ``dtype``, ``window``, ``minmax`` and ``percentile`` force one rule.

    Args:
        stored: channel-first array of stored values.
        policy: ``auto`` | ``dtype`` | ``window`` | ``minmax`` | ``percentile``.
        modality: free text such as "CT" or "MRI" (from DICOM Modality or dataset.json).
        slope: stored -> physical slope.
        intercept: stored -> physical intercept.
        window: physical ``(lo, hi)`` for the ``window`` rule.
        percentiles: lower and upper percentile for the ``percentile`` rule.

    Raises:
        ValueError: unknown policy, a dtype range asked of a float image, or a flat image.
    """
    dtype = np.dtype(stored.dtype)
    if policy == "auto":
        if modality and "CT" in modality.upper().split():
            policy = "window"
        elif dtype.kind in "ui" and dtype.itemsize == 1:
            policy = "dtype"
        else:
            policy = "percentile"
    n_ch = stored.shape[0]
    params: dict[str, Any] = {}
    if policy == "dtype":
        if dtype.kind not in "uib":
            raise ValueError(f"intensity policy 'dtype' needs an integer image, got {dtype}")
        info = np.iinfo(dtype) if dtype.kind != "b" else np.iinfo(np.uint8)
        lo = [float(info.min) * slope + intercept] * n_ch
        hi = [float(info.max) * slope + intercept] * n_ch
    elif policy == "window":
        w = tuple(window) if window is not None else ct_window
        lo, hi = [float(w[0])] * n_ch, [float(w[1])] * n_ch
        params["window"] = list(w)
    elif policy in ("minmax", "percentile"):
        phys = stored.reshape(n_ch, -1).astype(np.float64) * slope + intercept
        if policy == "minmax":
            lo, hi = phys.min(axis=1).tolist(), phys.max(axis=1).tolist()
        else:
            q = np.percentile(phys, list(percentiles), axis=1)
            lo, hi = q[0].tolist(), q[1].tolist()
            params["percentiles"] = list(percentiles)
        # a flat channel still needs an invertible map: fall back to a unit-wide window
        hi = [h if h > l_ else l_ + 1.0 for l_, h in zip(lo, hi)]
    else:
        raise ValueError(f"unknown intensity policy {policy!r} (auto, dtype, window, minmax, percentile)")
    return IntensityMapping(lo=lo, hi=hi, dtype=dtype.name, method=policy, slope=float(slope),
                            intercept=float(intercept), params=params)


def budget_in_stored(epsilon: float, mapping: IntensityMapping) -> np.ndarray:
    """The largest stored-unit change a budget ``epsilon`` allows, per channel (floored for integer dtypes)."""
    b = epsilon * mapping.scale(1)
    if np.dtype(mapping.dtype).kind in "uib":
        b = np.floor(b + 1e-9)
    return b


def quantise(
    stored: np.ndarray,
    delta: np.ndarray,
    mapping: IntensityMapping,
    epsilon: float | None = None,
    source: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Apply a normalised perturbation to a stored array and quantise the result to the stored dtype.

    ``delta_q = round(to_stored(x + delta)) - x_stored``, clipped to the largest whole number of stored units
    inside the budget when ``epsilon`` is given (so the budget holds *after* quantisation); the result stays
    inside the dtype's range and inside the wider of the image's own range and the mapping's window (so a float
    MRI volume whose background is 0 gets no negative values). Float images are perturbed without rounding.
    Computed block by block (:func:`quantise_blocks`).

    Args:
        stored: channel-first stored array (the file's values).
        delta: normalised perturbation, same shape.
        mapping: the case's intensity mapping.
        epsilon: the protector's L-inf budget in normalised units, or None for no clamp.
        source: file name used in the warning.

    Returns:
        ``(protected, delta_q)``: the protected array in the stored dtype and the realised change in stored units
        (int64 for integer dtypes, float64 for float dtypes).
    """
    dtype = np.dtype(stored.dtype)
    protected = np.empty(stored.shape, dtype)
    delta_q = np.empty(stored.shape, np.int64 if dtype.kind in "uib" else np.float64)
    for idx, p, d in quantise_blocks(stored, delta, mapping, epsilon, source):
        protected[idx] = p
        delta_q[idx] = d
    return protected, delta_q


def quantise_blocks(
    stored: np.ndarray,
    delta: np.ndarray,
    mapping: IntensityMapping,
    epsilon: float | None = None,
    source: str = "",
) -> Iterator[tuple[tuple[int | slice, ...], np.ndarray, np.ndarray]]:
    """:func:`quantise`, one block at a time: a big volume needs memory for a block of temporaries, not for several
    float64 and int64 copies of itself.

    Args:
        stored: channel-first stored array (the file's values).
        delta: normalised perturbation, same shape (any float dtype; each block is converted to float64).
        mapping: the case's intensity mapping.
        epsilon: the protector's L-inf budget in normalised units, or None for no clamp.
        source: file name used in the warning.

    Yields:
        ``(index, protected, delta_q)`` per block: ``index`` selects the block in ``stored`` (channel first, see
        :func:`monai_umed.blocks.c_order_blocks`); ``protected`` is in the stored dtype, ``delta_q`` int64 for integer
        dtypes and float64 for float dtypes. The blocks cover the array in C order.
    """
    dtype = np.dtype(stored.dtype)
    delta = np.broadcast_to(np.asarray(delta), stored.shape)
    n_ch = stored.shape[0]
    shape = (n_ch,) + (1,) * (stored.ndim - 1)
    scale = np.broadcast_to(mapping.scale(stored.ndim), shape).reshape(n_ch)
    b = None
    if epsilon is not None:
        b = np.broadcast_to(budget_in_stored(epsilon, mapping).reshape((-1,) + (1,) * (stored.ndim - 1)), shape)
        if epsilon > 0 and np.all(b == 0):
            warnings.warn(
                f"{source or 'image'}: budget epsilon={epsilon:.6g} is below one {dtype} step "
                f"({float(mapping.scale(1).min()):.6g} stored units per normalised unit): the written copy is unprotected",
                stacklevel=3,
            )
        b = b.reshape(n_ch)
    # never leave the wider of the image's own range and the mapping's window (METHODS.md clips to [0, 1]; values
    # outside the window, e.g. above the 99.5th percentile, are kept), nor the dtype's range
    axes = tuple(range(1, stored.ndim))
    win = np.sort(np.stack([mapping.to_stored(np.zeros(shape)), mapping.to_stored(np.ones(shape))]), axis=0)
    lo = np.minimum(stored.min(axis=axes).reshape(shape), win[0])
    hi = np.maximum(stored.max(axis=axes).reshape(shape), win[1])
    integer = dtype.kind in "uib"
    if integer:
        info = np.iinfo(dtype) if dtype.kind != "b" else np.iinfo(np.uint8)
        lo, hi = np.maximum(np.ceil(lo), info.min).astype(np.int64), np.minimum(np.floor(hi), info.max).astype(np.int64)
    lo, hi = lo.reshape(n_ch), hi.reshape(n_ch)
    for c in range(n_ch):
        for idx in c_order_blocks(stored.shape[1:]):
            i = (c,) + idx
            s = stored[i]
            d = delta[i].astype(np.float64)
            d *= scale[c]
            if b is not None:
                np.clip(d, -b[c], b[c], out=d)
            if integer:
                s64 = s.astype(np.int64)
                out = s64 + np.rint(d, out=d).astype(np.int64)
                np.clip(out, lo[c], hi[c], out=out)
                yield i, out.astype(dtype), np.subtract(out, s64, out=s64)
            else:
                s64 = s.astype(np.float64)
                out = np.clip(s64 + d, lo[c], hi[c]).astype(dtype)
                yield i, out, np.subtract(out.astype(np.float64), s64, out=s64)
