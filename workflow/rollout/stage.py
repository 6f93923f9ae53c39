"""rollout and promote: put the registered package behind the gateway, check it, and move `production`.

    snakemake results/rollout/promoted.json

local (the embedded default): start the gateway on the package with the key from the KMS, wait until it is
ready, run the canary checks (TLS 1.3, role matrix, generation equal to the engine's own, latency SLO, audit),
stop it gracefully; promote only if every check passed. kubernetes: render and validate the manifests, and with
a kubectl context apply them and wait for the rollout (undone when the pods do not become ready).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx2
import mlflow
import yaml

from workflow.chat import prompt_text
from workflow.config import Allow, Config
from workflow.engine.runtime import load_engine
from workflow.finetune.launch import free_port
from workflow.package import archive
from workflow.rollout import canary, kubernetes, registry
from workflow.roles import ROLES
from workflow.serve.access import KeyStore
from workflow.serve.output import ReasoningSplit, split_text
from workflow.serve.settings import GatewaySettings
from workflow.serve.tls import client_context, ensure_certificates
from workflow.tracking import Tracking, describe, job_run, record_gate
from workflow.wait import wait_for

log = logging.getLogger(__name__)
logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per canary request is noise


class CanaryFailed(RuntimeError):
    """A rollout check failed: production was not touched."""


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


class LocalGateway:
    """The gateway as its own process on a loopback port, with throw-away canary keys (one per role)."""

    def __init__(self, config: Config, package: str | Path, workdir: Path, log_path: str | None) -> None:
        self.workdir, self.package, self.log_path = workdir, package, log_path
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        gateway = config.rollout.gateway
        keys_path = workdir / "canary_keys.json"
        keys_path.unlink(missing_ok=True)
        store = KeyStore(keys_path)
        self.keys = {role: store.add(f"canary-{role}", role) for role in ROLES}
        self.audit_path = workdir / "canary-audit.jsonl"
        # The canary's gateway starts afresh: no audit records, anchor or served-package history of an earlier canary.
        for stale in (self.audit_path, self.audit_path.with_name(self.audit_path.name + ".anchor.json")):
            stale.unlink(missing_ok=True)
        canary_gateway = gateway.model_copy(update={
            "host": "127.0.0.1", "port": self.port, "api_keys": str(keys_path), "upstream": None,
            "audit": gateway.audit.model_copy(update={"path": str(self.audit_path)}),
            "allow": Allow(**{role: ("127.0.0.0/8",) for role in ROLES})})  # the canary calls from loopback
        self.config = config.model_copy(update={"rollout": config.rollout.model_copy(update={"gateway": canary_gateway})})
        self.config_path = workdir / "canary-config.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config.model_dump(mode="json")))
        self.ca = ensure_certificates(gateway.tls.dir, gateway.tls.hosts).ca
        self.url = f"https://127.0.0.1:{self.port}"

    def __enter__(self) -> LocalGateway:
        sink = open(self.log_path or os.devnull, "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workflow.serve", "--config", str(self.config_path), "start", "--package", str(self.package)],
            stdout=sink, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout_s: float) -> float:
        began = time.perf_counter()
        with httpx2.Client(base_url=self.url, verify=client_context(self.ca), timeout=5) as client:
            def ready() -> bool:
                if self.process.poll() is not None:
                    raise CanaryFailed(f"rollout: the gateway exited with status {self.process.returncode} before it was ready; see {self.log_path}")
                try:
                    answer = client.get("/readyz")
                except httpx2.TransportError:
                    return False
                if answer.json().get("reason", "").startswith("load failed"):
                    raise CanaryFailed(f"rollout: the gateway could not load the package: {answer.json()['reason']} "
                                       f"({self.log_path})")
                return answer.status_code == 200

            try:
                wait_for(ready, "the gateway to load the package", timeout_s)
            except TimeoutError:
                raise CanaryFailed(f"rollout: the gateway was not ready within rollout.canary.ready_timeout_s = {timeout_s}") from None
        return time.perf_counter() - began

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGTERM)  # graceful: in-flight requests finish
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def served_fields(text: str, tokenizer, row: dict, reasoning: str) -> dict:
    """The message fields the gateway answers for this generation (its think block split off unless reasoning: raw)."""
    if reasoning == "raw":
        return {"content": text}
    return split_text(text, ReasoningSplit.opens_think(prompt_text(tokenizer, row["messages"][:-1])))


def local_checks(config: Config, package_dir: Path, selection: dict, test_path: str | Path, workdir: Path,
                 log_path: str | None) -> tuple[list[canary.Check], dict]:
    # The reference answers need torch and Transformers; imported here, not above, so that promote (in this module,
    # and a second's work) starts without them: 7 s of a job's start-up on 2 cores.
    from transformers import AutoTokenizer

    from workflow.data import read_split
    from workflow.evaluate import engine_completions

    settings, model = config.rollout.canary, config.package.model_name
    rows = read_split(test_path, settings.samples)
    max_tokens = config.evaluate.max_new_tokens
    engine_dir = selection["engine_dir"]
    engine = load_engine(engine_dir, config.engine)
    tokenizer = AutoTokenizer.from_pretrained(engine_dir)
    reference = [served_fields(c.text, tokenizer, row, config.rollout.gateway.reasoning)
                 for c, row in zip(engine_completions(engine, tokenizer, rows, max_tokens), rows, strict=True)]
    with LocalGateway(config, package_dir, workdir, log_path) as gateway:
        ready_s = gateway.wait_ready(settings.ready_timeout_s)
        analyst = canary.openai_client(gateway.url, gateway.ca, gateway.keys["analyst"])
        checks = [
            canary.check_tls("127.0.0.1", gateway.port, gateway.ca),
            canary.check_roles(gateway.url, gateway.ca, gateway.keys, model),
            canary.check_generation(analyst, model, rows, reference, max_tokens),
            canary.check_latency(analyst, model, rows, max(config.benchmark.concurrency), settings.requests,
                                 config.benchmark.output_len, settings.latency_p95_s),
        ]
        calls = (len(ROLES) + 1) * len(canary.ENDPOINTS) + len(rows) + settings.requests
    audit = GatewaySettings.from_config(gateway.config).audit_log(writer=False)
    checks.append(canary.check_audit(audit, calls, rows[0]["messages"][-2]["content"]))
    return checks, {"url": gateway.url, "ready_s": ready_s}


def kubernetes_checks(config: Config, package_dir: Path, out_dir: Path) -> tuple[list[canary.Check], dict]:
    k8s = config.rollout.kubernetes
    signer = GatewaySettings.from_config(config).trusted_signer()
    folder = kubernetes.render(config, archive.digest(package_dir), out_dir / "k8s", archive.public_pem(signer))
    try:
        checked = kubernetes.validate(kubernetes.build(folder), k8s.kubernetes_version)
        checks = [canary.Check("manifests", True, checked, f"Kubernetes {k8s.kubernetes_version} schemas (strict)",
                               f"{len(checked)} resources valid: {', '.join(checked)}")]
    except kubernetes.InvalidManifest as err:
        return [canary.Check("manifests", False, None, "valid", str(err))], {"kustomize": str(folder)}
    if k8s.context:
        applied = kubernetes.apply(folder, k8s.context, k8s.namespace, k8s.name, k8s.startup_timeout_s + 60)
        checks.append(canary.Check("rollout_status", applied["ready"], applied, "ready", applied["status"]))
    return checks, {"kustomize": str(folder), "applied": bool(k8s.context)}


def rollout(package_dir: str | Path, registered_path: str | Path, selection_path: str | Path, test_path: str | Path,
            out_path: str | Path, config: Config, tracking: Tracking) -> dict:
    package_dir, out_path = Path(package_dir), Path(out_path)
    registered, selection = read_json(registered_path), read_json(selection_path)
    target = config.rollout.target
    with job_run(tracking, "rollout", {"rollout": config.rollout.model_dump(), "version": registered["version"]}):
        if target == "local":
            checks, where = local_checks(config, package_dir, selection, test_path, out_path.parent, tracking.log_path)
        else:
            checks, where = kubernetes_checks(config, package_dir, out_path.parent)
        report = {"passed": all(c.passed for c in checks), "target": target, "model_name": registered["model_name"],
                  "version": registered["version"], "scheme": selection["selected"], "package_sha256": archive.digest(package_dir),
                  "checks": [c.as_dict() for c in checks], "at": datetime.now(UTC).isoformat(timespec="seconds"),
                  "by": registry.who(), **where}
        mlflow.log_dict(report, "rollout_report.json")
        mlflow.set_tag("ft2prod.package.sha256", report["package_sha256"])
        record_gate(report["checks"])
        describe(f"{target} rollout of {registered['model_name']} version {registered['version']} ({selection['selected']}): "
                 f"**{'passed' if report['passed'] else 'failed'}** — " + "; ".join(
                     f"{c.name} {'passed' if c.passed else 'FAILED'}" for c in checks) + ".")
        for check in checks:
            mlflow.log_metric(f"check_{check.name}", float(check.passed))
            log.info("%s %s: %s", "PASS" if check.passed else "FAIL", check.name, check.detail)
        latency = next((c for c in checks if c.name == "latency"), None)
        if latency:
            mlflow.log_metrics({"canary_latency_p95_s": latency.value["p95_s"], "canary_ttft_p50_s": latency.value["ttft_p50_s"]})
        if not report["passed"]:
            (out_path.parent / "failed-report.json").write_text(json.dumps(report, indent=1))
            failed = "; ".join(f"{c.name}: {c.detail}" for c in checks if not c.passed)
            raise CanaryFailed(f"rollout: canary failed, production not changed: {failed}")
        out_path.write_text(json.dumps(report, indent=1))
        return report


def promote(report_path: str | Path, out_path: str | Path, tracking: Tracking) -> dict:
    """Move `production` to the checked version (the old one keeps `previous`) and record the rollout with it."""
    report = read_json(report_path)
    if not report["passed"]:
        raise CanaryFailed(f"promote: {report_path} records a failed rollout; production not changed")
    with job_run(tracking, "promote", {"model_name": report["model_name"], "version": report["version"]}):
        record = registry.promote(report["model_name"], report["version"])
        client = mlflow.tracking.MlflowClient()
        for key in ("package_sha256", "target", "at", "by"):
            client.set_model_version_tag(report["model_name"], report["version"], f"ft2prod.rollout.{key}", str(report[key]))
        mlflow.log_dict(report, "rollout_report.json")
        mlflow.log_dict(record, "promoted.json")
        mlflow.set_tags({"ft2prod.gate": "passed", "ft2prod.production_version": record["production"]})
        describe(f"{record['model_name']}: `production` → version **{record['production']}** (`previous`: {record['previous']}), "
                 f"by {record['by']} at {record['at']}.")
        Path(out_path).write_text(json.dumps(record, indent=1))
        log.info("promoted %s version %s to production (previous: %s)", record["model_name"], record["production"], record["previous"])
        return record
