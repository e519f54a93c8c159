"""When a slot frees: dispatch now, or wait briefly for the rest of a burst."""

from __future__ import annotations

import math


class GatherPolicy:
    """Decides, when a slot frees, whether to wait briefly for more requests.

    Closed-loop clients send their next request as soon as their answer arrives, so a batch's
    answers come back as a burst; dispatching the burst's first arrival alone would split every
    later batch in two (1 + 39, then 20 + 20). So: `demand` is the peak number of requests in
    flight between dispatches (halved each dispatch when traffic falls); the target is demand
    minus what the other slots are running, shared by the free slots. A window opens when the
    queue holds less than the target and closes the moment it is reached; it lasts at most a
    quarter of the measured batch time T (the latecomers of a burst arrive within a millisecond
    or two, and a wait w <= T/4 costs the queued less than a batch missing them), capped by
    max_batch_wait_s. At idle the target is the lone request itself: no wait, no timer.
    """

    def __init__(self, max_wait_s: float, max_batch_size: int) -> None:
        self.max_wait_s = max_wait_s
        self.max_batch_size = max_batch_size
        self.demand = 0.0
        self.peak = 0
        self.batch_seconds = 0.0  # EWMA of engine time per batch

    def observe_in_flight(self, in_flight: int) -> None:
        self.peak = max(self.peak, in_flight)

    def observe_batch(self, seconds: float) -> None:
        self.batch_seconds = seconds if self.batch_seconds == 0 else 0.8 * self.batch_seconds + 0.2 * seconds

    def plan(self, queued: int, running: int, in_flight: int, free_slots: int) -> tuple[int, float]:
        """(target batch size, seconds to wait for it); 0 seconds = dispatch now."""
        self.demand = max(float(self.peak), 0.5 * self.demand)
        self.peak = in_flight
        # Several free slots share the expected demand: two batches of 20 beat one of 40 and an
        # idle slot.
        target = min(self.max_batch_size, math.ceil((self.demand - running) / max(free_slots, 1)))
        if self.max_wait_s <= 0 or queued >= target:
            return target, 0.0
        return target, min(self.max_wait_s, 0.5 * self.batch_seconds)


