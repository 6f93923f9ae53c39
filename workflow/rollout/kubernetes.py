"""Kubernetes manifests for the gateway (a kustomize folder), validated offline, applied with kubectl.

    kubectl kustomize results/rollout/k8s            # what would be applied
    kubectl --context CTX apply -k results/rollout/k8s

The pod: an init container verifies and opens the package into a fresh 0700 folder inside a memory-backed volume;
the gateway serves it in-process (ONNX Runtime GenAI), or an engine container (trtllm-serve, GPUs = tp x pp) serves
it and the gateway forwards. A startup probe gives loading its own budget so liveness (3 failures) never kills a pod
that is still loading; readiness holds traffic until the model answers. Secrets are referenced by name only.

Hardening: every container runs as a non-root user with a read-only root filesystem, no privilege escalation, no
capabilities and the runtime's default seccomp profile; no service-account token is mounted; the KMS credential
(key file, HSM PIN or Vault token) reaches the init container only; images are referenced by digest; the
NetworkPolicy allows no egress but DNS and the KMS endpoint (`rollout.kubernetes.kms_egress_cidrs`), and only when
the KMS is reached over the network (NetworkPolicy selects pods, not containers: the gateway container shares that
egress, but holds no credential to use it with).
"""

from __future__ import annotations

import ipaddress
import math
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import yaml

from workflow.config import Config
from workflow.engine.release import TENSORRT_LLM_IMAGE

GATEWAY_PORT, ENGINE_PORT = 8443, 8000
MOUNTS = {"packages": "/packages", "model": "/model", "config": "/etc/ft2prod/config", "tls": "/etc/ft2prod/tls",
          "api-keys": "/etc/ft2prod/keys", "kms": "/etc/ft2prod/kms", "audit": "/var/log/ft2prod", "tmp": "/tmp",
          "audit-key": "/etc/ft2prod/audit-key"}


POD_USER = 10001  # the gateway image's user (envs/gateway.Dockerfile); also the pod's group and fsGroup
MODEL_DIR = f"{MOUNTS['model']}/opened"  # made 0700 by the init container: open refuses the volume's own 0777 root
DIGEST_REFERENCE = re.compile(r"^[a-z0-9][^\s@]*@sha256:[0-9a-f]{64}$")
KUBE_DNS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}


