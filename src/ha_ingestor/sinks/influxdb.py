"""InfluxDB HTTP API: detection, write endpoints (v1, v2, v3) and their answers, classified.

Only this module knows the endpoints and their authentication; the writer sees one
``write(body)`` that returns a :class:`WriteResult` whose ``outcome`` says what to do with the
batch (DESIGN §5). Foreign exceptions (aiohttp, timeouts) are translated here, once:
``write`` never raises for transport errors, ``ping``/``detect``/``prepare`` raise
:class:`InfluxUnavailableError`.

Endpoints
- v1 (InfluxDB 1.x): ``POST /write?db=&rp=&precision=ns``; credentials as HTTP basic auth (never
  the ``u``/``p`` query parameters, so they cannot end up in a logged URL). Without a user name
  a token is sent as ``Authorization: Token`` (the 1.x-compatible API of InfluxDB 2 and 3).
  A missing database is created with ``CREATE DATABASE``.
- v2 (InfluxDB 2.x, Cloud): ``POST /api/v2/write?org=&bucket=&precision=ns`` with
  ``Authorization: Token``. Without a bucket setting the database name is the bucket.
- v3 (InfluxDB 3 Core/Enterprise): ``POST /api/v3/write_lp?db=&precision=nanosecond`` with
  ``Authorization: Bearer`` (v3 creates a missing database on the first write). InfluxDB 3 also
  serves the v1 and v2 write endpoints above, so either setting works against it.

``auto`` asks ``GET /ping``: InfluxDB 1.x answers 204 with ``X-Influxdb-Version: 1.x``, 2.x
answers 204 with ``2.x`` (InfluxDB Cloud sends no version), InfluxDB 3 answers 200 with
``X-Influxdb-Version: 3.x``, ``X-Influxdb-Build: Core|Enterprise`` and a JSON body with
``version`` — or 401 when the token is missing, since only InfluxDB 3 guards ``/ping``.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum

import aiohttp
import orjson
from yarl import URL

from ha_ingestor.config import InfluxApi, Settings
from ha_ingestor.errors import CheckError, describe

__all__ = [
    "InfluxClient",
    "InfluxUnavailableError",
    "LineError",
    "Outcome",
    "WriteResult",
    "classify",
    "is_limit_message",
]

_MAX_MESSAGE = 2000
_DROPPED = re.compile(r"dropped=(\d+)")
# InfluxDB 3 Core: "... would exceed the limit of 500 columns per table", "... table limit ...".
_LIMIT = re.compile(
    r"\blimit\b.*\b(column|table|database)s?\b|\b(column|table|database)s?\b.*\blimit\b"
)
# Answers about the request rather than its lines: bisecting would dead-letter every line.
_REQUEST_ERRORS = (
    "database is required",  # v1: no db parameter
    "retention policy not found",  # v1: unknown rp (HTTP 500)
    "orgid or org",  # v2: no organisation given
    "organization name",  # v2: unknown organisation
    "db name",  # v3: invalid database name
    "database or rp name",  # v3: invalid database name
)


class Outcome(StrEnum):
    OK = "ok"
    RETRY = "retryable"  # 429, 5xx, timeouts, connection errors: keep and back off
    REJECTED = "rejected"  # 400/422: bad lines in the batch (bisect, dead-letter the bad ones)
    AUTH = "auth"  # 401/403: keep everything, not ready, retry slowly
    NOT_FOUND = "not_found"  # 404: database or bucket missing (created on v1)
    TOO_LARGE = "too_large"  # 413: split the batch
    CONFIG = "config"  # the request itself is wrong (organisation, retention policy): as AUTH
    PARTIAL = "partial"  # v3: the good lines are stored, ``line_errors`` lists the others
    LIMIT = "limit"  # a column, table or database limit, or a deleted database: as AUTH


@dataclass(frozen=True, slots=True)
class LineError:
    """One line the server refused: its 1-based number in the request body and why."""

    line_number: int
    message: str
    original_line: str = ""

    @property
    def is_limit(self) -> bool:
        """A limit of the server, not a fault of the line: the line is kept and retried."""
        return is_limit_message(self.message)


@dataclass(frozen=True, slots=True)
class WriteResult:
    outcome: Outcome
    status: int | None = None  # None: no HTTP answer (connection error, timeout)
    message: str = ""  # the server's reason, or the transport error
    retry_after: float | None = None  # seconds, from Retry-After
    line_errors: tuple[LineError, ...] = ()  # v3: the refused lines, by number
    dropped: int | None = None  # 1.x/2.x "partial write: ... dropped=N": the others are stored

    def describe(self) -> str:
        if self.status is None:
            return self.message
        return f"HTTP {self.status}: {self.message}" if self.message else f"HTTP {self.status}"


class InfluxUnavailableError(Exception):
    """InfluxDB could not be reached or identified (detection, database creation)."""


def classify(status: int, body: str, headers: Mapping[str, str] | None = None) -> WriteResult:
    """Map an HTTP answer to what the writer must do with the batch."""
    if 200 <= status < 300:
        return WriteResult(Outcome.OK, status)
    document = _json_document(body)
    message = error_message(body) or (headers or {}).get("X-Influxdb-Error", "")
    lowered = message.lower()
    if status in (401, 403):
        return WriteResult(Outcome.AUTH, status, message)
    if status == 404:
        return WriteResult(Outcome.NOT_FOUND, status, message)
    if status == 413:
        return WriteResult(Outcome.TOO_LARGE, status, message)
    if "partial write" not in lowered and any(e in lowered for e in _REQUEST_ERRORS):
        return WriteResult(Outcome.CONFIG, status, message)
    if status in (400, 422):
        line_errors = _line_errors(document)
        data = document.get("data") if document else None
        if isinstance(data, list) and line_errors:
            # v3 write_lp with accept_partial: every line but the listed ones is stored.
            return WriteResult(Outcome.PARTIAL, status, message, line_errors=line_errors)
        if is_limit_message(lowered):
            return WriteResult(Outcome.LIMIT, status, message)
        dropped = _DROPPED.search(message) if "partial write" in lowered else None
        return WriteResult(
            Outcome.REJECTED,
            status,
            message,
            line_errors=line_errors,
            dropped=int(dropped.group(1)) if dropped else None,
        )
    retry_after = parse_retry_after((headers or {}).get("Retry-After"))
    return WriteResult(Outcome.RETRY, status, message, retry_after)


def is_limit_message(message: str) -> bool:
    """InfluxDB 3's column/table/database limits, and writes to a deleted database."""
    lowered = message.lower()
    return bool(_LIMIT.search(lowered)) or ("database" in lowered and "deleted" in lowered)


