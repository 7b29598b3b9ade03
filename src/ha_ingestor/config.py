"""Settings, read once at start-up from ``HA_INGESTOR_*`` environment variables.

Every secret can also come from a file: ``HA_INGESTOR_<NAME>_FILE`` names a file whose content
(trailing newline stripped) is the value. Invalid or missing values raise :class:`ConfigError`
naming the variable and what is wrong; secret values never appear in that message.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "HA_INGESTOR_"

#: Settings that may be given as ``<NAME>_FILE``.
SECRET_FIELDS = (
    "mqtt_password",
    "ha_token",
    "influx_token",
    "influx_password",
)


class ConfigError(Exception):
    """A setting is missing or invalid. ``variable`` names the environment variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class InfluxApi(StrEnum):
    AUTO = "auto"
    V1 = "v1"
    V2 = "v2"
    V3 = "v3"


class LogFormat(StrEnum):
    JSON = "json"
    CONSOLE = "console"


class OverflowPolicy(StrEnum):
    """What the spool does when it reaches its byte cap."""

    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


CsvList = list[str]
#: ``ha_state`` fields that HA_INGESTOR_HA_STATE_FIELDS_ALWAYS can put on every point.
STATE_FIELD_CHOICES = frozenset(
    {"attributes", "context", "last_changed", "last_reported", "previous_state"}
)


