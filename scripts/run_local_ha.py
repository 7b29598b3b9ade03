"""Start the current Home Assistant for scripts/run-local: its ``demo`` integration (sample
entities that change by themselves) on loopback, configuration and recorder under
data/homeassistant. Onboards it on the first run and keeps the access token there.

Prints ``<pid> <url> <token>`` once Home Assistant is RUNNING; the caller stops it by that PID.
Run with the project's interpreter: ``.venv/bin/python scripts/run_local_ha.py PORT``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.homeassistant import CURRENT, HomeAssistant  # noqa: E402

DEMO_CONFIGURATION = """
homeassistant:
  name: Demo Home
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
logger:
  default: warning
demo:
"""


def main() -> None:
    port = int(sys.argv[1])
    directory = ROOT / "data" / "homeassistant"
    token_file = directory / ".ha-ingestor-token"
    ha = HomeAssistant(directory, CURRENT, port=port, configuration=DEMO_CONFIGURATION)
    if token_file.exists():
        ha.token = token_file.read_text().strip()
    ha.start(timeout=600)  # the first start builds the recorder and the frontend's files
    token_file.write_text(ha.token)
    token_file.chmod(0o600)
    assert ha.process is not None
    print(ha.process.pid, ha.url, ha.token, flush=True)


if __name__ == "__main__":
    main()
