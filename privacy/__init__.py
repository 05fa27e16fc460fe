"""Differential privacy: privacy events, accountants (PRV, RDP), calibration, the
site's hash-chained privacy ledger and its site secret (keyed ids, ledger anchor),
and CSPRNG noise and sampling for secure-mode DP-SGD.
Homomorphic encryption: parameter sets checked at 128-bit security, quantisation
and packing, TenSEAL contexts (``privacy.he``).

The public names below are loaded on first use (module ``__getattr__``, as
``flwr/__init__.py`` does): importing one module of this package never loads the
others, so light commands and modules do not pay for torch or Opacus.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from privacy.accountants import (
        ACCOUNTANTS,
        Accountant,
        BudgetCheck,
        PRVAccountant,
        RDPAccountant,
        get_accountant,
    )
    from privacy.events import SubsampledGaussianEvent, compress
    from privacy.he import HEContext, HEParams, ckks_params, new_secret_context
    from privacy.ledger import DatasetAccount, PrivacyLedger, ScopeAccount
    from privacy.noise import SecureUniform, secure_gaussian_like, secure_standard_normal
    from privacy.site_secret import SiteSecret

_EXPORTS: dict[str, str] = {
    "ACCOUNTANTS": "privacy.accountants",
    "Accountant": "privacy.accountants",
    "BudgetCheck": "privacy.accountants",
    "DatasetAccount": "privacy.ledger",
    "HEContext": "privacy.he",
    "HEParams": "privacy.he",
    "PRVAccountant": "privacy.accountants",
    "PrivacyLedger": "privacy.ledger",
    "RDPAccountant": "privacy.accountants",
    "ScopeAccount": "privacy.ledger",
    "SecureUniform": "privacy.noise",
    "SiteSecret": "privacy.site_secret",
    "SubsampledGaussianEvent": "privacy.events",
    "ckks_params": "privacy.he",
    "compress": "privacy.events",
    "get_accountant": "privacy.accountants",
    "new_secret_context": "privacy.he",
    "secure_gaussian_like": "privacy.noise",
    "secure_standard_normal": "privacy.noise",
}

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "BudgetCheck",
    "DatasetAccount",
    "HEContext",
    "HEParams",
    "PRVAccountant",
    "PrivacyLedger",
    "RDPAccountant",
    "ScopeAccount",
    "SecureUniform",
    "SiteSecret",
    "SubsampledGaussianEvent",
    "ckks_params",
    "compress",
    "get_accountant",
    "new_secret_context",
    "secure_gaussian_like",
    "secure_standard_normal",
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
