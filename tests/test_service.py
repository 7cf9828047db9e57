"""`anomalygpt serve`: profiles, inspections equal to the Inspector's, the audit trail, refusals, keys, metrics."""

import hashlib
import io
import itertools
import json
import sqlite3
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from conftest import texture_crops, with_dark_blob
from PIL import Image
from service_postgres import postgres_binary, start_postgres
from sqlalchemy import text
from starlette.testclient import TestClient

from anomalygpt.client import Client, ServiceError
from anomalygpt.config import load_preset, with_false_alarm_rate
from anomalygpt.inspection import Inspector
from anomalygpt.io import load_image
from anomalygpt.service import Limits, create_app
from anomalygpt.service.cli import is_loopback
from anomalygpt.service.cli import main as serve_main

KEY = "s3cret-key-for-line-1"


def write_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def inspector(small_backbone):
    return Inspector(small_backbone, load_preset("default"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    goods = [write_png(folder / f"good{i}.png", crop) for i, crop in enumerate(texture_crops(5, seed=21))]
    good = write_png(folder / "query_good.png", texture_crops(1, seed=60)[0])
    defect = write_png(folder / "query_defect.png", with_dark_blob(texture_crops(1, seed=61)[0], (40, 90), 9))
    small = write_png(folder / "small.png", texture_crops(1, size=64, seed=62)[0])
    return {"goods": goods, "good": good, "defect": defect, "small": small}


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL server for the session (each module's service gets its own database)."""
    if postgres_binary("initdb") is None:
        pytest.skip(
            "PostgreSQL is not installed here (no initdb; apt-get install postgresql): PostgreSQL variant skipped"
        )
    server = start_postgres()
    yield server
    server.stop()


DATABASES = itertools.count()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request, tmp_path_factory):
    """(service folder, audit database URL): SQLite (WAL) in the folder, or a fresh PostgreSQL database."""
    folder = tmp_path_factory.mktemp(f"service-{request.param}")
    if request.param == "sqlite":
        return folder, f"sqlite:///{folder / 'audit.db'}"
    return folder, request.getfixturevalue("postgres").create_database(f"audit{next(DATABASES)}")


@pytest.fixture(scope="module")
def served(inspector, database):
    """The service over a fresh folder and database, and a client through starlette's TestClient."""
    folder, url = database
    app = create_app(folder, url, inspector=inspector, batch_wait_ms=5)
    with TestClient(app) as http:
        yield {"folder": folder, "db": url, "app": app, "http": http, "client": Client(http=http)}


@pytest.fixture(scope="module")
def profile(served, images):
    return served["client"].create_profile("brick wall", images["goods"])


def query(served, sql: str, **params) -> list[tuple]:
    """Rows of a SQL query on the service's audit database (either dialect)."""
    with served["app"].state.service.audit.engine.connect() as db:
        return [tuple(row) for row in db.execute(text(sql), params)]


def rows(served, table: str) -> int:
    return query(served, f"SELECT COUNT(*) FROM {table}")[0][0]


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("audit.db")}


def test_a_profile_is_fitted_saved_and_listed(served, profile, images):
    assert len(profile["id"]) == 16 and profile["version"] == 1 and profile["name"] == "brick wall"
    assert profile["n_references"] == 5 and profile["image_size"] == [128, 128]
    path = served["folder"] / f"{profile['id']}.profile"
    assert profile["checksum"] == hashlib.sha256(path.read_bytes()).hexdigest()
    sent = [hashlib.sha256(p.read_bytes()).hexdigest() for p in images["goods"]]
    assert [r["sha256"] for r in profile["references"]] == sent
    assert served["client"].profile(profile["id"]) == profile
    assert profile["id"] in [p["id"] for p in served["client"].profiles()]
    if served["db"].startswith("sqlite"):
        with sqlite3.connect(served["folder"] / "audit.db") as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_profile_takes_its_own_false_alarm_rate_and_the_service_serves_it(tmp_path, profile, inspector, images):
    """false_alarm_rate as fit's --false-alarm-rate: 5 references are enough at 25 % ((1 - 0.25) / 0.25 = 3), so
    the threshold is the 5th smallest of 5 held-out scores (the largest), the profile says its rate, and it loads
    into the service's default-preset inspector to inspect with a p-value. The default profile's 5 are too few for
    2 %: mean + 3 spreads, no rate. (A service of its own: the module's keeps one profile's inspections.)"""
    app = create_app(tmp_path, f"sqlite:///{tmp_path / 'audit.db'}", inspector=inspector, batch_wait_ms=5)
    with TestClient(app) as http:
        check_own_false_alarm_rate(Client(http=http), profile, inspector, images)


def check_own_false_alarm_rate(client, profile, inspector, images):
    created = client.create_profile("brick wall at 25 %", images["goods"], false_alarm_rate=0.25)
    assert created["false_alarm_rate"] == 0.25 and profile["false_alarm_rate"] is None
    assert client.profile(created["id"]) == created
    fitter = inspector.with_preset(with_false_alarm_rate(inspector.preset, 0.25))
    calibration = fitter.fit(images["goods"]).calibration
    assert created["threshold"] == pytest.approx(max(calibration.reference_scores), abs=1e-6)
    assert created["threshold"] < profile["threshold"]  # mean + 3 spreads of 5 scores is above their largest
    answer = client.inspect(created["id"], images["defect"])
    assert answer["threshold"] == pytest.approx(created["threshold"]) and answer["p_value"] is not None
    assert answer["calibration"]["false_alarm_rate"] == 0.25
    default = client.create_profile("brick wall", images["goods"])
    assert default["threshold"] == profile["threshold"]
    assert client.inspect(default["id"], images["defect"])["p_value"] is None


def test_the_service_answers_what_the_inspector_computes_on_the_same_profile(served, profile, inspector, images):
    client = served["client"]
    references = inspector.load_profile(served["folder"] / f"{profile['id']}.profile")
    for kind, verdict in (("good", "normal"), ("defect", "anomalous")):
        answer = client.inspect(profile["id"], images[kind])
        direct = inspector.inspect(load_image(images[kind]), references)
        assert answer["verdict"] == direct.verdict == verdict
        assert answer["score"] == direct.score and answer["threshold"] == direct.threshold
        assert answer["margin"] == direct.margin and len(answer["regions"]) == len(direct.regions)
        assert answer["warnings"] == direct.warnings and answer["notes"] == direct.notes and len(direct.notes) == 1
        assert answer["profile"] == profile["id"] and answer["profile_version"] == 1
        assert answer["image_sha256"] == hashlib.sha256(images[kind].read_bytes()).hexdigest()
        assert answer["source_sha256"] == answer["image_sha256"]  # the record names the bytes it inspected
        assert client.inspection(answer["id"]) == answer
        anomaly_map = np.load(io.BytesIO(client.anomaly_map(answer["id"])))
        assert anomaly_map.shape == (128, 128) and np.array_equal(anomaly_map, direct.anomaly_map)
        overlay = client.overlay(answer["id"])
        assert Image.open(io.BytesIO(overlay)).width >= 128
        digest = hashlib.sha256(overlay).hexdigest()
        assert (served["folder"] / "blobs" / digest[:2] / f"{digest}.png").is_file()
    lowered = client.inspect(profile["id"], images["good"], sensitivity=2.0)
    direct = inspector.inspect(load_image(images["good"]), references, sensitivity=2.0)
    assert lowered["threshold"] == direct.threshold < answer["threshold"] and lowered["score"] == direct.score


def test_batches_are_one_transaction_and_the_listing_filters_and_pages(served, profile, images):
    client = served["client"]
    before = rows(served, "inspections")
    batch = client.inspect_batch(profile["id"], [images["good"], images["defect"], images["good"]])
    assert [item["verdict"] for item in batch] == ["normal", "anomalous", "normal"]
    assert batch[0]["score"] == batch[2]["score"] and len({item["id"] for item in batch}) == 3
    total = rows(served, "inspections")
    assert total == before + 3
    listed = client.inspections(profile=profile["id"], limit=1000)
    assert listed["total"] == total and len(listed["items"]) == total
    anomalous = client.inspections(profile=profile["id"], verdict="anomalous")
    assert anomalous["total"] == sum(item["verdict"] == "anomalous" for item in listed["items"]) >= 1
    pages = [client.inspections(limit=2, offset=offset)["items"] for offset in range(0, total, 2)]
    assert [item["id"] for page in pages for item in page] == [item["id"] for item in listed["items"]]
    assert client.inspections(since="2999-01-01T00:00:00Z")["total"] == 0
    assert client.inspections(since=batch[0]["created"])["total"] == 3


@pytest.mark.parametrize("inference_batch", [None, 4])
def test_concurrent_requests_are_gathered_into_one_batch(inspector, served, profile, images, inference_batch):
    app = create_app(
        served["folder"], served["db"], inspector=inspector, batch_wait_ms=400, inference_batch=inference_batch
    )
    assert app.state.service.batch_size == (inference_batch or 1)  # 1 on a CPU by default
    answers: list[dict] = []
    with TestClient(app) as http:
        client = Client(http=http)

        def one() -> None:
            answers.append(client.inspect(profile["id"], images["defect"]))

        threads = [threading.Thread(target=one) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        metrics = http.get("/metrics").text
    references = inspector.load_profile(served["folder"] / f"{profile['id']}.profile")
    direct = inspector.inspect(load_image(images["defect"]), references)
    assert len(answers) == 4 and {(a["verdict"], a["score"]) for a in answers} == {("anomalous", direct.score)}
    sizes = {
        int(line.split('size="')[1].split('"')[0]): float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("anomalygpt_batches_total{")
    }
    assert sum(size * count for size, count in sizes.items()) == 4 and max(sizes) >= 2
    assert "anomalygpt_queue_depth 0" in metrics


def corrupt_png(path: Path) -> bytes:
    data = bytearray(path.read_bytes())
    data[60] ^= 0xFF
    return bytes(data)


def pixel_bomb() -> bytes:
    """A 6 kB PNG that declares 48 million pixels."""
    buffer = io.BytesIO()
    Image.new("1", (8000, 6000)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_requests_get_one_line_4xx_and_leave_nothing_behind(inspector, served, profile, images):
    http, pid = served["http"], profile["id"]
    good = images["good"].read_bytes()
    goods = [("images", (path.name, path.read_bytes())) for path in images["goods"]]
    folder = served["folder"]
    before = (files_under(folder), rows(served, "inspections"), rows(served, "profiles"))
    cases = [
        ("bad image bytes", "/v1/inspect", {"profile": pid}, [("image", ("x.png", b"not an image"))], 400),
        ("corrupt PNG", "/v1/inspect", {"profile": pid}, [("image", ("x.png", corrupt_png(images["good"])))], 400),
        ("empty image", "/v1/inspect", {"profile": pid}, [("image", ("x.png", b""))], 400),
        ("48 million pixels", "/v1/inspect", {"profile": pid}, [("image", ("bomb.png", pixel_bomb()))], 400),
        ("truncated PNG", "/v1/inspect", {"profile": pid}, [("image", ("x.png", good[: len(good) // 2]))], 400),
        ("unknown profile", "/v1/inspect", {"profile": "0123456789abcdef"}, [("image", ("g.png", good))], 404),
        ("profile as a path", "/v1/inspect", {"profile": "../audit.db"}, [("image", ("g.png", good))], 404),
        ("missing image", "/v1/inspect", {"profile": pid}, [("other", ("g.png", good))], 400),
        ("missing profile", "/v1/inspect", {}, [("image", ("g.png", good))], 400),
        (
            "image of another size",
            "/v1/inspect",
            {"profile": pid},
            [("image", ("s.png", images["small"].read_bytes()))],
            422,
        ),
        (
            "sensitivity not a number",
            "/v1/inspect",
            {"profile": pid, "sensitivity": "high"},
            [("image", ("g.png", good))],
            422,
        ),
        ("sensitivity nan", "/v1/inspect", {"profile": pid, "sensitivity": "nan"}, [("image", ("g.png", good))], 422),
        (
            "sensitivity out of range",
            "/v1/inspect",
            {"profile": pid, "sensitivity": "9"},
            [("image", ("g.png", good))],
            422,
        ),
        (
            "batch with a bad image",
            "/v1/inspect/batch",
            {"profile": pid},
            [("images", ("g.png", good)), ("images", ("b.png", b"xx"))],
            400,
        ),
        ("profile without images", "/v1/profiles", {"name": "p"}, [("other", ("g.png", good))], 400),
        ("profile without a name", "/v1/profiles", {}, [("images", ("g.png", good))], 400),
        *[
            (f"false_alarm_rate {rate}", "/v1/profiles", {"name": "p", "false_alarm_rate": rate}, goods, 422)
            for rate in ("0", "0.6", "-0.1", "nan", "often")
        ],
        (
            "profile with a corrupt image",
            "/v1/profiles",
            {"name": "p"},
            [("images", ("b.png", b"\x89PNG\r\n\x1a\nxx"))],
            400,
        ),
    ]
    for what, url, data, files, status in cases:
        response = http.post(url, data=data, files=files)
        assert response.status_code == status, (what, response.text)
        assert list(response.json()) == ["error"] and "\n" not in response.json()["error"], what
    posted = [
        ("JSON instead of a form", http.post("/v1/inspect", json={"profile": pid}), 415),
        ("no content type", http.post("/v1/inspect", content=b"raw"), 415),
        (
            "malformed multipart",
            http.post(
                "/v1/inspect", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"}
            ),
            400,
        ),
        ("verdict filter", http.get("/v1/inspections?verdict=maybe"), 422),
        ("limit 0", http.get("/v1/inspections?limit=0"), 422),
        ("limit not a number", http.get("/v1/inspections?limit=ten"), 422),
        ("since not a time", http.get("/v1/inspections?since=yesterday"), 422),
        ("unknown inspection", http.get("/v1/inspections/0123456789abcdef"), 404),
        ("unknown overlay", http.get("/v1/inspections/nope/overlay"), 404),
        ("unknown profile id", http.get("/v1/profiles/0123456789abcdef"), 404),
    ]
    for what, response, status in posted:
        assert response.status_code == status, (what, response.text)
        assert list(response.json()) == ["error"] and "\n" not in response.json()["error"], what
    small = create_app(
        folder, served["db"], inspector=inspector, limits=Limits(max_body_bytes=50_000, max_batch_images=2)
    )
    with TestClient(small) as tight:
        big = tight.post("/v1/inspect", data={"profile": pid}, files=[("image", ("g.png", b"\0" * 60_000))])
        assert big.status_code == 413 and "limit" in big.json()["error"]
        three = [("images", (f"{i}.png", good)) for i in range(3)]
        assert tight.post("/v1/inspect/batch", data={"profile": pid}, files=three).status_code == 413
    assert (files_under(folder), rows(served, "inspections"), rows(served, "profiles")) == before
    metrics = http.get("/metrics").text
    assert 'anomalygpt_requests_total{method="POST",route="/v1/inspect",status="400"}' in metrics
    assert 'status="500"' not in metrics


def test_api_keys_guard_every_route_but_healthz_and_name_the_audit_row(inspector, served, profile, images):
    keys = {hashlib.sha256(KEY.encode()).hexdigest(): "line-1"}
    app = create_app(served["folder"], served["db"], inspector=inspector, api_keys=keys)
    with TestClient(app) as http:
        assert http.get("/healthz").json()["status"] == "ok"
        assert http.get("/v1/profiles").status_code == 401
        assert http.get("/v1/profiles", headers={"Authorization": "Bearer wrong-key-123"}).status_code == 401
        with pytest.raises(ServiceError) as refused:
            Client(http=http, api_key="wrong-key-123").inspect(profile["id"], images["good"])
        assert refused.value.status == 401
        answer = Client(http=http, api_key=KEY).inspect(profile["id"], images["good"])
        assert http.get("/metrics").status_code == 401  # every route but /healthz
        metrics = http.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert "anomalygpt_auth_failures_total 4" in metrics
    assert query(served, "SELECT key_name FROM inspections WHERE id = :id", id=answer["id"]) == [("line-1",)]


def test_every_acknowledged_request_has_exactly_one_row_with_its_files(served, profile, images):
    http, folder, pid = served["http"], served["folder"], profile["id"]
    before = rows(served, "inspections")
    good, defect = images["good"].read_bytes(), images["defect"].read_bytes()
    responses = [
        http.post("/v1/inspect", data={"profile": pid}, files=[("image", ("g.png", good))]),
        http.post(
            "/v1/inspect/batch",
            data={"profile": pid},
            files=[("images", ("g.png", good)), ("images", ("d.png", defect))],
        ),
        http.post("/v1/inspect", data={"profile": pid}, files=[("image", ("x.png", b"garbage"))]),
        http.post(
            "/v1/inspect/batch",
            data={"profile": pid},
            files=[("images", ("d.png", defect)), ("images", ("x.png", b"x"))],
        ),
    ]
    assert [r.status_code for r in responses] == [201, 201, 400, 400]
    acknowledged = [responses[0].json()["id"]] + [item["id"] for item in responses[1].json()["items"]]
    assert rows(served, "inspections") == before + len(acknowledged) == before + 3
    for inspection_id in acknowledged:
        assert query(served, "SELECT COUNT(*) FROM inspections WHERE id = :id", id=inspection_id) == [(1,)]
    stored = query(served, "SELECT overlay_sha256, map_sha256 FROM inspections")
    for overlay, anomaly_map in stored:  # every row of the trail, not only these: its files exist and match
        for digest, suffix in ((overlay, ".png"), (anomaly_map, ".npy")):
            path = folder / "blobs" / digest[:2] / f"{digest}{suffix}"
            assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def metric_values(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}


def test_metrics_count_requests_verdicts_and_latency(served, profile, images):
    http = served["http"]
    before = metric_values(http.get("/metrics").text)
    served["client"].inspect(profile["id"], images["defect"])
    text = http.get("/metrics").text
    after = metric_values(text)
    ok, anomalous = (
        'anomalygpt_requests_total{method="POST",route="/v1/inspect",status="201"}',
        ('anomalygpt_verdicts_total{verdict="anomalous"}'),
    )
    assert after[ok] == before.get(ok, 0) + 1 and after[anomalous] == before[anomalous] + 1
    normal = 'anomalygpt_verdicts_total{verdict="normal"}'
    assert after[normal] == before[normal]
    assert after['anomalygpt_requests_total{method="POST",route="/v1/profiles",status="201"}'] == 1
    count = after['anomalygpt_request_seconds_count{route="/v1/inspect"}']
    all_statuses = sum(
        v for k, v in after.items() if k.startswith('anomalygpt_requests_total{method="POST",route="/v1/inspect",')
    )
    assert (
        after['anomalygpt_request_seconds_bucket{route="/v1/inspect",le="+Inf"}'] == count == all_statuses >= after[ok]
    )
    assert "# TYPE anomalygpt_request_seconds histogram" in text and after["anomalygpt_queue_depth"] == 0
    schema = http.get("/openapi.json").json()
    assert {"/v1/inspect", "/v1/profiles", "/v1/inspections", "/metrics"} <= set(schema["paths"])


def test_serve_refuses_bad_options_in_one_line_and_knows_loopback(capsys, tmp_path):
    assert serve_main(["--batch-wait-ms", "-1", "--profiles", str(tmp_path)]) == 2
    assert "--batch-wait-ms: -1 is outside" in capsys.readouterr().err
    (tmp_path / "keys").write_text("line-1\n")
    assert serve_main(["--api-key-file", str(tmp_path / "keys"), "--profiles", str(tmp_path)]) == 2
    assert "expected 'name:key'" in capsys.readouterr().err
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


def test_the_client_works_over_a_real_uvicorn_server(inspector, served, profile, images):
    import socket

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    limits = Limits(max_body_bytes=100_000, body_timeout_s=1.0)
    app = create_app(served["folder"], served["db"], inspector=inspector, limits=limits)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            threading.Event().wait(0.05)
        with Client(f"http://127.0.0.1:{port}", timeout=60) as client:
            assert client.health()["status"] == "ok"
            answer = client.inspect(profile["id"], images["defect"])
            assert answer["verdict"] == "anomalous" and client.inspection(answer["id"])["score"] == answer["score"]
            head = b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
            chunks = iter([head] + [b"\0" * 10_000] * 20)  # no Content-Length: the limit is counted while it streams
            headers = {"content-type": "multipart/form-data; boundary=x"}
            streamed = client.http.post("/v1/inspect", content=chunks, headers=headers)
            assert streamed.status_code == 413 and "limit" in streamed.json()["error"]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:  # a body that never completes
            started = time.perf_counter()
            slow.sendall(b"POST /v1/inspect HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                         b"Content-Length: 5000\r\n\r\n--x\r\n")  # fmt: skip
            answer = b""
            while not answer.endswith(b"}"):
                answer += slow.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") and b"not complete within 1 s" in answer
        assert time.perf_counter() - started < 5
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_serve_warns_when_it_listens_beyond_this_machine(monkeypatch, capsys, tmp_path):
    import socket

    import uvicorn

    import anomalygpt.service.app as service_app

    calls = []

    def run(server, sockets):
        calls.append((server.config.app, *sockets[0].getsockname()[:2]))
        sockets[0].close()

    monkeypatch.setattr(service_app, "create_app", lambda *args, answerer, inference_batch: args)
    monkeypatch.setattr(uvicorn.Server, "run", run)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["--host", "0.0.0.0", "--port", str(port), "--profiles", str(tmp_path), "--batch-wait-ms", "2"]
    assert serve_main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "warning: listening on 0.0.0.0" in err[0] and "without API keys" in err[0]
    assert err[1] == f"anomalygpt serve: listening on http://0.0.0.0:{port} (Ctrl+C stops it)"
    ((app_args, host, bound),) = calls
    folder, db, preset, keys, wait = app_args[:5]
    assert (host, bound, folder, db, keys, wait) == ("0.0.0.0", port, tmp_path, None, None, 2.0)
    assert (preset if isinstance(preset, str) else preset.name) == "default"
    assert app_args[5] == Limits(questions_per_minute=30)
    assert serve_main(["--profiles", str(tmp_path), "--port", str(port)]) == 0
    assert capsys.readouterr().err == f"anomalygpt serve: listening on http://127.0.0.1:{port} (Ctrl+C stops it)\n"
    with socket.socket() as taken:  # another service holds the port: one line, exit 2, uvicorn never started
        taken.bind(("127.0.0.1", port))
        taken.listen()
        assert serve_main(["--profiles", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"anomalygpt serve: error: --host/--port: cannot listen on 127.0.0.1:{port} (Address already in use); "
        "is the port taken?\n"
    )
    assert len(calls) == 2


def fresh_database(request, tmp_path: Path, kind: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    return request.getfixturevalue("postgres").create_database(f"fresh{next(DATABASES)}")


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_migrations_build_the_models_schema_and_adopt_a_database_made_before_them(request, tmp_path, kind):
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine

    from anomalygpt.service.audit import AuditStore, Base, database_url, migration_config

    url = fresh_database(request, tmp_path, kind)
    with create_engine(database_url(url)).begin() as db:  # what the first release left: tables, no alembic_version
        config = migration_config()
        config.attributes["connection"] = db
        command.upgrade(config, "0001")
        db.execute(text("DROP TABLE alembic_version"))
        db.execute(text("INSERT INTO profiles VALUES ('00000000000000aa', 'old', 1, '2026-01-02 03:04:05', NULL, "
                        "'a.profile', 'c', 4, 8, 8, 0.5, 'default', '[]', '[]', 1.0)"))  # fmt: skip
    store = AuditStore(url, tmp_path / "blobs")
    with store.engine.connect() as db:
        assert db.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == head_revision()
        assert compare_metadata(MigrationContext.configure(db), Base.metadata) == []
    assert [(p.id, p.name, p.version) for p in store.profiles()] == [("00000000000000aa", "old", 1)]
    assert store.api_keys() == []
    AuditStore(url, tmp_path / "blobs")  # a second start finds the head revision and changes nothing
    assert len(store.profiles()) == 1


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_created_key_is_printed_once_stored_as_its_hash_and_then_required(request, inspector, tmp_path, capsys, kind):
    url = fresh_database(request, tmp_path, kind)
    app = create_app(tmp_path, url, inspector=inspector)
    with TestClient(app) as http:
        assert http.get("/v1/profiles").status_code == 200  # no key anywhere: open
        assert serve_main(["keys", "create", "camera-3", "--profiles", str(tmp_path), "--db", url]) == 0
        key = capsys.readouterr().out.strip()
        assert key.startswith("agk_") and len(key) > 40
        stored = served_query(app, "SELECT name, key_sha256 FROM api_keys")
        assert stored == [("camera-3", hashlib.sha256(key.encode()).hexdigest())]
        assert http.get("/v1/profiles").status_code == 401
        assert http.get("/v1/profiles", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert http.get("/healthz").status_code == 200
    assert serve_main(["keys", "create", "camera-3", "--profiles", str(tmp_path), "--db", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "named 'camera-3' exists already" in err
    assert serve_main(["keys", "create", "../x", "--profiles", str(tmp_path), "--db", url]) == 2
    assert serve_main(["keys", "create", "x", "--profiles", str(tmp_path / "new"), "--db", "nonsense://"]) == 2
    assert "--db: 'nonsense://' is not a database URL" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert len(served_query(app, "SELECT name FROM api_keys")) == 1


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    from anomalygpt.service.audit import migration_config

    return ScriptDirectory.from_config(migration_config()).get_current_head()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_keys_are_listed_without_secrets_and_a_revoked_key_is_refused_by_every_replica(
    request, inspector, tmp_path, capsys, kind
):
    url = fresh_database(request, tmp_path, kind)
    with_db = ["--profiles", str(tmp_path), "--db", url]
    assert serve_main(["keys", "list", "--profiles", str(tmp_path / "none")]) == 2  # never creates a database
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "none").exists()
    made = {}
    for name in ("camera-3", "camera-4"):
        assert serve_main(["keys", "create", name, *with_db]) == 0
        made[name] = capsys.readouterr().out.strip()
    replicas = [create_app(tmp_path / f"replica{i}", url, inspector=inspector) for i in range(2)]
    with TestClient(replicas[0]) as first, TestClient(replicas[1]) as second:
        bearer = {name: {"Authorization": f"Bearer {key}"} for name, key in made.items()}
        assert first.get("/v1/profiles", headers=bearer["camera-3"]).status_code == 200
        assert serve_main(["keys", "list", *with_db]) == 0
        listed = capsys.readouterr().out
        secrets = [*made.values(), *(hashlib.sha256(key.encode()).hexdigest() for key in made.values())]
        assert not any(secret in listed for secret in secrets)
        header, *table = [line.split() for line in listed.splitlines()]
        assert header == ["name", "created", "last", "used", "revoked"] and [row[0] for row in table] == list(made)
        created, used = (datetime.fromisoformat(cell.rstrip("Z")) for cell in table[0][1:3])
        assert 0 <= (used - created).total_seconds() < 60 and table[0][3] == "-"  # camera-3: used, not revoked
        assert table[1][2:] == ["-", "-"]  # camera-4: never used
        assert serve_main(["keys", "revoke", "camera-3", *with_db]) == 0
        assert "'camera-3' revoked at" in capsys.readouterr().err
        for http in (first, second):  # from the next request on, on both replicas, without a restart
            refused = http.get("/v1/profiles", headers=bearer["camera-3"])
            assert refused.status_code == 401 and refused.json()["error"].startswith("this API key was revoked")
            assert http.get("/v1/profiles", headers=bearer["camera-4"]).status_code == 200
        assert serve_main(["keys", "revoke", "camera-4", *with_db]) == 0
        capsys.readouterr()
        closed = second.get("/v1/profiles")  # revoking every key leaves the service closed
        assert closed.status_code == 401 and closed.json()["error"].startswith("missing or wrong API key")
        assert second.get("/healthz").status_code == 200
    assert serve_main(["keys", "list", *with_db]) == 0
    table = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(row[0], row[-1].endswith("Z")) for row in table] == [("camera-3", True), ("camera-4", True)]
    assert serve_main(["keys", "revoke", "camera-9", *with_db]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("anomalygpt serve keys: error: no API key named 'camera-9'")


def served_query(app, sql: str) -> list[tuple]:
    return query({"app": app}, sql)


def events_of(text: str) -> list[tuple[str, dict]]:
    import json

    found = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        found.append((lines["event"], json.loads(lines["data"])))
    return found


def test_chat_streams_the_checked_grounded_answer_and_records_it(served, profile, inspector, images):
    from anomalygpt.answerers import grounded_answer

    http, client = served["http"], served["client"]
    answer = client.inspect(profile["id"], images["defect"])
    references = inspector.load_profile(served["folder"] / f"{profile['id']}.profile")
    direct = inspector.inspect(load_image(images["defect"]), references)
    for question in ("Is there a defect?", "Where is it?", "How many defects are there?"):
        response = http.post("/v1/chat", json={"inspection": answer["id"], "question": question})
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = events_of(response.text)
        assert [kind for kind, _ in events[:-1]] == ["piece"] * (len(events) - 1) and events[-1][0] == "done"
        text, done = "".join(data["text"] for _, data in events[:-1]), events[-1][1]
        assert text == done["answer"] and text.strip() == grounded_answer(question, direct).strip()
        assert done["inspection"] == answer["id"] and done["answerer"] == "grounded" and "raw" not in done["checks"]
        stored = query(served, "SELECT answer, question, inspection_id FROM chat_answers WHERE id = :i", i=done["id"])
        assert stored == [(text, question, answer["id"])]
    assert text.startswith("Yes") or "anomal" in text.lower()
    pieces: list[str] = []
    streamed = client.chat(answer["id"], "Is there a defect?", on_piece=pieces.append)
    assert "".join(pieces) == streamed["answer"] and streamed["id"] != done["id"]


def test_chat_refuses_bad_questions_in_one_line(served, profile, images):
    http = served["http"]
    inspection = served["client"].inspect(profile["id"], images["good"])["id"]
    before = rows(served, "chat_answers")
    cases = [
        ("malformed JSON", {"content": b'{"inspection": ', "headers": {"content-type": "application/json"}}, 400),
        ("a list", {"json": [inspection, "Is it ok?"]}, 422),
        ("missing question", {"json": {"inspection": inspection}}, 422),
        ("wrong field name", {"json": {"inspection": inspection, "query": "ok?"}}, 422),
        ("empty question", {"json": {"inspection": inspection, "question": "  "}}, 422),
        ("question not text", {"json": {"inspection": inspection, "question": 3}}, 422),
        ("question too long", {"json": {"inspection": inspection, "question": "why " * 200}}, 422),
        ("unknown inspection", {"json": {"inspection": "0123456789abcdef", "question": "ok?"}}, 404),
        ("inspection as a path", {"json": {"inspection": "../audit.db", "question": "ok?"}}, 404),
        ("a form", {"data": {"inspection": inspection, "question": "ok?"}}, 415),
    ]
    for what, kwargs, status in cases:
        response = http.post("/v1/chat", **kwargs)
        assert response.status_code == status, (what, response.text)
        assert list(response.json()) == ["error"] and "\n" not in response.json()["error"], what
    assert rows(served, "chat_answers") == before


def test_the_question_limit_is_shared_by_replicas_on_one_database(inspector, served, profile, images):
    inspection = served["client"].inspect(profile["id"], images["good"])["id"]
    before = rows(served, "chat_answers")
    clock = [29_000_000 * 60 + 45.25]  # 14.75 s before a minute ends
    replicas = [
        create_app(served["folder"], served["db"], inspector=inspector, limits=Limits(questions_per_minute=2))
        for _ in range(2)
    ]
    for app in replicas:
        app.state.limiter.clock = lambda: clock[0]
    with TestClient(replicas[0]) as first, TestClient(replicas[1]) as second:

        def ask(http: TestClient):
            return http.post("/v1/chat", json={"inspection": inspection, "question": "Is it ok?"})

        asked = [ask(first), ask(second), ask(first), ask(second)]
        assert [r.status_code for r in asked] == [200, 200, 429, 429]  # 2 in all, not 2 per replica
        assert "2 questions per minute" in asked[2].json()["error"] and asked[2].headers["retry-after"] == "15"
        clock[0] += 15  # the next minute
        assert ask(second).status_code == 200
        statuses: list[int] = []
        threads = [
            threading.Thread(target=lambda h=h: statuses.append(ask(h).status_code)) for h in [first, second] * 3
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(statuses) == [200] + [429] * 5  # one left this minute, however the six race
    assert rows(served, "chat_answers") == before + 4


def test_audit_export_writes_csv_and_json_lines_from_a_time_on(served, profile, images, tmp_path, capsys):
    import csv
    import json

    from anomalygpt.cli import main as anomalygpt_main

    first = served["client"].inspect(profile["id"], images["good"])
    total = rows(served, "inspections")
    base = ["audit", "export", "--db", served["db"], "--profiles", str(served["folder"])]
    assert anomalygpt_main([*base, "--format", "csv", "--out", str(tmp_path / "all.csv")]) == 0
    with (tmp_path / "all.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == total and first["id"] in {row["id"] for row in table}
    assert [row["created"] for row in table] == sorted(row["created"] for row in table)
    assert f"wrote {total} rows" in capsys.readouterr().err
    assert anomalygpt_main([*base, "--since", first["created"], "--format", "jsonl"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["id"] == first["id"] and lines[0]["score"] == first["score"] and len(lines) < total
    assert json.loads(lines[0]["result_json"])["verdict"] == first["verdict"]
    assert anomalygpt_main([*base, "--table", "chats", "--format", "jsonl"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == rows(served, "chat_answers")
    assert anomalygpt_main([*base, "--since", "yesterday"]) == 2
    assert "--since: 'yesterday' is not an ISO 8601 time" in capsys.readouterr().err
    assert anomalygpt_main(["audit", "export", "--profiles", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "none").exists()


def inspection_rows(count: int, start: datetime) -> list[dict]:
    """Audit rows as the service writes them, one a second from start, with a 2 kB answer each."""
    answer = json.dumps({"verdict": "normal", "note": "é" + "x" * 2000})
    return [
        {
            "id": f"{i:016x}",
            "created": start + timedelta(seconds=i),
            "key_name": "line-1",
            "profile_id": "a" * 16,
            "profile_version": 1,
            "profile_checksum": "c" * 64,
            "image_name": f"cell, {i}.png",  # a comma: CSV must quote it
            "image_sha256": hashlib.sha256(str(i).encode()).hexdigest(),
            "image_bytes": i,
            "image_height": 300,
            "image_width": 300,
            "verdict": "anomalous" if i % 3 == 0 else "normal",
            "score": i / 7,
            "threshold": 0.5,
            "margin": i / 7 - 0.5,
            "sensitivity": 0.0,
            "regions_json": "[]",
            "result_json": answer,
            "overlay_sha256": "0" * 64,
            "map_sha256": "1" * 64,
            "preset": "default",
            "versions_json": "{}",
            "latency_ms": 1.5,
        }
        for i in range(count)
    ]


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_large_export_is_streamed_whole_and_a_failed_one_leaves_no_file(request, tmp_path, capsys, kind):
    import csv
    import tracemalloc

    from sqlalchemy import insert

    from anomalygpt.cli import main as anomalygpt_main
    from anomalygpt.service.audit import AuditStore, InspectionRow

    url = fresh_database(request, tmp_path, kind)
    store = AuditStore(url, tmp_path / "blobs")
    stored = inspection_rows(10_000, datetime(2026, 12, 1))
    with store.sessions.begin() as session:
        session.execute(insert(InspectionRow), stored)
    base = ["audit", "export", "--db", url, "--profiles", str(tmp_path), "--out"]
    out = tmp_path / "all.jsonl"
    tracemalloc.start()
    assert anomalygpt_main([*base, str(out)]) == 0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    size = out.stat().st_size
    assert size > 20_000_000 and peak < size / 2  # 1,000 rows at a time; the export built in memory held 2x size
    assert "wrote 10000 rows" in capsys.readouterr().err
    with out.open(encoding="utf-8") as handle:
        exported = [json.loads(line) for line in handle]
    assert [row["id"] for row in exported] == [row["id"] for row in stored]  # every row, once, oldest first
    assert exported[-1]["score"] == stored[-1]["score"] and exported[-1]["created"] == "2026-12-01T02:46:39.000000Z"
    assert exported[7]["result_json"] == stored[7]["result_json"] and exported[7]["image_name"] == "cell, 7.png"
    assert anomalygpt_main([*base, str(tmp_path / "all.csv"), "--format", "csv"]) == 0
    capsys.readouterr()
    with (tmp_path / "all.csv").open(encoding="utf-8", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [(row["id"], row["image_name"], float(row["score"])) for row in table] == [
        (row["id"], row["image_name"], row["score"]) for row in stored
    ]
    with store.sessions.begin() as session:  # a row JSON cannot hold: the export fails after 2,001 rows (4 MB)
        session.execute(insert(InspectionRow), {**stored[0], "id": "f" * 16, "created": stored[2000]["created"],
                                                "score": float("inf")})  # fmt: skip
    out.write_text("the previous export\n")
    before = sorted(tmp_path.iterdir())
    assert anomalygpt_main([*base, str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: row '{'f' * 16}'" in err
    assert anomalygpt_main([*base, str(tmp_path / "new.jsonl")]) == 2
    assert sorted(tmp_path.iterdir()) == before and out.read_text() == "the previous export\n"  # no file, no temp


def test_an_export_piped_into_a_reader_that_stops_early_ends_quietly(request, tmp_path):
    import subprocess
    import sys

    from sqlalchemy import insert

    from anomalygpt.service.audit import AuditStore, InspectionRow

    url = fresh_database(request, tmp_path, "sqlite")
    with AuditStore(url, tmp_path / "blobs").sessions.begin() as session:
        session.execute(insert(InspectionRow), inspection_rows(2_000, datetime(2026, 12, 1)))  # 4 MB: fills the pipe
    code = "import sys; from anomalygpt.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", code, "audit", "export", "--db", url, "--profiles", str(tmp_path)]
    export = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert export.stdout is not None and export.stderr is not None
    first = export.stdout.read(100)  # `anomalygpt audit export ... | head -c 100`
    export.stdout.close()
    assert export.wait(timeout=60) == 0 and first.startswith(b'{"id": "0000000000000000"')
    assert export.stderr.read() == b""  # no "error: [Errno 32] Broken pipe", no traceback


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")  # transformers, inside peft
def test_chat_with_the_llm_answerer_sends_what_the_claim_checker_passed(tmp_path):
    import json

    from tiny_llm import save_chat_llm

    from anomalygpt.answerers import AssistantAnswerer
    from anomalygpt.assistant import AssistantConfig
    from anomalygpt.backbones import BackboneConfig
    from anomalygpt.config import Preset
    from anomalygpt.inspection import build_inspector
    from anomalygpt.llm import LLMConfig
    from anomalygpt.memory import MemoryConfig
    from anomalygpt.service.chat import stored_inspection

    preset = Preset(
        name="tiny",
        backbone=BackboneConfig(image_size=64),
        memory=MemoryConfig(augment=True),
        llm=LLMConfig(model=str(save_chat_llm(tmp_path / "llm"))),
        assistant=AssistantConfig(max_new_tokens=6),
        device="cpu",
    )
    goods = [write_png(tmp_path / f"g{i}.png", crop) for i, crop in enumerate(texture_crops(2, size=64, seed=11))]
    defect = write_png(tmp_path / "d.png", with_dark_blob(texture_crops(1, size=64, seed=98)[0], (46, 46), 7))
    app = create_app(tmp_path / "service", inspector=build_inspector(preset), answerer="llm")
    question = "Is there an anomaly in this image?"
    with TestClient(app) as http:
        client = Client(http=http)
        inspected = client.inspect(client.create_profile("tiny", goods)["id"], defect)
        pieces: list[str] = []
        done = client.chat(inspected["id"], question, on_piece=pieces.append)
    chats = app.state.chats
    assert isinstance(chats.answerer, AssistantAnswerer) and done["answerer"] == "llm"
    row = chats.service.audit.inspection(inspected["id"])
    inspection, pixels = stored_inspection(row, chats.service.audit.blobs)
    reports: list = []
    checked = "".join(chats.answerer.stream(question, [], inspection, pixels, None, reports.append))
    assert "".join(pieces) == done["answer"] == checked  # the web app's and the CLI's path: the checker's output
    assert done["answer"].startswith("Yes" if inspected["verdict"] == "anomalous" else "No")
    stored = json.loads(query({"app": app}, "SELECT checks_json FROM chat_answers")[0][0])
    assert stored["raw"] == reports[0].raw and "raw" not in done["checks"]  # the model's own text stays in the audit
