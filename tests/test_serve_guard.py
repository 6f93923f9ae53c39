"""Slow clients and greedy keys against the running gateway (uvicorn, TLS 1.3, the tiny model's package): the
attacks performed for real, over raw TLS sockets (benchmarks/slow_clients.py), while well-formed clients go on."""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import pytest
from conftest import REPO
from test_serve import Served, chat, package  # noqa: F401  (package: the module fixture, the tiny model's package)

sys.path.insert(0, str(REPO / "benchmarks"))
import slow_clients

pytestmark = pytest.mark.slow  # hundreds of slow connections against a running gateway

HEADER_S, BODY_S = 4.0, 1.5
MAX_CONNECTIONS = 40


@pytest.fixture(scope="module")
def guarded(package):  # noqa: F811  (the fixture)
    served = Served(package.parent / "guarded", package, {
        "deadlines": {"header_s": HEADER_S, "body_s": BODY_S, "keep_alive_s": 5}, "max_connections": MAX_CONNECTIONS,
        # every attacker here is on loopback, one address: let each refusal be answered as itself (408/401), not as the
        # address's 429 too_many_refusals (tests/test_serve_http.py tests that limit)
        "refusal_limits": {"per_minute": 60000, "burst": 10000}})
    served.wait_ready()
    yield served
    served.stop()


def test_slow_clients_cannot_starve_well_formed_ones(guarded):
    """Four kinds of slow client, 16 new connections a second for 10 s (160, four times max_connections), each
    waiting up to 10 s for the gateway to act, while four clients send well-formed chat completions. Without
    deadlines the slow connections pile up until every new request gets 503."""
    port, ca, key = guarded.port, guarded.ca, guarded.keys["analyst"]
    attacks = {"silent": lambda: slow_clients.silent(port, ca, 10),
               "trickle": lambda: slow_clients.trickle(port, ca, 10),
               "idle_body_key": lambda: slow_clients.idle_body(port, ca, 10, key),
               "idle_body_nokey": lambda: slow_clients.idle_body(port, ca, 10, None)}
    stop, statuses = threading.Event(), []

    def well_formed() -> None:
        with guarded.http("analyst") as client:
            while not stop.is_set():
                try:
                    statuses.append(client.post("/v1/chat/completions", json=chat(max_tokens=2)).status_code)
                except httpx2.TransportError as err:
                    statuses.append(repr(err))

    with ThreadPoolExecutor(4) as senders, ThreadPoolExecutor(200) as attackers:
        for _ in range(4):
            senders.submit(well_formed)
        launched = []
        for _ in range(40):  # 10 s
            launched += [attackers.submit(attack) for attack in attacks.values()]
            time.sleep(0.25)
        outcomes = [future.result() for future in launched]
        stop.set()
    assert len(outcomes) >= 4 * MAX_CONNECTIONS and not [o for o in outcomes if o.error]
    assert len(statuses) >= 20 and set(statuses) == {200}, f"well-formed requests got {sorted(set(map(str, statuses)))}"
    by_kind = {kind: [o for o in outcomes if o.kind == kind] for kind in attacks}
    slack = HEADER_S + 4  # a busy 2-core machine
    for kind in ("silent", "trickle"):  # no request ever came: closed by the header deadline (or evicted), no answer
        assert all(o.closed_s is not None and o.closed_s < slack and o.status is None for o in by_kind[kind]), (
            kind, [(o.status, o.closed_s) for o in by_kind[kind]][:10])
    keyed = by_kind["idle_body_key"]  # a valid key, no body: 408 at the body deadline, then closed
    assert all(o.status == 408 and b"body_timeout" in o.body and o.closed_s is not None for o in keyed), (
        [(o.status, o.closed_s) for o in keyed][:10])
    assert min(o.answered_s for o in keyed) >= BODY_S * 0.9
    keyless = by_kind["idle_body_nokey"]  # no key: 401 from the headers alone, the body never awaited
    assert all(o.status == 401 and o.answered_s < BODY_S for o in keyless), [(o.status, o.answered_s) for o in keyless][:10]

    with guarded.http("auditor") as auditor:
        metrics = auditor.get("/metrics").text
        events = auditor.get("/audit/events", params={"status": 408, "limit": 1000}).json()["events"]
    assert 'ft2prod_gateway_connections_closed_total{reason="header_timeout"}' in metrics
    assert 'ft2prod_gateway_denied_total{reason="body_timeout"}' in metrics
    assert len(events) == len(keyed) and {e["reason"] for e in events} == {"body_timeout"}


