"""deploy/kubernetes: refresherd as the native sidecar of an application pod. No cluster runs here,
so what a cluster would do is tested piece by piece:

- kubectl's own kustomize builds both entry points (deploy/kubernetes and its
  prometheus-operator variant), offline;
- kubernetes-validate checks every resource built against the Kubernetes API schemas it ships
  (strict: no unknown field), for 1.29 (the first release with native sidecars on by default)
  and for the newest release it knows, with every network connection refused;
- the ServiceMonitor is a custom resource whose schema (prometheus-operator's CRD) no package
  here ships, so it is checked field by field instead: its metadata and selector against the
  Kubernetes schemas of those types, its endpoint against the Service and the config;
- the facts that must not drift: the image is the one compose builds, the user is the
  Dockerfile's, the hardening is the systemd unit's, the probes and the scrape name the port and
  paths the config makes the daemon serve, the grace period covers the daemon's drain;
- the ConfigMap's config is loaded by refresherd's real loader with the Secret's files laid out
  as the pod mounts them; then the real daemon runs on it against a FakeIdP on loopback, answers
  the probes and the scrape the manifests name, and the stand-in application reads a token over
  the shared unix socket and stops on SIGTERM as its container's PID 1.

The pod's file system is laid out under a temporary root (ConfigMaps and Secrets written as the
kubelet projects them, emptyDirs and the volume as directories). The config names absolute
paths, so the test puts that root in front of every path under one of the pod's mounts, in the
config and in the containers' environment; it also points the provider at the FakeIdP and the
listener at 127.0.0.1:0 (other tests use port 9469; the port the config names is checked against
the manifests separately).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import (
    LEAKS,
    Daemons,
    IdPFactory,
    metric,
    run_cli,
    wait_until,
)
from deploy_support import DEPLOY, ROOT

from refresherd.config import load_config
from refresherd.daemon import READINESS_TIMEOUT, SERVER_STOP_TIMEOUT
from refresherd.refresh.grants import PERSIST_DEADLINE, PERSIST_RETRY_MAX
from refresherd.settings import parse_duration

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is part of the test extras"
)

KUBERNETES = DEPLOY / "kubernetes"
OPERATOR = KUBERNETES / "prometheus-operator"
APP_SCRIPT = KUBERNETES / "base" / "app" / "read_token.py"
KUBECTL = shutil.which("kubectl")
UNSHARE = shutil.which("unshare")
# Native sidecars (an init container with restartPolicy: Always) are on by default from 1.29.
OLDEST_KUBERNETES = "1.29"
SIDECAR = "refresherd"

# CI installs kubectl (.ci/run): there a missing one is a failure, not a skip.
if KUBECTL is None and os.environ.get("CI"):
    raise RuntimeError("CI without kubectl: .ci/run installs it")

needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl (its built-in kustomize) is not installed"
)


# --------------------------------------------------------------------------- what is built


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The resources ``kubectl apply -k directory`` would send, from kubectl's own kustomize."""
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    if KUBECTL is None:
        pytest.skip("kubectl (its built-in kustomize) is not installed")
    return kustomize(KUBERNETES)


@pytest.fixture(scope="module")
def with_operator() -> list[dict[str, Any]]:
    if KUBECTL is None:
        pytest.skip("kubectl (its built-in kustomize) is not installed")
    return kustomize(OPERATOR)


