"""Formats shared by client, server and tools: the run configuration and the
hash-chained record format (run events now; the privacy ledger and audit trail next)."""

from protocols.config import RunSettings
from protocols.hashchain import ChainReport, HashChainLog, read_chain, verify_chain

__all__ = ["ChainReport", "HashChainLog", "RunSettings", "read_chain", "verify_chain"]
