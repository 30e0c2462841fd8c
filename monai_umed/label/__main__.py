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

"""``python -m monai_umed.label APP_DIR``: write a MONAI Label app folder for the monai-umed app.

Without an argument it prints the packaged app folder.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from monai_umed.label import APP_DIR, write_app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monai_umed.label",
                                     description="Write a MONAI Label app folder that serves the monai-umed app.")
    parser.add_argument("app_dir", nargs="?", help="folder to create (without it: print the packaged app folder)")
    args = parser.parse_args(argv)
    if args.app_dir is None:
        print(APP_DIR)
        return 0
    try:
        main_py = write_app(args.app_dir)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"MONAI Label app written: {main_py.parent}\n"
          f"start it with: monailabel start_server --app {main_py.parent} --studies STUDIES "
          "--uvicorn_app monai_umed.label.server:app")
    return 0


if __name__ == "__main__":
    sys.exit(main())
