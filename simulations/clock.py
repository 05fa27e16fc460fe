"""The simulated clock: how long a round would take on the scenario's sites and links.

Pure arithmetic, so a test can check it against a hand computation. One phase
of a round (training, then federated evaluation) sends each sampled site the
server's message and waits for its reply. Site ``k`` needs::

    t_k = latency_k + 8 * bytes_down_k / downlink_k       (receive the model)
        + examples_k / compute_k                          (train or evaluate)
        + latency_k + 8 * bytes_up_k / uplink_k           (send the reply)

with bandwidths in bit/s and latency one way. Flower's server waits for every
reply until the round timeout, so the phase lasts ``max_k t_k``; a site that
dropped out, or whose ``t_k`` exceeds the timeout, is waited for until the
timeout and its reply (if any) is discarded. A site that was offline when the
round started is known to be disconnected and costs no waiting.
"""

from __future__ import annotations

from dataclasses import dataclass

MBIT = 1_000_000.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Link:
    """A site's network link and compute speed."""

    uplink_mbps: float
    downlink_mbps: float
    latency_ms: float
    compute: float  # examples per second

    def __post_init__(self) -> None:
        for name in ("uplink_mbps", "downlink_mbps", "compute"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0. Found {getattr(self, name)}.")
        if self.latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0. Found {self.latency_ms}.")


@dataclass(frozen=True, slots=True, kw_only=True)
class Exchange:
    """What one sampled site did in one phase of a round."""

    link: Link
    bytes_down: int
    bytes_up: int = 0
    examples: int = 0
    dropped: bool = False


def site_seconds(x: Exchange) -> float:
    """Seconds from the server sending site ``x`` its message to receiving the reply."""
    lat = x.link.latency_ms / 1000.0
    down = 8.0 * x.bytes_down / (x.link.downlink_mbps * MBIT)
    up = 8.0 * x.bytes_up / (x.link.uplink_mbps * MBIT)
    return lat + down + x.examples / x.link.compute + lat + up


@dataclass(frozen=True, slots=True, kw_only=True)
class PhaseTime:
    seconds: float
    timed_out: tuple[int, ...]  # indices (into the exchanges) the server gave up on


def phase_seconds(exchanges: list[Exchange], *, timeout: float) -> PhaseTime:
    """Simulated duration of one phase and which sites missed the deadline."""
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0. Found {timeout}.")
    if not exchanges:
        return PhaseTime(seconds=0.0, timed_out=())
    late: list[int] = []
    longest = 0.0
    for i, x in enumerate(exchanges):
        t = site_seconds(x)
        if x.dropped or t > timeout:
            late.append(i)
        else:
            longest = max(longest, t)
    return PhaseTime(seconds=timeout if late else longest, timed_out=tuple(late))