def one(resources: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        r
        for r in resources
        if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_of(resources: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(resources, "Deployment")["spec"]["template"]["spec"]
    return spec


def sidecar_of(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in pod.get("initContainers", []) if c["name"] == SIDECAR]
    return container


def app_of(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod["containers"]
    return container


def volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [v for v in pod["volumes"] if v["name"] == name]
    return found


def mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mount path -> the volumeMount, for one container."""
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def configmap_data(
    resources: list[dict[str, Any]], pod: dict[str, Any], vol: str
) -> dict[str, str]:
    """The files a configMap volume shows: the ConfigMap kustomize generated, by its hashed name."""
    name = volume(pod, vol)["configMap"]["name"]
    data: dict[str, str] = one(resources, "ConfigMap", name)["data"]
    return data


def sidecar_config_text(resources: list[dict[str, Any]]) -> str:
    """The refresherd config the pod gets: the ConfigMap mounted where $REFRESHERD_CONFIG is."""
    pod = pod_of(resources)
    config_path = Path(image_env()["REFRESHERD_CONFIG"])
    mount = mounts(sidecar_of(pod))[str(config_path.parent)]
    return configmap_data(resources, pod, mount["name"])[config_path.name]


def sidecar_config(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return tomllib.loads(sidecar_config_text(resources))


def seconds(value: str) -> float:
    """A duration as refresherd's config writes it ("20s"; the CRD's and systemd's alike)."""
    return parse_duration(value, file="deploy/kubernetes", key="duration")


def listen_port(config: dict[str, Any]) -> int:
    return int(config["server"]["listen"].rpartition(":")[2])


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or a Service's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


# --------------------------------------------------------------------------- the image, the unit


def dockerfile_final_stage() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's last stage, continuation lines joined."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        found.append((keyword.upper(), args.strip()))
    last_from = max(i for i, (k, _) in enumerate(found) if k == "FROM")
    return found[last_from:]


def image(keyword: str) -> list[str]:
    return [args for k, args in dockerfile_final_stage() if k == keyword]


def image_env() -> dict[str, str]:
    return dict(kv for args in image("ENV") for kv in re.findall(r"(\w+)=(\S+)", args))


def image_user() -> tuple[int, int]:
    uid, _, gid = image("USER")[-1].partition(":")
    return int(uid), int(gid)


def unit_settings() -> dict[str, list[str]]:
    """The [Service] settings of systemd/refresherd.service, each key's values in order."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in (ROOT / "systemd" / "refresherd.service").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def compose_image() -> str:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    name: str = compose["services"]["refresherd"]["image"]
    return name


# --------------------------------------------------------------------------- building


@needs_kubectl
def test_kustomize_builds_both_entry_points_from_every_file(
    base: list[dict[str, Any]], with_operator: list[dict[str, Any]]
) -> None:
    kinds = sorted(r["kind"] for r in base)
    assert kinds == ["ConfigMap", "ConfigMap", "Deployment", "PersistentVolumeClaim", "Service"]
    # No Secret: applying the manifests again must never overwrite the real one.
    assert "Secret" not in {r["kind"] for r in with_operator}
    extra = [r for r in with_operator if r not in base]
    assert {r["kind"] for r in extra} == {"ServiceMonitor", "Deployment"}
    # The operator variant is the same pod without the scrape annotations: one scrape per pod.
    plain, operated = one(base, "Deployment"), one(with_operator, "Deployment")
    annotations = plain["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert not operated["spec"]["template"]["metadata"].get("annotations")
    operated["spec"]["template"]["metadata"]["annotations"] = annotations
    assert operated == plain

    # Every file under deploy/kubernetes is a resource or a generator's source somewhere.
    used: set[Path] = set()
    for kustomization in KUBERNETES.rglob("kustomization.yaml"):
        used.add(kustomization)
        spec = yaml.safe_load(kustomization.read_text(encoding="utf-8"))
        for entry in spec.get("resources", []):
            path = (kustomization.parent / entry).resolve()
            used.add(path / "kustomization.yaml" if path.is_dir() else path)
        for generator in spec.get("configMapGenerator", []):
            for source in generator.get("files", []):
                used.add((kustomization.parent / source.rpartition("=")[2]).resolve())
    present = {p.resolve() for p in KUBERNETES.rglob("*") if p.is_file()}
    present = {p for p in present if "__pycache__" not in p.parts}
    assert present == used, f"not used by any kustomization: {sorted(present - used)}"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection or name lookup fails: the validator must find every schema on disk."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access during schema validation")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@needs_kubectl
@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, kubernetes_validate.latest_version()])
def test_every_resource_validates_against_the_kubernetes_schemas(
    with_operator: list[dict[str, Any]], version: str
) -> None:
    validated = 0
    for resource in with_operator:
        if resource["kind"] == "ServiceMonitor":
            continue  # a custom resource: test_the_service_monitor_scrapes_the_sidecar
        name = f"{resource['kind']}/{resource['metadata']['name']}"
        try:
            used = kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name} is not valid for Kubernetes {version}: {path}: {exc.message}")
        assert used == kubernetes_validate.utils.major_minor(version)
        validated += 1
    assert validated == len(with_operator) - 1

    # The validator refuses what it should: a misspelt field in the sidecar.
    broken = copy.deepcopy(one(with_operator, "Deployment"))
    sidecar_of(broken["spec"]["template"]["spec"])["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def kubernetes_type_validator(version: str, definition: str) -> Callable[[object], None]:
    """A validator for one Kubernetes type (``io.k8s....ObjectMeta``) from the schemas that
    kubernetes-validate ships, strict, with their references resolved on disk."""
    import json

    import jsonschema
    from referencing import Registry, Resource

    schemas = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    directory = schemas / f"v{version}.0-local-strict"
    definitions = json.loads((directory / "_definitions.json").read_text(encoding="utf-8"))
    registry: Registry[Any] = Resource.from_contents(definitions) @ Registry()
    schema = {"$ref": f"{definitions['$id']}#/$defs/{definition}"}
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return validator.validate


@needs_kubectl
@pytest.mark.usefixtures("no_network")
def test_the_service_monitor_scrapes_the_sidecar(with_operator: list[dict[str, Any]]) -> None:
    monitor = one(with_operator, "ServiceMonitor")
    service = one(with_operator, "Service")
    pod = pod_of(with_operator)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    # Its metadata and selector are Kubernetes' own types (ObjectMeta, LabelSelector).
    meta = "io.k8s.apimachinery.pkg.apis.meta.v1"
    kubernetes_type_validator(OLDEST_KUBERNETES, f"{meta}.ObjectMeta")(monitor["metadata"])
    selector = monitor["spec"]["selector"]
    kubernetes_type_validator(OLDEST_KUBERNETES, f"{meta}.LabelSelector")(selector)
    with pytest.raises(Exception, match="unexpected"):
        kubernetes_type_validator(OLDEST_KUBERNETES, f"{meta}.LabelSelector")({"matchLabel": {}})

    # The fields of ServiceMonitorSpec and Endpoint that it uses, with the CRD's types.
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "endpoints", "jobLabel", "namespaceSelector"}, spec
    assert "jobLabel" not in spec  # so the job label is the Service's name
    assert set(selector) == {"matchLabels"}
    assert selector["matchLabels"].items() <= service["metadata"]["labels"].items()
    # The job the alert rules and the dashboard select.
    assert service["metadata"]["name"] == "refresherd"
    assert 'up{job="refresherd"}' in (DEPLOY / "prometheus" / "alerts.yml").read_text()
    (endpoint,) = spec["endpoints"]
    assert set(endpoint) == {"port", "path", "interval", "scrapeTimeout"}, endpoint
    duration = re.compile(r"(0|(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?)")  # the CRD's
    assert duration.fullmatch(endpoint["interval"]) and duration.fullmatch(
        endpoint["scrapeTimeout"]
    )
    assert seconds(endpoint["scrapeTimeout"]) <= seconds(endpoint["interval"])
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert endpoint["path"] == job["metrics_path"]
    assert endpoint["scrapeTimeout"] == job["scrape_timeout"]
    assert endpoint["interval"] == scrape["global"]["scrape_interval"]

    # The endpoint's port is the Service's port of that name, which is the sidecar's metrics
    # port, which is the port the config listens on.
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    target = container_port(sidecar_of(pod), port["targetPort"])
    assert target == port["port"] == listen_port(sidecar_config(with_operator))
    labels = one(with_operator, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


# --------------------------------------------------------------------------- the pod


@needs_kubectl
def test_refresherd_is_a_native_sidecar_of_the_application(base: list[dict[str, Any]]) -> None:
    deployment = one(base, "Deployment")
    pod = pod_of(base)
    sidecar, app = sidecar_of(pod), app_of(pod)
    assert sidecar["restartPolicy"] == "Always"
    assert SIDECAR not in {c["name"] for c in pod["containers"]}
    # The image compose builds from the Dockerfile, run as the image runs it.
    assert sidecar["image"] == compose_image()
    assert sidecar["args"] == yaml.safe_load(image("CMD")[-1]) and "command" not in sidecar
    # Not pulled on every start (":latest" would be), so a locally loaded image works too.
    assert sidecar["imagePullPolicy"] == "IfNotPresent"
    # The ConfigMap sits where the image looks for the config.
    config_path = Path(image_env()["REFRESHERD_CONFIG"])
    assert mounts(sidecar)[str(config_path.parent)]["readOnly"] is True
    assert sidecar_config(base)["daemon"]["database"]

    # SQLite on a ReadWriteOnce volume: one pod at a time, the old one gone before the new.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    config = sidecar_config(base)
    database = Path(config["daemon"]["database"])
    tokens = mounts(sidecar)[str(database.parent)]
    claim = volume(pod, tokens["name"])["persistentVolumeClaim"]["claimName"]
    assert one(base, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert not tokens.get("readOnly")

    # The application shares the API's socket directory, and nothing else of refresherd's.
    socket_path = Path(config["api"]["unix_socket"])
    assert config["api"]["tcp"] is False and config["api"]["unix_socket_mode"] == "0660"
    shared = mounts(sidecar)[str(socket_path.parent)]
    assert mounts(app)[str(socket_path.parent)]["name"] == shared["name"]
    assert "emptyDir" in volume(pod, shared["name"])
    assert env_of(app)["REFRESHERD_SOCKET"] == str(socket_path)
    sidecar_volumes = {m["name"] for m in sidecar["volumeMounts"]}
    assert sidecar_volumes & {m["name"] for m in app["volumeMounts"]} == {shared["name"]}
    # The application gets the API's bearer token, and only that key of the Secret.
    bearer_file = Path(env_of(app)["REFRESHERD_BEARER_FILE"])
    bearer_volume = volume(pod, mounts(app)[str(bearer_file.parent)]["name"])["secret"]
    assert bearer_volume["items"] == [
        {"key": config["api"]["bearer_token_credential"], "path": bearer_file.name}
    ]
    # Secrets only as files: no environment variable holds one.
    for container in (sidecar, app):
        for variable in container.get("env", []):
            assert set(variable) == {"name", "value"}, variable
    assert one(base, "ConfigMap", volume(pod, "app")["configMap"]["name"])["data"] == {
        "read_token.py": APP_SCRIPT.read_text(encoding="utf-8")
    }


@needs_kubectl
def test_the_security_context_is_the_images_user_with_the_systemd_units_hardening(
    base: list[dict[str, Any]],
) -> None:
    pod = pod_of(base)
    sidecar = sidecar_of(pod)
    uid, gid = image_user()
    context = pod["securityContext"]
    assert (sidecar["securityContext"]["runAsUser"], sidecar["securityContext"]["runAsGroup"]) == (
        uid,
        gid,
    )
    assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (uid, gid, gid)

    # Each of the unit's settings, and what stands for it in the pod.
    unit = unit_settings()
    assert unit["DynamicUser"] == ["yes"]  # an unprivileged user
    assert context["runAsNonRoot"] is True and uid != 0
    assert unit["NoNewPrivileges"] == ["yes"]
    assert sidecar["securityContext"]["allowPrivilegeEscalation"] is False
    assert unit["CapabilityBoundingSet"] == [""] and unit["AmbientCapabilities"] == [""]
    assert sidecar["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert unit["ProtectSystem"] == ["strict"]
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    assert unit["PrivateTmp"] == ["yes"]
    assert "emptyDir" in volume(pod, mounts(sidecar)["/tmp"]["name"])
    assert unit["SystemCallFilter"]
    assert sidecar["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert unit["PrivateDevices"] == ["yes"]
    assert sidecar["securityContext"]["privileged"] is False
    # ProtectKernel*, ProtectClock, ...: no Kubernetes API access either.
    assert pod["automountServiceAccountToken"] is False

    # Every container of the pod meets the "restricted" Pod Security Standard.
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    allowed = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "projected", "secret"}
    for vol in pod["volumes"]:
        assert set(vol) - {"name"} <= allowed | {"persistentVolumeClaim"}, vol
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert security["runAsNonRoot"] is True, container["name"]
        assert security.get("runAsUser", context["runAsUser"]) != 0
        assert security["readOnlyRootFilesystem"] is True, container["name"]
        assert security.get("privileged") is False, container["name"]
        assert not any("hostPort" in p for p in container.get("ports", [])), container["name"]


@needs_kubectl
def test_probes_ports_and_scrape_follow_what_the_config_serves(base: list[dict[str, Any]]) -> None:
    pod = pod_of(base)
    sidecar = sidecar_of(pod)
    port = listen_port(sidecar_config(base))
    host = sidecar_config(base)["server"]["listen"].rpartition(":")[0]
    assert host == "0.0.0.0"  # the kubelet and Prometheus come from outside the pod's loopback
    assert image("EXPOSE") == [str(port)]
    assert [p["containerPort"] for p in sidecar["ports"]] == [port]

    paths = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = sidecar[probe]["httpGet"]
        assert container_port(sidecar, get["port"]) == port, probe
        paths[probe] = get["path"]
    # /readyz: database open and migrated, listener up (the application waits for that); /healthz:
    # the event loop is alive.
    assert paths == {
        "startupProbe": "/readyz",
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
    }
    # /readyz gives up on a slow database after READINESS_TIMEOUT and says so: the kubelet
    # waits longer, to hear it.
    assert sidecar["readinessProbe"]["timeoutSeconds"] > READINESS_TIMEOUT
    assert sidecar["startupProbe"]["timeoutSeconds"] > READINESS_TIMEOUT

    annotations = one(base, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] == "/metrics"
    service = one(base, "Service")
    assert [container_port(sidecar, p["targetPort"]) for p in service["spec"]["ports"]] == [port]


@needs_kubectl
def test_the_grace_period_covers_the_daemons_drain(base: list[dict[str, Any]]) -> None:
    pod = pod_of(base)
    shutdown_timeout = seconds(sidecar_config(base)["daemon"]["shutdown_timeout"])
    # The drain, then a grant the database has not taken yet, held and retried, then the
    # listener: refresherd's longest stop. The sidecar is stopped after the application.
    drain = shutdown_timeout + PERSIST_DEADLINE + PERSIST_RETRY_MAX + SERVER_STOP_TIMEOUT
    assert pod["terminationGracePeriodSeconds"] > drain
    # The systemd unit allows the same.
    assert seconds(unit_settings()["TimeoutStopSec"][0]) >= drain


@needs_kubectl
def test_every_container_has_requests_and_limits(base: list[dict[str, Any]]) -> None:
    pod = pod_of(base)
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        resources = container["resources"]
        for kind in ("cpu", "memory"):
            request = quantity(resources["requests"][kind])
            limit = quantity(resources["limits"][kind])
            assert 0 < request <= limit, (container["name"], kind)


def quantity(value: str | int) -> float:
    """A Kubernetes quantity: "50m" cores, "96Mi" bytes, "1" core."""
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * factor
    return float(text)


# --------------------------------------------------------------------------- the pod's files


class PodFiles:
    """The pod's file system under ``root``: each volume at its mount path, filled as the
    kubelet fills it. Secret files get mode 0440 however ``defaultMode`` is set: with an
    fsGroup, the kubelet gives read-only volumes' files to that group (kubernetes#57923)."""

    def __init__(self, root: Path, resources: list[dict[str, Any]], secrets: dict[str, str]):
        self.root = root
        self.resources = resources
        self.pod = pod_of(resources)
        self.mount_paths: list[str] = []
        seen: dict[str, str] = {}
        for container in [*self.pod.get("initContainers", []), *self.pod["containers"]]:
            for path, mount in mounts(container).items():
                # One root for the pod holds while no path shows two volumes.
                assert seen.setdefault(path, mount["name"]) == mount["name"], path
                if path not in self.mount_paths:
                    self.mount_paths.append(path)
                    self._fill(self.here(path), volume(self.pod, mount["name"]), secrets)

    def here(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def rooted(self, text: str) -> str:
        """``text`` with the root in front of every absolute path under a mount."""
        # One pass, longest path first: the root may itself start with a mount path (/tmp).
        paths = "|".join(re.escape(p) for p in sorted(self.mount_paths, key=len, reverse=True))
        return re.sub(rf'(?<![\w/])(?:{paths})(?=/|"|$)', lambda m: f"{self.root}{m[0]}", text)

    def env(self, container: dict[str, Any]) -> dict[str, str]:
        return {k: self.rooted(v) for k, v in env_of(container).items()}

    def _fill(self, target: Path, vol: dict[str, Any], secrets: dict[str, str]) -> None:
        target.mkdir(parents=True)
        if "configMap" in vol:
            data = configmap_data(self.resources, self.pod, vol["name"])
            for key, text in data.items():
                (target / key).write_text(text, encoding="utf-8")
                (target / key).chmod(0o644)  # the default defaultMode
        elif "secret" in vol:
            for item in vol["secret"]["items"]:
                path = target / item["path"]
                path.write_text(secrets[item["key"]], encoding="utf-8")
                path.chmod(item.get("mode", vol["secret"]["defaultMode"]) | 0o440)
        else:
            assert {"emptyDir", "persistentVolumeClaim"} & set(vol), vol


@pytest.fixture
def pod_root() -> Iterator[Path]:
    # Short: the API's unix socket must fit in sun_path (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="k8s-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def pod_secrets(resources: list[dict[str, Any]], client_secret: str) -> dict[str, str]:
    """A value for each key the config names as a credential, which are the Secret's keys the
    sidecar's volume projects."""
    config = sidecar_config(resources)
    (provider,) = config["providers"].values()
    secrets = {
        provider["client_secret_credential"]: client_secret,
        config["api"]["bearer_token_credential"]: "bearer_" + os.urandom(16).hex(),
        config["encryption"]["key_credential"]: base64.b64encode(os.urandom(32)).decode(),
    }
    for value in secrets.values():
        LEAKS.add_secret(value)
    sidecar = sidecar_of(pod_of(resources))
    directory = env_of(sidecar)["CREDENTIALS_DIRECTORY"]
    projected = volume(pod_of(resources), mounts(sidecar)[directory]["name"])["secret"]["items"]
    assert sorted(item["key"] for item in projected) == sorted(secrets)
    assert all(item["path"] == item["key"] for item in projected)
    return secrets


@needs_kubectl
def test_the_configmaps_config_loads_with_the_secrets_as_the_pod_mounts_them(
    base: list[dict[str, Any]], pod_root: Path
) -> None:
    secrets = pod_secrets(base, "cs_" + os.urandom(12).hex())
    files = PodFiles(pod_root, base, secrets)
    sidecar, app = sidecar_of(files.pod), app_of(files.pod)
    config_file = files.here(image_env()["REFRESHERD_CONFIG"])
    config_file.write_text(files.rooted(config_file.read_text(encoding="utf-8")))

    config = load_config(config_file, env=files.env(sidecar))
    written = sidecar_config(base)
    (provider,) = config.providers.values()
    credential = written["providers"][provider.name]["client_secret_credential"]
    assert provider.client_secret.reveal() == secrets[credential]
    assert config.api.enabled and config.api.bearer_token is not None
    bearer = secrets[written["api"]["bearer_token_credential"]]
    assert config.api.bearer_token.reveal() == bearer
    assert config.encryption is not None
    assert config.encryption.key.reveal() == secrets[written["encryption"]["key_credential"]]
    # Kubernetes makes the Secret's files 0440: a credential's mode is not the user's to chmod,
    # so the loader has no warning for it.
    assert config.warnings == ()
    # Everything the daemon writes is on a volume (the root file system is read-only): the
    # database on the claim, the socket on the emptyDir the application mounts too.
    on_claim = [
        path
        for path, mount in mounts(sidecar).items()
        if "persistentVolumeClaim" in volume(files.pod, mount["name"])
    ]
    assert [files.here(path) for path in on_claim] == [Path(config.daemon.database).parent]
    assert config.api.unix_socket == Path(files.env(app)["REFRESHERD_SOCKET"])
    assert config.server.port == listen_port(written)
    assert config.api.tcp is False


# --------------------------------------------------------------------------- the running pod


def peak_rss(pid: int) -> int:
    """The process's peak resident set, bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def ns_pid_1(unshare_pid: int) -> int:
    """The host pid of the PID namespace's init, the one child of ``unshare --fork``."""
    (child,) = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
    return int(child)


def pid_namespaces() -> bool:
    if UNSHARE is None:
        return False
    probe = [UNSHARE, "--pid", "--fork", "true"]
    return subprocess.run(probe, capture_output=True, timeout=30, check=False).returncode == 0


@needs_kubectl
def test_the_pod_runs_the_daemon_the_probes_the_scrape_and_the_application(
    base: list[dict[str, Any]],
    pod_root: Path,
    tmp_path: Path,
    idp_factory: IdPFactory,
    daemons: Daemons,
) -> None:
    idp = idp_factory()
    secrets = pod_secrets(base, idp.client_secret)
    files = PodFiles(pod_root, base, secrets)
    deployment = one(base, "Deployment")
    sidecar, app = sidecar_of(files.pod), app_of(files.pod)

    # The ConfigMap's config, its provider pointed at the FakeIdP and its listener at a free
    # loopback port; everything else as the pod gets it.
    config_file = files.here(image_env()["REFRESHERD_CONFIG"])
    text = files.rooted(config_file.read_text(encoding="utf-8"))
    for key, value in (
        ("token_url", idp.token_url),
        ("client_id", idp.client_id),
        ("listen", "127.0.0.1:0"),
    ):
        text, count = re.subn(rf'(?m)^{key} = ".*"$', f'{key} = "{value}"', text)
        assert count == 1, key
    config_file.write_text(text, encoding="utf-8")
    env = {**os.environ, **files.env(sidecar), "REFRESHERD_CONFIG": str(config_file)}

    token_set = env_of(app)["TOKEN_SET_ID"]
    (provider,) = sidecar_config(base)["providers"]
    (line,) = idp.token_lines(provider, 1, with_access_token=False)
    line["id"] = token_set
    imported = run_cli(config_file, "tokens", "import", "-", input=json.dumps(line) + "\n", env=env)
    assert imported.returncode == 0, imported.stderr

    daemon = daemons(config_file, env=env)
    started = time.monotonic()

    def get(path: str) -> httpx.Response:
        try:
            return daemon.get(path)
        except httpx.TransportError:
            return httpx.Response(599)

    # The kubelet: the startup probe until it passes, then readiness and liveness.
    startup = sidecar["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    wait_until(lambda: get(startup["httpGet"]["path"]).status_code == 200, timeout=budget)
    for probe in ("readinessProbe", "livenessProbe"):
        response = get(sidecar[probe]["httpGet"]["path"])
        assert response.status_code == 200, (probe, response.text)
    assert time.monotonic() - started < budget

    # Prometheus, by the pod's annotations: the refresh shows.
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"

    def refreshed() -> float:
        response = get(annotations["prometheus.io/path"])
        assert response.status_code == 200
        return metric(response.text, "refresherd_refresh_success_total", provider=provider)

    wait_until(refreshed, what="the first refresh, on /metrics")

    # The application, as its container runs it (the ConfigMap's script), once ...
    script = files.here(app["command"][1])
    app_env = {**os.environ, **files.env(app)}
    once = subprocess.run(
        [sys.executable, str(script), "--once"],
        env=app_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    LEAKS.add_output("read_token.py --once", (once.stdout + once.stderr).encode())
    assert once.returncode == 0, once.stderr
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
    assert re.fullmatch(
        rf"{token_set}: access token \(\d+ chars\) valid until {stamp} \(in \d+s\)\n", once.stdout
    ), once.stdout
    # ... and as its container's PID 1, which the kubelet stops with SIGTERM.
    log = tmp_path / "app.log"  # kept for the leak scan at the end of the session
    LEAKS.add_file(log)
    as_pid_1: list[str] = []
    if UNSHARE is not None and pid_namespaces():
        as_pid_1 = [UNSHARE, "--pid", "--fork", "--kill-child"]
    with log.open("wb") as out:
        reader = subprocess.Popen(
            [*as_pid_1, sys.executable, str(script)],
            env={**app_env, "READ_INTERVAL": "0.5"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: log.read_text().count("valid until") >= 2, what="the app's reads")
        os.kill(ns_pid_1(reader.pid) if as_pid_1 else reader.pid, signal.SIGTERM)
        assert reader.wait(timeout=10) == 0
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()

    # The daemon within its memory request; stopped as the kubelet stops it, within the
    # grace period.
    request = quantity(sidecar["resources"]["requests"]["memory"])
    assert peak_rss(daemon.pid) < request
    stopping = time.monotonic()
    assert daemon.stop(timeout=files.pod["terminationGracePeriodSeconds"]) == 0
    assert time.monotonic() - stopping < files.pod["terminationGracePeriodSeconds"]
    assert daemon.events("refresherd stopped")
    assert daemon.events("config") == []
