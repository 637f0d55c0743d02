"""The image, built and run. buildah builds the Dockerfile as users would (no Docker engine and no
daemon: chroot isolation), on a Debian base made with debootstrap (`.ci/run base-image`, once per
machine, handed over as the BASE_IMAGE build argument: no other registry is reachable in CI).
Then the image's ENTRYPOINT and CMD run in a container as its unprivileged user, against a
FakeIdP on the host, with the database on a volume, as deploy/compose.yaml runs it; compose's
application reads the token from that volume; the image's HEALTHCHECK runs in the container; a
SIGTERM drains and ends in exit 0.

buildah's chroot isolation shares the host's network and PID namespace: the container reaches
the IdP on loopback and listens on a free loopback port, and refresherd is not PID 1 here (as PID
1 of its own namespace it runs in tests/test_deploy_docker.py). The test needs root, buildah and
debootstrap; without them it is skipped, except in CI (``$CI`` set), where it fails."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    LEAKS,
    DaemonProcess,
    IdPFactory,
    IdPHandle,
    free_port,
    read_rows,
    wait_until,
)
from deploy_support import DEPLOY, ROOT

from refresherd.settings import DaemonConfig
from refresherd.testing import FaultKind

# The first test may make the base image (debootstrap, a minute; .ci/run makes it before the
# suite in CI) before the build.
pytestmark = pytest.mark.timeout(600)

BUILDAH = shutil.which("buildah")
# The host's CA bundle, bind-mounted over the base's during the build only: pip in the build
# reaches PyPI through whatever TLS the host trusts (a proxy's own CA on some CI machines), and a
# bind mount leaves nothing in a layer.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
SHUTDOWN_TIMEOUT = DaemonConfig(database=Path("x")).shutdown_timeout


def unavailable() -> str | None:
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (Debian packages; .ci/run installs them)"
    if os.geteuid() != 0:
        return "building and running the image needs root (debootstrap, buildah chroot isolation)"
    return None


def buildah(*args: str, input: str | None = None, timeout: float = 120) -> str:
    assert BUILDAH is not None
    result = subprocess.run(
        [BUILDAH, *args], input=input, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"buildah {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout


def run_argv(container: str, command: Sequence[str], *options: str) -> list[str]:
    """``buildah run`` of ``command`` in ``container`` (as its image's user unless ``--user``)."""
    assert BUILDAH is not None
    return [BUILDAH, "run", "--isolation", "chroot", *options, container, "--", *command]


def default_base_image() -> str:
    match = re.search(r"^ARG BASE_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert match, "the Dockerfile takes its base as ARG BASE_IMAGE=<default>"
    return match.group(1)


@dataclass(frozen=True)
class Image:
    name: str
    base: str  # the Debian base it was built on, standing in for the Dockerfile's default
    config: dict[str, Any]  # the Docker image config: User, Entrypoint, Cmd, Healthcheck, ...

    @property
    def user(self) -> tuple[int, int]:
        uid, _, gid = self.config["User"].partition(":")
        return int(uid), int(gid or uid)


@pytest.fixture(scope="session")
def image() -> Iterator[Image]:
    """The Dockerfile built once per session (about 20 s; the base, made once per machine, is a
    minute more the first time)."""
    problem = unavailable()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    base = subprocess.run(
        [str(ROOT / ".ci" / "run"), "base-image"],
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    assert base.returncode == 0, f".ci/run base-image:\n{base.stdout}{base.stderr}"
    base_image = base.stdout.strip()
    name = f"localhost/refresherd-test:{uuid.uuid4().hex[:12]}"
    # As `docker build` does, with what CI lacks passed in: the base as the build argument.
    # The Docker format keeps HEALTHCHECK (the OCI image config has no field for it).
    ca = ["--volume", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"] if HOST_CA_BUNDLE.is_file() else []
    buildah(
        *("bud", "--isolation", "chroot", "--format", "docker", "--pull=never", *ca),
        *("--build-arg", f"BASE_IMAGE={base_image}", "--file", "Dockerfile", "--tag", name),
        str(ROOT),
        timeout=600,
    )
    try:
        inspected = json.loads(buildah("inspect", "--type", "image", name))
        yield Image(name, base_image, inspected["Docker"]["config"])
    finally:
        buildah("rmi", name)


@pytest.fixture
def containers() -> Iterator[Callable[[str], str]]:
    """``containers(image)``: a new working container of ``image``, removed after the test."""
    made: list[str] = []

    def make(image_name: str) -> str:
        name = f"refresherd-test-{uuid.uuid4().hex[:12]}"
        buildah("from", "--pull-never", "--name", name, image_name)
        made.append(name)
        return name

    yield make
    for name in made:
        buildah("rm", name)


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


def command_pid(buildah_pid: int) -> int | None:
    """The container's command: the first descendant of a ``buildah run`` that is not one of
    buildah's own helpers (buildah-chroot-runtime, buildah-chroot-exec)."""
    pending = [buildah_pid]
    while pending:
        for child in children(pending.pop()):
            try:
                argv0 = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0]
            except (FileNotFoundError, ProcessLookupError):
                continue
            if argv0.startswith(b"buildah"):
                pending.append(child)
            elif argv0:
                return child
    return None


def process_ids(pid: int) -> tuple[int, int]:
    """(effective uid, effective gid) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    uid, gid = (line.split()[2] for line in status.splitlines() if line[:4] in ("Uid:", "Gid:"))
    return int(uid), int(gid)


class ContainerProcess(DaemonProcess):
    """A command run in a container with ``buildah run``, its output in a log file. buildah does
    not pass signals on (a SIGTERM to it kills the command), so signals go to the command
    itself, as `docker stop` sends them to the container's main process."""

    def __init__(self, argv: list[str], config: Path, log_path: Path):
        super().__init__(config, log_path)
        self.argv = argv

    def start(self, *, wait_listening: bool = True) -> ContainerProcess:
        assert self.proc is None
        LEAKS.add_file(self.log_path)
        LEAKS.add_output(
            f"argv of the container logging to {self.log_path}", " ".join(self.argv).encode()
        )
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        if wait_listening:
            self.address = self.wait_for_address()
        return self

    def command_pid(self) -> int:
        assert self.proc is not None
        pid = wait_until(lambda: command_pid(self.pid), what="the container's command to start")
        assert pid is not None
        return pid

    def send_signal(self, sig: int) -> None:
        os.kill(self.command_pid(), sig)

    def kill(self) -> None:
        """SIGKILL to the command; buildah, left running, then cleans up after it and exits."""
        assert self.proc is not None
        if (pid := command_pid(self.pid)) is not None:
            os.kill(pid, signal.SIGKILL)
        try:
            self.returncode = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            super().kill()


@pytest.fixture
def processes() -> Iterator[list[ContainerProcess]]:
    made: list[ContainerProcess] = []
    yield made
    for process in made:
        if process.running():
            process.kill()


# --------------------------------------------------------------------------- compose.yaml


def compose_service(name: str) -> dict[str, Any]:
    service: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"][
        name
    ]
    return service


def volume_options(
    service: dict[str, Any], named: dict[str, Path], files: dict[str, Path]
) -> list[str]:
    """``--volume`` options for a compose service's volumes: a named volume from ``named``, a
    relative path from deploy/ unless ``files`` replaces it (the test's own config, say)."""
    options: list[str] = []
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        if source.startswith("."):
            host = files.get(source, (DEPLOY / source).resolve())
        else:
            host = named[source]
        options += ["--volume", ":".join([str(host), target, *mode])]
    return options


def sidecar_config(path: Path, idp: IdPHandle, port: int) -> Path:
    """deploy/refresherd.toml with the IdP's token URL and client id, listening on a free
    loopback port: the container shares the host's network here, not a network of its own."""
    text = (DEPLOY / "refresherd.toml").read_text(encoding="utf-8")
    for key, value in (
        ("listen", f"127.0.0.1:{port}"),
        ("token_url", idp.token_url),
        ("client_id", idp.client_id),
    ):
        text, count = re.subn(rf"^{key} = .*$", f"{key} = {json.dumps(value)}", text, flags=re.M)
        assert count == 1, f"deploy/refresherd.toml: {key} {count} times"
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the tests


def test_the_image_is_configured_to_run_refresherd_unprivileged(
    image: Image, containers: Callable[[str], str]
) -> None:
    config = image.config
    assert image.user[0] != 0 and image.user[1] != 0, config["User"]
    assert config["Entrypoint"] == ["refresherd"] and config["Cmd"] == ["run"]
    assert config["StopSignal"] == "SIGTERM"
    assert list(config["Volumes"]) == ["/var/lib/refresherd"]
    assert config["Healthcheck"]["Test"][0] == "CMD"
    # The volume's directory, which a new named volume takes its owner and mode from.
    container = containers(image.name)
    mountpoint = Path(buildah("mount", container).strip())
    try:
        state = (mountpoint / "var/lib/refresherd").stat()
        # The base the test built on stands in for the Dockerfile's default base: the same
        # Debian release and Python minor version.
        python = next((mountpoint / "opt/refresherd/lib").glob("python3.*")).name
    finally:
        buildah("umount", container)
    assert (state.st_uid, state.st_gid, state.st_mode & 0o7777) == (*image.user, 0o700)
    default = default_base_image()
    assert default.startswith(f"python:{python.removeprefix('python')}-"), (default, python)
    assert image.base.rpartition(":")[2].split("-")[0] == default.rpartition("-")[2]


def test_the_image_refreshes_through_its_volume_answers_its_healthcheck_and_drains_on_sigterm(
    tmp_path: Path,
    image: Image,
    containers: Callable[[str], str],
    processes: list[ContainerProcess],
    idp_factory: IdPFactory,
) -> None:
    # deploy/refresherd.toml's provider: one-time refresh tokens with a 30 s grace period.
    idp = idp_factory(grace_period=30.0)
    uid, gid = image.user
    port = free_port()
    config = sidecar_config(tmp_path / "config.toml", idp, port)
    # The named volume: new, it takes the owner and mode of the image's directory.
    volume = tmp_path / "volume"
    volume.mkdir(mode=0o700)
    os.chown(volume, uid, gid)
    database = volume / "tokens.db"
    # The secret as README.md installs it: owned by the image's uid, mode 0400.
    service = compose_service("refresherd")
    (secret,) = service["secrets"]
    secret_file = tmp_path / "secrets" / secret
    secret_file.parent.mkdir()
    secret_file.write_text(idp.client_secret + "\n", encoding="utf-8")
    secret_file.chmod(0o400)
    os.chown(secret_file, uid, gid)

    # The container as compose.yaml runs it: its volumes and secret, its capabilities dropped, a
    # tmpfs /tmp (`buildah run` has no read-only root file system and no no-new-privileges: the
    # image's user has no privilege to gain). The healthcheck's URL follows the listen port, as
    # `docker run -e` would set it. The image's VOLUME comes off the working container: `buildah
    # run` would mount an anonymous volume of its own there beside our bind, and either one can
    # win (buildah 1.28); the named volume takes that place, as with Docker.
    container = containers(image.name)
    buildah(
        "config",
        *(f"--volume={path}-" for path in image.config["Volumes"]),
        f"--env=REFRESHERD_HEALTHCHECK_URL=http://127.0.0.1:{port}/healthz",
        container,
    )
    options = [
        *volume_options(service, {"tokens": volume}, {"./refresherd.toml": config}),
        f"--volume={secret_file}:/run/secrets/{secret}:ro",
        *(f"--cap-drop={capability}" for capability in service["cap_drop"]),
        *(f"--mount=type=tmpfs,destination={path}" for path in service["tmpfs"]),
    ]
    entrypoint = image.config["Entrypoint"]

    def tokens_add(token_set_id: str) -> None:
        """`docker compose run --rm -T refresherd tokens add ... < response.json`."""
        response = dict(idp.idp.issue(user=token_set_id))
        del response["access_token"], response["expires_in"]  # so that it is refreshed at once
        argv = run_argv(
            container, [*entrypoint, "tokens", "add", token_set_id, "--provider", "visma"], *options
        )
        added = subprocess.run(
            argv, input=json.dumps(response).encode(), capture_output=True, timeout=120
        )
        LEAKS.add_output(f"tokens add {token_set_id} in the container", added.stdout + added.stderr)
        assert added.returncode == 0, added.stderr.decode()

    tokens_add("customer-42")
    # Created by the image's user, 0600: the application reads it as that uid.
    assert (database.stat().st_uid, database.stat().st_mode & 0o777) == (uid, 0o600)

    daemon = ContainerProcess(
        run_argv(container, [*entrypoint, *image.config["Cmd"]], *options),
        config,
        tmp_path / "container.log",
    )
    processes.append(daemon)
    daemon.start()
    assert process_ids(daemon.command_pid()) == (uid, gid), "not the image's user"
    wait_until(
        lambda: read_rows(database)["customer-42"]["version"] == 2,
        what="customer-42 refreshed, as the volume shows it",
    )

    # The HEALTHCHECK, as Docker runs it: in the container, with its user and environment.
    healthcheck = run_argv(container, image.config["Healthcheck"]["Test"][1:])
    assert subprocess.run(healthcheck, capture_output=True, timeout=60).returncode == 0

    # compose.yaml's application: its image (the Dockerfile's default base, here the Debian base
    # standing in for it), its user, environment, command and read-only view of the volume.
    app = compose_service("app")
    assert app["image"] == default_base_image()
    app_container = containers(image.base)
    env = [f"--env={key}={value}" for key, value in app["environment"].items()]
    reader = ContainerProcess(
        run_argv(
            app_container,
            app["command"],
            *("--user", app["user"], *env),
            *volume_options(app, {"tokens": volume}, {}),
        ),
        config,
        tmp_path / "app.log",
    )
    processes.append(reader)
    reader.start(wait_listening=False)
    row = read_rows(database)["customer-42"]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["expires_at"]))
    line = rf"customer-42: access token \({len(row['access_token'])} chars\) valid until {stamp} "
    wait_until(
        lambda: re.search(line, reader.log_text()) or not reader.running(),
        what="the application's first read",
    )
    assert re.search(line, reader.log_text()), reader.log_text()
    assert process_ids(reader.command_pid()) == tuple(int(i) for i in app["user"].split(":"))
    reader.stop()

    # `docker stop`: SIGTERM while a refresh is in flight (a token set added while it runs, as
    # `docker exec` would, and the IdP slow to answer). It finishes, persists, and exit is 0.
    idp.faults.add(FaultKind.SLOW, times=4, delay=3.0)
    tokens_add("customer-43")
    wait_until(lambda: idp.ledger.refreshes == 2, what="customer-43's refresh at the IdP")
    assert daemon.stop(timeout=SHUTDOWN_TIMEOUT + 30) == 0, daemon.tail()
    assert daemon.events("stop signal", signal="SIGTERM")
    (shutting_down,) = daemon.events("shutting down")
    assert shutting_down["in_flight"] >= 1
    assert daemon.events("refresherd stopped", exit_code=0)
    rows = read_rows(database)
    assert {r["version"] for r in rows.values()} == {2}
    for token_set_id, row in rows.items():
        assert row["attempt_started_at"] is None, token_set_id
        assert idp.ledger.is_live(row["refresh_token"]), token_set_id
    # Down, the healthcheck fails.
    assert subprocess.run(healthcheck, capture_output=True, timeout=60).returncode != 0