class Settings(BaseModel):
    """All configuration. Field descriptions are the user-facing reference (docs/configuration.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- MQTT source ---------------------------------------------------------------------------
    mqtt_host: str | None = Field(
        None, description="Broker host name or address; setting it enables the MQTT source."
    )
    mqtt_port: int | None = Field(
        None, ge=1, le=65535, description="Broker port. Default 1883, or 8883 when TLS is on."
    )
    mqtt_username: str | None = Field(None, description="Broker user name.")
    mqtt_password: SecretStr | None = Field(None, description="Broker password (secret).")
    mqtt_topics: CsvList = Field(
        default_factory=lambda: ["#"], description="Comma-separated subscription filters."
    )
    mqtt_exclude_topics: CsvList = Field(
        default_factory=list, description="Comma-separated topic filters that are never stored."
    )
    mqtt_qos: int = Field(1, ge=0, le=2, description="Subscription QoS: 0, 1 or 2.")
    mqtt_client_id: str = Field(
        default_factory=lambda: f"ha-ingestor-{socket.gethostname()}",
        description="Client id; a stable id keeps a persistent session on the broker.",
    )
    mqtt_protocol: str = Field(
        "auto",
        pattern="^(auto|5|3.1.1)$",
        description="MQTT protocol: `5`, `3.1.1`, or `auto` (5 with fallback to 3.1.1).",
    )
    mqtt_session_expiry: int = Field(
        86400,
        ge=0,
        description="Seconds the broker keeps the session (and queues QoS 1/2 messages) while "
        "the ingestor is away. 0 = clean session on every connect.",
    )
    mqtt_keepalive: int = Field(30, ge=5, le=65535, description="MQTT keepalive in seconds.")
    mqtt_tls: bool = Field(False, description="Connect to the broker with TLS.")
    mqtt_ca_file: Path | None = Field(
        None,
        description="CA bundle that signs the broker certificate; needs `HA_INGESTOR_MQTT_TLS`.",
    )
    mqtt_cert_file: Path | None = Field(None, description="Client certificate (mutual TLS).")
    mqtt_key_file: Path | None = Field(None, description="Client private key (mutual TLS).")
    mqtt_tls_insecure: bool = Field(
        False, description="Skip broker certificate and host name verification (testing only)."
    )
    mqtt_max_payload_bytes: int = Field(
        65536,
        ge=64,
        le=1024 * 1024 - 1024,
        description="Payloads above this size are stored truncated and flagged. At most just "
        "under 1 MiB, the longest string InfluxDB 2.x and 3.x store (64 KiB before 3.9).",
    )
    mqtt_max_fields: int = Field(
        64, ge=0, description="Most numeric/boolean JSON leaves promoted to fields per message."
    )
    mqtt_discovery_prefix: str = Field(
        "homeassistant", description="Home Assistant MQTT discovery prefix."
    )

    # --- Home Assistant WebSocket source -------------------------------------------------------
    ha_url: str | None = Field(
        None,
        description="Home Assistant base URL (`http(s)://host:8123`); with a token, "
        "enables the WebSocket source.",
    )
    ha_token: SecretStr | None = Field(None, description="Long-lived access token (secret).")
    ha_event_types: CsvList = Field(
        default_factory=list, description="Event types to subscribe to (empty = all events)."
    )
    ha_exclude_event_types: CsvList = Field(
        default_factory=list, description="Event types never stored."
    )
    ha_include_entities: CsvList = Field(
        default_factory=list, description="Entity id globs to keep, e.g. `sensor.*` (empty = all)."
    )
    ha_exclude_entities: CsvList = Field(
        default_factory=list, description="Entity id globs never stored."
    )
    ha_exclude_attributes: CsvList = Field(
        default_factory=list, description="Attribute names left out of stored points."
    )
    ha_state_fields_always: CsvList = Field(
        default_factory=list,
        description="`ha_state` fields stored on every point rather than only when they carry "
        "information: any of `attributes` (default: when they change), `context` (default: "
        "when another stored event shares it), `last_changed` (default: when it differs from "
        "the point's time), `last_reported` (default: when it differs from the point's time; live "
        "points only), `previous_state` (default: never; it is the previous point's "
        "`state`), or `all`.",
    )
    ha_ca_file: Path | None = Field(None, description="CA bundle for an `https` Home Assistant.")
    ha_tls_insecure: bool = Field(
        False, description="Skip Home Assistant certificate verification (testing only)."
    )
    ha_ping_interval: float = Field(
        20.0, gt=0, description="Seconds between application pings to Home Assistant."
    )
    ha_ping_timeout: float = Field(
        10.0, gt=0, description="Seconds without a pong before the connection counts as dead."
    )
    ha_backfill_settle: float = Field(
        15.0,
        ge=0,
        description="Longest wait after a reconnect for Home Assistant's recorder to commit "
        "the gap (it writes in the background) before the gap is back-filled (0 = no wait).",
    )
    ha_max_held_events: int = Field(
        20_000,
        ge=100,
        description="Events held in memory while the buffer takes none (e.g. the spool's disk "
        "is full); newer ones are left to the back-fill: state changes come back from the "
        "recorder's history, other events are lost (counted).",
    )
    ha_backfill_max_hours: float = Field(
        24.0, ge=0, description="Longest gap back-filled from Home Assistant's history."
    )

    # --- InfluxDB sink ---------------------------------------------------------------------------
    influx_url: str = Field(
        description="InfluxDB base URL, e.g. `http://localhost:8086` (required)."
    )
    influx_api: InfluxApi = Field(
        InfluxApi.AUTO, description="`v1`, `v2`, `v3`, or `auto` (probe `/ping`)."
    )
    influx_database: str = Field(
        "home_assistant", description="Database for v1/v3 (created on v1 if missing)."
    )
    influx_retention_policy: str | None = Field(None, description="v1 retention policy.")
    influx_bucket: str | None = Field(None, description="v2 bucket.")
    influx_org: str | None = Field(None, description="v2 organisation.")
    influx_token: SecretStr | None = Field(None, description="v2/v3 API token (secret).")
    influx_username: str | None = Field(None, description="v1 user name.")
    influx_password: SecretStr | None = Field(None, description="v1 password (secret).")
    influx_ca_file: Path | None = Field(None, description="CA bundle for an `https` InfluxDB.")
    influx_tls_insecure: bool = Field(
        False, description="Skip InfluxDB certificate verification (testing only)."
    )
    influx_max_columns: int = Field(
        500,
        ge=0,
        description="Most columns (time, tags and fields) the ingestor gives one measurement: "
        "InfluxDB 3 Core's fixed limit. Promoted fields past it (JSON leaves, `attr_*`) stay "
        "only in `payload`/`attributes`. 0 = no limit (InfluxDB 1.x/2.x only).",
    )
    influx_batch_size: int = Field(5000, ge=1, description="Most lines per write request.")
    influx_flush_interval: float = Field(
        1.0, gt=0, description="Most seconds a point waits before it is written."
    )
    influx_concurrency: int = Field(2, ge=1, le=16, description="Write requests in flight at once.")
    influx_timeout: float = Field(
        10.0, gt=0, description="Seconds before a write request times out."
    )
    influx_gzip: str = Field(
        "auto",
        pattern="^(auto|true|false)$",
        description="Compress write requests with gzip (level 1): `true`, `false`, or `auto` "
        "(on, except for an InfluxDB on this host, where compressing only costs CPU).",
    )

    # --- Spool -------------------------------------------------------------------------------------
    spool_dir: Path = Field(
        Path("./data/spool"), description="Directory of the durable buffer (SQLite, WAL mode)."
    )
    spool_max_bytes: int = Field(
        1024**3, ge=1024 * 1024, description="Cap on the spool's size in bytes."
    )
    spool_overflow: OverflowPolicy = Field(
        OverflowPolicy.DROP_OLDEST,
        description="At the cap: `drop_oldest` deletes the oldest batches, `drop_newest` refuses "
        "new data. Either way the loss is logged and counted.",
    )
    spool_min_free_bytes: int = Field(
        64 * 1024**2,
        ge=0,
        description="Free space the spool leaves on its disk: when the disk (which it may share) "
        "has less, the overflow policy applies as at the cap, before the disk is full. 0 = off.",
    )
    spool_enabled: bool = Field(
        True, description="Keep the durable spool. Off = memory only (data is lost on a crash)."
    )
    spool_commit_interval: float = Field(
        0.005,
        gt=0,
        le=1,
        description="Seconds a spool group commit waits for more lines in a burst (commits "
        "back to back). When lines come slowly it waits for 16 of them, up to 0.2 s, then "
        "commits at once.",
    )

    # --- HTTP, logging, identity ---------------------------------------------------------------
    http_host: str = Field("0.0.0.0", description="Address of the health/metrics server.")  # noqa: S104
    http_port: int = Field(8000, ge=0, le=65535, description="Port of the health/metrics server.")
    log_level: str = Field(
        "INFO", pattern="^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$", description="Log level."
    )
    log_format: LogFormat = Field(LogFormat.JSON, description="`json` lines or `console`.")
    instance: str | None = Field(
        None, description="Value of the `instance` tag (default: HA location name, else host name)."
    )
    tags: dict[str, str] = Field(
        default_factory=dict, description="Static tags `k=v,k2=v2` added to every point."
    )
    shutdown_timeout: float = Field(
        10.0, gt=0, description="Seconds a graceful shutdown may take before it gives up."
    )

    @field_validator(
        "mqtt_topics",
        "mqtt_exclude_topics",
        "ha_event_types",
        "ha_exclude_event_types",
        "ha_include_entities",
        "ha_exclude_entities",
        "ha_exclude_attributes",
        "ha_state_fields_always",
        mode="before",
    )
    @classmethod
    def _csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("tags", mode="before")
    @classmethod
    def _tags(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        tags: dict[str, str] = {}
        for item in _split_csv(value):
            key, sep, val = item.partition("=")
            if not sep or not key.strip() or not val.strip():
                raise ValueError(f"expected k=v pairs separated by commas, got {item!r}")
            tags[key.strip()] = val.strip()
        return tags

    @field_validator("influx_url", "ha_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("ha_state_fields_always")
    @classmethod
    def _state_fields(cls, value: list[str]) -> list[str]:
        if "all" in value:
            return sorted(STATE_FIELD_CHOICES)
        unknown = sorted(set(value) - STATE_FIELD_CHOICES)
        if unknown:
            choices = ", ".join(sorted(STATE_FIELD_CHOICES))
            raise ValueError(f"unknown field {unknown[0]!r}: choose from {choices} or all")
        return value

    @field_validator("influx_database")
    @classmethod
    def _database(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.mqtt_host is None and not self.ha_enabled:
            if self.ha_url and self.ha_token is None:
                raise ValueError("HA_INGESTOR_HA_URL is set but HA_INGESTOR_HA_TOKEN is not")
            raise ValueError(
                "no source is enabled: set HA_INGESTOR_MQTT_HOST and/or "
                "HA_INGESTOR_HA_URL with HA_INGESTOR_HA_TOKEN"
            )
        if (self.mqtt_cert_file is None) != (self.mqtt_key_file is None):
            raise ValueError(
                "HA_INGESTOR_MQTT_CERT_FILE and HA_INGESTOR_MQTT_KEY_FILE must be set together"
            )
        tls_only = {
            "HA_INGESTOR_MQTT_CA_FILE": self.mqtt_ca_file is not None,
            "HA_INGESTOR_MQTT_CERT_FILE": self.mqtt_cert_file is not None,
            "HA_INGESTOR_MQTT_TLS_INSECURE": self.mqtt_tls_insecure,
        }
        given = [name for name, is_set in tls_only.items() if is_set]
        if given and not self.mqtt_tls:
            # Ignoring them would connect in plain text to a broker the user meant to reach
            # over TLS, password and all.
            raise ValueError(
                f"{', '.join(given)} set, but HA_INGESTOR_MQTT_TLS is not true: set "
                "HA_INGESTOR_MQTT_TLS=true to connect to the broker with TLS"
            )
        return self

    @property
    def mqtt_enabled(self) -> bool:
        return self.mqtt_host is not None

    @property
    def ha_enabled(self) -> bool:
        return self.ha_url is not None and self.ha_token is not None

    @property
    def influx_compress(self) -> bool:
        if self.influx_gzip != "auto":
            return self.influx_gzip == "true"
        host = urlsplit(self.influx_url).hostname or ""
        return host not in ("localhost", "::1") and not host.startswith("127.")

    @property
    def effective_mqtt_port(self) -> int:
        if self.mqtt_port is not None:
            return self.mqtt_port
        return 8883 if self.mqtt_tls else 1883


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _read_secret_files(environ: Mapping[str, str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for field in SECRET_FIELDS:
        file_var = env_name(field) + "_FILE"
        path = environ.get(file_var)
        if not path:
            continue
        if environ.get(env_name(field)):
            raise ConfigError(file_var, f"set together with {env_name(field)}; set only one")
        try:
            values[env_name(field)] = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(file_var, f"cannot read {path}: {exc.strerror}") from None
    return values


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``environ`` (default: the process environment)."""
    source = dict(os.environ if environ is None else environ)
    source.update(_read_secret_files(source))
    relevant = {k: v for k, v in source.items() if k.upper().startswith(ENV_PREFIX)}
    try:
        return Settings(**_as_init_kwargs(relevant))
    except ValidationError as exc:
        raise _config_error(exc) from None


def _as_init_kwargs(environ: Mapping[str, str]) -> dict[str, Any]:
    fields = Settings.model_fields
    file_vars = {env_name(field) + "_FILE" for field in SECRET_FIELDS}
    kwargs: dict[str, Any] = {}
    for key, value in environ.items():
        name = key[len(ENV_PREFIX) :].lower()
        if name in fields:
            kwargs[name] = value
        elif key.upper() not in file_vars:
            # A typo such as HA_INGESTOR_MQTT_HOTS would otherwise be ignored silently.
            raise ConfigError(key, "unknown setting (see docs/configuration.md)")
    return kwargs


def _config_error(exc: ValidationError) -> ConfigError:
    error = exc.errors(include_url=False, include_input=False)[0]
    loc = error.get("loc", ())
    variable = env_name(str(loc[0])) if loc else "configuration"
    message = str(error.get("msg", "invalid value"))
    if error.get("type") == "missing":
        message = "is required but not set"
    # Pydantic prefixes custom messages with "Value error, ".
    message = message.removeprefix("Value error, ")
    return ConfigError(variable, message)
