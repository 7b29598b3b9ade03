"""A real Home Assistant for tests, of either tested release (:data:`RELEASES`).

The current release needs Python >= 3.14.2, which this project's machines do not have: it runs
from a Debian forky tree (.ha-current/root, made by scripts/bootstrap-ha-current) through
``chroot``, in a private mount namespace of its own that mounts ``proc`` and binds the test's
directory at ``/config`` — both vanish with the process, nothing stays mounted. It shares the
loopback network, so ports, the WebSocket and the recorder file work as for the oldest supported
release, which runs from .ha-venv.

Writes a small test configuration (helpers, template sensors, an automation, a script) into a
directory of its own, starts ``hass`` on a free loopback port, onboards it through the HTTP API
and creates a long-lived access token. ``stop``/``kill``/``restart`` act on the process by PID;
a restart keeps the port, the configuration, the recorder database and the token.

Nothing is installed at test time (``hass`` runs with ``--skip-pip``): scripts/bootstrap
prepares .ha-venv and the requirements of the integrations loaded here.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import json
import signal
import sqlite3
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.servers import HOST, ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Release:
    """A Home Assistant release the tests run against, and how to start it."""

    version: str
    #: The chroot tree it runs in, or None for a virtual environment on this machine.
    tree: Path | None
    hass: Path  # inside ``tree`` when there is one

    @property
    def id(self) -> str:
        return f"ha{self.version}"

    @property
    def installed(self) -> Path:
        return self.tree / self.hass.relative_to("/") if self.tree else self.hass

    def at_least(self, version: str) -> bool:
        return _version(self.version) >= _version(version)

    def command(self, config_dir: Path, *args: str) -> list[str]:
        """``hass -c <config_dir> args...``: in the tree it sees ``config_dir`` as /config."""
        if self.tree is None:
            return [str(self.hass), "-c", str(config_dir), *args]
        inside = [a.replace(str(config_dir), CONFIG_INSIDE) for a in args]
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            'mount -t proc proc "$1/proc" && mount --bind "$2" "$1/config" && '
            'tree=$1 && shift 2 && exec chroot "$tree" "$@"',
            "sh",
            str(self.tree),
            str(config_dir),
            "env",
            "-i",
            "PATH=/usr/bin:/bin",
            "HOME=/root",
            "LANG=C.UTF-8",
            f"SSL_CERT_FILE={CA_BUNDLE}",
            "UV_NATIVE_TLS=1",
            str(self.hass),
            "-c",
            CONFIG_INSIDE,
            *inside,
        ]

    def path_inside(self, config_dir: Path, path: Path) -> str:
        """How Home Assistant sees ``path`` (a file in ``config_dir``)."""
        if self.tree is None:
            return str(path)
        return str(Path(CONFIG_INSIDE) / path.relative_to(config_dir))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


CONFIG_INSIDE = "/config"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
CURRENT = Release("2026.11.0", tree=ROOT / ".ha-current" / "root", hass=Path("/opt/ha/bin/hass"))
OLDEST = Release("2024.3.3", tree=None, hass=ROOT / ".ha-venv" / "bin" / "hass")
#: Every Home Assistant test runs against each of these (the current release first).
RELEASES = (CURRENT, OLDEST)

# Only what the tests need: `default_config` would load dozens of integrations and slow every start.
CONFIGURATION = """
homeassistant:
  name: Test Home
  latitude: 52.37
  longitude: 4.89
  elevation: 0
  unit_system: metric
  time_zone: UTC
  currency: EUR
  country: NL
http:
  server_host: {host}
  server_port: {port}
api:
websocket_api:
auth:
onboarding:
config:
history:
recorder:
  db_url: "sqlite:///{db}"
  commit_interval: 0
logger:
  default: warning
input_boolean:
  test_switch:
    name: Test switch
  sensor_available:
    name: Sensor available
    initial: true
input_number:
  test_level:
    name: Test level
    min: 0
    max: 1000000
    step: 1
    mode: box
