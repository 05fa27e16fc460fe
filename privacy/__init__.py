"""Differential privacy (accountants, privacy events, the budget ledger) and
homomorphic encryption (contexts, parameter sets, packing).

Empty in the foundation: DP-SGD with an enforced budget and encrypted
aggregation arrive with their own issues.
"""

__all__: list[str] = []
