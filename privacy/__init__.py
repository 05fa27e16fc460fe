"""Differential privacy: privacy events, accountants (PRV, RDP), calibration, the
site's hash-chained privacy ledger and its site secret (keyed ids, ledger anchor),
and CSPRNG noise and sampling for secure-mode DP-SGD.
Homomorphic encryption: parameter sets checked at 128-bit security, quantisation
and packing, TenSEAL contexts (``privacy.he``).
"""

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
