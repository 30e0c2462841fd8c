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

"""Protection options of the MONAI Label app, and fitted protectors loaded from a file or a bundle.

The options carry the names of ``monai-umed protect``: ``method``, ``epsilon``, ``epochs``, ``seed``, ``params``
(the ``--param KEY=VALUE`` settings, as a JSON object), ``device``, ``intensity``, plus ``label_tag`` (which saved
label marks the ROI: ``final``, ``original`` or ``auto`` = final, else original) and ``modality`` (written into the
release's ``dataset.json``; ``CT`` selects the HU window). They come from the server's ``--conf KEY VALUE``
options (strings) and are overridden per request (JSON values). ``model`` (a saved protector ``state_dict`` or a
bundle folder with ``models/``) is a server option only: a request cannot make the server unpickle a file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from monai_umed import protectors
from monai_umed.errors import InputError
from monai_umed.intensity import parse_epsilon

__all__ = ["ProtectOptions", "LABEL_TAGS", "find_state_file", "load_protector"]

#: accepted values of ``label_tag``
LABEL_TAGS = ("auto", "final", "original")
_INTENSITY = ("auto", "dtype", "window", "minmax", "percentile")
_REQUEST_KEYS = ("method", "epsilon", "epochs", "seed", "params", "device", "intensity", "label_tag", "modality")


def _as_int(name: str, value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, bool):
        raise InputError(f"option {name!r} must be an integer, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError) as e:
        raise InputError(f"option {name!r} must be an integer, got {value!r}") from e
    if f != int(f):
        raise InputError(f"option {name!r} must be an integer, got {value!r}")
    return int(f)


def _as_params(value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise InputError(f"option 'params' must be a JSON object such as '{{\"region\":\"roi\"}}', "
                             f"got {value!r}") from e
    if not isinstance(value, Mapping):
        raise InputError(f"option 'params' must be a JSON object, got {value!r}")
    return {str(k).replace("-", "_"): v for k, v in value.items()}


@dataclass
class ProtectOptions:
    """Settings of one protection (a preview of one study, or an export of the datastore).

    Attributes:
        method: protector name (``monai-umed methods``); None means the method of ``model``, else ``noise``.
        epsilon: L-inf budget in normalised units.
        epochs: bound on fitting (ignored by methods that fit nothing).
        seed: run seed; per-case randomness comes from ``(seed, case_id)``.
        params: method-specific settings.
        device: ``auto`` | ``cpu`` | ``cuda``.
        intensity: native -> ``[0, 1]`` mapping policy.
        label_tag: ``auto`` | ``final`` | ``original``.
        modality: modality hint for the intensity mapping (``CT``, ``MRI``, ...), or None.
        model: saved protector ``state_dict`` file (or bundle folder) to load instead of fitting, or None.
        explicit: the option names given explicitly (by the server's ``--conf`` or the request).
    """

    method: str | None = None
    epsilon: float = 8 / 255
    epochs: int | None = None
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    intensity: str = "auto"
    label_tag: str = "auto"
    modality: str | None = None
    model: str | None = None
    explicit: frozenset[str] = frozenset()

    @classmethod
    def from_sources(cls, conf: Mapping[str, Any] | None = None, request: Mapping[str, Any] | None = None,
                     base_dir: str | os.PathLike | None = None) -> "ProtectOptions":
        """Merge the server's ``--conf`` values and a request's values (the request wins; ``params`` are merged).

        Args:
            conf: server options (strings as given on the command line, or JSON values).
            request: request options (JSON values); ``model`` is ignored there.
            base_dir: folder against which a relative ``model`` path is resolved (the app folder).

        Raises:
            InputError: a value that does not parse, with the option named.
        """
        conf = dict(conf or {})
        request = {k: v for k, v in (request or {}).items() if k in _REQUEST_KEYS and v is not None}
        merged: dict[str, Any] = {k: conf[k] for k in (*_REQUEST_KEYS, "model") if k in conf and conf[k] is not None}
        params = _as_params(merged.get("params"))
        params.update(_as_params(request.get("params")))
        merged.update({k: v for k, v in request.items() if k != "params"})
        explicit = frozenset(k for k in merged if k != "params") | (frozenset({"params"}) if params else frozenset())

        method = merged.get("method")
        method = str(method).strip().lower() if method not in (None, "") else None
        try:
            epsilon = parse_epsilon(merged.get("epsilon", 8 / 255))
        except ValueError as e:
            raise InputError(f"option 'epsilon': {e}") from e
        seed = _as_int("seed", merged.get("seed", 0))
        device = str(merged.get("device", "auto")).lower()
        if device not in ("auto", "cpu", "cuda"):
            raise InputError(f"option 'device' must be auto, cpu or cuda, got {device!r}")
        intensity = str(merged.get("intensity", "auto")).lower()
        if intensity not in _INTENSITY:
            raise InputError(f"option 'intensity' must be one of {', '.join(_INTENSITY)}, got {intensity!r}")
        label_tag = str(merged.get("label_tag", "auto")).lower()
        if label_tag not in LABEL_TAGS:
            raise InputError(f"option 'label_tag' must be one of {', '.join(LABEL_TAGS)}, got {label_tag!r}")
        modality = merged.get("modality")
        model = merged.get("model")
        if model not in (None, ""):
            p = Path(str(model)).expanduser()
            model = str(p if p.is_absolute() or base_dir is None else Path(base_dir) / p)
        else:
            model = None
        return cls(method=method, epsilon=epsilon, epochs=_as_int("epochs", merged.get("epochs")),
                   seed=0 if seed is None else seed, params=params, device=device, intensity=intensity,
                   label_tag=label_tag, modality=str(modality) if modality not in (None, "") else None,
                   model=model, explicit=explicit)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view (what the server reports and what identifies a fitted protector)."""
        d = asdict(self)
        d["explicit"] = sorted(self.explicit)
        return d

    def protector_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``protectors.get`` (params, epsilon, seed, device, epochs when given)."""
        kwargs = dict(self.params)
        kwargs.update(epsilon=self.epsilon, seed=self.seed, device=self.device)
        if self.epochs is not None:
            kwargs["epochs"] = self.epochs
        return kwargs


def find_state_file(path: str | os.PathLike) -> Path:
    """The protector ``state_dict`` file named by ``path``: the file itself, or the single ``*.pt``/``*.pth`` in a
    bundle's ``models/`` folder (or in the folder itself).

    Raises:
        InputError: nothing or more than one candidate found.
    """
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise InputError("protector model not found (a state_dict file or a bundle folder with models/)", p)
    folder = p / "models" if (p / "models").is_dir() else p
    found = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in (".pt", ".pth"))
    if not found:
        raise InputError("no fitted protector (*.pt, *.pth) in this folder", folder)
    if len(found) > 1:
        raise InputError(f"several fitted protectors here ({', '.join(f.name for f in found)}); name the file", folder)
    return found[0]


def load_protector(options: ProtectOptions) -> protectors.Protector:
    """Build the protector the options describe; when ``options.model`` is set, load its fitted state.

    A saved state records its method and parameters; options given explicitly override those parameters (the
    budget, for instance), and an explicit ``method`` that differs from the saved one is an error.

    Raises:
        InputError: unknown method, bad parameters, or a state that does not fit the method.
    """
    if options.model is None:
        try:
            return protectors.get(options.method or "noise", **options.protector_kwargs())
        except ValueError as e:
            raise InputError(str(e)) from e
    path = find_state_file(options.model)
    try:
        # the custodian's own file (server option only, never taken from a request); states hold plain Python
        # values next to tensors, as the pipeline saves them
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types on a corrupt file
        raise InputError(f"unreadable protector state ({type(e).__name__}: {e})", path) from e
    if not isinstance(state, Mapping):
        raise InputError("not a protector state_dict (expected a mapping)", path)
    name = str(state.get("name") or options.method or "")
    if not name:
        raise InputError("the state does not name its method; set the 'method' option", path)
    if options.method and options.method != name:
        raise InputError(f"the state is of method {name!r}, the 'method' option asks for {options.method!r}", path)
    kwargs = {k: v for k, v in dict(state.get("params") or {}).items()}
    explicit = options.protector_kwargs()
    for k in ("epsilon", "seed", "epochs"):
        if k not in options.explicit:
            explicit.pop(k, None)
    kwargs.update(explicit)
    try:
        protector = protectors.get(name, **kwargs)
        protector.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"cannot load this state into protector {name!r}: {e}", path) from e
    return protector
