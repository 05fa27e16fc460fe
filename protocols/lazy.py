"""Lazy public exports for a package ``__init__`` (module ``__getattr__``, PEP 562, as
``flwr/__init__.py`` does): each public name is imported on first use, so importing
one module of a package never loads the others, and light commands and modules do
not pay for torch or Opacus. The one copy of this mechanism; each package lists
its names once (``_EXPORTS``) and keeps the imports under ``TYPE_CHECKING`` for
type checkers."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose public names live in the
    modules ``exports`` maps them to (name -> module)."""

    def getattr_(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # the next access skips this hook
        return value

    def dir_() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return getattr_, dir_
