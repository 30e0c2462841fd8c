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

"""Blocks of a big array in C order, so that element-wise work on a volume needs memory for a block, not the volume.

A 512 x 512 x 300 CT has 79 M voxels: one float64 temporary of it is 630 MB, and a NumPy expression makes several.
Quantisation, checksums and the key's deltas are element-wise (or sums over elements), so they run block by block
over :func:`c_order_blocks`, which cuts an array into pieces whose C-order ravels, taken in the order given, are the
array's own C-order ravel: results are the same values, in the same order, as on the whole array.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

__all__ = ["BLOCK", "c_order_blocks"]

#: Elements per block: 4 Mi elements, 32 MB for an int64 or float64 temporary.
BLOCK = 1 << 22


def c_order_blocks(shape: Sequence[int], block: int = BLOCK) -> Iterator[tuple[int | slice, ...]]:
    """Index tuples cutting an array of ``shape`` into C-order runs of at most ``block`` elements.

    Trailing axes are taken whole, the last axis that is cut is cut into ranges, the axes before it one index at a
    time; a run is never shorter than one whole trailing part (so a block may exceed ``block`` when a single row
    of the last axis does). Each index selects a view; ``a[index].ravel()`` of the indices in order, concatenated,
    is ``a.ravel()``.

    Args:
        shape: the array's shape.
        block: the largest number of elements per piece (when the trailing axes allow it).

    Yields:
        Index tuples (ints and slices) for the leading axes; the axes not named are taken whole.
    """
    shape = tuple(int(n) for n in shape)
    if not shape or 0 in shape:
        yield ()
        return
    inner, k = 1, len(shape)
    while k > 0 and inner * shape[k - 1] <= block:
        k -= 1
        inner *= shape[k]
    if k == 0:
        yield ()
        return
    step = max(1, block // inner)
    for lead in np.ndindex(*shape[: k - 1]):
        for a in range(0, shape[k - 1], step):
            yield tuple(lead) + (slice(a, min(a + step, shape[k - 1])),)
