"""Error responses: problem details for bad input, unknown routes, outages and auth."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from api_test_data import API_TOKEN, GPU_UUID, at, make_record
from flask.testing import FlaskClient
from sqlalchemy import text
from sqlalchemy.engine import Engine

from api.app import create_app
from telemetry.record import TelemetryRecord

Store = Callable[[Sequence[TelemetryRecord]], None]
TELEMETRY_URL = f"/api/v1/gpus/{GPU_UUID}/telemetry"


def assert_problem(response, status: int, *fragments: str) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.content_type == "application/problem+json"
    body = response.get_json()
    assert set(body) == {"type", "title", "status", "detail"}
    assert body["status"] == status
    for fragment in fragments:
        assert fragment in body["detail"]
    assert "Traceback" not in response.get_data(as_text=True)


@pytest.mark.parametrize(
    ("query", "fragments"),
    [
        ("start_time=yesterday", ["start_time='yesterday'", "RFC 3339"]),
        ("start_time=2025-07-18T20:00:00", ["start_time='2025-07-18T20:00:00'"]),
        ("end_time=2025-07-18 20:00:00Z", ["end_time='2025-07-18 20:00:00Z'"]),
        (
            "end_time=2025-02-30T00:00:00Z",
            ["end_time='2025-02-30T00:00:00Z'", "day is out of range"],
        ),
        ("start_time=0001-01-01T00:00:00%2B01:00", ["start_time='0001-01-01T00:00:00+01:00'"]),
        ("end_time=2025-07-18T20:00:00%2B24:00", ["end_time='2025-07-18T20:00:00+24:00'"]),
        ("start_time=2025-07-18T20:00:00+02:00", ["'2025-07-18T20:00:00 02:00'", "must be sent as %2B"]),
        (
            "start_time=2025-07-18T20:00:10Z&end_time=2025-07-18T20:00:00Z",
            ["start_time '2025-07-18T20:00:10.000000Z' is after end_time '2025-07-18T20:00:00.000000Z'"],
        ),
        ("limit=0", ["limit='0'", "from 1 to 10000"]),
        ("limit=10001", ["limit='10001'"]),
        ("limit=abc", ["limit='abc'", "expected an integer"]),
        ("limit=1.5", ["limit='1.5'"]),
        ("limit=5&limit=6", ["limit=['5', '6']", "pass it once"]),
        ("cursor=abc", ["cursor 'abc'"]),
        ("cursor=", ["cursor=''"]),
        ("cursor=bm90IGpzb24", ["not a cursor returned by this API"]),
        ("metric_name=", ["metric_name=''"]),
        ("colour=red", ["unknown query parameter 'colour'"]),
    ],
    ids=[
        "unparsable-time",
        "time-without-offset",
        "time-with-space",
        "impossible-date",
        "time-out-of-range",
        "offset-out-of-range",
        "offset-plus-unescaped",
        "start-after-end",
        "limit-zero",
        "limit-too-large",
        "limit-not-integer",
        "limit-fraction",
        "limit-repeated",
        "cursor-not-base64-json",
        "cursor-empty",
        "cursor-not-json",
        "metric-name-empty",
        "unknown-parameter",
    ],
)
def test_telemetry_bad_query_400(
    sqlite_client: FlaskClient, sqlite_store: Store, query: str, fragments: list[str]
) -> None:
    sqlite_store([make_record()])

    response = sqlite_client.get(f"{TELEMETRY_URL}?{query}")

    assert_problem(response, 400, *fragments)


def test_cursor_of_other_query_400(sqlite_client: FlaskClient, sqlite_store: Store) -> None:
    sqlite_store([make_record(timestamp=at(index)) for index in range(5)])
    cursor = sqlite_client.get(TELEMETRY_URL, query_string={"limit": 2}).get_json()["next_cursor"]
    assert cursor is not None

    response = sqlite_client.get(
        TELEMETRY_URL, query_string={"limit": 2, "cursor": cursor, "metric_name": "X"}
    )

    assert_problem(response, 400, "different query")


def test_gpu_list_unknown_parameter_400(sqlite_client: FlaskClient) -> None:
    assert_problem(sqlite_client.get("/api/v1/gpus?page=2"), 400, "unknown query parameter 'page'")


def test_gpu_unknown_parameter_400(sqlite_client: FlaskClient, sqlite_store: Store) -> None:
    sqlite_store([make_record()])

    assert_problem(
        sqlite_client.get(f"/api/v1/gpus/{GPU_UUID}?verbose=1"),
        400,
        "unknown query parameter 'verbose'",
    )


def test_unknown_route_404(sqlite_client: FlaskClient) -> None:
    assert_problem(sqlite_client.get("/api/v2/gpus"), 404, "'/api/v2/gpus'")


def test_wrong_method_405(sqlite_client: FlaskClient) -> None:
    response = sqlite_client.post("/api/v1/gpus")

    assert_problem(response, 405, "POST")
    assert "GET" in response.headers["Allow"]


def unreachable_urls(tmp_path: Path) -> dict[str, str]:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the database folder should be")
    return {
        # Port 1 on the loopback address: nothing listens, so connecting is refused.
        "postgresql-closed-port": "postgresql://postgres@127.0.0.1:1/telemetry",
        "sqlite-missing-folder": f"sqlite:///{blocker / 'missing' / 'telemetry.db'}",
    }


@pytest.mark.parametrize("kind", ["postgresql-closed-port", "sqlite-missing-folder"])
@pytest.mark.parametrize(
    "path",
    ["/api/v1/gpus", f"/api/v1/gpus/{GPU_UUID}", TELEMETRY_URL, "/readyz"],
    ids=["gpus", "gpu", "telemetry", "readyz"],
)
def test_database_unreachable_503(
    tmp_path: Path, make_url_client: Callable[[str], FlaskClient], kind: str, path: str
) -> None:
    client = make_url_client(unreachable_urls(tmp_path)[kind])

    response = client.get(path)

    assert_problem(response, 503, "retry after 5 seconds")
    assert response.headers["Retry-After"] == "5"


def test_database_unreachable_health_still_200(
    tmp_path: Path, make_url_client: Callable[[str], FlaskClient]
) -> None:
    client = make_url_client(unreachable_urls(tmp_path)["postgresql-closed-port"])

    assert client.get("/healthz").status_code == 200


def test_database_without_tables_503(
    database_url: str, make_url_client: Callable[[str], FlaskClient]
) -> None:
    client = make_url_client(database_url)

    assert_problem(client.get("/api/v1/gpus"), 503)
    assert_problem(client.get("/readyz"), 503)


def test_readyz_names_missing_table(
    sqlite_url: str, sqlite_engine: Engine, make_url_client: Callable[[str], FlaskClient]
) -> None:
    with sqlite_engine.begin() as connection:
        connection.execute(text("DROP TABLE telemetry_samples"))
    client = make_url_client(sqlite_url)

    response = client.get("/readyz")

    assert_problem(response, 503, "missing tables telemetry_samples")
    assert response.headers["Retry-After"] == "5"
    assert client.get("/api/v1/gpus").status_code == 200


def test_unexpected_error_500_without_trace(
    sqlite_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(engine=sqlite_engine)

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("secret internal state")

    response = app.test_client().get("/boom")

    assert_problem(response, 500)
    assert "secret internal state" not in response.get_data(as_text=True)
    assert "secret internal state" in caplog.text


@pytest.fixture
def auth_client(sqlite_engine: Engine) -> FlaskClient:
    return create_app(engine=sqlite_engine, token=API_TOKEN).test_client()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {API_TOKEN}"},
        {"Authorization": "Bearer"},
    ],
    ids=["missing", "wrong-token", "wrong-scheme", "empty-token"],
)
@pytest.mark.parametrize("path", ["/api/v1/gpus", f"/api/v1/gpus/{GPU_UUID}", TELEMETRY_URL])
def test_auth_on_rejects_401(
    auth_client: FlaskClient, sqlite_store: Store, headers: dict[str, str], path: str
) -> None:
    sqlite_store([make_record()])

    response = auth_client.get(path, headers=headers)

    assert_problem(response, 401, "bearer token")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("path", ["/api/v1/gpus", f"/api/v1/gpus/{GPU_UUID}", TELEMETRY_URL])
def test_auth_on_accepts_token(auth_client: FlaskClient, sqlite_store: Store, path: str) -> None:
    sqlite_store([make_record()])

    response = auth_client.get(path, headers={"Authorization": f"Bearer {API_TOKEN}"})

    assert response.status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"])
def test_auth_on_leaves_operations_open(auth_client: FlaskClient, path: str) -> None:
    assert auth_client.get(path).status_code == 200


def test_auth_off_ignores_token(sqlite_client: FlaskClient, sqlite_store: Store) -> None:
    sqlite_store([make_record()])

    assert sqlite_client.get("/api/v1/gpus").status_code == 200
    assert (
        sqlite_client.get("/api/v1/gpus", headers={"Authorization": "Bearer anything"}).status_code
        == 200
    )


@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/gpus/GPU%00x",
        "/api/v1/gpus/GPU%00x/telemetry",
        "/api/v1/gpus?hostname=host%00a",
        f"{TELEMETRY_URL}?metric_name=A%00B",
    ],
    ids=["gpu-id", "telemetry-gpu-id", "hostname", "metric-name"],
)
def test_nul_character_400(client: FlaskClient, store: Store, url: str) -> None:
    store([make_record()])

    assert_problem(client.get(url), 400, "NUL character")
