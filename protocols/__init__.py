"""Formats shared by client, server and tools: the run configuration and the
hash-chained record format (run events, privacy ledgers, releases).

The public names below are loaded on first use (module ``__getattr__``, as
``flwr/__init__.py`` does): importing one module of this package never loads the
others, so light commands and modules do not pay for torch or Opacus.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from protocols.config import RunSettings
    from protocols.hashchain import ChainReport, HashChainLog, read_chain, verify_chain

_EXPORTS: dict[str, str] = {
    "ChainReport": "protocols.hashchain",
    "HashChainLog": "protocols.hashchain",
    "RunSettings": "protocols.config",
    "read_chain": "protocols.hashchain",
    "verify_chain": "protocols.hashchain",
}

__all__ = [
    "ChainReport",
    "HashChainLog",
    "RunSettings",
    "read_chain",
    "verify_chain",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
