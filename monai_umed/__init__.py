# Copyright (c) monai-umed contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""monai-umed: unlearnable medical image segmentation datasets for MONAI."""

from __future__ import annotations

__version__ = "0.1.0"
