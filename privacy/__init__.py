"""Differential privacy: privacy events, accountants (PRV, RDP), calibration, the
site's hash-chained privacy ledger, and CSPRNG noise for secure-mode DP-SGD.

Homomorphic encryption (contexts, parameter sets, packing) comes next.
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
from privacy.ledger import DatasetAccount, PrivacyLedger
from privacy.noise import secure_gaussian_like, secure_standard_normal

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "BudgetCheck",
    "DatasetAccount",
    "PRVAccountant",
    "PrivacyLedger",
    "RDPAccountant",
    "SubsampledGaussianEvent",
    "compress",
    "get_accountant",
    "secure_gaussian_like",
    "secure_standard_normal",
]
