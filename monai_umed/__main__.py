# Copyright (c) monai-umed contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""``python -m monai_umed`` runs the ``monai-umed`` command (also under ``torchrun``)."""

import sys

from monai_umed.cli import main

sys.exit(main())
