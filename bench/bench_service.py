"""`anomalygpt serve` under load and crashes (issue 21): a real server subprocess, real HTTP clients, the audit
database read back afterwards.

- load: one profile from 4 good odd-numbered (dev half) ELPV mono cells; N concurrent clients post dev-half cells
  (good and defective) to /v1/inspect for D seconds: throughput, p50/p95/p99 latency, failed requests, and exactly
  one audit row per acknowledged request. Rows for 1 client and for --batch-wait-ms 0; the one-process CLI
  baseline (`anomalygpt detect` per image, with --ref and with a fitted --profile).
- crash: 8 clients, `kill -9` of the server after ~10 s, restart on the same folder: time until /healthz answers,
  every acknowledged inspection's row and files (sha256 = file name), no temp file left, the same profile served.

Servers run with `--answerer grounded` (no LLM loaded for /v1/chat, which these parts do not call): start-up
times are the inspection service's own.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_service.py --parts load,crash --out runs/bench_service.json
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from anomalygpt.client import Client, ServiceError
from anomalygpt.io import write_json_atomic
from eval.datasets import elpv_half, load_split

ANOMALYGPT = str(Path(sys.executable).with_name("anomalygpt"))
DEFAULT_WAIT_MS = 5.0  # anomalygpt serve's --batch-wait-ms default
START_TIMEOUT_S = 600.0
N_REFERENCES = 4
SEED = 0


@dataclass(frozen=True)
class BenchConfig:
    parts: tuple[str, ...]
    clients: int  # concurrent clients of the main load row
    seconds: float  # how long each load row posts
    cli_calls: int  # `anomalygpt detect` calls per baseline
    crash_clients: int
    kills: int
    kill_after_s: float  # load time before each kill -9
    out: Path
    serve_options: tuple[str, ...] = ()  # e.g. ("--inference-batch", "16")


@dataclass
class Outcome:
    """One client request: when it ran, its HTTP status (0: no answer) and the inspection id it acknowledged."""

    started: float
    seconds: float
    status: int
    inspection_id: str | None = None
    error: str = ""


@dataclass
class Server:
    """An `anomalygpt serve` subprocess on a free port over `folder`."""

    folder: Path
    wait_ms: float
    options: list[str] = field(default_factory=list)  # more `anomalygpt serve` options (--db, --api-key-file...)
    env: dict[str, str] | None = None  # the server's environment; None: this process's
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    log: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> float:
        """Start it and wait for /healthz; returns the seconds from launch to the first answer."""
        self.port = free_port()
        log = self.folder.parent / f"serve-{self.port}-{len(self.log)}.log"  # replicas share a folder
        self.log.append(log)
        command = [ANOMALYGPT, "serve", "--port", str(self.port), "--profiles", str(self.folder)]
        command += ["--batch-wait-ms", f"{self.wait_ms:g}", "--answerer", "grounded", *self.options]
        launched = time.perf_counter()
        with log.open("wb") as handle:
            self.process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=self.env)
        while time.perf_counter() - launched < START_TIMEOUT_S:
            if self.process.poll() is not None:
                raise RuntimeError(f"anomalygpt serve exited with {self.process.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return time.perf_counter() - launched
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"anomalygpt serve did not answer /healthz within {START_TIMEOUT_S:g} s")

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self, key: str | None = None) -> str:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.get(f"{self.url}/metrics", timeout=30, headers=headers).text


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def bench_images() -> tuple[list[Path], list[Path]]:
    """4 good dev-half cells for the profile; the other dev-half cells (good and defective, interleaved) to inspect."""
    split = elpv_half(load_split("elpv", None, "mono"), "dev")
    pool = sorted(split.reference_pool)
    order = np.random.default_rng(SEED).permutation(len(pool))
    references = [pool[i] for i in order[:N_REFERENCES]]
    goods = [pool[i] for i in sorted(order[N_REFERENCES:])]
    defects = sorted(sample.path for sample in split.test)
    queries = [path for pair in zip(goods, defects, strict=False) for path in pair]
    return references, queries + goods[len(defects) :]


def post_until(url: str, profile_id: str, queries: list[Path], offset: int, stop: threading.Event) -> list[Outcome]:
    """One client: post images (from `offset` on, round-robin) one after another until `stop` is set."""
    outcomes: list[Outcome] = []
    with Client(url, timeout=600) as client:
        index = offset
        while not stop.is_set():
            started = time.perf_counter()
            outcome = Outcome(started, 0.0, 0)
            try:
                answer = client.inspect(profile_id, queries[index % len(queries)])
                outcome.status, outcome.inspection_id = 201, answer["id"]
            except ServiceError as error:
                outcome.status, outcome.error = error.status, str(error)
            except httpx.HTTPError as error:
                outcome.error = f"{type(error).__name__}: {error}"
            outcome.seconds = time.perf_counter() - started
            outcomes.append(outcome)
            index += 1
    return outcomes


def run_clients(urls: list[str], profile_id: str, queries: list[Path], clients: int, seconds: float) -> list[Outcome]:
    """`clients` threads posting for `seconds`, client n to urls[n % len(urls)]; requests in flight at the deadline
    are waited for and counted. With several urls (replicas) each outcome's error is tagged 'replica i|...'."""
    stop = threading.Event()
    results: list[list[Outcome]] = [[] for _ in range(clients)]
    spread = max(1, len(queries) // clients)

    def client(number: int) -> None:
        replica = number % len(urls)
        results[number] = post_until(urls[replica], profile_id, queries, number * spread, stop)
        if len(urls) > 1:
            for outcome in results[number]:
                outcome.error = f"replica {replica}|{outcome.error}"

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return [outcome for outcomes in results for outcome in outcomes]


def batch_counts(metrics_text: str) -> dict[int, int]:
    """{batch size: count} from anomalygpt_batches_total."""
    pattern = re.compile(r'^anomalygpt_batches_total\{size="(\d+)"\} (\d+(?:\.\d+)?)$', re.MULTILINE)
    return {int(size): int(float(count)) for size, count in pattern.findall(metrics_text)}


def server_errors(metrics_text: str) -> int:
    pattern = re.compile(r'^anomalygpt_requests_total\{[^}]*status="5\d\d"\} (\d+)', re.MULTILINE)
    return sum(int(count) for count in pattern.findall(metrics_text))


def load_row(server: Server, profile_id: str, queries: list[Path], clients: int, seconds: float) -> dict[str, Any]:
    before = batch_counts(server.metrics())
    began = time.perf_counter()
    outcomes = run_clients([server.url], profile_id, queries, clients, seconds)
    elapsed = max(o.started + o.seconds for o in outcomes) - began
    after = batch_counts(server.metrics())
    batches = {size: after.get(size, 0) - before.get(size, 0) for size in after if after[size] != before.get(size, 0)}
    ok = [o for o in outcomes if o.status == 201]
    latencies = np.array([o.seconds for o in ok]) if ok else np.array([float("nan")])
    n_batches = sum(batches.values())
    return {
        "clients": clients,
        "batch_wait_ms": server.wait_ms,
        "seconds": round(elapsed, 1),
        "requests": len(outcomes),
        "acknowledged": len(ok),
        "failed": len(outcomes) - len(ok),
        "failures": sorted({f"{o.status} {o.error}"[:200] for o in outcomes if o.status != 201})[:10],
        "images_per_s": round(len(ok) / elapsed, 3),
        "p50_s": round(float(np.percentile(latencies, 50)), 3),
        "p95_s": round(float(np.percentile(latencies, 95)), 3),
        "p99_s": round(float(np.percentile(latencies, 99)), 3),
        "batches": {str(size): count for size, count in sorted(batches.items())},
        "mean_batch": round(sum(s * c for s, c in batches.items()) / n_batches, 2) if n_batches else 0.0,
        "ids": [o.inspection_id for o in ok],
    }


def audit_rows(folder: Path) -> list[tuple[str, str, str]]:
    """(id, overlay sha256, map sha256) of every inspection row (read-only, beside a live or dead server)."""
    with sqlite3.connect(f"file:{folder / 'audit.db'}?mode=ro", uri=True) as db:
        return db.execute("SELECT id, overlay_sha256, map_sha256 FROM inspections").fetchall()


def integrity(folder: Path) -> str:
    with sqlite3.connect(f"file:{folder / 'audit.db'}?mode=ro", uri=True) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


def bad_blobs(folder: Path, rows: list[tuple[str, str, str]]) -> list[str]:
    """Files that rows name and that are missing or whose sha256 is not their name."""
    bad = []
    for _, overlay, anomaly_map in rows:
        for digest, suffix in ((overlay, ".png"), (anomaly_map, ".npy")):
            path = folder / "blobs" / digest[:2] / f"{digest}{suffix}"
            if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                bad.append(str(path))
    return bad


def temp_files(folder: Path) -> list[str]:
    """Leftovers of atomic writes (.NAME.HEX.tmp) anywhere under the service folder."""
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and (p.name.startswith(".") or p.suffix == ".tmp"))


