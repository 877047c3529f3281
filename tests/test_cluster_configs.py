"""The cluster configurations in cluster/ parse, run the Ray that pyproject.toml pins, turn on
Ray token authentication, and expose no dashboard, GCS or MLflow server to the outside
without a password.

These tests only read files: no network, no cloud. Each scanner is also run on a small bad
snippet, so a scanner that silently matches nothing fails here instead of passing.
"""

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).parents[1]
CLUSTER = REPO / "cluster"
YAML_FILES = sorted([*CLUSTER.rglob("*.yaml"), *CLUSTER.rglob("*.yml")])
RAY_CONFIGS = ["aws.yaml", "gcp.yaml", "local.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]
CLOUD_RAY_CONFIGS = [name for name in RAY_CONFIGS if name != "local.yaml"]
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]
EVERYWHERE = "0.0.0.0/0"
ANY_ADDRESS = r"(?:0\.0\.0\.0|::|\[::\])"
PUBLIC_SERVICE_TYPES = {"LoadBalancer", "NodePort"}


def load_documents(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def walk(node):
    """Every dict, list and scalar inside a parsed YAML document."""
    yield node
    if isinstance(node, dict):
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        children = []
    for child in children:
        yield from walk(child)


def dicts(document):
    return (node for node in walk(document) if isinstance(node, dict))


# --- scanners -----------------------------------------------------------------------------


def pinned_ray_version(pyproject_text: str) -> str:
    for requirement in tomllib.loads(pyproject_text)["project"]["dependencies"]:
        match = re.fullmatch(r"ray\[[^\]]*\]==(\S+)", requirement.replace(" ", ""))
        if match:
            return match.group(1)
    raise AssertionError("pyproject.toml pins no ray[...]==VERSION dependency")


def ray_version_pins(text: str) -> list[str]:
    """Ray versions a file installs: image tags, pip pins and rayVersion fields."""
    tags = re.findall(r"rayproject/ray(?:-ml)?:([^\s\"'@]+)", text)
    pins = re.findall(r"\bray(?:\[[^\]]*\])?\s*==\s*([\w.]+)", text)
    fields = re.findall(r"rayVersion:\s*[\"']?([\w.]+)", text)
    return [tag.split("-")[0] for tag in tags] + pins + fields


def unpinned_ray_requirements(text: str) -> list[str]:
    return re.findall(r"\bray\[[^\]]*\](?!\s*==)", text)


def shell_commands(document) -> list[str]:
    """Every command line in a document: shell strings (backslash continuations joined, one
    entry per line) and each container's command + args joined into one line."""
    commands = []
    for node in walk(document):
        if isinstance(node, str):
            commands += node.replace("\\\n", " ").splitlines()
        elif isinstance(node, dict) and ("command" in node or "args" in node):
            argv = [*(node.get("command") or []), *(node.get("args") or [])]
            if all(isinstance(arg, str) for arg in argv):
                commands.append(" ".join(argv))
    return commands


def dashboard_exposures(text: str) -> list[str]:
    """Dashboards bound to every address, as a `ray start` flag or a YAML key."""
    flag = rf"--dashboard-host(?:=|\s+)[\"']?{ANY_ADDRESS}"
    key = rf"dashboard[-_]host[\"']?\s*:\s*[\"']?{ANY_ADDRESS}"
    return re.findall(flag, text) + re.findall(key, text)


def mlflow_exposures(commands: list[str]) -> list[str]:
    """`mlflow server` commands bound to every address without basic-auth."""
    return [
        command
        for command in commands
        if re.search(r"\bmlflow\b.*\bserver\b", command)
        and re.search(rf"(?:--host|-h)(?:=|\s+)[\"']?{ANY_ADDRESS}", command)
        and not re.search(r"--app-name(?:=|\s+)[\"']?basic-auth", command)
    ]


def kubernetes_exposures(document) -> list[str]:
    """Services, ingresses and host ports that reach beyond the cluster network."""
    found = []
    for node in dicts(document):
        kind = node.get("kind")
        if kind == "Ingress":
            found.append("Ingress")
        if kind == "Service" and node.get("spec", {}).get("type") in PUBLIC_SERVICE_TYPES:
            found.append(f"Service type {node['spec']['type']}")
        head = node.get("headGroupSpec")
        if isinstance(head, dict) and head.get("serviceType") in PUBLIC_SERVICE_TYPES:
            found.append(f"head serviceType {head['serviceType']}")
        if isinstance(head, dict) and head.get("enableIngress"):
            found.append("head enableIngress")
        if node.get("hostNetwork") or "hostPort" in node:
            found.append("host network or host port")
    return found


def open_ingress_rules(document) -> list[dict]:
    """Firewall rules (AWS IpPermissions, GCP sourceRanges) open to the internet beyond SSH."""
    found = []
    for node in dicts(document):
        for rule in node.get("IpPermissions") or []:
            ranges = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
            ranges += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
            only_ssh = rule.get("FromPort") == rule.get("ToPort") == 22
            if (EVERYWHERE in ranges or "::/0" in ranges) and not only_ssh:
                found.append(rule)
        if EVERYWHERE in (node.get("sourceRanges") or []):
            allowed = node.get("allowed", [])
            if [port for rule in allowed for port in rule.get("ports", ["all"])] != ["22"]:
                found.append(node)
    return found


def launcher_auth_problems(config: dict) -> list[str]:
    # Ray runs each command in its own shell, so the export must share the `ray start` line.
    starts = config.get("head_start_ray_commands", []) + config.get("worker_start_ray_commands", [])
    problems = [
        f"no RAY_AUTH_MODE=token before: {command[:60]}"
        for command in starts
        if "ray start" in command and not re.search(r"\bRAY_AUTH_MODE=[\"']?token\b", command)
    ]
    if not any(str(target).endswith(".ray/auth_token") for target in config.get("file_mounts", {})):
        problems.append("no file_mounts entry puts the token at ~/.ray/auth_token")
    return problems


def kuberay_auth_problems(cluster_spec: dict) -> list[str]:
    if cluster_spec.get("authOptions", {}).get("mode") == "token":
        return []
    templates = [cluster_spec["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster_spec.get("workerGroupSpecs", [])]
    problems = []
    for container in (c for template in templates for c in template["spec"]["containers"]):
        env = {variable["name"]: variable for variable in container.get("env", [])}
        if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
            problems.append(f"{container['name']}: no RAY_AUTH_MODE=token")
        if "secretKeyRef" not in env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}):
            problems.append(f"{container['name']}: RAY_AUTH_TOKEN not from a Secret")
    return problems


def ray_auth_problems(document) -> list[str] | None:
    """Why a Ray config does not require a token ([] if it does); None if it is not Ray."""
    if not isinstance(document, dict):
        return None
    if "head_start_ray_commands" in document:
        return launcher_auth_problems(document)
    spec = document.get("spec") or {}
    cluster_spec = {
        "RayCluster": spec,
        "RayJob": spec.get("rayClusterSpec"),
        "RayService": spec.get("rayClusterConfig"),
    }.get(document.get("kind"))
    if cluster_spec is not None:
        return kuberay_auth_problems(cluster_spec)
    if {"ray", "auth"} <= document.keys():  # local.yaml
        return [] if document["auth"].get("mode") == "token" else ["auth.mode is not token"]
    return None


# --- the scanners catch what they are meant to catch -------------------------------------


def test_version_scanners_find_every_pin():
    pyproject = '[project]\ndependencies = ["ray[tune] == 2.9.0"]'
    assert pinned_ray_version(pyproject) == "2.9.0"
    text = 'image: rayproject/ray:2.9.0-py311-gpu\npip install "ray[tune]==2.8.1"'
    assert ray_version_pins(text) == ["2.9.0", "2.8.1"]
    assert ray_version_pins("rayVersion: '2.7.0'\nimage: rayproject/ray:latest") == ["latest", "2.7.0"]
    assert unpinned_ray_requirements('pip install "ray[default]" "ray[tune]==2.9.0"') == ["ray[default]"]


def test_exposure_scanners_flag_bad_snippets():
    assert dashboard_exposures("ray start --head --dashboard-host=0.0.0.0")
    assert dashboard_exposures('rayStartParams:\n  dashboard-host: "0.0.0.0"')
    assert not dashboard_exposures("ray start --head --dashboard-host 127.0.0.1")

    assert mlflow_exposures(["mlflow server --host 0.0.0.0 --port 5000"])
    container = {"command": ["mlflow"], "args": ["server", "-h", "0.0.0.0"]}
    assert mlflow_exposures(shell_commands(container))
    assert mlflow_exposures(shell_commands("mlflow server \\\n  --host 0.0.0.0\n"))
    assert not mlflow_exposures(["mlflow server --host 0.0.0.0 --app-name basic-auth"])
    assert not mlflow_exposures(["mlflow server --host 127.0.0.1"])

    assert kubernetes_exposures({"kind": "Service", "spec": {"type": "LoadBalancer"}})
    head = {"headGroupSpec": {"serviceType": "NodePort"}}
    assert kubernetes_exposures({"kind": "RayJob", "spec": {"rayClusterSpec": head}})
    assert not kubernetes_exposures({"kind": "Service", "spec": {"type": "ClusterIP"}})

    dashboard_rule = {"FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": EVERYWHERE}]}
    ssh_rule = {"FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": EVERYWHERE}]}
    group = {"security_group": {"IpPermissions": [ssh_rule, dashboard_rule]}}
    assert open_ingress_rules({"provider": group}) == [dashboard_rule]
    mlflow_rule = {"sourceRanges": [EVERYWHERE], "allowed": [{"IPProtocol": "tcp", "ports": ["5000"]}]}
    assert open_ingress_rules(mlflow_rule) == [mlflow_rule]


