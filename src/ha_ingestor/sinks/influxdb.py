"""InfluxDB HTTP API: detection, write endpoints (v1, v2, v3) and their answers, classified.

Only this module knows the endpoints and their authentication; the writer sees one
``write(body)`` that returns a :class:`WriteResult` whose ``outcome`` says what to do
(DESIGN §5). Foreign exceptions (aiohttp, timeouts) are translated here, once.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any

import aiohttp
import orjson

from ha_ingestor.config import InfluxApi, Settings


class Outcome(StrEnum):
    OK = "ok"
    RETRY = "retryable"  # 429, 5xx, timeouts, connection errors: keep and back off
    REJECTED = "rejected"  # 400/422: bad lines in the batch
    AUTH = "auth"  # 401/403
    NOT_FOUND = "not_found"  # 404: database or bucket missing
    TOO_LARGE = "too_large"  # 413


@dataclass(frozen=True, slots=True)
class WriteResult:
    outcome: Outcome
    status: int | None = None
    message: str = ""
    retry_after: float | None = None


class InfluxUnavailableError(Exception):
    """InfluxDB could not be reached or identified (detection, database creation)."""


def _api_from_version(version: str) -> InfluxApi | None:
    version = version.strip().lstrip("vV")
    if version[:1] == "1":
        return InfluxApi.V1
    if version[:1] == "2":
        return InfluxApi.V2
    if version[:1] == "3":
        return InfluxApi.V3
    return None


def classify(status: int, body: str, headers: Any = None) -> WriteResult:
    """Map an HTTP answer to what the writer must do with the batch."""
    message = _error_message(body)
    if 200 <= status < 300:
        return WriteResult(Outcome.OK, status)
    if status in (401, 403):
        return WriteResult(Outcome.AUTH, status, message)
    if status == 404:
        return WriteResult(Outcome.NOT_FOUND, status, message)
    if status == 413:
        return WriteResult(Outcome.TOO_LARGE, status, message)
    if status in (400, 422):
        return WriteResult(Outcome.REJECTED, status, message)
    retry_after = _retry_after(headers.get("Retry-After") if headers is not None else None)
    return WriteResult(Outcome.RETRY, status, message, retry_after)


def _error_message(body: str) -> str:
    body = body.strip()
    if body.startswith("{"):
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body[:2000]
        if isinstance(document, dict):
            for key in ("error", "message", "data"):
                if key in document:
                    value = document[key]
                    return (
                        value[:2000]
                        if isinstance(value, str)
                        else orjson.dumps(value).decode()[:2000]
                    )
    return body[:2000]


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


class InfluxClient:
    """Writes line protocol to one InfluxDB over a session the caller owns."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self._settings = settings
        self._session = session
        self._base = settings.influx_url
        self.api: InfluxApi | None = (
            None if settings.influx_api == InfluxApi.AUTO else settings.influx_api
        )
        self._timeout = aiohttp.ClientTimeout(total=settings.influx_timeout)
        self.version: str | None = None

    # --- detection and preparation ---------------------------------------------------------------
    async def ping(self) -> tuple[int, str | None]:
        """(status, version) of ``GET /ping``; raises InfluxUnavailableError if unreachable."""
        headers = self._token_header("Token")
        try:
            async with self._session.get(
                f"{self._base}/ping", headers=headers, timeout=self._timeout
            ) as response:
                version = response.headers.get("X-Influxdb-Version")
                if version is None and response.content_type == "application/json":
                    body = await response.json(loads=orjson.loads)
                    if isinstance(body, dict) and isinstance(body.get("version"), str):
                        version = body["version"]
                return response.status, version
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise InfluxUnavailableError(f"{self._base}/ping: {_describe(exc)}") from None

    async def detect(self) -> InfluxApi:
        if self.api is not None:
            return self.api
        status, version = await self.ping()
        self.version = version
        api = _api_from_version(version) if version else None
        if api is None:
            if status == 401:
                api = InfluxApi.V3  # only InfluxDB 3 guards /ping with a token
            elif self._settings.influx_bucket:
                api = InfluxApi.V2  # InfluxDB Cloud sends no version header
            else:
                api = InfluxApi.V1
        self.api = api
        return api

    async def prepare(self) -> InfluxApi:
        """Detect the API and, on v1, create the database if it is missing."""
        api = await self.detect()
        if api == InfluxApi.V1:
            await self.create_database()
        return api

    async def create_database(self) -> None:
        name = self._settings.influx_database.replace("\\", "\\\\").replace('"', '\\"')
        try:
            async with self._session.post(
                f"{self._base}/query",
                data={"q": f'CREATE DATABASE "{name}"'},
                headers=self._auth_headers(InfluxApi.V1),
                timeout=self._timeout,
            ) as response:
                body = await response.text()
                if response.status in (401, 403):
                    raise InfluxUnavailableError(
                        f"not allowed to create database {self._settings.influx_database!r} "
                        f"(HTTP {response.status}); create it or grant the user admin rights"
                    )
                if response.status >= 300:
                    raise InfluxUnavailableError(
                        f"CREATE DATABASE failed: HTTP {response.status}: {_error_message(body)}"
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise InfluxUnavailableError(f"{self._base}/query: {_describe(exc)}") from None

    # --- writing ---------------------------------------------------------------------------------
    def write_url(self) -> tuple[str, dict[str, str]]:
        settings = self._settings
        api = self.api or InfluxApi.V1
        if api == InfluxApi.V2:
            params = {
                "org": settings.influx_org or "",
                "bucket": settings.influx_bucket or "",
                "precision": "ns",
            }
            return f"{self._base}/api/v2/write", params
        if api == InfluxApi.V3:
            params = {"db": settings.influx_database, "precision": "nanosecond"}
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
                text = await response.text() if response.status >= 300 else ""
                return classify(response.status, text, response.headers)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return WriteResult(Outcome.RETRY, None, _describe(exc))

    def _token_header(self, scheme: str) -> dict[str, str]:
        token = self._settings.influx_token
        return {"Authorization": f"{scheme} {token.get_secret_value()}"} if token else {}

    def _auth_headers(self, api: InfluxApi | None) -> dict[str, str]:
        settings = self._settings
        if api == InfluxApi.V3:
            return self._token_header("Bearer")
        if api == InfluxApi.V2:
            return self._token_header("Token")
        if settings.influx_username:
            password = (
                settings.influx_password.get_secret_value() if settings.influx_password else ""
            )
            raw = f"{settings.influx_username}:{password}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        return self._token_header("Token")  # InfluxDB 2/3 v1-compatibility endpoints

    # --- `ha-ingestor check` ---------------------------------------------------------------------
    async def check(self) -> str:
        """Reach InfluxDB, identify it, and prove a write is accepted (an empty write)."""
        try:
            api = await self.prepare()
        except InfluxUnavailableError as exc:
            from ha_ingestor.checks import CheckError

            raise CheckError(str(exc)) from None
        result = await self.write(b"")
        where = (
            self._settings.influx_bucket if api == InfluxApi.V2 else self._settings.influx_database
        )
        version = f" {self.version}" if self.version else ""
        if result.outcome in (Outcome.OK, Outcome.REJECTED):
            # An empty body is "no data" to some versions (400): auth and target were accepted.
            return f"InfluxDB{version} ({api.value} API), writing to {where!r}"
        from ha_ingestor.checks import CheckError

        if result.outcome == Outcome.AUTH:
            raise CheckError(
                f"{api.value} API refused the credentials (HTTP {result.status}): check "
                "HA_INGESTOR_INFLUX_TOKEN or _USERNAME/_PASSWORD"
            )
        if result.outcome == Outcome.NOT_FOUND:
            raise CheckError(f"{where!r} does not exist (HTTP 404): {result.message}")
        raise CheckError(f"write failed: {result.status or ''} {result.message}".strip())


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
