"""Start-up time of one-shot commands: wall time of whole processes, and what they import.

    python bench/startup.py [--runs 10] [--sets 50] [TREE ...]

Each TREE is a directory holding a ``refresherd`` package (default: this checkout); each is put
first on PYTHONPATH in turn (the commands run in a temporary directory, so that the current
one does not come first), so that two versions of the code can be compared on one machine in
one run (e.g. ``git archive BASE refresherd | tar -x -C /tmp/before``). The runs are interleaved
(tree A, tree B, tree A, ...) so that a machine's changing load falls on both alike. Commands:
``python -c pass`` (the interpreter alone), ``python -m refresherd --help``, ``check-config``
and ``tokens list`` on a SQLite database of ``--sets`` token sets. Per command and tree: the
median, min and max wall time over ``--runs`` runs, the median less the interpreter's, and the
modules ``python -X importtime`` saw imported (count, and which heavy ones). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("refresherd.daemon", "aiohttp", "starlette", "hypercorn", "prometheus_client")


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tree), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    )
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    return env


def _setup(directory: Path, tree: Path, sets: int) -> Path:
    secret = directory / "client-secret"
    secret.write_text("s3cr3t\n")
    secret.chmod(0o600)
    config = directory / "refresherd.toml"
    config.write_text(
        f'[daemon]\ndatabase = "{directory / "tokens.db"}"\n\n'
        '[providers.p]\ntoken_url = "http://127.0.0.1:1/connect/token"\n'
        'client_id = "c"\nclient_secret_file = "client-secret"\n'
    )
    lines = "".join(
        json.dumps(
            {
                "id": f"set-{i}",
                "provider": "p",
                "access_token": f"at-{i}",
                "refresh_token": f"rt-{i}",
                "expires_in": 3600,
            }
        )
        + "\n"
        for i in range(sets)
    )
    subprocess.run(
        [sys.executable, "-m", "refresherd", "--config", str(config), "tokens", "import"],
        input=lines,
        text=True,
        env=_env(tree),
        cwd=directory,
        check=True,
        capture_output=True,
    )
    return config


def _imported(argv: list[str], env: dict[str, str], cwd: str) -> set[str]:
    proc = subprocess.run(
        [argv[0], "-X", "importtime", *argv[1:]], env=env, cwd=cwd, capture_output=True, text=True
    )
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":
                names.add(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", type=Path, default=[ROOT])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--sets", type=int, default=50)
    args = parser.parse_args()
    trees: list[Path] = [t.resolve() for t in args.trees]
    with tempfile.TemporaryDirectory() as tmp:
        config = _setup(Path(tmp), trees[0], args.sets)
        py = sys.executable
        commands = {
            "python -c pass": [py, "-c", "pass"],
            "refresherd --help": [py, "-m", "refresherd", "--help"],
            "refresherd check-config": [
                py,
                "-m",
                "refresherd",
                "--config",
                str(config),
                "check-config",
            ],
            "refresherd tokens list": [
                py,
                "-m",
                "refresherd",
                "--config",
                str(config),
                "tokens",
                "list",
            ],
        }
        times: dict[tuple[str, Path], list[float]] = {}
        for _ in range(args.runs):
            for name, argv in commands.items():
                for tree in trees:
                    env = _env(tree)
                    start = time.perf_counter()
                    subprocess.run(argv, env=env, cwd=tmp, check=True, capture_output=True)
                    times.setdefault((name, tree), []).append(time.perf_counter() - start)
        base = {t: statistics.median(times[("python -c pass", t)]) for t in trees}
        print(f"{args.runs} runs each, interleaved; seconds of wall time")
        print(
            f"{'command':<26} {'tree':<28} {'median':>7} {'min':>7} {'max':>7} "
            f"{'-python':>8} {'modules':>7}  heavy modules imported"
        )
        for name, argv in commands.items():
            for tree in trees:
                samples = times[(name, tree)]
                median = statistics.median(samples)
                modules = _imported(argv, _env(tree), cwd=tmp)
                heavy = sorted(h for h in HEAVY if h in modules)
                print(
                    f"{name:<26} {str(tree)[-28:]:<28} {median:7.3f} {min(samples):7.3f} "
                    f"{max(samples):7.3f} {median - base[tree]:8.3f} {len(modules):7d}  "
                    f"{', '.join(heavy) or '-'}"
                )
        if len(trees) == 2:
            for name in commands:
                a = statistics.median(times[(name, trees[0])])
                b = statistics.median(times[(name, trees[1])])
                print(f"ratio {name}: {trees[0].name} / {trees[1].name} = {a / b:.2f}")


if __name__ == "__main__":
    main()
