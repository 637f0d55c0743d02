"""The daemon's CPU per refresh, its event loop's apart, against an IdP that costs next to nothing.

bench/run.py measures the daemon against the fake IdP, which spends 0.2 ms of the same two cores
on each request and moves every figure with it. Here a canned HTTP server (bench/request_cost.py's:
the same token response every time, so the sets are re-use tokens) answers instead, and what is
printed is the CPU of the daemon's main thread (its event loop) and of the whole process per
refresh, from the first refresh to the last of ``--sets`` imported and due at once. The daemon is
a real ``refresherd run`` with the default config, each run on a database of its own; the trees
(``--variants default,tree=DIR``, as in bench/run.py) alternate run by run. Neighbouring runs
agree to 1-2 % while the shared machine is quiet and to 5-10 % while it is not (the throughput
bench: 5-10 % at best); compare medians of several runs.

    python bench/refresh_cost.py --sets 20000 --variants default,tree=/tmp/before --repeat 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench
from request_cost import canned_idp


def one_run(url: str, workdir: Path, sets: int, tree: str | None) -> dict[str, float]:
    lines = workdir / "import.jsonl"
    with lines.open("w", encoding="utf-8") as f:
        for i in range(sets):
            row = {"id": f"ts-{i}", "provider": bench.PROVIDER, "refresh_token": "r" * 40}
            f.write(json.dumps(row) + "\n")
    config, port = bench.write_config(
        workdir, url, concurrency="auto", usage="reuse", log_level="info"
    )
    with bench.daemon(config, port, workdir, tree=tree) as d:
        bench.import_tokens(config, lines)
        first = None
        done0 = loop0 = process0 = 0.0
        deadline = time.monotonic() + max(120.0, sets / 50)
        while True:
            m = d.metrics()
            done = bench.successes(m) + bench.failures(m)
            now = time.perf_counter()
            if first is None and done > 0:
                first, done0 = now, done
                loop0 = bench.cpu_seconds(d.process.pid, main_thread=True)
                process0 = bench.cpu_seconds(d.process.pid)
            if done >= sets or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        loop = bench.cpu_seconds(d.process.pid, main_thread=True) - loop0
        process = bench.cpu_seconds(d.process.pid) - process0
        failures = bench.failures(m)
    counted = done - done0
    if failures or done < sets:
        raise SystemExit(f"{workdir}: {int(done)} of {sets} done, {int(failures)} failed")
    if first is None or counted <= 0:
        raise SystemExit(f"{sets} sets were refreshed between two looks: too few to measure")
    return {
        "loop_us": 1e6 * loop / counted,
        "process_us": 1e6 * process / counted,
        "per_second": counted / (now - first),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", type=int, default=20000)
    p.add_argument("--variants", default="default", help="default and/or tree=DIR, by commas")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--keep-workdir", action="store_true")
    args = p.parse_args()
    variants = args.variants.split(",")
    for variant in variants:
        if variant != "default" and not variant.startswith("tree="):
            p.error(f"a variant is default or tree=DIR, not {variant!r}")
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    print("| variant | run | loop CPU µs/refresh | process CPU µs/refresh | refreshes/s |")
    print("|---|---:|---:|---:|---:|")
    with canned_idp(backlog=4096) as url, bench.run_directory(keep=args.keep_workdir) as tmp:
        for run in range(1, args.repeat + 1):
            order = variants if run % 2 else list(reversed(variants))
            for variant in order:
                workdir = Path(tmp) / f"{run}-{len(results[variant])}-{variants.index(variant)}"
                workdir.mkdir()
                tree = variant.removeprefix("tree=") if variant != "default" else None
                r = one_run(url, workdir, args.sets, tree)
                results[variant].append(r)
                print(
                    f"| {variant} | {run} | {r['loop_us']:.1f} | {r['process_us']:.1f} "
                    f"| {r['per_second']:,.0f} |",
                    flush=True,
                )
    print()
    for variant, runs in results.items():
        loop = statistics.median(r["loop_us"] for r in runs)
        process = statistics.median(r["process_us"] for r in runs)
        print(f"{variant}: median loop {loop:.1f} µs, process {process:.1f} µs per refresh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
