"""A schema fuzz of the gateway: Schemathesis generates requests from the gateway's OpenAPI document (schema-valid
ones, and invalid ones) for every operation, sends them with each role's key, no key and a wrong key to the real
gateway (uvicorn over TLS 1.3, serving a package built from the tiny model in-process), and checks every answer:
no 5xx, only documented status codes and content types, bodies matching their documented schemas, invalid input
refused with a 4xx, and each identity refused exactly where its role has no permission.

    PYTHONPATH=$PWD python -m pytest tests/test_fuzz.py -q     # about a minute on a 2-core machine

Generation is bounded (max_examples) and derandomized, so a run sends the same requests every time.
"""

from __future__ import annotations

import copy
import time
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import CHECKS
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode
from test_serve import MODEL, Served, package  # noqa: F401  (package: the module's fixture)

from workflow.roles import ROLES
from workflow.serve.server import build

pytestmark = pytest.mark.slow  # ~2,900 requests from the gateway's OpenAPI document

# The permission each keyed operation needs (app.py's table); /healthz and /readyz need none.
PERMISSION = {
    "GET /v1/models": "infer", "POST /v1/chat/completions": "infer", "POST /v1/completions": "infer",
    "GET /v1/deployment": "view", "POST /admin/deploy": "deploy", "POST /admin/undeploy": "deploy",
    "GET /admin/limits": "adjust", "PUT /admin/limits": "adjust", "POST /admin/audit/prune": "adjust", "GET /audit/events": "audit",
    "GET /audit/alerts": "audit", "GET /metrics": "monitor",
}
IDENTITIES = ["admin", "analyst", "auditor", "no key", "wrong key"]
CHECKED = ("not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance",
           "response_headers_conformance", "negative_data_rejection")
# Examples per operation and generation mode: more where the identity reaches the route's own code.
REACHED, REFUSED = 80, 10


@pytest.fixture(scope="module")
def fuzzed(package, tmp_path_factory):  # noqa: F811
    """The gateway serving the tiny package, and its OpenAPI document as a Schemathesis schema."""
    # thousands of no-key and wrong-key requests from one address: each answered as itself, not as the address's
    # 429 too_many_refusals (tests/test_serve_http.py tests that limit)
    served = Served(tmp_path_factory.mktemp("fuzz") / "gateway", package,
                    {"refusal_limits": {"per_minute": 60000, "burst": 10000}})
    try:
        served.wait_ready()
        # The same app, not started: only its routes are read (its own audit log: the running gateway holds its one).
        document = build(served.config, audit_path=str(served.root / "document-audit.jsonl"))[0].openapi()
        config = SchemathesisConfig.from_dict({
            # 413: an invalid body may also be over limits.max_body_bytes, which the guard refuses first.
            "checks": {"negative_data_rejection": {"expected-statuses": ["400", "401", "403", "404", "413"]}},
            # Unknown query parameters are ignored, as OpenAPI allows (and OpenAI's API does): not invalid input.
            "generation": {"allow-extra-parameters": False},
        })
        yield served, lambda: schemathesis.openapi.from_dict(copy.deepcopy(document), config=config)
    finally:
        served.stop()


def identity_headers(served: Served, identity: str) -> dict:
    if identity == "no key":
        return {}
    key = served.keys[identity] if identity in ROLES else "ftk-" + "0" * 43
    return {"Authorization": f"Bearer {key}"}


def refusal(identity: str, label: str) -> int | None:
    """The status an identity must get on an operation it may not call (None: it may)."""
    if label not in PERMISSION:
        return None
    if identity not in ROLES:
        return 401
    return None if PERMISSION[label] in ROLES[identity].permissions else 403


def test_the_document_declares_every_route_its_key_and_its_refusals(fuzzed):
    _, load_schema = fuzzed
    document = load_schema().raw_schema
    operations = {f"{method.upper()} {path}": operation for path, item in document["paths"].items()
                  for method, operation in item.items()}
    assert set(operations) == set(PERMISSION) | {"GET /healthz", "GET /readyz"}, "a new route needs its row in PERMISSION"
    for label, operation in operations.items():
        assert ("security" in operation) == (label in PERMISSION), label
        refusals = {"400", "408", "413", "429"} | ({"401", "403"} if label in PERMISSION else set())
        assert refusals <= set(operation["responses"]) and "422" not in operation["responses"], label
    assert document["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": "An API key from `python -m workflow.serve keys add`"}


@pytest.mark.parametrize("identity", IDENTITIES)
def test_fuzz_every_operation(fuzzed, identity):
    served, load_schema = fuzzed
    schema = load_schema()  # fresh: what Schemathesis learns from answers stays within one identity's run
    failures, answered = [], Counter()
    began = time.perf_counter()
    with requests.Session() as session, served.http("admin") as admin:
        session.verify = str(served.ca)
        configured = admin.get("/admin/limits").json()
        for result in schema.get_all_operations():
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                failure = fuzz(result.ok(), mode, identity, served, session, admin, configured, answered)
                failures += [failure] if failure else []
        assert admin.get("/readyz").status_code == 200, "the gateway still serves"
    print(f"fuzz as {identity}: {answered.total()} requests in {time.perf_counter() - began:.1f} s")
    for (label, mode, status), count in sorted(answered.items()):
        print(f"  {label} {mode}: {status} x {count}")
    assert not failures, "\n".join(failures)