def audit_check(folder: Path, acknowledged: list[str]) -> dict[str, Any]:
    """Exactly one row per acknowledged id, no row that nobody was answered, every row's files intact."""
    rows = audit_rows(folder)
    stored = [row[0] for row in rows]
    return {
        "rows": len(rows),
        "acknowledged": len(acknowledged),
        "duplicate_ids_answered": len(acknowledged) - len(set(acknowledged)),
        "missing_rows": len(set(acknowledged) - set(stored)),
        "unacknowledged_rows": len(set(stored) - set(acknowledged)),
        "rows_equal_answers": sorted(stored) == sorted(acknowledged),
        "bad_files": len(bad_blobs(folder, rows)),
        "temp_files": temp_files(folder),
    }


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} ... exited {result.returncode}: {result.stderr[-1000:]}")
    return time.perf_counter() - started


def cli_baseline(references: list[Path], queries: list[Path], calls: int, work: Path) -> dict[str, Any]:
    """Wall time of one `anomalygpt detect` process per image: with --ref (indexing each time) and with --profile."""
    refs = [str(p) for p in references]
    with_refs = [timed([ANOMALYGPT, "detect", str(queries[i]), "--ref", *refs]) for i in range(calls)]
    profile = work / "cli.profile"
    fit_s = timed([ANOMALYGPT, "fit", *refs, "--out", str(profile)])
    with_profile = [timed([ANOMALYGPT, "detect", str(queries[i]), "--profile", str(profile)]) for i in range(calls)]
    return {
        "detect_ref_s": [round(s, 2) for s in with_refs],
        "fit_s": round(fit_s, 2),
        "detect_profile_s": [round(s, 2) for s in with_profile],
    }


