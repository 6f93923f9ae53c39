"""The short soak (benchmarks/soak.py for a minute): the gateway over TLS on loopback, serving the tiny model's
package in-process, under well-formed load with slow clients, aborted streams and a greedy key mixed in."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO
from test_serve import package  # noqa: F401  (the module fixture: the tiny model's package)

sys.path.insert(0, str(REPO / "benchmarks"))
import soak

pytestmark = pytest.mark.slow  # a minute of load on the gateway


def test_a_minute_of_load_with_slow_clients_and_aborted_streams(package, tmp_path):  # noqa: F811
    figures = soak.soak(package, tmp_path / "soak", seconds=60, concurrency=8, keys=2, slow=32, abort_every=5, greedy_rps=10,
                        overrides={  # short deadlines, so that each slow client is cut off many times in a minute
                            "deadlines": {"header_s": 3, "body_s": 3, "keep_alive_s": 5}, "max_connections": 64})
    print(soak.report(figures))
    well_formed = figures["well_formed"]
    assert well_formed["requests"] >= 50 and well_formed.get("2xx") == well_formed["requests"], well_formed
    assert len(well_formed["per_key"]) == 2, "the clients share the keys, each within the deployment's analyst rate"
    assert figures["aborted_streams"]["requests"] >= 5 and figures["aborted_streams"].get("2xx") == figures["aborted_streams"]["requests"]
    refused = figures["expected_refusals"]
    assert refused.get("408", 0) + refused.get("401", 0) > 0 and refused.get("429 rate_limited", 0) > 0, refused
    assert refused.get("429 too_many_refusals", 0) > 0, "one address's refusals past its bucket are answered 429"
    assert set(refused) <= {"401", "408", "429 rate_limited", "429 too_many_refusals", "greedy_2xx"}, refused
    slow = figures["slow_connections"]
    assert all(slow[kind]["closed_by_gateway"] == slow[kind]["n"] > 0 for kind in ("silent", "trickle")), slow
    memory = figures["rss_mib"]
    assert memory["end"] - memory["warm"] < 64, memory
    audit = figures["audit"]
    assert audit["request_records"] + audit["aggregated_requests"] == audit["requests_sent"] and audit["verified"], audit
    assert audit["aggregated_requests"] > 0
    assert figures["serving_after"] and figures["gateway_log"] == {"503_concurrency_limit": 0, "asgi_exceptions": 0}