def fuzz(operation, mode: GenerationMode, identity: str, served: Served, session: requests.Session, admin, configured: dict,
         answered: Counter) -> str | None:
    """Send one operation's generated requests in one mode as one identity; what failed, or None."""
    label = f"{operation.method.upper()} {operation.path}"
    refused = refusal(identity, label)
    headers = identity_headers(served, identity)
    @settings(max_examples=REACHED if refused is None else REFUSED, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        if mode == GenerationMode.NEGATIVE and any(isinstance(v, (list, dict)) for v in (case.query or {}).values()):
            # An array or object in a query string is sent as its items (one item: that value; none: nothing), which
            # may well be valid input: not a negative case. Wrong scalar types and values still are.
            reject()
        response = case.call(session=session, headers=headers, base_url=served.url, verify=str(served.ca))
        answered[label, mode.value, response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS.get_by_names(CHECKED), headers=headers)
            if refused is not None:
                # 413: the guard refuses an oversized body before any key is looked at. For invalid input also 400,
                # as FastAPI decodes the JSON body before the route's key check runs (a body that is not JSON is
                # refused as such first), and 401, as invalid input includes a broken API key.
                expected = {refused, 413} | ({400, 401} if mode == GenerationMode.NEGATIVE else set())
                assert response.status_code in expected, f"{identity} got {response.status_code} from {label}, expected {refused}"
        finally:
            if label == "PUT /admin/limits" and response.status_code == 200:
                # The fuzz sets any valid limits (max_tokens = 1 ...): put back the configured ones, so that every
                # example starts from the same gateway.
                assert admin.put("/admin/limits", json=configured).status_code == 200

    try:
        run()
    except Unsatisfiable:
        assert mode == GenerationMode.NEGATIVE  # an operation without parameters or body: nothing to break
    except (Exception, BaseExceptionGroup) as failure:  # noqa: BLE001 (every operation runs; failures are listed together)
        return f"--- {label} ({mode.value}, {identity}):\n{failure}\n" + "\n".join(getattr(failure, "__notes__", []))
    return None


# What the fuzz found, each with the request it sent; all failed on the gateway before the fix named.


def test_an_empty_prompt_is_a_400_not_a_500(fuzzed):
    # Found: {"model": "tiny-model", "prompt": ""} -> 500 (the engine raised "input_ids is empty").
    served, _ = fuzzed
    with served.http("analyst") as analyst:
        for stream in (False, True):
            answer = analyst.post("/v1/completions", json={"model": MODEL, "prompt": "", "stream": stream})
            assert answer.status_code == 400 and "prompt is empty" in answer.json()["error"]["message"]
        assert analyst.post("/v1/completions", json={"model": MODEL, "prompt": "1 + 1 =", "max_tokens": 2}).status_code == 200


def test_a_body_that_is_not_utf8_and_unknown_routes_get_the_error_shape(fuzzed):
    # Found: a body of bytes that are not UTF-8 -> 400 {"detail": "There was an error parsing the body"}, FastAPI's
    # shape, not the documented error body; unknown paths and methods answered in that shape too.
    served, _ = fuzzed
    with served.http("analyst") as analyst:
        garbled = analyst.post("/v1/completions", content=b"\xff\xfe{", headers={"content-type": "application/json"})
        assert garbled.status_code == 400 and "UTF-8" in garbled.json()["error"]["message"]
        assert analyst.get("/v2/nothing").json()["error"]["message"] == "Not Found"
        wrong_method = analyst.delete("/v1/models")
        assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "GET"
        assert wrong_method.json()["error"]["message"] == "Method Not Allowed"


def test_max_body_bytes_cannot_shut_the_admin_out(fuzzed):
    # Found: PUT /admin/limits {"max_body_bytes": 1} -> 200, after which every request with a body got 413, the
    # admin's PUT to raise the limit again included, until a restart.
    served, _ = fuzzed
    with served.http("admin") as admin:
        refused = admin.put("/admin/limits", json={"max_body_bytes": 1})
        assert refused.status_code == 400 and "greater than or equal to 1024" in refused.json()["error"]["message"]
        assert admin.put("/admin/limits", json={"max_body_bytes": 1024}).status_code == 200
        assert admin.put("/admin/limits", json={"max_body_bytes": 4096}).json()["max_body_bytes"] == 4096


def test_a_query_parameter_given_twice_is_refused(fuzzed):
    # Found: GET /audit/alerts?since=&since=u -> 200, the last value taken (a proxy in front could read the first).
    served, _ = fuzzed
    with served.http("auditor") as auditor:
        twice = auditor.get("/audit/alerts?since=&since=u")
        assert twice.status_code == 400 and "since given more than once" in twice.json()["error"]["message"]
        assert auditor.get("/audit/events?limit=1&key_id=admin").status_code == 200


def test_sampling_fields_of_the_wrong_json_type_are_refused(fuzzed):
    # Found: {"model": "tiny-model", "messages": [...], "temperature": false} -> 200 (false was read as 0). So were
    # "n": true, "stream": 0 and "max_tokens": "5": the schema's JSON types are the API's.
    served, _ = fuzzed
    with served.http("analyst") as analyst:
        for wrong in ({"temperature": False}, {"n": True}, {"stream": 0}, {"max_tokens": "5"}, {"max_completion_tokens": 2.5}):
            answer = analyst.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "2 + 2?"}]} | wrong)
            assert answer.status_code == 400, (wrong, answer.text)
            assert next(iter(wrong)) in answer.json()["error"]["message"]
        assert analyst.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "2 + 2?"}],
                                                          "temperature": 0, "n": 1.0, "stream": False, "max_tokens": 2.0}).status_code == 200
