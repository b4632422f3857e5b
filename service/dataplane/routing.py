"""Where a model's requests go: its served versions (each with its batcher and statistics)
and the weights and shadow of rollout.json. A reload replaces a model's :class:`Routing`
whole."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from service.dataplane.batching import Batcher
from service.dataplane.statistics import ModelStatistics
from service.model.repository import ModelSpec


class Version:
    """One served version of a model: its spec, batcher and statistics. A request's plan
    holds its version, so a request finishes on the version it started on even when a
    reload switches the model's traffic to another one meanwhile."""

    def __init__(self, spec: ModelSpec, batcher: Batcher, stats: ModelStatistics) -> None:
        self.spec = spec
        self.batcher = batcher
        self.stats = stats
        #: EWMA of one image's decode + preprocess time (admission's estimate).
        self.decode_s = 0.005
        #: The latest deadline of a request planned on this version: once it has passed,
        #: a version no longer routed to has no request left and can be released.
        self.last_deadline = 0.0
        #: Set once a version no longer routed to is being closed and unloaded.
        self.releasing = False


@dataclass(frozen=True)
class Routing:
    """Where one model's requests go. Replaced whole by a reload: the switch is one
    assignment, so a request sees the old routing or the new one, never a mix."""

    versions: dict[str, Version]
    #: Unpinned traffic: (version, weight > 0), from rollout.json; empty: all to ``newest``.
    weights: tuple[tuple[str, float], ...] = ()
    #: A version that gets a copy of unpinned traffic; its answers are compared, not returned.
    shadow: str | None = None

    @property
    def newest(self) -> Version:
        return self.versions[max(self.versions, key=int)]

    def shares(self) -> dict[str, float]:
        """Each version unpinned requests go to, with its share of them (0..1)."""
        if not self.weights:
            return {self.newest.spec.version: 1.0}
        total = sum(w for _, w in self.weights)
        return {v: w / total for v, w in self.weights}

    def pick(self, model: str, client: str | None) -> Version:
        """The version an unpinned request goes to: by weight, the same one for the same
        client key (hashed onto [0, 1)), at random without one."""
        if not self.weights:
            return self.newest
        if client:
            digest = hashlib.blake2b(f"{model}\0{client}".encode(), digest_size=8).digest()
            point = int.from_bytes(digest, "big") / 2**64
        else:
            point = random.random()
        for version, share in self.shares().items():
            point -= share
            if point < 0:
                return self.versions[version]
        return self.versions[self.weights[-1][0]]
