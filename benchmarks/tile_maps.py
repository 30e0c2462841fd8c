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

"""Screen where UMed's shared tile lies: write a fitted tile again with other budget-map settings, without refitting.

A fit of the 2D shared tile takes 15-40 minutes on a 2-core CPU, yet most of what decides how a copy protects is how
the fitted tile is laid on each case: the budget map (contour band, texture bound ``B``, caps) and the energy
budget. This screen loads the fitted UMed of a key, changes map parameters (``b_min``, ``texture_quantiles``,
``epsilon_t``, ``epsilon_c``, ``mode``, ``min_psnr``, ...), forgets the stored per-case perturbations, so that every
training case gets the tile through the unseen-case path (tile x the case's new map, scaled to its energy budget),
and writes a new protected copy with its own key. Judge it with ``monai-umed evaluate``::

    python benchmarks/tile_maps.py /tmp/eff/protected_umed.umedkey ../shared/data/kvasir_seg /tmp/tile_b0 \
        --param tile_bound=0,0.25,0.95
    monai-umed evaluate ../shared/data/kvasir_seg /tmp/tile_b0/protected --image-size 128 --epochs 10 --seed 3

The same works for an EM or SALM key whose release stage refined a shared tile (``refine_tile``): there the map
parameters are ``refine_texture`` (the texture-aware bound on the method's footprint) and ``min_psnr``.

Changing ``b_min`` or ``texture_quantiles`` of a key that writes on its fitting bound (``tile_bound=fit``, every
key from before ``tile_bound``) moves the written map too. This is how ``tile_bound``'s default was found
(docs/methods.md, fifth session); a fit with ``--param tile_bound=...`` writes the same way from the start.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from efficacy import parse_params  # noqa: E402

from monai_umed import protectors  # noqa: E402
from monai_umed.bundle import load_protector  # noqa: E402
from monai_umed.errors import InputError  # noqa: E402
from monai_umed.pipeline import protect_dataset  # noqa: E402
from monai_umed.protectors.em import EMProtector  # noqa: E402
from monai_umed.protectors.refine_shared import SharedTileRefiner  # noqa: E402
from monai_umed.protectors.umed import UMedProtector  # noqa: E402

#: the map and budget parameters a re-write may change (the tile and everything fitted stay as in the key)
MAP_PARAMS = ("b_min", "texture_quantiles", "tile_bound", "texture_window", "epsilon_c", "epsilon_t", "contour_radius",
              "mode", "min_psnr")
#: the same for EM's and SALM's release stage
RELEASE_MAP_PARAMS = ("refine_texture", "min_psnr")


def rewrite(key: str | Path, dataset: str | Path, out: Path, params: dict, seed: int = 0) -> dict:
    """Write ``dataset``'s training cases again with the fitted tile of ``key`` under other map ``params``.

    Args:
        key: a key of a UMed, EM or SALM copy whose release stage refined a shared tile.
        dataset: the clean dataset the key's copy was made from.
        out: the new copy goes to ``out / "protected"``, its key to ``out / "protected.umedkey"``.
        params: map parameters (:data:`MAP_PARAMS`; EM and SALM: :data:`RELEASE_MAP_PARAMS`) and their new values.
        seed: the run seed of the protection.

    Returns:
        ``protect_dataset``'s summary.

    Raises:
        InputError: not a UMed, EM or SALM key with a shared tile, or a parameter outside those its method allows.
    """
    protector = load_protector(key, device="cpu")
    if not isinstance(protector, (UMedProtector, EMProtector)) or not isinstance(protector.refiner, SharedTileRefiner):
        raise InputError("the key holds no UMed, EM or SALM fitted with a shared tile (refine_tile)", key)
    allowed = MAP_PARAMS if isinstance(protector, UMedProtector) else RELEASE_MAP_PARAMS
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise InputError(f"tile_maps changes only {', '.join(allowed)} of {protector.name}; got {', '.join(unknown)}")
    state = protector.state_dict()
    # the method's own constructor parses and checks the new values (``min_psnr=none``, ``"0,0.25,0.95"``, ...)
    current = {k: v for k, v in state["params"].items() if k != "spatial_dims"}
    try:
        typed = protectors.get(protector.name, **{**current, **params, "device": "cpu"}).params()
    except ValueError as e:
        raise InputError(str(e), key) from e
    state["params"].update({k: typed[k] for k in params})
    state["refine"]["deltas"] = {}  # every case through the tile's unseen path, laid on its new map
    protector.load_state_dict(state)
    return protect_dataset(dataset, out / "protected", protector=protector, epsilon=protector.epsilon,
                           split="training", seed=seed, device="cpu", key=out / "protected.umedkey")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("key", type=Path, help="the fitted copy's key")
    ap.add_argument("dataset", type=Path, help="the clean dataset")
    ap.add_argument("out", type=Path)
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="map parameter")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        params = parse_params([f"umed.{p}" for p in args.param], ["umed"])["umed"]
        t0 = time.perf_counter()
        summary = rewrite(args.key, args.dataset, args.out, params, seed=args.seed)
    except InputError as e:
        print(f"tile_maps: error: {e}", file=sys.stderr)
        return 2
    print(f"tile_maps: {summary['protected']} cases written to {args.out / 'protected'} with {params}: PSNR mean "
          f"{summary['psnr_mean']:.2f} dB, min {summary['psnr_min']:.2f} dB ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
