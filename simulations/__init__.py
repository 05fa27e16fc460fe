"""Simulation of multi-site federations on Flower's Simulation Engine (Ray)."""

from fedvault.partition import dirichlet_partition, iid_partition, label_skew, partition_indices

__all__ = ["dirichlet_partition", "iid_partition", "label_skew", "partition_indices"]
