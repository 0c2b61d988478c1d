"""Cluster mode's edges (contract §16, §17.11): a node given a broker refuses to start without
an explicit JWT secret or without the cluster extra (exit 2, one line saying what to set or
install); ``/readyz`` on both ports is 503 while the broker cannot reach Redis or the database
does not commit; the metrics name the node and the broker's health."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import SECRET, make_settings, metric, running
from processes import COMMAND_TIMEOUT, environment, winkr
from test_plain_http import exchange, get

from winkr.store.writer import run_inline

BROKER = "redis://127.0.0.1:6379/0"  # never contacted: these nodes refuse to start first
SHARED_DB = "postgresql://127.0.0.1:5432/never-contacted"  # a cluster's database (refused before it is used)
# winkr's CLI with redis-py made unimportable: a machine without the cluster extra.
WITHOUT_REDIS = "import sys; sys.modules['redis'] = None; from winkr.cli import main; sys.exit(main())"


def test_a_node_with_a_broker_and_no_jwt_secret_exits_2_saying_what_to_set(tmp_path: Path) -> None:
    result = winkr(["serve", "--port", "0", "--broker-url", BROKER, "--database-url", SHARED_DB], tmp_path)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "broker_url is set" in lines[0] and "set jwt_secret (or WINKR_JWT_SECRET)" in lines[0], lines
    assert "same value on every node" in lines[0]
    # Nothing was generated beside the database, and nothing listened.
    assert not list(tmp_path.glob("*.secret")) and "listening" not in result.stdout


def test_a_secret_file_from_a_single_node_run_is_not_enough(tmp_path: Path) -> None:
    (tmp_path / "winkr.db.secret").write_text("x" * 48)
    result = winkr(["serve", "--port", "0"], tmp_path, WINKR_BROKER_URL=BROKER, WINKR_DATABASE_URL=SHARED_DB)
    assert result.returncode == 2 and "jwt_secret" in result.stderr, result


def test_without_the_cluster_extra_a_broker_exits_2_naming_it(tmp_path: Path) -> None:
    result = subprocess_winkr(["serve", "--port", "0", "--broker-url", BROKER, "--database-url", SHARED_DB], tmp_path,
                              WINKR_JWT_SECRET=SECRET)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "pip install 'winkr[cluster]'" in lines[0] and "Redis client (redis)" in lines[0], lines


def test_check_config_reports_both(tmp_path: Path) -> None:
    result = subprocess_winkr(["check-config"], tmp_path, WINKR_BROKER_URL=BROKER, WINKR_DATABASE_URL=SHARED_DB)
    assert result.returncode == 2, result
    errors = [line for line in result.stdout.splitlines() if line.startswith("error")]
    assert len(errors) == 2 and "pip install 'winkr[cluster]'" in errors[0] and "jwt_secret" in errors[1], errors


def test_a_node_with_a_broker_on_a_sqlite_file_exits_2_saying_to_share_postgresql(tmp_path: Path) -> None:
    # Forgetting database_url on the nodes of a cluster must not give each node a record of its
    # own behind one shared presence and fan-out (conversations NOT_FOUND on the other nodes).
    result = winkr(["serve", "--port", "0", "--broker-url", BROKER], tmp_path, WINKR_JWT_SECRET=SECRET)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "SQLite file winkr.db" in lines[0] and "set database_url (or WINKR_DATABASE_URL)" in lines[0], lines
    assert "listening" not in result.stdout and not list(tmp_path.glob("winkr.db*")), result


def test_one_node_needs_neither(tmp_path: Path) -> None:
    result = subprocess_winkr(["check-config"], tmp_path)
    assert result.returncode == 0, result.stdout


def subprocess_winkr(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``winkr ARGS`` on a machine without redis-py."""
    return subprocess.run([sys.executable, "-c", WITHOUT_REDIS, *args], cwd=cwd, env=environment(**env),
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT)