def warm_up(server: Server, profile_id: str, queries: list[Path]) -> list[dict[str, Any]]:
    with Client(server.url, timeout=600) as client:
        return [client.inspect(profile_id, path) for path in queries[:2]]


def bench_load(cfg: BenchConfig, references: list[Path], queries: list[Path], work: Path) -> dict[str, Any]:
    folder = work / "load"
    server = Server(folder, DEFAULT_WAIT_MS, list(cfg.serve_options))
    rows, acknowledged = [], []
    try:
        start_s = server.start()
        with Client(server.url, timeout=600) as client:
            created = time.perf_counter()
            profile = client.create_profile("elpv mono dev", references)
            profile_s = time.perf_counter() - created
        acknowledged += [answer["id"] for answer in warm_up(server, profile["id"], queries)]
        for clients in (cfg.clients, 1):
            rows.append(load_row(server, profile["id"], queries, clients, cfg.seconds))
            print(row_line(rows[-1]), flush=True)
        errors_5xx = server_errors(server.metrics())
        server.stop()
        server.wait_ms = 0.0
        restart_s = server.start()
        acknowledged += [answer["id"] for answer in warm_up(server, profile["id"], queries)]
        rows.append(load_row(server, profile["id"], queries, cfg.clients, cfg.seconds))
        print(row_line(rows[-1]), flush=True)
        errors_5xx += server_errors(server.metrics())
    finally:
        server.stop()
    for row in rows:
        acknowledged += row.pop("ids")
    return {
        "start_s": round(start_s, 2),
        "restart_s": round(restart_s, 2),
        "profile_fit_s": round(profile_s, 2),
        "rows": rows,
        "server_5xx": errors_5xx,
        "audit": audit_check(folder, acknowledged),
        "cli": cli_baseline(references, queries, cfg.cli_calls, work) if cfg.cli_calls else None,
    }