template:
  - sensor:
      - name: Doubled level
        unique_id: doubled_level
        unit_of_measurement: W
        device_class: power
        state_class: measurement
        state: "{{{{ states('input_number.test_level') | float(0) * 2 }}}}"
      - name: Guarded level
        unique_id: guarded_level
        unit_of_measurement: "%"
        availability: "{{{{ is_state('input_boolean.sensor_available', 'on') }}}}"
        state: "{{{{ states('input_number.test_level') | float(0) }}}}"
      - name: Switch echo
        unique_id: switch_echo
        state: "{{{{ states('input_boolean.test_switch') }}}}"
automation:
  - id: level_on_switch
    alias: Level up when the switch turns on
    trigger:
      - platform: state
        entity_id: input_boolean.test_switch
        to: "on"
    action:
      - service: input_number.increment
        target:
          entity_id: input_number.test_level
script:
  bump_level:
    alias: Bump level
    sequence:
      - service: input_number.increment
        target:
          entity_id: input_number.test_level
"""

USER = {
    "name": "Test Admin",
    "username": "admin",
    "password": "test-password-123",
    "language": "en",
}

#: What Home Assistant logs when it drops a client that cannot keep up.
SLOW_CONSUMER_MESSAGES = ("pending messages", "unable to keep up")


class HomeAssistant(ServerProcess):
    """One Home Assistant process with its own configuration directory.

    ``log_path`` collects the console output of every run (it survives restarts);
    ``ha_log_path`` is Home Assistant's own log file, which it rotates at each start.
    """

    name = "hass"

    def __init__(
        self,
        directory: Path,
        release: Release = CURRENT,
        port: int | None = None,
        configuration: str = CONFIGURATION,
    ) -> None:
        """``configuration`` is a template of configuration.yaml with ``{host}``, ``{port}``
        and ``{db}`` (the recorder's database path as Home Assistant sees it)."""
        if not release.installed.exists():
            raise RuntimeError(
                f"{release.installed} is missing: run scripts/bootstrap to install Home "
                f"Assistant {release.version} for the tests"
            )
        super().__init__(directory)
        self.release = release
        self.host = HOST
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.ws_url = f"ws://{HOST}:{self.port}/api/websocket"
        self.config_dir = directory
        self.db_path = directory / "home-assistant_v2.db"
        self.ha_log_path = directory / "home-assistant.log"
        self.token = ""
        self.startup_seconds: list[float] = []  # one entry per start, onboarding excluded
        (directory / "configuration.yaml").write_text(
            configuration.format(
                host=HOST, port=self.port, db=release.path_inside(directory, self.db_path)
            )
        )

    # --- process ---------------------------------------------------------------------------------
    def command(self) -> list[str]:
        return self.release.command(
            self.config_dir, "--skip-pip", "--log-file", str(self.ha_log_path)
        )

    def is_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/api/onboarding", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def start(self, timeout: float = 180.0) -> None:
        """Start and wait until Home Assistant is RUNNING; onboard on the very first start."""
        began = time.monotonic()
        super().start(timeout)
        if not self.token:
            self.token = asyncio.run(self._onboard())
            self._wait_token_saved()
        self.wait_running(timeout)
        self.startup_seconds.append(time.monotonic() - began)

    def stop(self) -> None:
        self._signal(signal.SIGTERM, 60)  # a graceful stop commits the recorder first

    def restart(self, kill: bool = False) -> None:
        """Stop (or SIGKILL) and start again on the same port, configuration and database."""
        if kill:
            self.kill()
        else:
            self.stop()
        self.start()

    def wait_running(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                if self.api("GET", "/api/config").get("state") == "RUNNING":
                    return
            time.sleep(0.1)
        raise RuntimeError(f"Home Assistant did not reach RUNNING; log tail:\n{self.log_tail()}")

    def _wait_token_saved(self, timeout: float = 30.0) -> None:
        """Home Assistant writes its auth store a moment after a change: until then a SIGKILL
        would forget the token."""
        store = self.config_dir / ".storage" / "auth"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if "ha-ingestor-tests" in store.read_text():
                    return
            time.sleep(0.1)
        raise RuntimeError("Home Assistant did not save the test token")

    async def _onboard(self) -> str:
        """Create the owner, exchange the auth code for an access token, and turn that into
        a long-lived token.

        The remaining onboarding steps (core_config, analytics, integration) are not needed by
        the API and are left alone on purpose: finishing core_config adds cloud-backed
        integrations (met, radio_browser, ...) that slow every start and need the network.
        """
        client_id = f"{self.url}/"
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{self.url}/api/onboarding/users", json={**USER, "client_id": client_id}
            ) as response:
                response.raise_for_status()
                auth_code = (await response.json())["auth_code"]
            access_token = await self._token_for_code(session, client_id, auth_code)
        return await self._long_lived_token(access_token, "ha-ingestor-tests")

    async def _token_for_code(
        self, session: aiohttp.ClientSession, client_id: str, code: str
    ) -> str:
        async with session.post(
            f"{self.url}/auth/token",
            data={"grant_type": "authorization_code", "code": code, "client_id": client_id},
        ) as response:
            response.raise_for_status()
            return str((await response.json())["access_token"])

    async def _long_lived_token(self, access_token: str, client_name: str) -> str:
        async with self.websocket(access_token) as ws:
            result = await ws.call(
                "auth/long_lived_access_token", client_name=client_name, lifespan=365
            )
        return str(result)

    async def create_user(self, username: str, password: str, admin: bool = False) -> str:
        """A new local user; returns a long-lived token of theirs (admin or not)."""
        async with self.websocket() as ws:
            created = await ws.call(
                "config/auth/create",
                name=username,
                group_ids=["system-admin" if admin else "system-users"],
            )
            await ws.call(
                "config/auth_provider/homeassistant/create",
                user_id=created["user"]["id"],
                username=username,
                password=password,
            )
        client_id = f"{self.url}/"
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{self.url}/auth/login_flow",
                json={
                    "client_id": client_id,
                    "handler": ["homeassistant", None],
                    "redirect_uri": client_id,
                },
            ) as response:
                response.raise_for_status()
                flow_id = (await response.json())["flow_id"]
            async with session.post(
                f"{self.url}/auth/login_flow/{flow_id}",
                json={"client_id": client_id, "username": username, "password": password},
            ) as response:
                response.raise_for_status()
                code = (await response.json())["result"]
            access_token = await self._token_for_code(session, client_id, code)
        return await self._long_lived_token(access_token, f"{username}-token")

    # --- REST ------------------------------------------------------------------------------------
    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def set_state(
        self, entity_id: str, state: str, attributes: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """``POST /api/states/<entity_id>``; returns the state object Home Assistant stored."""
        result: dict[str, Any] = self.api(
            "POST", f"/api/states/{entity_id}", {"state": state, "attributes": attributes or {}}
        )
        return result

    def remove_state(self, entity_id: str) -> None:
        self.api("DELETE", f"/api/states/{entity_id}")

    def call_service(self, domain: str, service: str, **data: Any) -> Any:
        """``POST /api/services/<domain>/<service>``; returns the states it changed."""
        return self.api("POST", f"/api/services/{domain}/{service}", data)

    def fire_event(self, event_type: str, **data: Any) -> Any:
        return self.api("POST", f"/api/events/{event_type}", data)

    # --- integrations ----------------------------------------------------------------------------
    def add_mqtt(self, host: str, port: int) -> dict[str, Any]:
        """Set up the MQTT integration against the broker at ``host:port`` (discovery on,
        prefix ``homeassistant``) through the config flow, as a user would; returns the entry.

        The flow's form differs by release: 2026.11 (it may open with a menu when an add-on
        could provide the broker) has an ``other_settings`` section that must be sent."""
        step = self.api("POST", "/api/config/config_entries/flow", {"handler": "mqtt"})
        for _ in range(5):
            if step["type"] == "create_entry":
                return dict(step["result"])
            if step["type"] == "menu":
                body: dict[str, Any] = {"next_step_id": "broker"}
            elif step["type"] == "form" and step["step_id"] == "broker":
                body = {"broker": host, "port": port}
                if any(f.get("name") == "other_settings" for f in step["data_schema"]):
                    body["other_settings"] = {"set_client_cert": False, "set_ca_cert": "off"}
            else:
                raise RuntimeError(f"unexpected MQTT config flow step: {step}")
            step = self.api("POST", f"/api/config/config_entries/flow/{step['flow_id']}", body)
        raise RuntimeError(f"the MQTT config flow did not finish: {step}")

    # --- WebSocket -------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def websocket(self, token: str | None = None) -> AsyncIterator[WebSocketClient]:
        """An authenticated WebSocket API connection (the fixture's token by default)."""
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(self.ws_url, max_msg_size=0) as ws,
        ):
            hello = await ws.receive_json(timeout=10)
            assert hello["type"] == "auth_required", hello
            await ws.send_json({"type": "auth", "access_token": token or self.token})
            answer = await ws.receive_json(timeout=10)
            if answer["type"] != "auth_ok":
                raise PermissionError(f"WebSocket authentication failed: {answer}")
            yield WebSocketClient(ws)

    # --- the recorder ----------------------------------------------------------------------------
    def recorded_states(self, since: float, entity_prefix: str = "") -> set[tuple[str, int]]:
        """(entity_id, last_updated in whole µs since the epoch, converted as Home Assistant
        converts its floats) of every row the recorder
        committed with ``last_updated >= since`` (epoch seconds), for entities starting with
        ``entity_prefix``. HA 2024.3 schema: ``states.metadata_id`` → ``states_meta``."""
        if not self.db_path.exists():
            return set()
        uri = f"file:{self.db_path}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as db:
            rows = db.execute(
                "SELECT m.entity_id, s.last_updated_ts FROM states s "
                "JOIN states_meta m ON s.metadata_id = m.metadata_id "
                "WHERE s.last_updated_ts >= ? AND m.entity_id LIKE ? ESCAPE '\\'",
                (since, entity_prefix.replace("_", r"\_") + "%"),
            ).fetchall()
        return {(entity_id, recorder_us(ts)) for entity_id, ts in rows}

    def wait_recorded(
        self, since: float, entity_prefix: str, count: int, timeout: float = 60.0
    ) -> set[tuple[str, int]]:
        """Poll the recorder until it holds at least ``count`` rows for ``entity_prefix``."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.recorded_states(since, entity_prefix)
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)

    # --- logs ------------------------------------------------------------------------------------
    def log_text(self) -> str:
        """Everything Home Assistant logged, across restarts."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, size: int = 3000) -> str:
        return self.log_text()[-size:]

    def slow_consumer_lines(self) -> list[str]:
        """Log lines in which Home Assistant dropped a WebSocket client as a slow consumer."""
        return [
            line
            for line in self.log_text().splitlines()
            if any(message in line.lower() for message in SLOW_CONSUMER_MESSAGES)
        ]


