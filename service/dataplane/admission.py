"""Whether one version's queue takes a request, decided before any work is done for it.

A request is refused at once (503 + Retry-After) when the queue is full, or when the queue
ahead of it could not be worked off before its deadline; 504 at once when not even an idle
model could make it. An admitted request holds its place while its images are decoded.
The prediction is checked against what happens: where queued images wait longer than
predicted (batches start late on a busy event loop, a shared CPU), the slack grows by that
ratio.

Pure bookkeeping: every time is passed in (``time.perf_counter()`` values), nothing here
waits or reads a clock; the batcher (:mod:`service.dataplane.batching`) does both.
"""

from __future__ import annotations

from service.dataplane.batch_policy import BatchPolicy, Load
from service.errors import DeadlineExceeded, Overloaded

#: 25% of slack: the prediction is an average, a request admitted at the limit of its
#: deadline would be answered 504 by any batch that runs a little late.
ADMISSION_SLACK = 1.25


class Admission:
    """One version's admission: at most ``max_queue`` images waiting, each request only if
    the batches ahead of it (``policy``'s prediction) leave time before its deadline."""

    def __init__(self, model: str, max_queue: int, policy: BatchPolicy) -> None:
        self.model = model
        self.max_queue = max_queue
        self.policy = policy
        #: Images admitted and still being decoded: they wait as much as queued ones.
        self.reserved = 0
        # Averages of the seconds queued images waited for their results, and of what
        # was predicted for them when they were queued: their ratio is the lateness.
        self._waited = self._predicted = 0.0

    @property
    def lateness(self) -> float:
        """How much longer queued images waited than predicted (1: as predicted)."""
        return self._waited / self._predicted if self._predicted > 0 else 1.0

    def learn(self, predicted: float, waited: float) -> None:
        """Count images that were predicted to wait ``predicted`` seconds and waited
        ``waited``."""
        self._predicted += 0.1 * (predicted - self._predicted)
        self._waited += 0.1 * (waited - self._waited)

    def check(
        self, load: Load, images: int, deadline: float, now: float, extra_s: float = 0.0
    ) -> None:
        """Raise unless a request of ``images`` images could be taken at ``now`` with
        ``load`` ahead of it: Overloaded (503 + Retry-After) if the queue is full or what
        waits ahead of it (plus ``extra_s`` of its own work before the queue) cannot be done
        by ``deadline``; DeadlineExceeded (504, at once) if not even an idle model could make
        the deadline."""
        if load.waiting + images > self.max_queue:
            raise Overloaded(
                f"model {self.model!r} has {load.waiting} images waiting (limit "
                f"{self.max_queue}); retry later",
                retry_after=self.policy.wait_s(load, 0, now),
            )
        wait = self.policy.wait_s(load, images, now) + extra_s
        left = deadline - now
        # More slack where queued images have been waiting longer than predicted (never
        # less: a pessimistic prediction only refuses early).
        if wait * ADMISSION_SLACK * max(1.0, self.lateness) <= left:
            return
        alone = self.policy.costs.work_s(images, self.policy.cap) + extra_s
        if alone * ADMISSION_SLACK > left:  # not even an idle model: retrying cannot help
            raise DeadlineExceeded(
                f"the request's deadline ({max(left, 0) * 1000:.0f} ms from now) is shorter "
                f"than model {self.model!r} needs (about {alone * 1000:.0f} ms)"
            )
        raise Overloaded(
            f"model {self.model!r} is busy: this request would be answered in about "
            f"{wait:.1f}s, after its deadline; retry later",
            retry_after=wait,
        )

    def reserve(
        self, load: Load, images: int, deadline: float, now: float, extra_s: float = 0.0
    ) -> None:
        """Admit a request (see :meth:`check`) and hold its place until :meth:`release`."""
        self.check(load, images, deadline, now, extra_s)
        self.reserved += images

    def release(self, images: int) -> None:
        """Give back a reservation (its images will never come, or are being queued)."""
        self.reserved -= images