def test_auth_check_flags_configs_without_token():
    launcher = {
        "head_start_ray_commands": ["ray stop", "ray start --head"],
        "worker_start_ray_commands": ["export RAY_AUTH_MODE=token; ray start --address=h:6379"],
        "file_mounts": {"~/.ray/auth_token": "~/.ray/auth_token"},
    }
    assert ray_auth_problems(launcher) == ["no RAY_AUTH_MODE=token before: ray start --head"]
    container = {"name": "ray-head", "env": [{"name": "RAY_AUTH_MODE", "value": "token"}]}
    head = {"template": {"spec": {"containers": [container]}}}
    cluster = {"kind": "RayCluster", "spec": {"headGroupSpec": head}}
    assert ray_auth_problems(cluster) == ["ray-head: RAY_AUTH_TOKEN not from a Secret"]
    cluster["spec"]["authOptions"] = {"mode": "token"}
    assert ray_auth_problems(cluster) == []
    assert ray_auth_problems({"ray": {}, "auth": {"mode": "disabled"}}) == ["auth.mode is not token"]
    assert ray_auth_problems({"kind": "Service"}) is None


# --- the real files -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def documents() -> dict[str, list]:
    return {str(path.relative_to(CLUSTER)): load_documents(path) for path in YAML_FILES}


