"""Fair sharing: one organisation's flood never makes another's requests fail. On SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections import Counter

from souverain.server.registry import Registry
from tests.server.platform_app import ROOT, call, org_key


def test_free_flood_with_n16_while_pro_gets_every_answer(url: str, registry: Registry) -> None:
    # The free plan keeps its fair-sharing caps (4 running, 16 queued) but its rate limits are lifted, so the
    # flood is held back by the caps alone.
    assert call(url, "PUT", "/v1/admin/plans/free", ROOT, {"requests_per_second": 1000, "tokens_per_minute": None,
                                                           "tokens_per_month": None})[0] == 200
    free, pro = org_key(url, "free-co", "free"), org_key(url, "pro-co", "pro")
    engine = registry.models["tiny"].engine.engine
    stop = threading.Event()
    codes: Counter[object] = Counter()
    most_free_running = 0

    def flood() -> None:
        while not stop.is_set():
            body = {"model": "tiny", "prompt": "flood", "n": 16, "max_tokens": 300, "min_tokens": 300,
                    "temperature": 1.0}
            status, _, answer = call(url, "POST", "/v1/completions", free, body)
            codes[status if status == 200 else answer.get("code")] += 1

    def watch() -> None:
        nonlocal most_free_running
        while not stop.is_set():
            per_tenant = Counter(s.request.tenant for s in list(engine.scheduler.running))
            most_free_running = max([most_free_running, *per_tenant.values()])  # pro runs one at a time
            time.sleep(0.001)

    threads = [threading.Thread(target=flood) for _ in range(6)] + [threading.Thread(target=watch)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)  # the flood is under way
        answers = []
        for _ in range(3):
            started = time.monotonic()
            status, _, _ = call(url, "POST", "/v1/completions", pro, {"model": "tiny", "prompt": "pro",
                                                                          "max_tokens": 8, "temperature": 0})
            answers.append((status, round(time.monotonic() - started, 2)))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    print(f"pro answers (status, seconds): {answers}; free flood outcomes: {dict(codes)}; "
          f"free sequences running at most: {most_free_running}")
    assert [s for s, _ in answers] == [200, 200, 200]
    assert codes["org_queue_full"] > 0  # the flood was refused past its allowance ...
    assert most_free_running <= 4  # ... and ran at most its plan's 4 sequences at once
    assert set(codes) <= {200, "org_queue_full"}


def test_n_beyond_the_plans_allowance_is_a_400_not_a_retry(url: str) -> None:
    free = org_key(url, "free-co", "free")
    assert call(url, "PUT", "/v1/admin/plans/free", ROOT, {"max_concurrent": 2, "max_queued": 2})[0] == 200
    status, _, body = call(url, "POST", "/v1/completions", free, {"model": "tiny", "prompt": "x", "n": 5,
                                                                   "max_tokens": 1})
    assert status == 400 and body["param"] == "n" and body["code"] == "plan_limit"