def _json_document(body: str) -> dict[str, object] | None:
    """The error body as a JSON object; InfluxDB 3's v2 endpoint may wrap the v3 form as a
    JSON text in ``message``."""
    body = body.strip()
    if not body.startswith("{"):
        return None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    inner = document.get("message")
    if "data" not in document and isinstance(inner, str) and inner.lstrip().startswith("{"):
        nested = _json_document(inner)
        if nested is not None:
            return nested
    return document


def _line_errors(document: dict[str, object] | None) -> tuple[LineError, ...]:
    """``data`` as a list (v3 partial write) or as one object (v3's /write and /api/v2/write)."""
    if document is None:
        return ()
    data = document.get("data")
    items = data if isinstance(data, list) else [data] if isinstance(data, dict) else []
    errors: list[LineError] = []
    for item in items:
        if not isinstance(item, dict):
            return ()
        number = item.get("line_number")
        if type(number) is not int or number < 1:
            return ()  # not a form this client understands: fall back to bisecting
        errors.append(
            LineError(
                number, str(item.get("error_message", "")), str(item.get("original_line", ""))
            )
        )
    return tuple(errors)


def error_message(body: str) -> str:
    """The reason in an error body: v1 ``{"error"}``, v2 ``{"code","message"}``, v3
    ``{"error","data":[{"line_number","error_message",...}]}`` or ``"data"`` as one object,
    or plain text."""
    document = _json_document(body)
    if document is None:
        return body.strip()[:_MAX_MESSAGE]
    message = document.get("error") or document.get("message") or ""
    if not isinstance(message, str):
        message = orjson.dumps(message).decode()
    data = document.get("data")
    items = data if isinstance(data, list) else [data] if isinstance(data, dict) else []
    if items:
        details = [
            f"line {item.get('line_number', '?')}: {item.get('error_message', '')}"
            if isinstance(item, dict)
            else str(item)
            for item in items
        ]
        message = f"{message}: {'; '.join(details)}" if message else "; ".join(details)
    return (message or body.strip())[:_MAX_MESSAGE]


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, moment.timestamp() - time.time())


def api_from_version(version: str) -> InfluxApi | None:
    version = version.strip().lstrip("vV")
    return {"1": InfluxApi.V1, "2": InfluxApi.V2, "3": InfluxApi.V3}.get(version[:1])


