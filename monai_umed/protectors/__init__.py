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

"""Protection methods behind one interface, built by name: ``protectors.get("noise", epsilon=8/255)``.

Methods register themselves with :func:`register`; modules listed in ``_BUILTIN`` are imported lazily so a
missing optional method never breaks the others.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from monai_umed.protectors.base import Protector, case_seed, resolve_device

__all__ = ["Protector", "get", "names", "register", "case_seed", "resolve_device"]

_REGISTRY: dict[str, type[Protector]] = {}
# name -> module that defines it; imported on first use
_BUILTIN = {
    "noise": "monai_umed.protectors.noise",
    "umed": "monai_umed.protectors.umed",
    "salm": "monai_umed.protectors.salm",
    "em": "monai_umed.protectors.em",
    "tap": "monai_umed.protectors.tap",
    "lsp": "monai_umed.protectors.lsp",
    "ar": "monai_umed.protectors.ar",
    "sep": "monai_umed.protectors.sep",
}


def register(cls: type[Protector]) -> type[Protector]:
    """Class decorator adding a protector to the registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def _load(name: str) -> None:
    if name not in _REGISTRY and name in _BUILTIN:
        try:
            module = importlib.import_module(_BUILTIN[name])
        except ModuleNotFoundError as e:
            if e.name != _BUILTIN[name]:
                raise
            return
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Protector) and obj.name == name:
                _REGISTRY[name] = obj


def names() -> list[str]:
    """Names of the protectors available in this installation."""
    for n in _BUILTIN:
        _load(n)
    return sorted(_REGISTRY)


def get(name: str, **params: Any) -> Protector:
    """Build a protector by name.

    Raises:
        ValueError: unknown name or parameters the method does not take.
    """
    _load(name)
    if name not in _REGISTRY:
        raise ValueError(f"unknown protection method {name!r}; available: {', '.join(names())}")
    try:
        return _REGISTRY[name](**params)
    except TypeError as e:
        raise ValueError(f"bad parameters for method {name!r}: {e}") from e


def factory(name: str) -> Callable[..., Protector]:
    """The class registered under ``name`` (for introspection)."""
    _load(name)
    return _REGISTRY[name]
