"""Differential privacy: privacy events, accountants (PRV, RDP), calibration, the
site's hash-chained privacy ledger and its site secret (keyed ids, ledger anchor),
and CSPRNG noise and sampling for secure-mode DP-SGD.
Homomorphic encryption: parameter sets checked at 128-bit security, quantisation
and packing, TenSEAL contexts (``privacy.he``).
Public names are imported on first use (:mod:`protocols.lazy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocols.lazy import lazy_exports

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

# (a literal list: linters and type checkers read it)
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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
