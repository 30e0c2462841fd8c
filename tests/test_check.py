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

"""``monai-umed check``: the owner's quick self-check on a tiny protected dataset."""

from __future__ import annotations

import json

import pytest
from test_evaluate import _write_2d

from monai_umed.cli import main
from monai_umed.errors import InputError
from monai_umed.evaluation.check import check, verdict


def test_verdict():
    assert verdict(0.8, 0.1) == "protected" and verdict(0.8, 0.4) == "partly"
    assert verdict(0.8, 0.7) == "not protected" and verdict(0.01, 0.0) == "-" and verdict(None, 0.1) == "-"


def test_check_on_a_protected_copy_via_the_cli(tmp_path, capsys):
    clean = _write_2d(tmp_path / "clean", n_train=6, n_test=2, size=32)
    out = tmp_path / "prot"
    assert main(["protect", str(clean), str(out), "--method", "noise", "--split", "training", "--quiet"]) == 0
    rc = main(["check", str(out), "--cases", "4", "--epochs", "1", "--image-size", "32", "--threads", "1",
               "--quiet", "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "check.json")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| standard |" in text and "| nnunet |" in text and "dB PSNR" in text
    res = json.loads((tmp_path / "check.json").read_text())
    assert [r["recipe"] for r in res["rows"]] == ["standard", "nnunet"] and res["cases"] == 4
    assert res["clean"] == str(clean) and all(0 <= r["dice_protected"] <= 1 for r in res["rows"])


def test_check_holds_out_clean_cases_without_a_test_list(tmp_path):
    clean = _write_2d(tmp_path / "clean", n_train=6, n_test=2, size=32)
    meta = json.loads((clean / "dataset.json").read_text())
    del meta["test"]
    (clean / "dataset.json").write_text(json.dumps(meta))
    out = tmp_path / "prot"
    assert main(["protect", str(clean), str(out), "--method", "noise", "--quiet"]) == 0
    res = check(out, cases=10, epochs=1, image_size=32, recipes=["standard"], holdout=2, threads=1, progress=False,
                cache_dir=tmp_path / "cache")
    assert res["cases"] == 4  # six cases, two held out
    with pytest.raises(InputError, match="held-out"):
        check(out, cases=4, epochs=1, recipes=["standard"], holdout=6, threads=1, progress=False)
    with pytest.raises(InputError, match="manifest"):
        check(clean, cases=4, epochs=1, threads=1, progress=False)
