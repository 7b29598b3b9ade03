"""Partial writes, limits and type conflicts settled exactly: against the InfluxDB 2.x/3 stand-in
(which stores the good lines of a partial write, as the servers do) and a real InfluxDB 1.6.7."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from ha_ingestor.checks import check_influxdb
from ha_ingestor.config import Settings
from ha_ingestor.errors import CheckError
from ha_ingestor.sinks.influxdb import Outcome, classify
from ha_ingestor.web.readiness import not_ready
from tests.sinks.conftest import Harness, Proxy, make_settings, running_writer
from tests.support.influxdb_standin import Database, InfluxStandIn, serve
from tests.support.servers import InfluxDB1
from tests.support.waiting import wait_for

TOKEN = "standin-token"


def v3_settings(url: str, tmp_path: Path, **env: str) -> Settings:
    return make_settings(
        url, tmp_path, influx_api="v3", influx_token=TOKEN, influx_database="home", **env
    )


def dead_letters(w: Harness) -> list[dict[str, str]]:
    path = w.writer.dead_letters.path
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def readiness_problem(w: Harness, tmp_path: Path, url: str) -> str:
    settings = make_settings(url, tmp_path)
    return not_ready(settings, w.telemetry.connections, w.buffer.depth()).get("influxdb", "")


@pytest.mark.timeout(60)
async def test_v3_one_bad_line_in_5000_good_lines_written_once(tmp_path: Path) -> None:
    good = [f"m,entity_id=s{i % 50} v={i}.5 {i + 1}" for i in range(5000)]
    lines = [*good[:2500], 'm,entity_id=s1 v="text" 9999999', *good[2500:4999]]
    async with serve(InfluxStandIn("v3")) as standin:
        async with running_writer(
            v3_settings(standin.url, tmp_path, influx_batch_size="6000")
        ) as w:
            await w.add(lines)
            await w.drained()
        sent = Counter(standin.lines_sent())
        assert len(standin.writes) == 1  # settled from the answer: no second round trip
        assert all(sent[line] == 1 for line in good[:4999])
        assert len(standin.rows("home", "m")) == 4999
        (dead,) = dead_letters(w)
        assert dead["line"] == 'm,entity_id=s1 v="text" 9999999'
        assert "invalid column type for column 'v'" in dead["reason"]
        assert w.metric("ha_ingestor_points_written_total", measurement="other") == 4999


@pytest.mark.timeout(60)
async def test_v3_tag_and_field_of_the_same_name_is_a_line_error(tmp_path: Path) -> None:
    async with serve(InfluxStandIn("v3")) as standin:
        async with running_writer(v3_settings(standin.url, tmp_path)) as w:
            await w.add(["m,kind=a v=1 1", "m kind=2 2", "m v=3 3"])
            await w.drained()
        assert [row["time"] for row in standin.rows("home", "m")] == ["1", "3"]
        assert [d["line"] for d in dead_letters(w)] == ["m kind=2 2"]


@pytest.mark.timeout(60)
async def test_v3_column_limit_keeps_the_lines_and_is_not_ready_until_lifted(
    tmp_path: Path,
) -> None:
    standin = InfluxStandIn("v3", max_columns=4)  # time, v, a, b
    async with serve(standin):
        async with running_writer(v3_settings(standin.url, tmp_path)) as w:
            await w.add(["m v=1,a=1 1", "m b=2 2", "m c=3 3", "m v=4 4"])
            await wait_for(
                lambda: "columns per table" in readiness_problem(w, tmp_path, standin.url),
                20,
                message="not ready, naming the column limit",
            )
            assert w.buffer.depth()[0] == 4  # the batch is not acknowledged: nothing lost
            assert [row["time"] for row in standin.rows("home", "m")] == ["1", "2", "4"]
            standin.max_columns = 500  # e.g. columns dropped, or Enterprise's limit raised
            await w.drained()
            assert readiness_problem(w, tmp_path, standin.url) == ""
        assert [row["time"] for row in standin.rows("home", "m")] == ["1", "2", "3", "4"]
        assert dead_letters(w) == []
        assert Counter(standin.lines_sent())["m v=1,a=1 1"] == 1


@pytest.mark.timeout(60)
async def test_v3_database_limit_keeps_everything_and_names_the_limit(tmp_path: Path) -> None:
    standin = InfluxStandIn("v3", databases={f"db{i}": Database() for i in range(5)})
    async with serve(standin):
        async with running_writer(v3_settings(standin.url, tmp_path)) as w:
            await w.add(["m v=1 1", "m v=2 2"])
            await wait_for(
                lambda: "limit of 5 databases" in readiness_problem(w, tmp_path, standin.url),
                20,
                message="not ready, naming the database limit",
            )
            assert w.buffer.depth()[0] == 2
            del standin.databases["db0"]
            await w.drained()
        assert len(standin.rows("home", "m")) == 2
        assert dead_letters(w) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["v1", "v2"])
async def test_v3_compatibility_endpoints_refuse_the_batch_at_the_numbered_line(
    api: str, tmp_path: Path
) -> None:
    lines = ["m v=1 1", "m v=2 2", 'm v="x" 3', "m v=4 4"]
    async with serve(InfluxStandIn("v3")) as standin:
        settings = make_settings(
            standin.url, tmp_path, influx_api=api, influx_token=TOKEN, influx_database="home"
        )
        async with running_writer(settings) as w:
            await w.add(lines)
            await w.drained()
        assert [row["time"] for row in standin.rows("home", "m")] == ["1", "2", "4"]
        assert [d["line"] for d in dead_letters(w)] == ['m v="x" 3']
        assert len(standin.writes) == 2  # the batch, then the batch without the bad line


@pytest.mark.timeout(60)
async def test_v3_bodies_over_10_mib_are_split(tmp_path: Path) -> None:
    lines = [f'm,n=a s="{"x" * 3000}",i={i}i {i + 1}' for i in range(4000)]  # ~12 MB
    async with serve(InfluxStandIn("v3")) as standin:
        async with running_writer(v3_settings(standin.url, tmp_path)) as w:
            await w.add(lines)
            await w.drained()
        assert len(standin.rows("home", "m")) == 4000
        assert dead_letters(w) == []


@pytest.mark.timeout(60)
async def test_v2_type_conflict_422_settled_in_one_round_trip(tmp_path: Path) -> None:
    standin = InfluxStandIn("v2", databases={"ha": Database()})
    lines = [f"m v={i}.0 {i + 1}" for i in range(1000)]
    lines[500] = 'm v="x" 501'
    async with serve(standin):
        settings = make_settings(
            standin.url,
            tmp_path,
            influx_api="v2",
            influx_token=TOKEN,
            influx_bucket="ha",
            influx_org="o",
        )
        async with running_writer(settings) as w:
            await w.add(lines)
            await w.drained()
        assert len(standin.writes) == 1
        assert len(standin.rows("ha", "m")) == 999
        (dead,) = dead_letters(w)
        assert dead["line"] == 'm v="x" 501'
        assert dead["reason"].startswith("HTTP 422: failure writing points to database: partial")


@pytest.mark.timeout(60)
async def test_v2_points_beyond_retention_are_the_oldest(tmp_path: Path) -> None:
    import time

    now = time.time_ns()
    standin = InfluxStandIn("v2", databases={"ha": Database(retention_ns=3600 * 10**9)})
    lines = [f"m v={i}.0 {now - i * 600 * 10**9}" for i in range(10)]  # every 10 min back
    async with serve(standin):
        settings = make_settings(
            standin.url,
            tmp_path,
            influx_api="v2",
            influx_token=TOKEN,
            influx_bucket="ha",
            influx_org="o",
        )
        async with running_writer(settings) as w:
            await w.add(lines)
            await w.drained()
        assert len(standin.writes) == 1
        assert len(standin.rows("ha", "m")) == 6
        assert sorted(d["line"] for d in dead_letters(w)) == sorted(lines[6:])


@pytest.mark.timeout(60)
async def test_v1_type_conflict_on_a_real_influxdb_settled_in_one_round_trip(
    proxy: Proxy, influxdb: InfluxDB1, tmp_path: Path
) -> None:
    database = "partial_v1"
    influxdb.query(f'CREATE DATABASE "{database}"')
    lines = [f"conflict,e=a v={i}.0 {i + 1}" for i in range(200)]
    lines[77] = 'conflict,e=a v="text" 78'
    settings = make_settings(proxy.url, tmp_path, influx_api="v1", influx_database=database)
    async with running_writer(settings) as w:
        # A shard's first write refuses a conflicting batch whole (then the writer bisects);
        # into an existing shard, 1.x stores the other points and names the conflict.
        await w.add(["conflict,e=a v=0.5 1000"])
        await w.drained()
        await w.add(lines)
        await w.drained()
    assert len(proxy.writes()) == 2
    assert influxdb.count(database, "conflict") == 200
    (dead,) = dead_letters(w)
    assert dead["line"] == 'conflict,e=a v="text" 78'
    assert "field type conflict" in dead["reason"]


def test_v3_partial_and_limit_answers_are_classified() -> None:
    partial = json.dumps(
        {
            "error": "partial write of line protocol occurred",
            "data": [{"original_line": "m v=x", "line_number": 2, "error_message": "bad"}],
        }
    )
    result = classify(400, partial)
    assert result.outcome is Outcome.PARTIAL
    assert [(e.line_number, e.message) for e in result.line_errors] == [(2, "bad")]
    whole = json.dumps(
        {"error": "parsing failed", "data": {"line_number": 3, "error_message": "x"}}
    )
    wrapped = json.dumps({"code": "invalid", "message": whole})
    for body in (whole, wrapped):
        refused = classify(400, body)
        assert refused.outcome is Outcome.REJECTED
        assert [e.line_number for e in refused.line_errors] == [3]
        assert refused.message == "parsing failed: line 3: x"
    limit = classify(422, '{"error":"Adding a new database would exceed the limit of 5 databases"}')
    assert limit.outcome is Outcome.LIMIT
    assert (
        classify(422, '{"error":"database \\"home\\" has been deleted"}').outcome is Outcome.LIMIT
    )
    dropped = classify(
        422, '{"code":"x","message":"partial write: points beyond retention policy dropped=3"}'
    )
    assert (dropped.outcome, dropped.dropped) == (Outcome.REJECTED, 3)


@pytest.mark.timeout(60)
async def test_check_on_v3_does_not_create_the_database(tmp_path: Path) -> None:
    async with serve(InfluxStandIn("v3")) as standin:
        summary = await check_influxdb(v3_settings(standin.url, tmp_path))
        assert "writing to 'home'" in summary
        assert standin.databases == {}


@pytest.mark.timeout(60)
async def test_check_of_a_missing_v2_bucket_names_the_variable(tmp_path: Path) -> None:
    async with serve(InfluxStandIn("v2")) as standin:
        settings = make_settings(
            standin.url, tmp_path, influx_api="v2", influx_token=TOKEN, influx_bucket="nope"
        )
        with pytest.raises(CheckError, match="bucket 'nope' not found") as error:
            await check_influxdb(settings)
    assert "set HA_INGESTOR_INFLUX_BUCKET to an existing bucket" in str(error.value)
