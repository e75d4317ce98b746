"""LoopGuard: the admitted share shrinks only while the loop lags *and* requests keep arriving."""

from __future__ import annotations

from server.core.dataplane import LoopGuard


class FakeLoop:
    def __init__(self):
        self.now = 0.0
        self.timers = []

    def time(self):
        return self.now

    def call_at(self, when, fn):
        self.timers.append((when, fn))

        class H:
            def cancel(self_inner):
                pass
        return H()

    def fire(self, late: float):
        when, fn = self.timers.pop(0)
        self.now = when + late
        fn()


def admitted(guard: LoopGuard, n: int) -> int:
    return sum(guard.admit() for _ in range(n))


def test_a_lagging_loop_with_arrivals_cuts_the_share_and_recovers():
    loop = FakeLoop()
    g = LoopGuard(loop, limit=0.05, interval=0.01, min_arrivals=32)
    g.start()
    assert admitted(g, 100) == 100
    loop.fire(late=0.2)  # lag and 100 arrivals: overloaded
    assert g.share == 0.8
    assert admitted(g, 100) == 80  # spread evenly, no randomness
    loop.fire(late=0.0)
    assert abs(g.share - 0.85) < 1e-9
    for _ in range(10):
        loop.fire(late=0.0)
    assert g.share == 1.0


def test_a_pause_without_arrivals_is_not_overload():
    loop = FakeLoop()
    g = LoopGuard(loop, limit=0.05)
    g.start()
    admitted(g, 5)
    loop.fire(late=1.0)  # a long pause (GC, a busy machine) with few requests
    assert g.share == 1.0


def test_off_when_the_limit_is_zero():
    loop = FakeLoop()
    LoopGuard(loop, limit=0.0).start()
    assert loop.timers == []
