"""Names, in one place: the closed sets of names fedvault accepts (partitioners,
accountants, HE schemes, run modes; ``StrEnum``s, so each member is its string),
``site-K`` for the K-th site (0-based) of a federation, and the stable node id a
simulation gives it (Flower's own node ids change from run to run; a scenario's
site K is always node K + 1)."""

from __future__ import annotations

from enum import StrEnum


class Partitioner(StrEnum):
    """How one table is split across simulated sites (:mod:`fedvault_tasks.partition`)."""

    IID = "iid"
    DIRICHLET = "dirichlet"


class AccountantName(StrEnum):
    """The privacy accountants (:data:`privacy.accountants.ACCOUNTANTS` is the registry)."""

    PRV = "prv"
    RDP = "rdp"


class Scheme(StrEnum):
    """Homomorphic encryption schemes (:mod:`privacy.he`)."""

    BFV = "bfv"
    CKKS = "ckks"


#: HE parameter profiles by name (``fedvault provision --scheme``, ``site he-keys``;
#: :func:`privacy.he.params_for`)
HE_PROFILES = ("bfv", "bfv-compact", "ckks")


class RunMode(StrEnum):
    """Who ran the ServerApp (``summary.json`` ``mode``)."""

    SIMULATION = "simulation"
    REHEARSAL = "rehearsal"
    DEPLOYMENT = "deployment"


def values(names: type[StrEnum]) -> tuple[str, ...]:
    """The member strings of a closed set, in declaration order."""
    return tuple(m.value for m in names)


def site_name(k: int) -> str:
    """The name of the federation's ``k``-th site (0-based): ``site-k``."""
    return f"site-{k}"


def simulated_node_id(k: int) -> int:
    """The node id the simulated network shows for a scenario's ``k``-th site."""
    return k + 1
