"""The WebSocket source against a real Home Assistant: every state change and event, compared
with Home Assistant's own recorder; registries; permissions; dead connections; restarts."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from ha_ingestor.pipeline.buffer import MemoryCheckpoints
from ha_ingestor.pipeline.ha_events import format_time_ns, parse_time_ns
from ha_ingestor.sources.homeassistant import CHECKPOINT_KEY
from ha_ingestor.telemetry import ConnState
from tests.homeassistant.harness import (
    SourceRun,
    burst_of_state_changes,
    running_source,
    switch_and_script,
    wait_backfill_counted,
    wait_for_agreement,
)
from tests.homeassistant.tcp_proxy import TcpProxy
from tests.support.homeassistant import CONFIGURATION, HomeAssistant, Release
from tests.support.servers import started
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.homeassistant, pytest.mark.timeout(300)]


def assert_one_series_per_change(run: SourceRun, since: float) -> None:
    """However often a change was written (live, back-filled), it is one (series, time): the
    copies collapse into one point in InfluxDB."""
    series: defaultdict[tuple[str, int], set[str]] = defaultdict(set)
    for line in run.states(since):
        series[line.key].add(line.series)
    split = {key: names for key, names in series.items() if len(names) > 1}
    assert not split, f"changes written to more than one series: {list(split.items())[:3]}"


async def test_every_state_change_and_event_matches_the_recorder(
    home_assistant: HomeAssistant,
) -> None:
    ha = home_assistant
    async with running_source(ha) as run:
        await run.wait_connected()
        since = time.time()
        clients, per_client = 8, 150
        rate = await asyncio.to_thread(burst_of_state_changes, ha, "src_burst", clients, per_client)
        await asyncio.to_thread(switch_and_script, ha, 5)
        await asyncio.to_thread(
            ha.call_service,
            "input_boolean",
            "turn_off",
            entity_id="input_boolean.sensor_available",
        )
        await asyncio.to_thread(
            ha.call_service, "input_boolean", "turn_on", entity_id="input_boolean.sensor_available"
        )
        await asyncio.to_thread(ha.set_state, "sensor.src_gone", "7")
        await asyncio.to_thread(ha.remove_state, "sensor.src_gone")
        until = time.time()

        recorded, stored = await wait_for_agreement(ha, run, since, until)
        assert recorded - stored == set(), "every row of the recorder has its point"
        assert stored - recorded == set(), "every point has its row in the recorder"
        live = run.states(since, until)
        assert len(live) == len(stored), "exactly one line per state change"

        burst = Counter(x.tags["entity_id"] for x in live if "src_burst" in x.tags["entity_id"])
        assert burst == {f"sensor.src_burst_{i}": per_client for i in range(clients)}
        first = next(x for x in live if x.tags["entity_id"] == "sensor.src_burst_0")
        assert first.tags["domain"] == "sensor"
        assert first.tags["unit"] == "°C"
        assert first.tags["device_class"] == "temperature"
        assert first.tags["instance"] == "Test Home"
        assert first.fields["state"] == "0.0"
        assert first.fields["value"] == 0.0
        assert first.fields["attr_sequence"] == 0.0
        assert json.loads(str(first.fields["attributes"]))["sequence"] == 0
        assert "context_id" not in first.fields, "no stored event shares its context"

        guarded = [x for x in live if x.tags["entity_id"] == "sensor.guarded_level"]
        assert "unavailable" in {x.fields["state"] for x in guarded}
        gone = [x for x in live if x.tags["entity_id"] == "sensor.src_gone"]
        assert [x.fields["state"] for x in gone] == ["7", ""]
        assert gone[-1].fields["removed"] is True

        await wait_for(lambda: len(run.events("script_started", since)) == 5, timeout=30)
        calls = [
            x for x in run.events("call_service", since) if x.tags["domain"] == "input_boolean"
        ]
        assert len(calls) == 12
        assert {x.tags["service"] for x in calls} == {"turn_on", "turn_off"}
        # A state changed by a service call keeps the context it shares with the call.
        switched = [x for x in live if x.tags["entity_id"] == "input_boolean.test_switch"]
        call_contexts = {x.fields["context_id"] for x in calls}
        assert switched
        assert all(x.fields.get("context_id") in call_contexts for x in switched)
        assert {x.tags["entity_id"] for x in calls} == {
            "input_boolean.test_switch",
            "input_boolean.sensor_available",
        }
        automations = run.events("automation_triggered", since)
        assert len(automations) == 5
        assert automations[0].tags["entity_id"] == "automation.level_up_when_the_switch_turns_on"
        assert automations[0].fields["name"] == "Level up when the switch turns on"
        assert automations[0].fields["context_id"]
        scripts = run.events("script_started", since)
        assert scripts[0].tags["entity_id"] == "script.bump_level"
        assert scripts[0].fields["name"] == "Bump level"
        assert json.loads(str(scripts[0].fields["data"]))["name"] == "Bump level"

        assert ha.slow_consumer_lines() == [], "Home Assistant never dropped the source"
        assert run.metric("ha_ingestor_events_received_total", source="homeassistant") >= len(live)
        assert run.metric("ha_ingestor_queue_depth", queue="homeassistant") == 0
        assert run.source.connection_attempts == 1
        assert rate > 50, f"Home Assistant took only {rate:.0f} state changes/s"


async def test_registries_enrich_points_and_follow_changes(home_assistant: HomeAssistant) -> None:
    ha = home_assistant
    async with running_source(ha) as run, ha.websocket() as ws:
        await run.wait_connected()
        area = await ws.call("config/area_registry/create", name="Test Kitchen")
        try:
            await ws.call(
                "config/entity_registry/update",
                entity_id="sensor.doubled_level",
                area_id=area["area_id"],
            )

            async def doubled_level_after(level: float) -> dict[str, str]:
                since = time.time()
                await asyncio.to_thread(
                    ha.call_service,
                    "input_number",
                    "set_value",
                    entity_id="input_number.test_level",
                    value=level,
                )
                await wait_for(
                    lambda: any(
                        x.tags["entity_id"] == "sensor.doubled_level" for x in run.states(since)
                    )
                )
                return next(
                    x.tags
                    for x in run.states(since)
                    if x.tags["entity_id"] == "sensor.doubled_level"
                )

            # The registry event is handled a moment after it arrives: wait for the tag.
            await wait_for(
                lambda: run.source.mapper.entity_info("sensor.doubled_level").area == "Test Kitchen"
            )
            tags = await doubled_level_after(101)
            assert tags["area"] == "Test Kitchen"
            assert tags["platform"] == "template"

            await ws.call(
                "config/area_registry/update", area_id=area["area_id"], name="Test Scullery"
            )
            await wait_for(
                lambda: (
                    run.source.mapper.entity_info("sensor.doubled_level").area == "Test Scullery"
                )
            )
            assert (await doubled_level_after(102))["area"] == "Test Scullery"
        finally:
            await ws.call("config/area_registry/delete", area_id=area["area_id"])


async def test_a_token_without_admin_rights_fails_clearly_or_works_for_allowed_events(
    home_assistant: HomeAssistant,
) -> None:
    token = await home_assistant.create_user("source-user", "source-password-1")
    async with running_source(home_assistant, token=token) as run:
        await wait_for(lambda: run.state is ConnState.FAILED, timeout=30)
        await asyncio.sleep(2)  # a retry would show by now
        assert run.source.connection_attempts == 1
        errors = [e.error for e in run.telemetry.recent_errors if e.component == "homeassistant"]
        assert len(errors) == 1
        assert "administrator" in errors[0]
        assert "HA_INGESTOR_HA_EVENT_TYPES" in errors[0]
        assert not run.task.done(), "the source stays up, waiting for the operator"

    async with running_source(home_assistant, token=token, ha_event_types="state_changed") as run:
        await run.wait_connected()
        since = time.time()
        await asyncio.to_thread(home_assistant.set_state, "sensor.user_visible", "1")
        await wait_for(lambda: len(run.states(since)) >= 1, timeout=30)


async def test_an_event_type_home_assistant_refuses_fails_naming_the_variable(
    home_assistant: HomeAssistant,
) -> None:
    ha = home_assistant
    async with running_source(ha, ha_event_types="state_changed,state_reported") as run:
        if not ha.release.at_least("2024.4"):
            # No state_reported event before 2024.4: the name is accepted, nothing comes.
            await run.wait_connected()
            return
        await wait_for(lambda: run.state is ConnState.FAILED, timeout=30)
        await asyncio.sleep(2)  # a retry would show by now
        assert run.source.connection_attempts == 1
        errors = [e.error for e in run.telemetry.recent_errors if e.component == "homeassistant"]
        assert len(errors) == 1
        assert "HA_INGESTOR_HA_EVENT_TYPES" in errors[0]
        assert "state_reported" in errors[0]


async def test_excluding_state_changed_leaves_live_state_changes_out(
    home_assistant: HomeAssistant,
) -> None:
    ha = home_assistant
    async with running_source(ha, ha_exclude_event_types="state_changed") as run:
        await run.wait_connected()
        since = time.time()
        await asyncio.to_thread(ha.set_state, "sensor.excluded_probe", "1")
        await asyncio.to_thread(ha.fire_event, "excluded_probe_done")
        await wait_for(lambda: len(run.events("excluded_probe_done", since)) == 1, timeout=30)
        assert run.states(since) == [], "no state_changed point, live or back-filled"
        assert (
            run.metric(
                "ha_ingestor_events_dropped_total", reason="filtered_event", intentional="true"
            )
            >= 1
        )


async def test_a_dead_connection_is_detected_by_ping_and_its_gap_back_filled(
    home_assistant: HomeAssistant,
) -> None:
    ha = home_assistant
    async with (
        TcpProxy(ha.host, ha.port) as proxy,
        running_source(ha, url=proxy.url, ha_ping_interval="0.5", ha_ping_timeout="1") as run,
    ):
        await run.wait_connected()
        since = time.time()
        await asyncio.to_thread(burst_of_state_changes, ha, "blip_before", 2, 20)
        await wait_for(lambda: len(run.states(since)) >= 40)
        proxy.go_dead()
        # While the connection is dead (not closed: only the ping can tell).
        await asyncio.to_thread(burst_of_state_changes, ha, "blip_during", 2, 20)
        await wait_for(lambda: not run.telemetry.is_connected("homeassistant"), timeout=10)
        await run.wait_connected()
        await asyncio.to_thread(burst_of_state_changes, ha, "blip_after", 2, 20)
        until = time.time()

        recorded, stored = await wait_for_agreement(
            ha, run, since, until, entity_prefix="sensor.blip_"
        )
        assert len(recorded) == 120
        assert recorded == stored
        assert_one_series_per_change(run, since)
        await wait_backfill_counted(run, 40)
        connection = run.telemetry.connections["homeassistant"]
        assert connection.reconnects == 1
        assert "no pong" in (connection.last_error or "")
        # The checkpoint moved past the gap once the back-fill was durable.
        last = max(t for _, t in stored)
        await wait_for(
            lambda: (
                parse_time_ns(run.checkpoints.load(CHECKPOINT_KEY) or "1970-01-01T00:00:00")
                >= last * 1000
            ),
            timeout=10,
        )


class ContinuousWriter:
    """Sets states from a thread, round-robin over a few entities, until stopped; failures
    while Home Assistant is down are expected and skipped."""

    def __init__(self, ha: HomeAssistant, prefix: str, entities: int = 4) -> None:
        self._ha = ha
        self._prefix = prefix
        self._entities = entities
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.accepted = 0

    def __enter__(self) -> ContinuousWriter:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                self._ha.set_state(f"sensor.{self._prefix}_{i % self._entities}", str(i))
                self.accepted += 1
            except (OSError, http.client.HTTPException):  # HA killed mid-request: try again
                time.sleep(0.05)
            i += 1


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_a_home_assistant_restart_mid_stream_is_back_filled(
    fresh_home_assistant: HomeAssistant, how: str
) -> None:
    ha = fresh_home_assistant
    async with running_source(ha) as run:
        await run.wait_connected()
        since = time.time()
        with ContinuousWriter(ha, "restart") as writer:
            await wait_for(lambda: writer.accepted >= 100)
            await asyncio.to_thread(ha.restart, how == "kill")
            accepted = writer.accepted
            await wait_for(lambda: writer.accepted >= accepted + 100, timeout=60)
        until = time.time()
        await run.wait_connected()

        recorded, stored = await wait_for_agreement(ha, run, since, until, both_ways=how == "stop")
        assert recorded - stored == set(), "every change the recorder kept is stored"
        if how == "stop":
            assert stored == recorded
        # After a SIGKILL the recorder loses what it had not committed; the source, which
        # received those changes live, may hold more.
        assert_one_series_per_change(run, since)
        await wait_backfill_counted(run, 1)
        assert run.telemetry.connections["homeassistant"].reconnects == 1
        assert run.source.connection_attempts <= 6, "no reconnect storm while HA was down"
        assert ha.slow_consumer_lines() == []


async def test_a_restart_of_the_source_back_fills_from_its_checkpoint(
    home_assistant: HomeAssistant,
) -> None:
    ha = home_assistant
    checkpoints = MemoryCheckpoints()
    since = time.time()
    async with running_source(ha, checkpoints=checkpoints) as run:
        await run.wait_connected()
        await asyncio.to_thread(burst_of_state_changes, ha, "ckpt_running", 2, 20)
        await wait_for(lambda: len(run.states(since)) >= 40)
        newest = max(x.time_ns for x in run.states(since))

        def saved_past_the_burst() -> bool:
            saved = checkpoints.load(CHECKPOINT_KEY)
            return saved is not None and parse_time_ns(saved) >= newest

        # The first subscription saves a checkpoint at once; this waits for the regular one.
        await wait_for(saved_past_the_burst, timeout=10)
    await asyncio.to_thread(burst_of_state_changes, ha, "ckpt_stopped", 2, 20)
    restart_checkpoint = checkpoints.load(CHECKPOINT_KEY)
    async with running_source(ha, checkpoints=checkpoints) as run:
        await run.wait_connected()
        await asyncio.to_thread(ha.set_state, "sensor.ckpt_live", "1")  # ends the gap
        until = time.time()
        recorded, stored = await wait_for_agreement(
            ha, run, since, until, entity_prefix="sensor.ckpt_stopped"
        )
        assert len(recorded) == 40
        assert recorded == stored
        await wait_backfill_counted(run, 40)
        refetched = [
            (x.tags["entity_id"], x.time_ns, x.fields["state"])
            for x in run.states(since)
            if "ckpt_running" in x.tags["entity_id"]
        ]
        assert refetched == [], (
            "what was durable before the restart is not fetched again",
            restart_checkpoint,
            newest,
        )


#: The recorder commits every 15 s instead of at once: a gap is seldom written when it is read.
SLOW_RECORDER = CONFIGURATION.replace("commit_interval: 0", "commit_interval: 15")


@pytest.fixture
def slow_recorder_home_assistant(ha_release: Release, tmp_path: Path) -> Iterator[HomeAssistant]:
    home = HomeAssistant(tmp_path / "homeassistant", ha_release, configuration=SLOW_RECORDER)
    with started(home) as server:
        yield server


async def test_a_gap_the_recorder_writes_late_is_read_again_once_written(
    slow_recorder_home_assistant: HomeAssistant,
) -> None:
    """A busy recorder (after a restart, migrating) may write a gap long after the settle
    time: the gap read without it is read again once the recorder has written it."""
    ha = slow_recorder_home_assistant
    since = time.time()
    checkpoints = MemoryCheckpoints()
    await checkpoints.save(CHECKPOINT_KEY, format_time_ns(int(since * 1e9)))  # an earlier run
    await asyncio.to_thread(burst_of_state_changes, ha, "late_gap", 2, 10)
    async with running_source(ha, checkpoints=checkpoints, ha_backfill_settle="0.5") as run:
        await run.wait_connected()
        await asyncio.to_thread(ha.set_state, "sensor.late_live", "1")  # ends the gap
        until = time.time()
        recorded, stored = await wait_for_agreement(
            ha, run, since, until, timeout=60, entity_prefix="sensor.late_gap"
        )
        assert len(recorded) == 20
        assert recorded == stored
        await wait_for(
            lambda: run.metric("ha_ingestor_backfilled_points_total") == 20,
            timeout=30,
            message="back-filled points counted once",
        )
        # The hold is released after the second reading: the checkpoint moves past the gap.
        live_ns = next(
            x.time_ns for x in run.states(since) if x.tags["entity_id"] == "sensor.late_live"
        )
        await wait_for(
            lambda: parse_time_ns(checkpoints.load(CHECKPOINT_KEY) or "") >= live_ns,
            timeout=30,
            message="checkpoint past the gap",
        )