def test_every_cluster_yaml_parses(documents):
    assert {*RAY_CONFIGS, "kuberay/mlflow.yaml"} <= documents.keys()
    assert all(documents.values()), "a YAML file in cluster/ holds no document"


def test_ray_version_matches_pyproject_pin():
    version = pinned_ray_version((REPO / "pyproject.toml").read_text())
    for path in [*YAML_FILES, CLUSTER / "README.md"]:
        text = path.read_text()
        assert set(ray_version_pins(text)) <= {version}, f"{path.name} runs another Ray than {version}"
        assert not unpinned_ray_requirements(text), f"{path.name} installs Ray without ==version"
    for name in CLOUD_RAY_CONFIGS:
        assert version in ray_version_pins((CLUSTER / name).read_text()), f"{name} pins no Ray"


def test_every_ray_config_requires_a_token(documents):
    ray_configs = {
        name for name, docs in documents.items() for doc in docs if ray_auth_problems(doc) is not None
    }
    assert set(RAY_CONFIGS) <= ray_configs, "a Ray config was renamed or lost its Ray part"
    for name, docs in documents.items():
        for doc in docs:
            assert not ray_auth_problems(doc), f"{name}: {ray_auth_problems(doc)}"


def test_nothing_is_exposed_without_authentication(documents):
    for name, docs in documents.items():
        assert not dashboard_exposures((CLUSTER / name).read_text()), name
        for doc in docs:
            assert not mlflow_exposures(shell_commands(doc)), name
            assert not kubernetes_exposures(doc), name
            assert not open_ingress_rules(doc), name
            mlflow = doc.get("mlflow") if isinstance(doc, dict) else None
            if isinstance(mlflow, dict):  # local.yaml: no password, so loopback only
                assert not re.fullmatch(ANY_ADDRESS, str(mlflow.get("host"))), name


@pytest.mark.parametrize("name", CLOUD_RAY_CONFIGS)
def test_cloud_nodes_get_storage_path_and_tracking_uri(name):
    text = (CLUSTER / name).read_text()
    assert re.search(r"(?:s3|gs)://BUCKET/lenet-results", text)
    assert "LENET_STORAGE_PATH" in text and "MLFLOW_TRACKING_URI" in text


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_ray_up_accepts_launcher_config(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load_documents(CLUSTER / name)[0]))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_commands_are_valid_bash(name):
    config = load_documents(CLUSTER / name)[0]
    keys = [key for key in config if key.endswith("_commands")]
    for command in (command for key in keys for command in config[key]):
        # Ray runs each item as `bash --login -c -i "... && (ITEM)"`: a heredoc must end
        # before that parenthesis, or bash warns on stderr even under -n.
        result = subprocess.run(
            ["bash", "-n", "-c", f"true && ({command})"], capture_output=True, text=True
        )
        assert result.returncode == 0 and not result.stderr, f"{command[:80]}\n{result.stderr}"
