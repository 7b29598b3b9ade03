"""A real Home Assistant (release 2024.3.3, from .ha-venv) for tests.

Writes a test configuration (helpers, template sensors, an automation, a script), starts ``hass``
on a free loopback port, onboards it through the HTTP API and creates a long-lived token.
Nothing is installed here: scripts/bootstrap prepared .ha-venv.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.servers import HOST, ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
HASS = ROOT / ".ha-venv" / "bin" / "hass"

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
  logs:
    homeassistant.components.websocket_api: info
input_boolean:
  test_switch:
    name: Test switch
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
        state: "{{{{ states('input_number.test_level') | float(0) * 2 }}}}"
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


class HomeAssistant(ServerProcess):
    name = "hass"

    def __init__(self, directory: Path, port: int | None = None) -> None:
        super().__init__(directory)
        if not HASS.exists():
            raise RuntimeError(f"{HASS} is missing: run scripts/bootstrap first")
        self.host = HOST
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.db_path = directory / "home-assistant_v2.db"
        self.token = ""
        (directory / "configuration.yaml").write_text(
            CONFIGURATION.format(host=HOST, port=self.port, db=self.db_path)
        )
        self.log_path = directory / "home-assistant.log"

    def command(self) -> list[str]:
        return [
            str(HASS),
            "-c",
            str(self.directory),
            "--skip-pip",
            "--log-file",
            str(self.log_path),
        ]

    def is_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/api/onboarding", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def start(self, timeout: float = 180.0) -> None:
        super().start(timeout)
        if not self.token:
            self.token = asyncio.run(self._onboard())
        self.wait_running()

    def wait_running(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.api("GET", "/api/config").get("state") == "RUNNING":
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("Home Assistant did not reach RUNNING")

    async def _onboard(self) -> str:
        client_id = f"{self.url}/"
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{self.url}/api/onboarding/users", json={**USER, "client_id": client_id}
            ) as response:
                response.raise_for_status()
                auth_code = (await response.json())["auth_code"]
            async with session.post(
                f"{self.url}/auth/token",
                data={
                    "grant_type": "authorization_code",
                    "code": auth_code,
                    "client_id": client_id,
                },
            ) as response:
                response.raise_for_status()
                access_token = (await response.json())["access_token"]
            # The remaining onboarding steps are left alone on purpose: finishing core_config
            # adds cloud integrations (met, radio_browser...) that stall a restart offline.
            async with session.ws_connect(f"{self.url}/api/websocket") as ws:
                await ws.receive_json()
                await ws.send_json({"type": "auth", "access_token": access_token})
                assert (await ws.receive_json())["type"] == "auth_ok"
                await ws.send_json(
                    {
                        "id": 1,
                        "type": "auth/long_lived_access_token",
                        "client_name": "ha-ingestor-tests",
                        "lifespan": 365,
                    }
                )
                result = await ws.receive_json()
                return str(result["result"])

    # --- REST helpers ----------------------------------------------------------------------------
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
    ) -> Any:
        return self.api(
            "POST", f"/api/states/{entity_id}", {"state": state, "attributes": attributes or {}}
        )

    def call_service(self, domain: str, service: str, **data: Any) -> Any:
        return self.api("POST", f"/api/services/{domain}/{service}", data)

    # --- the recorder ----------------------------------------------------------------------------
    def recorded_states(self, since: float, entity_prefix: str = "") -> set[tuple[str, int]]:
        """(entity_id, last_updated in µs) of every state row the recorder stored since ``since``."""
        uri = f"file:{self.db_path}?mode=ro"
        with sqlite3.connect(uri, uri=True, timeout=30) as db:
            rows = db.execute(
                "SELECT m.entity_id, s.last_updated_ts FROM states s "
                "JOIN states_meta m ON s.metadata_id = m.metadata_id "
                "WHERE s.last_updated_ts >= ? AND m.entity_id LIKE ?",
                (since, entity_prefix + "%"),
            ).fetchall()
        return {(entity_id, round(ts * 1_000_000)) for entity_id, ts in rows}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def encode_query(params: dict[str, str]) -> str:
    return urllib.parse.urlencode(params)