def recorder_us(seconds: float) -> int:
    """A recorder float (epoch seconds) as the µs of the datetime Home Assistant makes of it:
    ``datetime.fromtimestamp`` rounds half-even to the microsecond."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return calendar.timegm(moment.timetuple()) * 1_000_000 + moment.microsecond


class WebSocketClient:
    """A minimal WebSocket API client for tests: commands one at a time, events queued."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._next_id = 1
        self.events: list[dict[str, Any]] = []

    async def call(self, command: str, **payload: Any) -> Any:
        message_id = self._next_id
        self._next_id += 1
        await self._ws.send_json({"id": message_id, "type": command, **payload})
        while True:
            for frame in await self._frames():
                if frame.get("id") == message_id and frame.get("type") == "result":
                    if not frame["success"]:
                        raise CommandFailedError(command, frame["error"])
                    return frame.get("result")

    async def subscribe(self, event_type: str | None = None) -> None:
        payload = {"event_type": event_type} if event_type else {}
        await self.call("subscribe_events", **payload)

    async def next_event(self, timeout: float = 10.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while not self.events:
                await self._frames()
        return self.events.pop(0)

    async def _frames(self) -> list[dict[str, Any]]:
        message = await self._ws.receive()
        if message.type != aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"WebSocket closed: {message.type!r}")
        decoded = json.loads(message.data)
        frames: list[dict[str, Any]] = decoded if isinstance(decoded, list) else [decoded]
        self.events.extend(f["event"] for f in frames if f.get("type") == "event")
        return frames


class CommandFailedError(Exception):
    def __init__(self, command: str, error: dict[str, Any]) -> None:
        super().__init__(f"{command}: {error.get('code')}: {error.get('message')}")
        self.code = error.get("code")