def test_a_burst_of_silent_connections_beyond_max_connections_is_evicted_not_served_503(guarded):
    """More silent connections at once than max_connections: those that have waited longest are closed to make
    room, so a well-formed request still gets 200 before any header deadline has passed."""
    def evicted() -> float:
        with guarded.http("auditor") as auditor:
            lines = auditor.get("/metrics").text.splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith('ft2prod_gateway_connections_closed_total{reason="evicted"}'))

    before, sockets = evicted(), []
    try:
        began = time.monotonic()
        for _ in range(MAX_CONNECTIONS + 10):
            sockets.append(slow_clients.connect(guarded.port, guarded.ca))
        with guarded.http("analyst") as client:
            assert client.post("/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200
        assert time.monotonic() - began < HEADER_S, "the header deadline passed first: this machine is too busy to tell"
    finally:
        for sock in sockets:
            sock.close()
    assert evicted() > before


def test_per_key_rate_limit_answers_429_with_retry_after_and_spares_other_keys(package, tmp_path):  # noqa: F811
    served = Served(tmp_path / "rated", package, {"rate_limits": {
        "admin": {"requests_per_minute": 60, "burst": 10}, "analyst": {"requests_per_minute": 6, "burst": 3},
        "auditor": {"requests_per_minute": 600, "burst": 100}}})
    try:
        served.wait_ready()
        from workflow.serve.access import KeyStore

        other = KeyStore(served.root / "api_keys.json").add("analyst-2", "analyst")
        with served.http("analyst") as greedy:
            assert [greedy.post("/v1/chat/completions", json=chat(max_tokens=2)).status_code for _ in range(3)] == [200] * 3
            refused = greedy.post("/v1/chat/completions", json=chat(max_tokens=2))
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(refused.headers["retry-after"]) <= 10  # one request per 10 s refills the bucket
        assert "6 requests per minute, burst 3" in refused.json()["error"]["message"]
        # decided from the headers: the announced body is never awaited
        refused_early = slow_clients.idle_body(served.port, served.ca, 8, served.keys["analyst"])
        assert refused_early.status == 429 and refused_early.answered_s < 5
        with httpx2.Client(base_url=served.url, verify=slow_clients.client_context(served.ca), timeout=60,
                           headers={"Authorization": f"Bearer {other}"}) as spared:
            assert spared.post("/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200
        with served.http("auditor") as auditor:
            metrics = auditor.get("/metrics").text
            limited = auditor.get("/audit/events", params={"status": 429}).json()["events"]
        assert 'ft2prod_gateway_denied_total{reason="rate_limited"}' in metrics
        assert 'ft2prod_gateway_requests_total{endpoint="/v1/chat/completions",role="analyst",status="429"}' in metrics
        assert len(limited) == 2 and {(e["key_id"], e["reason"]) for e in limited} == {("analyst", "rate_limited")}
    finally:
        served.stop()


def test_token_bucket_allows_the_burst_then_the_rate_per_key():
    from workflow.config import RateLimits
    from workflow.serve.ratelimit import RateLimiter, retry_after

    now = [0.0]
    limiter = RateLimiter(RateLimits(analyst={"requests_per_minute": 60, "burst": 3}), clock=lambda: now[0])
    assert [limiter.wait("a", "analyst") for _ in range(3)] == [0, 0, 0]
    assert limiter.wait("a", "analyst") == pytest.approx(1.0) and retry_after(1.0) == "1"
    assert limiter.wait("b", "analyst") == 0  # another key has its own bucket
    now[0] = 0.5
    assert limiter.wait("a", "analyst") == pytest.approx(0.5) and retry_after(0.5) == "1"
    now[0] = 1.0
    assert limiter.wait("a", "analyst") == 0 and limiter.wait("a", "analyst") > 0
    now[0] = 100.0  # a long pause refills to the burst, no further
    waits = [limiter.wait("a", "analyst") for _ in range(4)]
    assert waits[:3] == [0, 0, 0] and waits[3] > 0
