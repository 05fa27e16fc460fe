"""Formats shared by client, server and tools: the run configuration and the
hash-chained record format (run events, privacy ledgers, releases).
Public names are imported on first use (:mod:`protocols.lazy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocols.lazy import lazy_exports

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

# (a literal list: linters and type checkers read it)
__all__ = [
    "ChainReport",
    "HashChainLog",
    "RunSettings",
    "read_chain",
    "verify_chain",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