def crash_round(
    server: Server, profile: dict[str, Any], first: dict[str, Any], queries: list[Path], cfg: BenchConfig
) -> dict[str, Any]:
    """Load, kill -9, restart; what the clients were told against what the database and blob store hold."""
    stop = threading.Event()
    results: list[list[Outcome]] = [[] for _ in range(cfg.crash_clients)]

    def client(number: int) -> None:
        results[number] = post_until(server.url, profile["id"], queries, number * 7, stop)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(cfg.crash_clients)]
    for thread in threads:
        thread.start()
    time.sleep(cfg.kill_after_s)
    server.kill()
    stop.set()
    for thread in threads:
        thread.join()
    outcomes = [outcome for outcomes in results for outcome in outcomes]
    healthy_s = server.start()
    with Client(server.url, timeout=600) as client:
        same_profile = client.profile(profile["id"]) == profile
        after = client.inspect(profile["id"], queries[0])
    return {
        "requests": len(outcomes),
        "acknowledged": [o.inspection_id for o in outcomes if o.status == 201],
        "cut_off": sum(o.status == 0 for o in outcomes),
        "cut_off_errors": dict(Counter(o.error.split(":")[0] for o in outcomes if o.status == 0)),
        "refused": sorted({f"{o.status} {o.error}"[:200] for o in outcomes if o.status not in (0, 201)}),
        "healthy_after_restart_s": round(healthy_s, 2),
        "same_profile": same_profile,
        "same_answer": after["profile"] == first["profile"] and after["score"] == first["score"],
        "after_id": after["id"],
    }


def bench_crash(cfg: BenchConfig, references: list[Path], queries: list[Path], work: Path) -> dict[str, Any]:
    folder = work / "crash"
    server = Server(folder, DEFAULT_WAIT_MS, list(cfg.serve_options))
    rounds, acknowledged = [], []
    try:
        start_s = server.start()
        with Client(server.url, timeout=600) as client:
            profile = client.create_profile("elpv mono dev", references)
        first = warm_up(server, profile["id"], queries)
        acknowledged += [answer["id"] for answer in first]
        for number in range(cfg.kills):
            done = crash_round(server, profile, first[0], queries, cfg)
            ids = done.pop("acknowledged")
            acknowledged += ids + [done.pop("after_id")]
            rows = {row[0] for row in audit_rows(folder)}
            done |= {
                "acknowledged": len(ids),
                "acknowledged_without_row": len(set(ids) - rows),
                "integrity": integrity(folder),
                "temp_files": temp_files(folder),
            }
            rounds.append(done)
            print(f"kill {number + 1}: {done}", flush=True)
    finally:
        server.stop()
    audit = audit_check(folder, acknowledged)
    return {"start_s": round(start_s, 2), "rounds": rounds, "audit": audit}


def row_line(row: dict[str, Any]) -> str:
    return (
        f"| serve, {row['clients']} client{'s' if row['clients'] > 1 else ''}, wait {row['batch_wait_ms']:g} ms "
        f"| {row['images_per_s']:.2f} | {row['p50_s']:.2f} | {row['p95_s']:.2f} | {row['p99_s']:.2f} "
        f"| {row['acknowledged']} / {row['failed']} | {row['mean_batch']:.2f} |"
    )


