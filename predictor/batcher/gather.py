"""When a slot frees: dispatch now, or wait briefly for the rest of a burst."""

from __future__ import annotations

import math
from typing import NamedTuple


class GatherPlan(NamedTuple):
    target: int  # requests worth waiting for
    window_s: float  # how long to wait for them; 0 = dispatch now
    limit: int  # the most to take: the slot's share of the demand


class GatherPolicy:
    """Decides, when a slot frees, how many requests to take and whether to wait for more.

    Closed-loop clients send their next request as soon as their answer arrives, so a batch's
    answers come back as a burst; dispatching the burst's first arrival alone would split every
    later batch in two (1 + 39, then 20 + 20). So: `demand` is the peak number of requests in
    flight between dispatches (halved each dispatch when traffic falls).

    - The limit is a slot's share of the demand (demand / slots): a batch never takes more,
      so the slots run balanced batches. Without it a lane can lock into 1 + 39: the slot that
      ran the 1 is free again when the 39 come back, so they would all go to the other slot,
      and the lone request, re-sent, to this one (measured: half the steady throughput).
    - The target is what can still arrive (demand minus what the other slots run, shared by
      the free slots), up to the limit. A window opens when the queue holds less than the
      target and closes the moment it is reached; it lasts at most half the measured batch
      time T (the latecomers of a burst arrive within a millisecond or two), capped by
      max_batch_wait_s. At idle the target is the lone request itself: no wait, no timer.
    """

    def __init__(self, max_wait_s: float, max_batch_size: int, slots: int = 1) -> None:
        self.max_wait_s = max_wait_s
        self.max_batch_size = max_batch_size
        self.slots = max(slots, 1)
        self.demand = 0.0
        self.peak = 0
        self.batch_seconds = 0.0  # EWMA of engine time per batch

    def observe_in_flight(self, in_flight: int) -> None:
        self.peak = max(self.peak, in_flight)

    def observe_batch(self, seconds: float) -> None:
        self.batch_seconds = seconds if self.batch_seconds == 0 else 0.8 * self.batch_seconds + 0.2 * seconds

    def plan(self, queued: int, running: int, in_flight: int, free_slots: int) -> GatherPlan:
        self.demand = max(float(self.peak), 0.5 * self.demand)
        self.peak = in_flight
        limit = max(1, min(self.max_batch_size, math.ceil(self.demand / self.slots)))
        # Several free slots share what can still arrive: two batches of 20 beat one of 40 and
        # an idle slot.
        target = max(1, min(limit, math.ceil((self.demand - running) / max(free_slots, 1))))
        if self.max_wait_s <= 0 or queued >= target:
            return GatherPlan(target, 0.0, limit)
        return GatherPlan(target, min(self.max_wait_s, 0.5 * self.batch_seconds), limit)