class InfluxClient:
    """Writes line protocol to one InfluxDB over a session the caller owns."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self._settings = settings
        self._session = session
        url = URL(settings.influx_url)
        # Credentials in the URL would clash with the Authorization header and leak into
        # messages: take them out, and use them as v1 credentials if none are set.
        self._url_user = url.user
        self._url_password = url.password
        self._base = str(url.with_user(None).with_password(None)).rstrip("/")
        self.api: InfluxApi | None = (
            None if settings.influx_api == InfluxApi.AUTO else settings.influx_api
        )
        self.version: str | None = None
        self.build: str | None = None
        self._timeout = aiohttp.ClientTimeout(total=settings.influx_timeout)

    @property
    def url(self) -> str:
        """The base URL without credentials (safe to log)."""
        return self._base

    @property
    def target(self) -> str:
        """The database (v1, v3) or bucket (v2) written to."""
        settings = self._settings
        if self.api == InfluxApi.V2:
            return settings.influx_bucket or settings.influx_database
        return settings.influx_database

    # --- detection and preparation ---------------------------------------------------------------
    async def ping(self) -> tuple[int, str | None]:
        """(status, version) of ``GET /ping``; raises InfluxUnavailableError if unreachable."""
        try:
            async with self._session.get(
                f"{self._base}/ping", headers=self._token_header("Token"), timeout=self._timeout
            ) as response:
                version = response.headers.get("X-Influxdb-Version")
                self.build = response.headers.get("X-Influxdb-Build")
                if version is None and response.content_type == "application/json":
                    body = orjson.loads(await response.read() or b"null")
                    if isinstance(body, dict) and isinstance(body.get("version"), str):
                        version = body["version"]
                return response.status, version
        except (aiohttp.ClientError, TimeoutError, OSError, orjson.JSONDecodeError) as exc:
            raise InfluxUnavailableError(f"{self._base}/ping: {describe(exc)}") from None

    async def detect(self) -> InfluxApi:
        """The API to use: the setting, or for ``auto`` what ``/ping`` says."""
        if self.api is not None:
            return self.api
        status, version = await self.ping()
        if status >= 500:
            raise InfluxUnavailableError(f"{self._base}/ping: HTTP {status}")
        self.version = version
        api = api_from_version(version) if version else None
        if api is None:
            if status == 401:
                api = InfluxApi.V3  # only InfluxDB 3 guards /ping with a token
            elif self._settings.influx_bucket or self._settings.influx_org:
                api = InfluxApi.V2  # InfluxDB Cloud sends no version header
            else:
                api = InfluxApi.V1
        self.api = api
        return api

    async def prepare(self) -> WriteResult | None:
        """Detect the API and, on v1, create the database (idempotent).

        Returns the answer to ``CREATE DATABASE`` (v1) — AUTH when the user may not create
        databases, which is fine if it exists — or None. Raises InfluxUnavailableError when
        InfluxDB cannot be reached.
        """
        api = await self.detect()
        if api != InfluxApi.V1:
            return None
        result = await self.create_database()
        if result.outcome == Outcome.RETRY:
            raise InfluxUnavailableError(f"{self._base}/query: {result.describe()}")
        return result

    async def create_database(self) -> WriteResult:
        """``CREATE DATABASE`` on v1 (a no-op if it exists). Never raises."""
        name = self._settings.influx_database.replace("\\", "\\\\").replace('"', '\\"')
        try:
            async with self._session.post(
                f"{self._base}/query",
                data={"q": f'CREATE DATABASE "{name}"'},
                headers=self._auth_headers(InfluxApi.V1),
                timeout=self._timeout,
            ) as response:
                body = await response.text()
                result = classify(response.status, body, response.headers)
                error = _statement_error(body) if result.outcome == Outcome.OK else None
                if error is not None:
                    # InfluxQL errors come back as 200 with {"results":[{"error":...}]}.
                    outcome = Outcome.AUTH if "authoriz" in error else Outcome.CONFIG
                    return WriteResult(outcome, response.status, error)
                return result
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return WriteResult(Outcome.RETRY, None, describe(exc))

    # --- writing ---------------------------------------------------------------------------------
    def write_url(self) -> tuple[str, dict[str, str]]:
        """Endpoint and query parameters of a write (no secrets in either)."""
        settings = self._settings
        api = self.api or InfluxApi.V1
        if api == InfluxApi.V2:
            params = {"org": settings.influx_org or "", "bucket": self.target, "precision": "ns"}
            if not settings.influx_org:
                del params["org"]  # InfluxDB 3's v2 endpoint needs none; 2.x says what is wrong
            return f"{self._base}/api/v2/write", params
        if api == InfluxApi.V3:
            # accept_partial (the default, said so): the good lines of a batch are stored and
            # the answer lists the others by number, settled without sending anything twice.
            params = {
                "db": settings.influx_database,
                "precision": "nanosecond",
                "accept_partial": "true",
            }
            return f"{self._base}/api/v3/write_lp", params
        params = {"db": settings.influx_database, "precision": "ns"}
        if settings.influx_retention_policy:
            params["rp"] = settings.influx_retention_policy
        return f"{self._base}/write", params

    async def write(self, body: bytes) -> WriteResult:
        """POST one batch (newline-separated lines). Never raises for transport errors."""
        url, params = self.write_url()
        headers = {"Content-Type": "text/plain; charset=utf-8", **self._auth_headers(self.api)}
        if self._settings.influx_compress:
            loop = asyncio.get_running_loop()
            body = await loop.run_in_executor(None, gzip.compress, body, 1)
            headers["Content-Encoding"] = "gzip"
        try:
            # A file-like body: aiohttp streams it instead of warning about a large bytes body.
            async with self._session.post(
                url, params=params, data=io.BytesIO(body), headers=headers, timeout=self._timeout
            ) as response:
                text = await response.text(errors="replace") if response.status >= 300 else ""
                return classify(response.status, text, response.headers)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return WriteResult(Outcome.RETRY, None, describe(exc))

    def _token_header(self, scheme: str) -> dict[str, str]:
        token = self._settings.influx_token
        return {"Authorization": f"{scheme} {token.get_secret_value()}"} if token else {}

    def _auth_headers(self, api: InfluxApi | None) -> dict[str, str]:
        settings = self._settings
        if api == InfluxApi.V3:
            return self._token_header("Bearer")
        if api == InfluxApi.V2:
            return self._token_header("Token")
        username = settings.influx_username or self._url_user
        if username:
            if settings.influx_password is not None:
                password = settings.influx_password.get_secret_value()
            else:
                password = self._url_password or ""
            raw = f"{username}:{password}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        return self._token_header("Token")  # the v1-compatible endpoints of InfluxDB 2 and 3

    # --- `ha-ingestor check` ---------------------------------------------------------------------
    async def check(self) -> str:
        """Reach InfluxDB, identify it, and prove that a write would be accepted.

        Sends an empty write, which every version answers only after checking credentials and
        the database or bucket (v1: 204; v2 and v3: 400 "no data", which means the same).
        Returns a one-line summary; raises ``CheckError`` with a message per problem.
        """
        try:
            if self.api is not None:
                _, self.version = await self.ping()  # reachable? (and which version)
            created = await self.prepare()
        except InfluxUnavailableError as exc:
            raise CheckError(f"cannot reach InfluxDB: {exc}") from None
        api = self.api or InfluxApi.V1
        result = await self.write(b"")
        found = f"InfluxDB {self.version}" if self.version else "InfluxDB"
        summary = f"{found} at {self._base} ({api.value} API), writing to {self.target!r}"
        if result.outcome == Outcome.OK or (
            result.outcome == Outcome.REJECTED and _means_no_data(result.message)
        ):
            return summary
        raise CheckError(self._check_failure(api, result, created))

    def _check_failure(
        self, api: InfluxApi, result: WriteResult, created: WriteResult | None
    ) -> str:
        settings = self._settings
        what = "bucket" if api == InfluxApi.V2 else "database"
        prefix = f"{self._base} ({api.value} API)"
        if result.status == 401:
            if api == InfluxApi.V1 and (settings.influx_username or self._url_user):
                hint = "check HA_INGESTOR_INFLUX_USERNAME and HA_INGESTOR_INFLUX_PASSWORD"
            elif settings.influx_token is None:
                hint = "set HA_INGESTOR_INFLUX_TOKEN"
            else:
                hint = "check HA_INGESTOR_INFLUX_TOKEN"
            return f"{prefix}: credentials refused (HTTP 401): {hint}"
        if result.status == 403:
            return (
                f"{prefix}: not allowed to write to {what} {self.target!r} (HTTP 403): "
                "grant the user or token write access"
            )
        if result.outcome == Outcome.NOT_FOUND:
            detail = f"{what} {self.target!r} not found"
            if api == InfluxApi.V2 and settings.influx_org:
                detail = f"{what} {self.target!r} or organisation {settings.influx_org!r} not found"
            if created is not None and created.outcome != Outcome.OK:
                detail += f", and creating it failed ({created.describe()})"
            text = f"{prefix}: {detail} (HTTP 404): {result.message}".rstrip(": ")
            if api == InfluxApi.V2:
                text += (
                    " — set HA_INGESTOR_INFLUX_BUCKET to an existing bucket"
                    " (and HA_INGESTOR_INFLUX_ORG to its organisation)"
                )
            return text
        if result.outcome == Outcome.RETRY:
            return f"{prefix}: write failed ({result.describe()})"
        return f"{prefix}: write refused ({result.describe()})"


def _statement_error(body: str) -> str | None:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    results = document.get("results") if isinstance(document, dict) else None
    if isinstance(results, list) and results and isinstance(results[0], dict):
        error = results[0].get("error")
        return str(error) if error else None
    return None


def _means_no_data(message: str) -> bool:
    lowered = message.lower()
    return not lowered or any(
        words in lowered for words in ("empty", "requires points", "no data", "no points")
    )