# --- readiness and metrics (in-process server, MockClock) ------------------------------------------

async def readyz_both_ports(harness: Any) -> tuple[tuple[int, dict[str, Any]], tuple[int, dict[str, Any]]]:
    status, _, body, _ = await exchange(harness, get("/readyz"))
    transport = httpx.ASGITransport(app=harness.server.api_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://winkr-api") as api:
        response = await api.get("/readyz")
    return (status, orjson.loads(body)), (response.status_code, response.json())


async def test_readyz_is_503_while_the_broker_cannot_reach_redis(tmp_path: Any) -> None:
    async with running(make_settings(tmp_path, node_id="node-a")) as harness:
        server = harness.server
        assert await readyz_both_ports(harness) == ((200, {"status": "ready"}),) * 2
        scrape = server.metrics.text()
        assert metric(scrape, "winkr_node_info", node_id="node-a") == 1
        assert metric(scrape, "winkr_broker_up") == 1
        server.broker_health.down()
        server.broker_health.publish_failed(3)
        server.broker_health.resynced()
        unavailable = (503, {"status": "unavailable", "reason": "the broker cannot reach Redis"})
        assert await readyz_both_ports(harness) == (unavailable, unavailable)
        # The liveness check stays 200 (the process serves; established clients go on).
        assert (await exchange(harness, get("/health")))[0] == 200
        scrape = server.metrics.text()
        assert metric(scrape, "winkr_broker_up") == 0
        assert metric(scrape, "winkr_broker_publish_failures_total") == 3
        assert metric(scrape, "winkr_broker_resyncs_total") == 1
        server.broker_health.up()
        assert await readyz_both_ports(harness) == ((200, {"status": "ready"}),) * 2


async def test_readyz_is_503_while_the_database_does_not_commit(tmp_path: Any) -> None:
    # The writer's thread hop is where a database that stopped answering shows: it raises.
    database_down = [False]

    async def run_sync(fn: Callable[..., Any], *args: Any) -> Any:
        if database_down[0]:
            raise OSError("connection refused")
        return await run_inline(fn, *args)

    async with running(make_settings(tmp_path), run_sync=run_sync) as harness:
        assert await readyz_both_ports(harness) == ((200, {"status": "ready"}),) * 2
        database_down[0] = True
        unavailable = (503, {"status": "unavailable", "reason": "the store does not accept writes"})
        assert await readyz_both_ports(harness) == (unavailable, unavailable)
        database_down[0] = False
        assert await readyz_both_ports(harness) == ((200, {"status": "ready"}),) * 2


@pytest.mark.parametrize("node_id", ["", "n1"])
async def test_every_node_has_an_id_in_its_metrics(tmp_path: Any, node_id: str) -> None:
    async with running(make_settings(tmp_path, node_id=node_id)) as harness:
        expected = node_id or harness.server.node_id
        assert expected and (node_id or "-" in expected)  # hostname-pid by default
        assert metric(harness.server.metrics.text(), "winkr_node_info", node_id=expected) == 1


def test_check_config_names_the_cluster_without_its_password(tmp_path: Path) -> None:
    result = winkr(["check-config"], tmp_path, WINKR_BROKER_URL="redis://:hunter2@127.0.0.1:6379/0",
                   WINKR_DATABASE_URL="postgresql://winkr@127.0.0.1:5432/winkr", WINKR_JWT_SECRET=SECRET,
                   WINKR_NODE_ID="node-7", WINKR_PROXY_PROTOCOL_FROM="10.0.0.5")
    assert result.returncode == 0, result.stdout
    assert "ok    more than one node: broker redis://:***@127.0.0.1:6379/0, node_id node-7, Redis keys under " \
           "winkr:" in result.stdout, result.stdout
    assert "ok    PROXY protocol required from 10.0.0.5" in result.stdout
    assert "hunter2" not in result.stdout + result.stderr