def load_table(load: dict[str, Any]) -> str:
    lines = [
        "| mode | images/s | p50 s | p95 s | p99 s | acknowledged / failed | mean batch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [row_line(row) for row in load["rows"]]
    cli = load["cli"] or {"detect_ref_s": [], "detect_profile_s": [], "fit_s": "-"}
    for name, key in (
        ("CLI detect --ref (1 process/image)", "detect_ref_s"),
        ("CLI detect --profile", "detect_profile_s"),
    ):
        seconds = cli[key]
        if not seconds:  # --cli-calls 0
            continue
        mean = sum(seconds) / len(seconds)
        lines.append(f"| {name} | {1 / mean:.3f} | {float(np.median(seconds)):.2f} | - | - | {len(seconds)} / 0 | - |")
    audit = load["audit"]
    lines.append(
        f"\nserver start {load['start_s']} s (restart {load['restart_s']} s), profile fit over HTTP "
        f"{load['profile_fit_s']} s, CLI fit {cli['fit_s']} s; 5xx answers {load['server_5xx']}; audit: "
        f"{audit['rows']} rows for {audit['acknowledged']} acknowledged ids, rows == answers "
        f"{audit['rows_equal_answers']}, missing {audit['missing_rows']}, bad files {audit['bad_files']}, "
        f"temp files {len(audit['temp_files'])}"
    )
    return "\n".join(lines)


def crash_table(crash: dict[str, Any]) -> str:
    lines = [
        "| kill | requests | acknowledged | cut off | acknowledged without row | healthy after s | same profile+score "
        "| integrity | temp files |",
        "|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for number, r in enumerate(crash["rounds"], start=1):
        lines.append(
            f"| {number} | {r['requests']} | {r['acknowledged']} | {r['cut_off']} | {r['acknowledged_without_row']} "
            f"| {r['healthy_after_restart_s']} | {r['same_profile'] and r['same_answer']} "
            f"| {r['integrity']} | {len(r['temp_files'])} |"
        )
    audit = crash["audit"]
    lines.append(
        f"\nfirst start {crash['start_s']} s; audit after all kills: {audit['rows']} rows, "
        f"{audit['acknowledged']} acknowledged, missing {audit['missing_rows']}, committed but unanswered "
        f"{audit['unacknowledged_rows']}, bad files {audit['bad_files']}, temp files {len(audit['temp_files'])}"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="load,crash", help="comma-separated: load, crash")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=120.0, help="posting time of each load row")
    parser.add_argument("--cli-calls", type=int, default=3, help="0: no CLI baseline")
    parser.add_argument("--crash-clients", type=int, default=8)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--kill-after", type=float, default=10.0, help="seconds of load before each kill -9")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_service.json"))
    parser.add_argument("--inference-batch", type=int, default=None, help="the server's --inference-batch")
    args = parser.parse_args(argv)
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = sorted(set(parts) - {"load", "crash"})
    if unknown or not parts:
        parser.error(f"--parts: unknown {', '.join(unknown) or 'empty'}; known: load, crash")
    serve_options = ("--inference-batch", str(args.inference_batch)) if args.inference_batch else ()
    return BenchConfig(
        parts,
        args.clients,
        args.seconds,
        args.cli_calls,
        args.crash_clients,
        args.kills,
        args.kill_after,
        args.out,
        serve_options,
    )


def main() -> None:
    cfg = parse_args()
    machine = (
        f"{platform.platform()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    print(machine, flush=True)
    references, queries = bench_images()
    report: dict[str, Any] = {"machine": machine, "command": " ".join([sys.executable, *sys.argv])}
    with tempfile.TemporaryDirectory(prefix="bench_service_") as temp:
        work = Path(temp)
        if "load" in cfg.parts:
            report["load"] = bench_load(cfg, references, queries, work)
            print(load_table(report["load"]), flush=True)
        if "crash" in cfg.parts:
            report["crash"] = bench_crash(cfg, references, queries, work)
            print(crash_table(report["crash"]), flush=True)
    report["references"] = [p.name for p in references]
    report["finished"] = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    write_json_atomic(cfg.out, report)
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main()