def container_security() -> dict:
    """Every container's securityContext (a fresh dict each, so the written YAML spells each out, with no anchors)."""
    return {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


class InvalidManifest(ValueError):
    """A rendered manifest the Kubernetes API schema rejects."""


class UnsafeSetting(ValueError):
    """A rollout.kubernetes setting the manifests cannot be made safe with (an image by tag, a KMS with no egress)."""


def pinned_image(config: Config, key: str) -> str:
    """`rollout.kubernetes.<key>`, which must name its image by digest: a tag can be moved to other content (an unset
    engine_image is the pinned TensorRT-LLM release's, by tag until you give its digest)."""
    reference = getattr(config.rollout.kubernetes, key) or TENSORRT_LLM_IMAGE
    if not DIGEST_REFERENCE.match(reference):
        raise UnsafeSetting(f"rollout.kubernetes.{key} must name the image by digest, name[:tag]@sha256:<64 hex digits> "
                            f"(a tag can be moved to other content); got {reference!r}. Find the digest with "
                            f"`docker buildx imagetools inspect {reference}` or `crane digest {reference}`")
    return reference


def egress_rules(config: Config) -> list[dict]:
    """What the pod may reach: nothing, or, when the KMS is reached over the network, DNS and the KMS endpoint's
    CIDRs (on the Vault URL's port). The engine is on 127.0.0.1 in the same pod, which NetworkPolicy does not govern."""
    kms, cidrs = config.package.kms, config.rollout.kubernetes.kms_egress_cidrs
    if kms.provider == "vault" and not cidrs:
        raise UnsafeSetting(f"rollout.kubernetes.kms_egress_cidrs is empty, but package.kms.provider vault needs the pod to reach "
                            f"{kms.vault.url}: give the Vault server's address range (e.g. [10.0.5.10/32]); "
                            "every other egress stays closed")
    for cidr in cidrs:
        try:
            ipaddress.ip_network(cidr)
        except ValueError as err:
            raise UnsafeSetting(f"rollout.kubernetes.kms_egress_cidrs: {cidr!r} is not an address range ({err})") from None
    if kms.provider == "local" or not cidrs:
        return []
    to = {"to": [{"ipBlock": {"cidr": cidr}} for cidr in cidrs]}
    host = None
    if kms.provider == "vault":
        url = urlparse(kms.vault.url)
        to["ports"] = [{"protocol": "TCP", "port": url.port or (443 if url.scheme == "https" else 80)}]
        host = url.hostname
    try:
        ipaddress.ip_address(host or "")
        return [to]  # an address: no name to resolve
    except ValueError:
        dns = {"to": [KUBE_DNS], "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
        return [dns, to]


def pod_config(config: Config) -> dict:
    """The workflow config the pods read, with in-pod paths (rendered into a ConfigMap by kustomize)."""
    gateway = config.rollout.gateway.model_dump(mode="json")
    kms = config.package.kms.model_dump(mode="json")
    if config.package.kms.provider == "local":
        kms["local"] = {"key_file": f"{MOUNTS['kms']}/kek.bin"}
    upstream = f"http://127.0.0.1:{ENGINE_PORT}" if config.engine.backend == "tensorrt_llm" else None
    return {
        "engine": config.engine.model_dump(mode="json"),
        "package": {"model_name": config.package.model_name, "trusted_signer": f"{MOUNTS['config']}/signer.pub", "kms": kms},
        "rollout": {"gateway": {**gateway, "host": "0.0.0.0", "port": GATEWAY_PORT, "upstream": upstream,
                                "api_keys": f"{MOUNTS['api-keys']}/api_keys.json", "tls": {"dir": MOUNTS["tls"], "hosts": gateway["tls"]["hosts"]},
                                "audit": {**gateway["audit"], "path": f"{MOUNTS['audit']}/gateway.jsonl",
                                          # a Secret mounted 0400 arrives 0440 under fsGroup: accepted for that group only
                                          "key_file": f"{MOUNTS['audit-key']}/audit.key", "key_file_group": POD_USER}}},
    }


def _open_args(config: Config, package_path: str) -> tuple[list[str], list[dict]]:
    """The init container's `workflow.package open` arguments and environment for the configured KMS."""
    kms, secret = config.package.kms, config.rollout.kubernetes.secrets.kms
    args = ["python", "-m", "workflow.package", "open", package_path, "--signer-pub", f"{MOUNTS['config']}/signer.pub",
            "--into", MODEL_DIR, "--replace"]  # a restarted pod's init container finds its own earlier copy there
    if kms.provider == "local":  # the kubelet turns the Secret's 0400 into 0440 under fsGroup: accept that group only
        return args + ["--key-file", f"{MOUNTS['kms']}/kek.bin", "--key-file-group", str(POD_USER)], []
    if kms.provider == "pkcs11":
        p = kms.pkcs11
        env = [{"name": "PKCS11_PIN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "pin"}}}]
        return args + ["--pkcs11-module", p.module, "--token", p.token_label, "--key-label", p.key_label], env
    v = kms.vault
    env = [{"name": "VAULT_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "token"}}}]
    return args + ["--vault-url", v.url, "--vault-key", v.key_name, "--vault-mount", v.mount_point], env


def mount(volume: str, read_only: bool = True) -> dict:
    return {"name": volume, "mountPath": MOUNTS[volume], "readOnly": read_only}


def _probe(path: str, period: int, failures: int) -> dict:
    return {"httpGet": {"path": path, "port": GATEWAY_PORT, "scheme": "HTTPS"}, "periodSeconds": period,
            "timeoutSeconds": 5, "failureThreshold": failures}


def gateway_container(config: Config, image: str) -> dict:
    """The gateway, serving the folder the init container opened (as its own process, TLS 1.3, audited per pod); with
    the PyTorch engine in-process on one GPU."""
    k8s = config.rollout.kubernetes
    gpu = {"nvidia.com/gpu": "1"} if config.engine.backend == "pytorch" and config.cluster.gpus_per_node else {}
    return {
        "name": "gateway", "image": image,
        "args": ["python", "-m", "workflow.serve", "--config", f"{MOUNTS['config']}/config.yaml", "start", "--model-dir",
                 MODEL_DIR, "--audit-log", f"{MOUNTS['audit']}/$(POD_NAME).jsonl"],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "ports": [{"name": "https", "containerPort": GATEWAY_PORT}],
        "startupProbe": _probe("/readyz", 10, math.ceil(k8s.startup_timeout_s / 10)),
        "livenessProbe": _probe("/healthz", 10, 3),
        "readinessProbe": _probe("/readyz", 5, 3),
        "resources": {"requests": {"cpu": k8s.resources.cpu, "memory": k8s.resources.memory} | gpu,
                      "limits": {"memory": k8s.resources.memory_limit} | gpu},
        "securityContext": container_security(),
        "volumeMounts": [mount("model"), mount("config"), mount("tls"), mount("api-keys"), mount("audit", False),
                         mount("audit-key")],
    }


def engine_container(config: Config) -> dict | None:
    """trtllm-serve beside the gateway on tp x pp GPUs (engine.backend tensorrt_llm); None for in-process engines."""
    if config.engine.backend != "tensorrt_llm":
        return None
    trt = config.engine.tensorrt_llm
    gpus = trt.tp_size * trt.pp_size
    return {
        "name": "engine", "image": pinned_image(config, "engine_image"),
        "args": ["trtllm-serve", MODEL_DIR, "--host", "127.0.0.1", "--port", str(ENGINE_PORT),
                 "--tp_size", str(trt.tp_size), "--pp_size", str(trt.pp_size)],
        "env": [{"name": "HOME", "value": MOUNTS["tmp"]}],  # caches go to the memory-backed /tmp, not the read-only root
        "resources": {"limits": {"nvidia.com/gpu": str(gpus)}, "requests": {"nvidia.com/gpu": str(gpus)}},
        "securityContext": container_security(),
        "volumeMounts": [mount("model"), mount("tmp", False)],
    }


def pod_volumes(config: Config, with_tmp: bool) -> list[dict]:
    k8s = config.rollout.kubernetes
    # a key file (local KMS) as a Secret volume: 0400 becomes 0440 under fsGroup, which open accepts for that group only;
    # the HSM PIN or Vault token reach the init container as environment variables instead
    kms_volume = ([{"name": "kms", "secret": {"secretName": k8s.secrets.kms, "defaultMode": 0o400}}]
                  if config.package.kms.provider == "local" else [])
    return [
        {"name": "packages", "persistentVolumeClaim": {"claimName": k8s.package_claim, "readOnly": True}},
        {"name": "model", "emptyDir": {"medium": "Memory"}},
        {"name": "config", "configMap": {"name": f"{k8s.name}-config"}},
        {"name": "tls", "secret": {"secretName": k8s.secrets.tls,
                                   "items": [{"key": "tls.crt", "path": "server.pem"}, {"key": "tls.key", "path": "server.key"},
                                             {"key": "ca.crt", "path": "ca.pem"}]}},
        {"name": "api-keys", "secret": {"secretName": k8s.secrets.api_keys, "defaultMode": 0o400}},
        {"name": "audit", "persistentVolumeClaim": {"claimName": f"{k8s.name}-audit"}},
        {"name": "audit-key", "secret": {"secretName": k8s.secrets.audit_key, "defaultMode": 0o400,
                                         "items": [{"key": "audit.key", "path": "audit.key"}]}},
    ] + kms_volume + ([{"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}] if with_tmp else [])


def deployment(config: Config, package_sha256: str, labels: dict) -> dict:
    """The Deployment: an init container opens the package into memory, then the gateway (and engine) serve it."""
    k8s = config.rollout.kubernetes
    image = pinned_image(config, "image")
    open_args, open_env = _open_args(config, f"{MOUNTS['packages']}/{package_sha256}")
    containers = [c for c in (gateway_container(config, image), engine_container(config)) if c]
    opener = {  # the only container that holds the KMS credential
        "name": "open-package", "image": image, "args": open_args, "env": open_env,
        "securityContext": container_security(),
        "volumeMounts": [mount("packages"), mount("model", False), mount("config")]
                        + ([mount("kms")] if config.package.kms.provider == "local" else []),
    }

    def annotations() -> dict:  # one dict each: a shared one would be written as a YAML alias
        return {"ft2prod/package-sha256": package_sha256}

    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": k8s.name, "labels": labels, "annotations": annotations()},
        "spec": {
            "replicas": k8s.replicas, "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels, "annotations": annotations()},
                "spec": {
                    "securityContext": {"runAsNonRoot": True, "runAsUser": POD_USER, "runAsGroup": POD_USER, "fsGroup": POD_USER,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "initContainers": [opener],
                    "containers": containers,
                    "volumes": pod_volumes(config, with_tmp=len(containers) > 1),
                },
            },
        },
    }


def companions(config: Config, labels: dict) -> dict[str, dict]:
    """Service, NetworkPolicy (ingress from the roles' allow-lists only), PodDisruptionBudget and the audit claim."""
    k8s = config.rollout.kubernetes
    cidrs = sorted({cidr for role_cidrs in config.rollout.gateway.allow.model_dump().values() for cidr in role_cidrs})
    metadata = {"name": k8s.name, "labels": labels}
    return {
        "service.yaml": {"apiVersion": "v1", "kind": "Service", "metadata": metadata,
                         "spec": {"selector": labels, "ports": [{"name": "https", "port": 443, "targetPort": "https"}]}},
        "networkpolicy.yaml": {
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": metadata,
            "spec": {"podSelector": {"matchLabels": labels}, "policyTypes": ["Ingress", "Egress"],
                     "ingress": [{"from": [{"ipBlock": {"cidr": cidr}} for cidr in cidrs],
                                  "ports": [{"protocol": "TCP", "port": GATEWAY_PORT}]}],
                     "egress": egress_rules(config)},
        },
        "poddisruptionbudget.yaml": {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": metadata,
                                     "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}}},
        "audit-claim.yaml": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                             "metadata": {"name": f"{k8s.name}-audit", "labels": labels},
                             "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": k8s.audit_storage}}}},
    }


def render(config: Config, package_sha256: str, out_dir: str | Path, signer_pub: bytes) -> Path:
    """Write the kustomize folder: Deployment, Service, NetworkPolicy, PodDisruptionBudget, config and signer."""
    k8s = config.rollout.kubernetes
    labels = {"app.kubernetes.io/name": k8s.name, "app.kubernetes.io/part-of": "ft2prod"}
    resources = {"deployment.yaml": deployment(config, package_sha256, labels)} | companions(config, labels)
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for file_name, resource in resources.items():
        (out_dir / file_name).write_text(yaml.safe_dump(resource, sort_keys=False))
    (out_dir / "config.yaml").write_text(yaml.safe_dump(pod_config(config), sort_keys=False))
    (out_dir / "signer.pub").write_bytes(signer_pub)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": k8s.namespace,
        "resources": list(resources),
        "configMapGenerator": [{"name": f"{k8s.name}-config", "files": ["config.yaml", "signer.pub"]}],
    }
    (out_dir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return out_dir


def build(kustomize_dir: str | Path) -> list[dict]:
    """What `kubectl apply -k` would send: kustomize's output when kubectl is here, else the resource files."""
    kustomize_dir = Path(kustomize_dir)
    if shutil.which("kubectl"):
        done = subprocess.run(["kubectl", "kustomize", str(kustomize_dir)], capture_output=True, text=True)
        if done.returncode != 0:
            raise InvalidManifest(f"kustomize build of {kustomize_dir} failed: {done.stderr.strip()}")
        return [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    listed = yaml.safe_load((kustomize_dir / "kustomization.yaml").read_text())["resources"]
    return [yaml.safe_load((kustomize_dir / name).read_text()) for name in listed]


def validate(resources: list[dict], kubernetes_version: str) -> list[str]:
    """Check every resource against the Kubernetes API schema (strict: unknown fields are errors)."""
    checked = []
    for resource in resources:
        where = f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(resource, kubernetes_version, strict=True)
        except kubernetes_validate.ValidationError as err:
            raise InvalidManifest(f"{where}: {err.message} at {'.'.join(map(str, err.path))}") from None
        checked.append(where)
    return checked


def apply(kustomize_dir: str | Path, context: str, namespace: str, name: str, timeout_s: int) -> dict:
    """kubectl apply, then wait for the rollout; undo it when the new pods do not become ready."""
    kubectl = ["kubectl", "--context", context, "--namespace", namespace]
    subprocess.run([*kubectl, "apply", "-k", str(kustomize_dir)], check=True, capture_output=True, text=True)
    status = subprocess.run([*kubectl, "rollout", "status", f"deployment/{name}", f"--timeout={timeout_s}s"],
                            capture_output=True, text=True)
    if status.returncode != 0:
        subprocess.run([*kubectl, "rollout", "undo", f"deployment/{name}"], check=True, capture_output=True, text=True)
        return {"applied": True, "ready": False, "undone": True, "status": status.stderr.strip() or status.stdout.strip()}
    return {"applied": True, "ready": True, "undone": False, "status": status.stdout.strip()}
