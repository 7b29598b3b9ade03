"""Real Mosquitto and InfluxDB 1.x processes for tests: free loopback ports, temporary
directories, stopped by PID. Each can be killed and restarted on the same port and data."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _require(binary: str) -> str:
    path = shutil.which(binary) or (
        f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None
    )
    if path is None:
        raise RuntimeError(f"{binary} is not installed: run scripts/bootstrap first")
    return path


class ServerProcess:
    """A process with a log file, started and stopped by PID."""

    name = "server"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log_path = directory / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def is_up(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.directory
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self.is_up():
                return
            time.sleep(0.05)
        tail = self.log_path.read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"{self.name} did not start; log tail:\n{tail}")

    def _signal(self, sig: int, wait: float) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, sig)
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)

    def stop(self) -> None:
        self._signal(signal.SIGTERM, 10)

    def kill(self) -> None:
        self._signal(signal.SIGKILL, 10)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


ServerT = TypeVar("ServerT", bound=ServerProcess)


@contextlib.contextmanager
def started(server: ServerT) -> Iterator[ServerT]:
    """``server`` started, and stopped when the block ends."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Mosquitto(ServerProcess):
    name = "mosquitto"

    def __init__(
        self, directory: Path, port: int | None = None, users: dict[str, str] | None = None
    ):
        super().__init__(directory)
        self.host = HOST
        self.port = port or free_port()
        self.users = users or {}
        self.config_path = directory / "mosquitto.conf"
        self._write_config()

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} {HOST}",
            "persistence true",
            f"persistence_location {self.directory}/",
            "autosave_interval 1",
            # Tests and benchmarks push bursts far beyond the per-client defaults.
            "max_inflight_messages 0",
            "max_queued_messages 0",
            "max_queued_bytes 0",
            "set_tcp_nodelay true",
            "log_type error",
            "log_type warning",
        ]
        if os.getuid() == 0:
            # As root, mosquitto switches to the "mosquitto" user, who may not write the
            # persistence file into this test's private directory.
            lines.append("user root")
        if self.users:
            password_file = self.directory / "passwords"
            password_file.write_text("".join(f"{u}:{p}\n" for u, p in self.users.items()))
            subprocess.run([_require("mosquitto_passwd"), "-U", str(password_file)], check=True)
            password_file.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        self.config_path.write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        return [_require("mosquitto"), "-c", str(self.config_path)]

    def is_up(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.2):
            return True
        return False


class InfluxDB1(ServerProcess):
    name = "influxd"

    def __init__(self, directory: Path, port: int | None = None) -> None:
        super().__init__(directory)
        self.host = HOST
        self.port = port or free_port()
        self.rpc_port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.config_path = directory / "influxdb.conf"
        self.config_path.write_text(
            f"""reporting-disabled = true
bind-address = "{HOST}:{self.rpc_port}"
[meta]
  dir = "{directory}/meta"
[data]
  dir = "{directory}/data"
  wal-dir = "{directory}/wal"
  query-log-enabled = false
  wal-fsync-delay = "0s"
[http]
  bind-address = "{HOST}:{self.port}"
  log-enabled = false
  max-body-size = 0
[logging]
  level = "warn"
[monitor]
  store-enabled = false
[continuous_queries]
  enabled = false
"""
        )

    def command(self) -> list[str]:
        return [_require("influxd"), "-config", str(self.config_path)]

    def is_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=0.5) as response:
                return bool(response.status == 204)
        except OSError:
            return False

    # --- queries ---------------------------------------------------------------------------------
    def query(self, statement: str, database: str | None = None) -> list[dict[str, Any]]:
        """Run InfluxQL; returns the series of the first result (raises on an error)."""
        params = {"q": statement, "epoch": "ns"}
        if database:
            params["db"] = database
        data = urllib.parse.urlencode(params).encode()
        request = urllib.request.Request(f"{self.url}/query", data=data)
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.loads(response.read())
        result = body["results"][0]
        if "error" in result:
            raise RuntimeError(f"InfluxQL error: {result['error']} ({statement})")
        return list(result.get("series", []))

    def rows(self, statement: str, database: str) -> list[dict[str, Any]]:
        """Every row of every series as a dict (tags of GROUP BY * merged in)."""
        rows: list[dict[str, Any]] = []
        for series in self.query(statement, database):
            tags = series.get("tags", {})
            for values in series["values"]:
                row = dict(zip(series["columns"], values, strict=True))
                row.update(tags)
                rows.append(row)
        return rows

    def count(self, database: str, measurement: str, field: str = "*") -> int:
        try:
            series = self.query(f'SELECT count({field}) FROM "{measurement}"', database)
        except RuntimeError:
            return 0
        if not series:
            return 0
        columns = series[0]["columns"]
        values = series[0]["values"][0]
        return max(int(v) for c, v in zip(columns, values, strict=True) if c != "time" and v)

    def create_database(self, name: str) -> None:
        self.query(f'CREATE DATABASE "{name}"')

    def write(self, database: str, body: str) -> None:
        request = urllib.request.Request(
            f"{self.url}/write?db={urllib.parse.quote(database)}", data=body.encode()
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 204
