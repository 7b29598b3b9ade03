"""``ha-ingestor import`` and the service write ``ha_state`` from spools of their own, into one
InfluxDB 3 table with a fixed number of columns: they keep one column budget between them.

On the InfluxDB 3 stand-in, whose ``ha_state`` table is made full at exactly the budget (plus a
little room for fixed fields the history may add): an import of a history richer in numeric
attributes than the budget has room for, after the service has taken part of it, stores every
state and refuses nothing, and the service started after it promotes no attribute beyond the
budget either."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import pytest

from ha_ingestor.pipeline.columns import CHECKPOINT_PREFIX
from ha_ingestor.pipeline.ha_events import STATE_FIXED_COLUMNS, STATE_MEASUREMENT
from ha_ingestor.pipeline.spool import IMPORT_SPOOL, read_checkpoint
from tests.e2e.service import run_service, service_env
from tests.homeassistant.recorder import recorded_states, run_import
from tests.support.homeassistant import HomeAssistant
from tests.support.influxdb_standin import InfluxStandIn, serve
from tests.support.servers import InfluxDB1
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.homeassistant, pytest.mark.timeout(240)]

_ids = itertools.count()
BUDGET = 10  # promoted names ha_state may carry
LIVE = 6  # numeric attributes the service promotes first
HISTORY = 10  # numeric attributes of the history, none of them among the service's
ROOM = 3  # columns left beyond the budget for fixed fields the history adds (last_changed, …)
LEFT_OUT = "ha_ingestor_fields_left_out_total"


def _attribute_columns(standin: InfluxStandIn, database: str) -> set[str]:
    table = standin.databases[database].tables[STATE_MEASUREMENT]
    return {name for name in table.fields if name.startswith("attr_")}


def _saved_names(spool: Path) -> set[str] | None:
    saved = read_checkpoint(spool, CHECKPOINT_PREFIX + STATE_MEASUREMENT)
    return None if saved is None else set(json.loads(saved))


def _rows_of(standin: InfluxStandIn, database: str, entity_id: str) -> list[dict[str, str]]:
    tables = standin.databases.get(database)
    if tables is None or STATE_MEASUREMENT not in tables.tables:
        return []
    return [r for r in standin.rows(database, STATE_MEASUREMENT) if r["entity_id"] == entity_id]


async def test_the_import_and_the_service_share_one_column_budget(
    home_assistant: HomeAssistant, influxdb: InfluxDB1, tmp_path: Path
) -> None:
    ha = home_assistant
    tag = f"cols{next(_ids)}"
    live, history = f"sensor.{tag}_live", f"sensor.{tag}_hist"
    database = "cols"
    history_attributes = {f"hist_{i}": i + 0.5 for i in range(HISTORY)}
    for value in range(3):
        await asyncio.to_thread(
            ha.set_state, history, str(value), {**history_attributes, "step": f"s{value}"}
        )
    await wait_for(lambda: len(recorded_states(ha, history)) >= 3, timeout=60, message="recorder")

    async with serve(InfluxStandIn("v3")) as standin:
        env = service_env(
            tmp_path,
            influxdb,
            database,
            influx_url=standin.url,
            influx_api="v3",
            influx_token=standin.token,
            influx_max_columns=str(STATE_FIXED_COLUMNS + BUDGET),
            ha_url=ha.url,
            ha_token=ha.token,
            ha_include_entities=live,  # the history entity is the import's alone
        )
        # The service gives ha_state LIVE attribute columns.
        async with run_service(env, influxdb, database) as service:
            await wait_for(
                lambda: service.service.telemetry.is_connected("homeassistant"), 60, message="HA"
            )
            await asyncio.to_thread(ha.set_state, live, "1", {f"live_{i}": i for i in range(LIVE)})
            await wait_for(
                lambda: bool(_rows_of(standin, database, live)), 30, message="live state"
            )
            await wait_for(
                lambda: _saved_names(tmp_path / "spool") is not None,
                30,
                message="the service's column names saved",
            )
        assert len(_attribute_columns(standin, database)) == LIVE
        # From now on the table is full once the budget is used up, as InfluxDB 3 Core's is at
        # 500 columns.
        table = standin.databases[database].tables[STATE_MEASUREMENT]
        standin.table_columns[STATE_MEASUREMENT] = table.columns() - LIVE + BUDGET + ROOM

        import_env = {**env, "HA_INGESTOR_HA_INCLUDE_ENTITIES": f"sensor.{tag}_*"}
        result = await asyncio.to_thread(
            run_import, import_env, "--since", "1h", "--entities", history, "--no-statistics"
        )
        assert result.returncode == 0, result.stderr
        assert "imported 3 states" in result.stdout, result.stdout
        assert "0 unwritten" in result.stdout, result.stdout
        rows = _rows_of(standin, database, history)
        assert len(rows) == 3, "every state of the history stored"
        columns = _attribute_columns(standin, database)
        assert len(columns) == BUDGET, sorted(columns)
        assert {f"attr_live_{i}" for i in range(LIVE)} <= columns
        # What had no room stays in the attributes.
        assert all(
            json.loads(json.loads(row["attributes"]))["hist_9"] == 9.5
            for row in rows
            if "attributes" in row
        )
        assert _saved_names(tmp_path / "spool" / IMPORT_SPOOL) == columns

        # The service, started again, counts the import's columns too: a new attribute is left
        # out of the columns, and its state stored.
        async with run_service(env, influxdb, database) as service:
            await wait_for(
                lambda: service.service.telemetry.is_connected("homeassistant"), 60, message="HA"
            )
            await asyncio.to_thread(ha.set_state, live, "2", {"live_0": 7, "late": 1})
            await wait_for(
                lambda: len(_rows_of(standin, database, live)) >= 2, 30, message="new state"
            )
            left_out = service.metric(LEFT_OUT, measurement="ha_state", reason="column_budget")
        assert "attr_late" not in _attribute_columns(standin, database)
        assert left_out >= 1
        assert not (tmp_path / "spool" / "dead-letter.jsonl").exists()
