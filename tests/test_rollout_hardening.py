"""The Kubernetes pod as a security review checks it: every container non-root, read-only, without capabilities or
privilege escalation, under RuntimeDefault seccomp, with no service-account token; the KMS credential in the init
container only; images by digest; egress closed but for DNS and the KMS; and the init container's own command run
here for real against a key file as the kubelet leaves it under fsGroup (0440) and an emptyDir root (0777)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
import yaml

from workflow.config import Config, load
from workflow.engine.release import TENSORRT_LLM_IMAGE
from workflow.package import archive
from workflow.package.__main__ import main as package_main
from workflow.package.kms import LocalKeyFile
from workflow.rollout import kubernetes

PINNED = {"image": "registry.internal/ft2prod/gateway:0.1.0@sha256:" + "1" * 64,
          "engine_image": TENSORRT_LLM_IMAGE + "@sha256:" + "2" * 64}
TRT = {"backend": "tensorrt_llm", "tensorrt_llm": {"tp_size": 2, "pp_size": 1}}


def config_with(tmp_path, engine: dict | None = None, kms: dict | None = None, k8s: dict | None = None) -> Config:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"engine": engine or {}, "package": {"kms": kms or {}},
                                    "rollout": {"kubernetes": PINNED | (k8s or {})}}))
    return load(path)


def pod_of(config: Config, tmp_path: Path, digest: str = "ab" * 32, signer: bytes = b"-----BEGIN PUBLIC KEY-----\n") -> tuple[dict, dict]:
    folder = kubernetes.render(config, digest, tmp_path / "k8s", signer)
    resources = {r["kind"]: r for r in kubernetes.build(folder)}
    kubernetes.validate(list(resources.values()), config.rollout.kubernetes.kubernetes_version)
    return resources["Deployment"]["spec"]["template"]["spec"], resources


@pytest.mark.parametrize("engine", [{}, TRT], ids=["onnx_in_process", "tensorrt_llm_engine"])
def test_every_container_is_non_root_read_only_without_capabilities(tmp_path, engine):
    pod, _ = pod_of(config_with(tmp_path, engine), tmp_path)
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    containers = pod["initContainers"] + pod["containers"]
    assert [c["name"] for c in containers] == ["open-package", "gateway"] + (["engine"] if engine else [])
    for container in containers:
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True, container["name"]
        assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"] == {"drop": ["ALL"]} and context["seccompProfile"] == {"type": "RuntimeDefault"}, container["name"]
    if engine:  # the engine server writes caches: a memory-backed /tmp, not the root filesystem
        engine_container = pod["containers"][1]
        assert {"name": "tmp", "mountPath": "/tmp", "readOnly": False} in engine_container["volumeMounts"]
        assert {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}} in pod["volumes"]


def secret_uses(container: dict, secret: str) -> list[str]:
    """Where a container gets anything from the Secret `secret`: environment variables and volume mounts."""
    env = [e["name"] for e in container.get("env", []) + container.get("envFrom", [])
           if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == secret or e.get("secretRef", {}).get("name") == secret]
    return env + [m["name"] for m in container.get("volumeMounts", []) if m["name"] == "kms"]


@pytest.mark.parametrize("kms, used", [
    ({"provider": "local"}, ["kms"]),
    ({"provider": "pkcs11"}, ["PKCS11_PIN"]),
    ({"provider": "vault"}, ["VAULT_TOKEN"]),
])
def test_the_kms_credential_reaches_the_init_container_only(tmp_path, kms, used):
    config = config_with(tmp_path, TRT, kms, {"kms_egress_cidrs": ["10.0.5.0/28"]})
    pod, _ = pod_of(config, tmp_path)
    secret = config.rollout.kubernetes.secrets.kms
    init, gateway, engine = pod["initContainers"][0], pod["containers"][0], pod["containers"][1]
    assert secret_uses(init, secret) == used
    assert secret_uses(gateway, secret) == [] and secret_uses(engine, secret) == []
    assert not any("kms" in str(m) for c in pod["containers"] for m in c["volumeMounts"])


def test_the_pods_resources_and_the_vault_mount_come_from_the_config(tmp_path):
    vault = {"provider": "vault", "vault": {"url": "https://10.0.5.3:8200", "key_name": "k", "mount_point": "transit-prod"}}
    sized = {"kms_egress_cidrs": ["10.0.5.0/28"], "audit_storage": "50Gi",
             "resources": {"cpu": "6", "memory": "24Gi", "memory_limit": "48Gi"}}
    pod, resources = pod_of(config_with(tmp_path, kms=vault, k8s=sized), tmp_path)
    assert pod["containers"][0]["resources"] == {"requests": {"cpu": "6", "memory": "24Gi"}, "limits": {"memory": "48Gi"}}
    assert resources["PersistentVolumeClaim"]["spec"]["resources"]["requests"]["storage"] == "50Gi"
    args = pod["initContainers"][0]["args"]
    assert args[args.index("--vault-mount") + 1] == "transit-prod"  # the init container opens with the configured mount


@pytest.mark.parametrize("key, engine", [("image", {}), ("engine_image", TRT)])
def test_an_image_named_by_tag_is_refused_naming_the_key(tmp_path, key, engine):
    tagged = {"image": "registry.internal/ft2prod/gateway:0.1.0", "engine_image": TENSORRT_LLM_IMAGE}[key]
    config = config_with(tmp_path, engine, k8s={key: tagged})
    with pytest.raises(kubernetes.UnsafeSetting, match=rf"rollout.kubernetes.{key} must name the image by digest.*got '{tagged}'"):
        kubernetes.render(config, "ab" * 32, tmp_path / "k8s", b"")
    for bad in ("gateway@sha256:" + "1" * 63, "gateway@sha256:" + "G" * 64, "gateway:latest@sha1:" + "1" * 40):
        with pytest.raises(kubernetes.UnsafeSetting, match=f"rollout.kubernetes.{key}"):
            kubernetes.render(config_with(tmp_path, engine, k8s={key: bad}), "ab" * 32, tmp_path / "k8s", b"")
    if key == "engine_image":  # unset: the pinned release's image, still to be given by digest
        with pytest.raises(kubernetes.UnsafeSetting, match=rf"rollout.kubernetes.engine_image must name the image by digest.*got '{TENSORRT_LLM_IMAGE}'"):
            kubernetes.render(config_with(tmp_path, engine, k8s={key: None}), "ab" * 32, tmp_path / "k8s", b"")


def test_engine_image_is_not_needed_without_an_engine_container(tmp_path):
    pod, _ = pod_of(config_with(tmp_path, k8s={"engine_image": TENSORRT_LLM_IMAGE}), tmp_path)
    assert {c["image"] for c in pod["initContainers"] + pod["containers"]} == {PINNED["image"]}


def test_egress_is_closed_with_a_local_kms(tmp_path):
    _, resources = pod_of(config_with(tmp_path), tmp_path)
    policy = resources["NetworkPolicy"]["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"] and policy["egress"] == []


def test_egress_with_vault_is_dns_and_the_vault_range_on_its_port_only(tmp_path):
    vault = {"provider": "vault", "vault": {"url": "https://vault.internal:8200", "key_name": "ft2prod"}}
    with pytest.raises(kubernetes.UnsafeSetting, match="rollout.kubernetes.kms_egress_cidrs is empty, but package.kms.provider vault"):
        kubernetes.render(config_with(tmp_path, kms=vault), "ab" * 32, tmp_path / "k8s", b"")
    with pytest.raises(kubernetes.UnsafeSetting, match="'vault.internal' is not an address range"):
        kubernetes.render(config_with(tmp_path, kms=vault, k8s={"kms_egress_cidrs": ["vault.internal"]}), "ab" * 32, tmp_path / "k8s", b"")
    _, resources = pod_of(config_with(tmp_path, kms=vault, k8s={"kms_egress_cidrs": ["10.0.5.0/28"]}), tmp_path)
    dns, to_vault = resources["NetworkPolicy"]["spec"]["egress"]
    assert dns["to"] == [kubernetes.KUBE_DNS] and {p["port"] for p in dns["ports"]} == {53}
    assert to_vault == {"to": [{"ipBlock": {"cidr": "10.0.5.0/28"}}], "ports": [{"protocol": "TCP", "port": 8200}]}
    by_address = vault | {"vault": {"url": "https://10.0.5.3", "key_name": "ft2prod"}}
    _, resources = pod_of(config_with(tmp_path, kms=by_address, k8s={"kms_egress_cidrs": ["10.0.5.3/32"]}), tmp_path)
    assert resources["NetworkPolicy"]["spec"]["egress"] == [{"to": [{"ipBlock": {"cidr": "10.0.5.3/32"}}],
                                                            "ports": [{"protocol": "TCP", "port": 443}]}]


@pytest.fixture
def pod_volumes(tmp_path):
    """The init container's volumes as the kubelet leaves them: a package on the claim, the signer in the ConfigMap,
    the key file Secret at 0440 owned by root and the fsGroup, and an emptyDir (memory) whose root is 0777."""
    if os.geteuid() != 0:
        pytest.skip("giving the key file the pod's fsGroup as its group, as the kubelet does, needs root (chown)")
    source = tmp_path / "engine"
    source.mkdir()
    (source / "genai_config.json").write_text('{"model": {}}')
    (source / "model.onnx.data").write_bytes(os.urandom(500))
    kms, signer = LocalKeyFile(str(tmp_path / "build" / "kek.bin")), archive.load_signing_key(tmp_path / "build" / "signing.pem")
    (tmp_path / "packages").mkdir()
    archive.pack(source, tmp_path / "packages" / "pkg", kms, signer, {}, chunk_size=128)
    digest = archive.digest(tmp_path / "packages" / "pkg")
    (tmp_path / "packages" / "pkg").rename(tmp_path / "packages" / digest)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "signer.pub").write_bytes(archive.public_pem(signer.public_key()))
    (tmp_path / "kms").mkdir()
    key = tmp_path / "kms" / "kek.bin"
    shutil.copy(tmp_path / "build" / "kek.bin", key)
    os.chown(key, 0, kubernetes.POD_USER)
    os.chmod(key, 0o440)  # defaultMode 0400 + the group read the kubelet adds under fsGroup
    model = Path(tempfile.mkdtemp(prefix="ft2prod-emptydir-", dir="/dev/shm"))
    os.chmod(model, 0o777)
    yield {"packages": tmp_path / "packages", "config": tmp_path / "config", "kms": tmp_path / "kms", "model": model}, digest, signer
    shutil.rmtree(model, ignore_errors=True)


def in_pod(args: list[str], volumes: dict[str, Path]) -> list[str]:
    """The container's arguments with each volume's mount path replaced by where that volume is here."""
    out = []
    for arg in args:
        for name, here in volumes.items():
            mounted = kubernetes.MOUNTS[name]
            if arg == mounted or arg.startswith(mounted + "/"):
                arg = str(here) + arg[len(mounted):]
        out.append(arg)
    return out


def test_the_init_container_opens_the_package_with_the_key_file_as_fsgroup_leaves_it(tmp_path, pod_volumes, capsys):
    volumes, digest, signer = pod_volumes
    pod, _ = pod_of(config_with(tmp_path), tmp_path, digest, archive.public_pem(signer.public_key()))
    init, gateway = pod["initContainers"][0], pod["containers"][0]
    assert {"name": "kms", "secret": {"secretName": "ft2prod-kms", "defaultMode": 0o400}} in pod["volumes"]
    assert pod["securityContext"]["fsGroup"] == kubernetes.POD_USER
    args = in_pod(init["args"], volumes)
    assert args[:3] == ["python", "-m", "workflow.package"]
    assert package_main(args[3:]) == 0, capsys.readouterr().err
    opened = Path(in_pod([gateway["args"][gateway["args"].index("--model-dir") + 1]], volumes)[0])
    assert opened.parent == volumes["model"] and stat.S_IMODE(opened.stat().st_mode) == 0o700
    assert (opened / "genai_config.json").read_text() == '{"model": {}}'
    assert stat.S_IMODE((opened / "model.onnx.data").stat().st_mode) == 0o600
    assert package_main(args[3:]) == 0, capsys.readouterr().err  # the pod restarts: its init container runs again
    os.chown(volumes["kms"] / "kek.bin", 0, kubernetes.POD_USER + 1)  # group-readable by a group that is not the pod's
    assert package_main(args[3:]) == 2
    assert "has permissions 440; it must be readable by its owner only" in capsys.readouterr().err
    os.chown(volumes["kms"] / "kek.bin", 0, kubernetes.POD_USER)
    os.chmod(volumes["kms"] / "kek.bin", 0o460)  # the fsGroup may write it: refused
    assert package_main(args[3:]) == 2
