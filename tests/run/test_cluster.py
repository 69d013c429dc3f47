"""Cluster files: they parse, name GPU resources, autoscale from zero and expose nothing to the internet."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from lensray.redact import SECRET_NAME

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
RAY_UP = ["aws-gpu.yaml", "gcp-gpu.yaml"]
FAKE = "fake-multinode.yaml"  # aws-gpu.yaml's node types on Ray's fake multi-node provider (tests)
KUBE = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "kuberay-networkpolicy.yaml"]
RAY_PORTS = {6379, 8265, 10001}
OPEN = {"0.0.0.0/0", "::/0"}


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = [("kuberay-raycluster.yaml", _load("kuberay-raycluster.yaml")["spec"])]
    specs.append(("kuberay-rayjob.yaml", _load("kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]))
    return specs


def test_every_file_parses():
    names = sorted(p.name for p in CLUSTER.glob("*.yaml"))
    assert names == sorted(RAY_UP + KUBE + [FAKE])
    for name in names:
        assert all(isinstance(doc, dict) for doc in yaml.safe_load_all((CLUSTER / name).read_text()))
    assert (CLUSTER / "README.md").is_file()


@pytest.mark.parametrize("name", RAY_UP + [FAKE])
def test_ray_up_config_is_valid_for_ray(name):
    util = pytest.importorskip("ray.autoscaler._private.util", reason="Ray's cluster-config validator")
    # the fake provider ships no defaults file to fill in from: its config is validated as written
    config = _load(name) if name == FAKE else util.prepare_config(_load(name))
    util.validate_config(config)


@pytest.mark.parametrize("name", RAY_UP)
def test_ray_up_gpu_workers_autoscale_from_zero(name):
    config = _load(name)
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert types[head]["resources"] == {"CPU": 0}, "no trials on the head"
    workers = {k: v for k, v in types.items() if k != head}
    assert workers
    for node in workers.values():
        assert node["min_workers"] == 0 and node["max_workers"] >= 1
        assert node["resources"]["GPU"] >= 1
    if config["provider"]["type"] == "aws":
        assert all(w["node_config"]["InstanceType"].startswith(("p", "g")) for w in workers.values())
    else:
        assert all(w["node_config"]["guestAccelerators"][0]["acceleratorCount"] >= 1 for w in workers.values())
        assert all(w["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE" for w in workers.values())


@pytest.mark.parametrize("name", RAY_UP)
def test_ray_up_exposes_no_ray_port_and_uses_token_auth(name):
    config = _load(name)
    for path, value in _walk(config):
        assert not (isinstance(value, str) and value in OPEN), f"{name}{path} opens to the internet"
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        ports = set(range(rule["FromPort"], rule["ToPort"] + 1))
        assert not ports & RAY_PORTS, f"{name}: security group opens a Ray port {ports & RAY_PORTS}"
        assert rule["FromPort"] == rule["ToPort"] == 22
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token ray start") == 2
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}


def test_gcp_network_script_opens_only_ssh_from_the_operator():
    script = (CLUSTER / "gcp-network.sh").read_text()
    rules = [line for line in script.splitlines() if "--allow" in line]
    assert rules, "the script defines firewall rules"
    for port in RAY_PORTS:
        assert f"tcp:{port}" not in script
    assert "--allow tcp:22 --source-ranges \"$OPERATOR_CIDR\"" in script
    assert "0.0.0.0/0\" ]]" in script, "the script refuses an open operator range"
    assert "--source-ranges 0.0.0.0/0" not in script


@pytest.mark.parametrize("name, spec", _ray_cluster_specs())
def test_kuberay_gpu_group_autoscales_from_zero(name, spec):
    assert spec["enableInTreeAutoscaling"] is True
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["minReplicas"] == 0 and group["replicas"] == 0 and group["maxReplicas"] >= 1
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert container["image"].endswith("-gpu")
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


@pytest.mark.parametrize("name, spec", _ray_cluster_specs())
def test_kuberay_head_is_internal_and_token_protected(name, spec):
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    containers = [head["template"]["spec"]["containers"][0]]
    containers += [g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]]
    for container in containers:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]


def _token_ref(container_env: list[dict]) -> tuple[str, str]:
    env = {e["name"]: e for e in container_env}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


@pytest.mark.parametrize("name, spec", _ray_cluster_specs())
def test_kuberay_autoscaler_gets_the_ray_token(name, spec):
    """The autoscaler sidecar calls the GCS: it needs the token the Ray containers use, or a scale-up
    from zero is refused. KubeRay's authOptions names the Secret; autoscalerOptions.env passes the same
    token to the sidecar explicitly."""
    secret = _token_ref(spec["headGroupSpec"]["template"]["spec"]["containers"][0]["env"])
    assert spec["authOptions"] == {"mode": "token", "secretName": secret[0]}
    assert secret[1] == "auth_token"  # the data key authOptions.secretName requires
    assert spec["enableInTreeAutoscaling"] is True
    assert _token_ref(spec["autoscalerOptions"]["env"]) == secret
    for group in spec["workerGroupSpecs"]:
        assert _token_ref(group["template"]["spec"]["containers"][0]["env"]) == secret
    names = [e["name"] for e in spec["autoscalerOptions"]["env"]]
    assert not [n for n in names if SECRET_NAME.search(n) and n != "RAY_AUTH_TOKEN"]  # only what it needs


@pytest.mark.parametrize("name", KUBE)
def test_kubernetes_manifests_expose_nothing_and_hold_no_secret(name):
    for doc in yaml.safe_load_all((CLUSTER / name).read_text()):
        assert doc["kind"] in ("RayCluster", "RayJob", "NetworkPolicy")
        for path, value in _walk(doc):
            if isinstance(value, str):
                assert value not in {"LoadBalancer", "NodePort"} | OPEN, f"{name}{path}"
            if isinstance(value, dict) and "name" in value and ("value" in value or "valueFrom" in value):
                if SECRET_NAME.search(value["name"]):
                    assert "value" not in value, f"{name}{path}: secret {value['name']} given inline"


def test_networkpolicy_limits_head_to_its_namespace():
    policy = _load("kuberay-networkpolicy.yaml")
    assert policy["spec"]["podSelector"]["matchLabels"]["lensray/role"] == "head"
    sources = [src for rule in policy["spec"]["ingress"] for src in rule["from"]]
    assert sources == [{"podSelector": {}}]
    head_labels = _load("kuberay-raycluster.yaml")["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= head_labels.items()


def _dependencies() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=\[ ]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]}
    return names - {"ray"}  # the cluster provides Ray


def _names(packages: list[str]) -> set[str]:
    return {re.split(r"[<>=\[ ]", p, maxsplit=1)[0].lower() for p in packages}


def test_runtime_env_installs_lensray_dependencies_and_holds_no_secret():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # Ray accepts it
    assert _names(env["pip"]["packages"]) == _dependencies()
    for key in env["env_vars"]:
        assert not SECRET_NAME.search(key), key
    assert {".venv", ".git", "runs"} <= set(env["excludes"])
    job = yaml.safe_load(_load("kuberay-rayjob.yaml")["spec"]["runtimeEnvYAML"])
    assert _names(job["pip"]["packages"]) == _dependencies()
    assert job["env_vars"].items() <= env["env_vars"].items()


def test_no_credentials_in_any_cluster_or_job_file():
    patterns = [r"hf_[A-Za-z0-9]{20,}", r"AKIA[0-9A-Z]{16}", r"-----BEGIN [A-Z ]*PRIVATE KEY", r"ghp_[A-Za-z0-9]{30,}"]
    files = list(CLUSTER.iterdir()) + [REPO / "jobs" / "runtime_env.yaml"] + list((REPO / "configs").glob("*.yaml"))
    for path in files:
        text = path.read_text()
        for pattern in patterns:
            assert not re.search(pattern, text), f"{path.name} matches {pattern}"


def test_fake_multinode_config_mirrors_the_aws_node_types():
    fake, aws = _load(FAKE), _load("aws-gpu.yaml")
    assert fake["provider"]["type"] == "fake_multinode"
    # its nodes share one IP and run no setup: the autoscaler tells them apart by node id, starts no
    # node updater (SSH) on them
    assert fake["provider"]["use_node_id_as_ip"] is fake["provider"]["disable_node_updaters"] is True
    head = fake["available_node_types"][fake["head_node_type"]]
    assert head["resources"] == aws["available_node_types"][aws["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {k: v for k, v in fake["available_node_types"].items() if k != fake["head_node_type"]}
    aws_workers = {k: v for k, v in aws["available_node_types"].items() if k != aws["head_node_type"]}
    assert workers.keys() == aws_workers.keys()
    for name, node in workers.items():
        assert node["min_workers"] == aws_workers[name]["min_workers"] == 0
        assert 1 <= node["max_workers"] <= aws_workers[name]["max_workers"]
        assert set(node["resources"]) == {"CPU"} and "GPU" in aws_workers[name]["resources"]
    assert fake["max_workers"] <= aws["max_workers"]
