"""Token buckets: they trip at the configured rate and recover, driven by an injected clock."""

from __future__ import annotations

from souverain.server.limits import Rate, RateLimiter


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_requests_per_second_trip_and_recover() -> None:
    clock = Clock()
    lim = RateLimiter(clock)
    rates = [Rate("key:1", 2.0, None)]
    assert lim.admit(rates, 0).retry_after == 0
    assert lim.admit(rates, 0).retry_after == 0
    v = lim.admit(rates, 0)  # the third within the same instant
    assert v.retry_after == 0.5 and v.headers["Retry-After"] == "1"
    assert v.headers["x-ratelimit-remaining-requests"] == "0" and v.headers["x-ratelimit-limit-requests"] == "2/s"
    clock.t += 0.5
    assert lim.admit(rates, 0).retry_after == 0
    assert lim.admit(rates, 0).retry_after > 0
    clock.t += 10  # a long pause refills only up to the burst
    assert [lim.admit(rates, 0).retry_after == 0 for _ in range(3)] == [True, True, False]


def test_tokens_per_minute_include_the_answer() -> None:
    clock = Clock()
    lim = RateLimiter(clock)
    rates = [Rate("key:1", None, 600)]  # 10 tokens a second
    assert lim.admit(rates, 100).retry_after == 0
    lim.charge(rates, 550)  # the answer was long: the balance goes below zero
    v = lim.admit(rates, 10)
    assert abs(v.retry_after - 5.1) < 1e-9 and v.headers["Retry-After"] == "6"  # back to 1 token: 51 / 10 s
    assert v.headers["x-ratelimit-remaining-tokens"] == "0" and v.headers["x-ratelimit-limit-tokens"] == "600"
    clock.t += 5.2
    assert lim.admit(rates, 10).retry_after == 0


def test_the_tightest_scope_decides_and_a_refusal_takes_nothing() -> None:
    clock = Clock()
    lim = RateLimiter(clock)
    key_a, key_b, ws = Rate("key:a", 5.0, None), Rate("key:b", 5.0, None), Rate("workspace:1", 2.0, None)
    assert lim.admit([key_a, ws], 0).retry_after == 0
    assert lim.admit([key_b, ws], 0).retry_after == 0
    assert lim.admit([key_a, ws], 0).retry_after > 0  # the workspace is spent though key a is not
    # The refused request took nothing from key a: it still has 4 of 5.
    assert lim.buckets[("key:a", "requests")].level == 4.0


def test_unlimited_scopes_never_refuse() -> None:
    lim = RateLimiter(Clock())
    assert all(lim.admit([Rate("key:1", None, None)], 10**9).retry_after == 0 for _ in range(100))
