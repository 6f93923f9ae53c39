"""Kubernetes manifests (rendered, built by kustomize, validated against the API schemas) and the registry aliases
through promotion and rollback. No cluster runs here: applying is not tested."""

from __future__ import annotations

import shutil

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from workflow.config import load
from workflow.engine.release import TENSORRT_LLM_IMAGE
from workflow.rollout import kubernetes, registry

DIGEST = "ab" * 32
PINNED = {"image": "registry.internal/ft2prod/gateway:0.1.0@sha256:" + "1" * 64,
          "engine_image": TENSORRT_LLM_IMAGE + "@sha256:" + "2" * 64}


def merged(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merged(base.get(key, {}), value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def config_with(tmp_path, overrides: dict) -> dict:
    """The config with `overrides`, its images pinned by digest unless the overrides say otherwise."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(merged({"rollout": {"kubernetes": PINNED}}, overrides)))
    return load(path)


def rendered(tmp_path, overrides: dict) -> tuple[dict, list[dict]]:
    config = config_with(tmp_path, overrides)
    folder = kubernetes.render(config, DIGEST, tmp_path / "k8s", b"-----BEGIN PUBLIC KEY-----\n")
    return config, kubernetes.build(folder)


def by_kind(resources: list[dict]) -> dict[str, dict]:
    return {r["kind"]: r for r in resources}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for kustomize) is not installed")
def test_kustomize_builds_manifests_that_validate_against_the_kubernetes_schemas(tmp_path):
    config, resources = rendered(tmp_path, {"rollout": {"gateway": {"allow": {"analyst": ["10.20.0.0/16"]}}}})
    kinds = by_kind(resources)
    assert set(kinds) == {"Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget", "PersistentVolumeClaim", "ConfigMap"}
    assert len(kubernetes.validate(resources, config.rollout.kubernetes.kubernetes_version)) == 6
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    init, gateway = pod["initContainers"][0], pod["containers"][0]
    assert init["args"][:4] == ["python", "-m", "workflow.package", "open"] and f"/packages/{DIGEST}" in init["args"]
    assert init["args"][init["args"].index("--into") + 1] == "/model/opened" and "--replace" in init["args"]
    assert gateway["args"][gateway["args"].index("--model-dir") + 1] == "/model/opened"
    assert {"name": "model", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert gateway["livenessProbe"]["failureThreshold"] == 3
    assert gateway["startupProbe"]["failureThreshold"] * gateway["startupProbe"]["periodSeconds"] >= 600
    assert gateway["startupProbe"]["httpGet"]["path"] == "/readyz" and gateway["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert len(pod["containers"]) == 1  # ONNX Runtime GenAI: served in-process, no GPU
    blocks = {b["ipBlock"]["cidr"] for b in kinds["NetworkPolicy"]["spec"]["ingress"][0]["from"]}
    assert blocks == {"127.0.0.0/8", "10.20.0.0/16"}
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"ft2prod-gateway-tls", "ft2prod-api-keys", "ft2prod-kms", "ft2prod-audit-key"}
    assert "Secret" not in kinds  # referenced, never inlined
    assert {"name": "audit-key", "mountPath": "/etc/ft2prod/audit-key", "readOnly": True} in gateway["volumeMounts"]
    assert not any(m["name"] == "audit-key" for m in pod["initContainers"][0]["volumeMounts"]), "the audit key: the gateway only"
    assert kinds["ConfigMap"]["metadata"]["name"].startswith("ft2prod-gateway-config-")  # kustomize's content hash
    pod_config = yaml.safe_load(kinds["ConfigMap"]["data"]["config.yaml"])
    assert pod_config["rollout"]["gateway"]["audit"]["retention_days"] == 180
    assert all(r["metadata"].get("namespace") == "ft2prod" for r in resources)


def test_tensorrt_llm_gets_an_engine_container_with_tp_x_pp_gpus(tmp_path):
    config, resources = rendered(tmp_path, {"engine": {"backend": "tensorrt_llm", "tensorrt_llm": {"tp_size": 4, "pp_size": 2}},
                                            "package": {"kms": {"provider": "vault"}},
                                            "rollout": {"kubernetes": {"kms_egress_cidrs": ["10.0.5.0/28"]}}})
    kubernetes.validate(resources, config.rollout.kubernetes.kubernetes_version)
    pod = by_kind(resources)["Deployment"]["spec"]["template"]["spec"]
    engine = pod["containers"][1]
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == "8" and "--tp_size" in engine["args"]
    assert engine["image"] == PINNED["engine_image"] and engine["args"][1] == "/model/opened"
    assert {"name": "VAULT_TOKEN", "valueFrom": {"secretKeyRef": {"name": "ft2prod-kms", "key": "token"}}} in pod["initContainers"][0]["env"]
    pod_config = yaml.safe_load(by_kind(resources)["ConfigMap"]["data"]["config.yaml"])
    assert pod_config["rollout"]["gateway"]["upstream"] == "http://127.0.0.1:8000"


def test_an_invalid_manifest_is_refused_with_the_field(tmp_path):
    config, resources = rendered(tmp_path, {})
    deployment = by_kind(resources)["Deployment"]
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes.InvalidManifest, match="Deployment/ft2prod-gateway: .*replicas"):
        kubernetes.validate(resources, config.rollout.kubernetes.kubernetes_version)
    deployment["spec"]["replicas"] = 2
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes.InvalidManifest, match="livenessProbes"):
        kubernetes.validate(resources, config.rollout.kubernetes.kubernetes_version)


@pytest.fixture
def registry_store(tmp_path, monkeypatch):
    """The registry functions use MLflow's current store: point it here, and back afterwards."""
    before = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    yield
    mlflow.set_tracking_uri(before)


def test_promotion_keeps_previous_and_rollback_restores_it(tmp_path, registry_store):
    client = MlflowClient()
    client.create_registered_model("m")
    for _ in range(3):
        client.create_model_version("m", source=str(tmp_path))
    with pytest.raises(registry.RollbackImpossible, match="no version with alias 'previous'"):
        registry.rollback("m")
    assert registry.promote("m", "1")["previous"] is None
    assert registry.promote("m", "2")["previous"] == "1"
    assert registry.promote("m", "3")["previous"] == "2"
    aliases = {a: str(client.get_model_version_by_alias("m", a).version) for a in ("production", "previous")}
    assert aliases == {"production": "3", "previous": "2"}
    back = registry.rollback("m")
    assert back["production"] == "2" and back["rolled_back"] == "3"
    assert str(client.get_model_version_by_alias("m", "production").version) == "2"
    assert "ft2prod.rolled_back_at" in client.get_model_version("m", "3").tags
    with pytest.raises(registry.RollbackImpossible):
        registry.rollback("m")
