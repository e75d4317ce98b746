"""Promotion decisions: what makes a canary or a probation fail, and serving left as it was."""

from server.core.retraining_config import PromotionConfig
from server.retraining.promotion import Live, judge, promote


def test_a_challenger_as_good_as_the_champion_passes():
    cfg = PromotionConfig()
    assert judge(Live(1000, 1, 2.0, 1000), Live(100, 0, 0.21, 100), cfg) == []


def test_error_rate_latency_and_live_quality_each_fail_with_numbers():
    cfg = PromotionConfig(max_error_rate_increase=0.01, max_latency_ratio=1.5, max_quality_drop=0.02)
    reasons = judge(Live(1000, 0, 1.0, 1000, quality=0.95), Live(100, 5, 0.2, 100, quality=0.90), cfg)
    assert len(reasons) == 3
    assert "error rate 0.0500" in reasons[0] and "mean latency 2.00 ms" in reasons[1]
    assert "live quality 0.9000" in reasons[2]
    # lower is better (mse): a higher challenger value is the drop
    assert judge(Live(10, 0, 0, 0, quality=1.0, higher_is_better=False),
                 Live(10, 0, 0, 0, quality=1.5, higher_is_better=False), cfg)


class Server:
    """The management API's traffic numbers as a counter table that requests move (in memory)."""

    def __init__(self, chall_errors=0):
        self.stats = {"1.0": {"requests": 0, "errors": 0, "latency_sum_s": 0.0, "latency_count": 0},
                      "2.0": {"requests": 0, "errors": 0, "latency_sum_s": 0.0, "latency_count": 0}}
        self.weights, self.shadow, self.default, self.calls = None, None, "1.0", []
        self.chall_errors = chall_errors

    def serve(self, n):
        share = (self.weights or {}).get("2.0", 0.0) if self.default == "1.0" else 1.0
        for i in range(n):
            v = "2.0" if (i % 100) < share * 100 else "1.0"
            s = self.stats[v]
            s["requests"] += 1
            s["latency_count"] += 1
            s["latency_sum_s"] += 0.001
            if v == "2.0" and i % 10 == 0 and self.chall_errors:
                s["errors"] += 1

    def traffic(self, model):
        self.serve(1000)
        return {"stats": {k: dict(v) for k, v in self.stats.items()}}

    def set_traffic(self, model, weights):
        self.calls.append(("traffic", weights))
        self.weights = weights or None

    def set_shadow(self, model, version):
        self.calls.append(("shadow", version))

    def set_default(self, model, version):
        self.calls.append(("default", version))
        self.default = version

    def rollback(self, model):
        self.calls.append(("rollback",))
        self.default = "1.0"


def run(server, **kw):
    cfg = PromotionConfig(**{"min_requests": 50, "min_seconds": 0, "max_seconds": 100, "probation_s": 0, **kw})
    ticks = iter(range(10_000))
    return promote(server, "m", "1.0", "2.0", cfg, clock=lambda: next(ticks), sleep=lambda s: None)


def test_canary_then_default_then_weights_cleared():
    s = Server()
    out = run(s)
    assert out.result == "promoted", out.reasons
    assert s.calls[0] == ("traffic", {"1.0": 0.9, "2.0": 0.1}) and ("default", "2.0") in s.calls
    assert s.weights is None and s.default == "2.0"
    assert out.numbers["canary"]["challenger"]["requests"] >= 50


def test_a_failing_canary_leaves_the_champion_with_all_traffic():
    s = Server(chall_errors=1)
    out = run(s)
    assert out.result == "rejected" and "error rate" in out.reasons[0]
    assert s.default == "1.0" and s.weights is None and ("default", "2.0") not in s.calls


def test_a_canary_that_never_sees_enough_requests_is_rejected_in_time():
    s = Server()
    out = run(s, min_requests=10**9, max_seconds=5)
    assert out.result == "rejected" and "needed in 5 s" in out.reasons[0] and s.weights is None


def test_probation_rolls_back_a_default_that_degrades():
    s = Server(chall_errors=0)
    cfg = dict(probation_s=50)
    out = run(s, **cfg)
    assert out.result == "promoted"
    s2 = Server()
    s2.chall_errors = 0
    # errors start only once 2.0 is the default: the probation sees them and rolls back
    orig = s2.set_default

    def degrade(model, version):
        orig(model, version)
        s2.chall_errors = 1
    s2.set_default = degrade
    out2 = run(s2, **cfg)
    assert out2.result == "rolled_back" and ("rollback",) in s2.calls and s2.default == "1.0"
