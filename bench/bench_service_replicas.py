"""Two `anomalygpt serve` replicas (two processes on two ports, one --profiles folder) behind one PostgreSQL
database (issue 21): they start together (one migrates, the other waits on the migration lock), serve the same
profile, and under load write one consistent audit trail: every acknowledged request exactly one row, no row
nobody was answered, no duplicate, both replicas' rows present, every row's files intact; chat answers about one
replica's inspections asked on the other; the same profile name created on both at once gets distinct versions.

PostgreSQL is a throwaway server (initdb into a temporary folder, fsync on), as the tests start it
(tests/service_postgres.py). Each replica gets OMP_NUM_THREADS=1: two processes share the 2 cores.

    .venv/bin/python bench/bench_service_replicas.py --clients 16 --seconds 60 --out runs/bench_service_replicas.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from bench_service import Outcome, Server, bad_blobs, bench_images, run_clients, server_errors, temp_files

from anomalygpt.client import Client
from anomalygpt.io import write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from service_postgres import PostgresServer, start_postgres  # noqa: E402

CHAT_QUESTIONS = ("Is there a defect?", "Where is it?", "How many defects are there?")


def start_together(servers: list[Server]) -> list[float]:
    """Start every server at once (their migrations race for the lock); seconds until each answered /healthz."""
    times: list[float] = [0.0] * len(servers)
    errors: list[BaseException] = []

    def start(index: int) -> None:
        try:
            times[index] = servers[index].start()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(len(servers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return times


def replica_of(outcome: Outcome) -> int:
    return int(outcome.error.split("|", 1)[0].split()[1])


def concurrent_profiles(servers: list[Server], references: list[Path], per_replica: int) -> list[int]:
    """The same profile name created on every replica at once, `per_replica` times each: the versions given."""
    versions: list[int] = []
    lock = threading.Lock()

    def create(server: Server) -> None:
        with Client(server.url, timeout=600) as client:
            for _ in range(per_replica):
                made = client.create_profile("raced name", references[:2])
                with lock:
                    versions.append(made["version"])

    threads = [threading.Thread(target=create, args=(server,)) for server in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(versions)


def chat_across(servers: list[Server], by_replica: list[list[str]]) -> tuple[list[str], list[bool]]:
    """Questions about each replica's inspections asked on the other one: recorded ids, and whether each answer
    equals the one the inspecting replica gives."""
    ids, same = [], []
    for origin, inspections in enumerate(by_replica):
        other = servers[(origin + 1) % len(servers)]
        for inspection_id, question in zip(inspections[:3], CHAT_QUESTIONS, strict=False):
            with Client(other.url, timeout=600) as there, Client(servers[origin].url, timeout=600) as here:
                answer, again = there.chat(inspection_id, question), here.chat(inspection_id, question)
            ids += [answer["id"], again["id"]]
            same.append(answer["answer"] == again["answer"])
    return ids, same


def audit_rows(pg: PostgresServer, database: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(host=str(pg.root), port=pg.port, user="postgres", dbname=database) as db:
        return {
            "inspections": db.execute("SELECT id, overlay_sha256, map_sha256 FROM inspections").fetchall(),
            "chats": db.execute("SELECT id FROM chat_answers").fetchall(),
            "versions": db.execute("SELECT name, version FROM profiles").fetchall(),
            "revision": db.execute("SELECT version_num FROM alembic_version").fetchall(),
        }


def consistency(rows: dict[str, list[tuple[Any, ...]]], acknowledged: list[list[str]], chats: list[str]) -> dict:
    stored = [row[0] for row in rows["inspections"]]
    every = [i for ids in acknowledged for i in ids]
    return {
        "rows": len(stored),
        "distinct_rows": len(set(stored)),
        "acknowledged": len(every),
        "acknowledged_per_replica": [len(ids) for ids in acknowledged],
        "rows_per_replica_present": [len(set(ids) & set(stored)) for ids in acknowledged],
        "missing_rows": len(set(every) - set(stored)),
        "unacknowledged_rows": len(set(stored) - set(every)),
        "duplicate_acknowledged_ids": len(every) - len(set(every)),
        "rows_equal_answers": sorted(stored) == sorted(every),
        "chat_rows_equal_answers": sorted(r[0] for r in rows["chats"]) == sorted(chats),
        "profile_versions_unique": len(rows["versions"]) == len(set(rows["versions"])),
        "revision": [r[0] for r in rows["revision"]],
    }


def latency_summary(outcomes: list[Outcome], elapsed: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.status == 201]
    seconds = np.array([o.seconds for o in ok]) if ok else np.array([float("nan")])
    return {
        "requests": len(outcomes),
        "acknowledged": len(ok),
        "failed": len(outcomes) - len(ok),
        "failures": sorted({f"{o.status} {o.error}"[:200] for o in outcomes if o.status != 201})[:10],
        "images_per_s": round(len(ok) / elapsed, 3),
        "p50_s": round(float(np.percentile(seconds, 50)), 3),
        "p95_s": round(float(np.percentile(seconds, 95)), 3),
        "p99_s": round(float(np.percentile(seconds, 99)), 3),
    }


def run(cfg: argparse.Namespace, work: Path) -> dict[str, Any]:
    references, queries = bench_images()
    pg = start_postgres(durable=True)
    try:
        url = pg.create_database("audit")
        folder = work / "shared"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        servers = [Server(folder, 5.0, ["--db", url], env) for _ in range(2)]
        try:
            return serve_and_check(cfg, pg, servers, references, queries)
        finally:
            for server in servers:
                server.stop()
    finally:
        pg.stop()


def serve_and_check(
    cfg: argparse.Namespace, pg: PostgresServer, servers: list[Server], references: list[Path], queries: list[Path]
) -> dict[str, Any]:
    start_s = start_together(servers)
    with Client(servers[0].url, timeout=600) as first, Client(servers[1].url, timeout=600) as second:
        profile = first.create_profile("elpv mono dev", references)
        same_profile = second.profile(profile["id"]) == profile
        answers = [first.inspect(profile["id"], queries[0]), second.inspect(profile["id"], queries[0])]
    warm = [[answers[0]["id"]], [answers[1]["id"]]]
    began = time.perf_counter()
    outcomes = run_clients([server.url for server in servers], profile["id"], queries, cfg.clients, cfg.seconds)
    elapsed = max(o.started + o.seconds for o in outcomes) - began
    by_replica = [[str(o.inspection_id) for o in outcomes if o.status == 201 and replica_of(o) == r] for r in (0, 1)]
    acknowledged = [warm[r] + by_replica[r] for r in (0, 1)]
    chats, same_chat = chat_across(servers, by_replica)
    versions = concurrent_profiles(servers, references, cfg.raced_profiles)
    errors_5xx = sum(server_errors(server.metrics()) for server in servers)
    rows = audit_rows(pg, "audit")
    folder = servers[0].folder
    return {
        "start_together_s": [round(s, 2) for s in start_s],
        "same_profile_on_both": same_profile,
        "same_score_on_both": answers[0]["score"] == answers[1]["score"],
        "load": latency_summary(outcomes, elapsed) | {"seconds": round(elapsed, 1), "clients": cfg.clients},
        "per_replica": [
            latency_summary([o for o in outcomes if replica_of(o) == r], elapsed) for r in range(len(servers))
        ],
        "chat_answers": len(chats),
        "chat_same_on_both": all(same_chat),
        "raced_profile_versions": versions,
        "server_5xx": errors_5xx,
        "audit": consistency(rows, acknowledged, chats),
        "bad_files": len(bad_blobs(folder, rows["inspections"])),
        "temp_files": temp_files(folder),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients, alternately on each replica")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--raced-profiles", type=int, default=3, help="same-name profiles created on each replica")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_service_replicas.json"))
    return parser.parse_args()


def main() -> None:
    cfg = parse_args()
    machine = (
        f"{platform.platform()}, {os.cpu_count()} CPUs, each replica OMP_NUM_THREADS=1, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    print(machine, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_replicas_") as temp:
        report = {"machine": machine, "command": " ".join([sys.executable, *sys.argv]), **run(cfg, Path(temp))}
    report["finished"] = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    write_json_atomic(cfg.out, report)
    print({key: value for key, value in report.items() if key not in ("machine", "command")}, flush=True)
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main()
