"""An HTTP stand-in for InfluxDB 2.x and 3 Core that models their documented write behaviour.

No InfluxDB 2.x or 3.x server can be installed here, so this one stores what it accepts and
refuses what they refuse, the way they answer:

InfluxDB 3 Core (3.10-3.11)
- ``/api/v3/write_lp?db=&precision=&accept_partial=``: lines are validated one by one; with
  ``accept_partial`` (the default) the valid ones are stored and the answer is 400 — 422 when a
  line hit a limit — with ``{"error":"partial write of line protocol occurred","data":[{
  "original_line","line_number","error_message"}]}``; without it nothing is stored.
- ``/write`` and ``/api/v2/write``: the whole batch is refused (400) at the first bad line,
  ``data`` a single object (inside ``{"code","message"}`` on the v2 path).
- At most 5 databases (created on the first write; the sixth is 422 for the whole request),
  2,000 tables, 500 columns per table (time + tags + fields), checked per line. A field named
  like a tag of its table (or the reverse) and a field of another type are line errors.
- Bodies over 10 MiB after gunzip: 413. String values over 1 MiB: a line error.
- Names and tag values: ``\\\\``, ``\\,``, ``\\=``, ``\\ `` are escapes, any other backslash is
  kept, a trailing one is an error. ``Authorization: Bearer|Token <token>``.

InfluxDB 2.x (2.9)
- ``/api/v2/write?org=&bucket=``: a missing bucket is 404; a parse error refuses the batch
  (400); a field type conflict or a point outside the bucket's retention is 422 ``partial
  write: ... dropped=N`` and the other points are stored. Strings over 1 MiB: 400.
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web

from ha_ingestor.line_protocol import ParsedLine, field_type, parse_line
from tests.sinks.conftest import serving

MAX_BODY = 10 * 1024 * 1024
MAX_STRING = 1024 * 1024


class LineRefusedError(Exception):
    def __init__(self, message: str, *, limit: bool = False) -> None:
        super().__init__(message)
        self.limit = limit


@dataclass
class Table:
    tags: set[str] = field(default_factory=set)
    fields: dict[str, str] = field(default_factory=dict)  # name -> type
    rows: dict[tuple[tuple[tuple[str, str], ...], int], dict[str, str]] = field(
        default_factory=dict
    )

    def columns(self) -> int:
        return 1 + len(self.tags) + len(self.fields)  # time, tags, fields


@dataclass
class Database:
    tables: dict[str, Table] = field(default_factory=dict)
    retention_ns: int | None = None


@dataclass
class InfluxStandIn:
    """Set ``flavour``; read ``databases`` (v2: buckets, which must exist) after writing."""

    flavour: Literal["v2", "v3"] = "v3"
    token: str = "standin-token"
    max_databases: int = 5
    max_tables: int = 2000
    max_columns: int = 500
    #: A lower column limit for some tables (by name): a table that is nearly full already.
    table_columns: dict[str, int] = field(default_factory=dict)
    databases: dict[str, Database] = field(default_factory=dict)
    writes: list[tuple[str, dict[str, str], list[str]]] = field(default_factory=list)
    url: str = ""

    # --- what tests read -------------------------------------------------------------------------
    def rows(self, database: str, table: str) -> list[dict[str, str]]:
        """Each stored point: tags and raw field values, keyed by name (``time`` too)."""
        stored = self.databases[database].tables[table].rows
        return [
            {**dict(tags), **values, "time": str(stamp)}
            for (tags, stamp), values in sorted(stored.items(), key=lambda kv: kv[0][1])
        ]

    def lines_sent(self) -> list[str]:
        return [line for _, _, lines in self.writes for line in lines]

    # --- HTTP ------------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/ping":
            return self._ping()
        if request.headers.get("Authorization") not in self._accepted_auth():
            return web.json_response(
                {"code": "unauthorized", "message": "unauthorized"}, status=401
            )
        raw = await request.read()
        body = gzip.decompress(raw) if request.headers.get("Content-Encoding") == "gzip" else raw
        if len(body) > MAX_BODY:
            return web.Response(status=413, text="Request Entity Too Large")
        if request.path not in ("/write", "/api/v2/write", "/api/v3/write_lp"):
            # InfluxQL's CREATE DATABASE (the v1 API's start-up) is not served by 2.x/3.x.
            return web.json_response({"error": "not supported"}, status=400)
        lines = [line for line in body.decode().split("\n") if line.strip()]
        self.writes.append((request.path, dict(request.query), lines))
        if self.flavour == "v2":
            return self._v2_write(request, lines)
        if request.path == "/api/v3/write_lp":
            partial = request.query.get("accept_partial", "true") == "true"
            return self._v3_write(request.query.get("db", ""), lines, partial=partial)
        name = request.query.get("db") or request.query.get("bucket", "")
        return self._v3_write(name, lines, partial=False, v2=request.path != "/write")

    def _ping(self) -> web.Response:
        if self.flavour == "v2":
            return web.Response(status=204, headers={"X-Influxdb-Version": "v2.9.0"})
        headers = {"X-Influxdb-Version": "3.11.0", "X-Influxdb-Build": "Core"}
        return web.json_response({"version": "3.11.0", "revision": "x"}, headers=headers)

    def _accepted_auth(self) -> set[str]:
        schemes = ("Bearer", "Token") if self.flavour == "v3" else ("Token",)
        return {f"{scheme} {self.token}" for scheme in schemes}

    # --- InfluxDB 3 ------------------------------------------------------------------------------
    def _v3_write(
        self, name: str, lines: list[str], *, partial: bool, v2: bool = False
    ) -> web.Response:
        if not lines:
            return web.json_response({"error": "no data: incoming write was empty"}, status=400)
        database = self.databases.get(name)
        if database is None:
            if len(self.databases) >= self.max_databases:
                message = f"Adding a new database would exceed the limit of {self.max_databases} databases"
                return web.json_response({"error": message}, status=422)
            database = self.databases[name] = Database()
        errors: list[dict[str, object]] = []
        limited = False
        accepted: list[ParsedLine] = []
        for number, line in enumerate(lines, 1):
            try:
                parsed = parse_line(line, v3=True)
                self._check_v3(database, parsed, accepted)
            except (LineRefusedError, ValueError) as exc:
                limited = limited or (isinstance(exc, LineRefusedError) and exc.limit)
                errors.append(
                    {"original_line": line, "line_number": number, "error_message": str(exc)}
                )
                if not partial:
                    break
                continue
            if partial:
                self._store(database, parsed)
            else:
                accepted.append(parsed)
        if not errors:
            for parsed in accepted:
                self._store(database, parsed)
            return web.Response(status=204)
        if partial:
            document = {"error": "partial write of line protocol occurred", "data": errors}
            return web.json_response(document, status=422 if limited else 400)
        error = {"error": "parsing failed for write_lp endpoint", "data": errors[0]}
        if v2:
            return web.json_response({"code": "invalid", "message": json.dumps(error)}, status=400)
        return web.json_response(error, status=400)

    def _check_v3(self, database: Database, line: ParsedLine, pending: list[ParsedLine]) -> None:
        """Raise LineRefusedError as InfluxDB 3 would for this line (schema as if ``pending`` were in)."""
        table = database.tables.get(line.measurement)
        if table is None:
            if len(database.tables) >= self.max_tables:
                raise LineRefusedError(
                    f"Adding a new table would exceed the limit of {self.max_tables} tables",
                    limit=True,
                )
            table = Table()
        tags, fields = set(table.tags), dict(table.fields)
        for earlier in pending:
            if earlier.measurement == line.measurement:
                tags.update(earlier.tags)
                fields.update({k: field_type(v) for k, v in earlier.fields.items()})
        for name in line.tags:
            if name in fields:
                raise LineRefusedError(
                    f"invalid column type: tag {name!r} is a field of {line.measurement}"
                )
        for name, raw in line.fields.items():
            kind = field_type(raw)
            if name in tags:
                raise LineRefusedError(
                    f"invalid column type: field {name!r} is a tag of {line.measurement}"
                )
            if fields.get(name, kind) != kind:
                raise LineRefusedError(
                    f"invalid column type for column '{name}', expected {fields[name]}, got {kind}"
                )
            if kind == "string" and len(raw) - 2 > MAX_STRING:
                raise LineRefusedError(f"field {name!r} is longer than {MAX_STRING} bytes")
        new = len(set(line.tags) - tags) + len(set(line.fields) - set(fields))
        limit = self.table_columns.get(line.measurement, self.max_columns)
        if 1 + len(tags) + len(fields) + new > limit:
            raise LineRefusedError(
                f"Update to schema would exceed the limit of {limit} columns per table",
                limit=True,
            )

    # --- InfluxDB 2.x ----------------------------------------------------------------------------
    def _v2_write(self, request: web.Request, lines: list[str]) -> web.Response:
        name = request.query.get("bucket", "")
        database = self.databases.get(name)
        if request.path != "/api/v2/write" or database is None:
            return web.json_response(
                {"code": "not found", "message": f'bucket "{name}" not found'}, status=404
            )
        parsed: list[ParsedLine] = []
        for line in lines:
            try:
                point = parse_line(line)
                if any(v[:1] == '"' and len(v) - 2 > MAX_STRING for v in point.fields.values()):
                    raise ValueError("max string length exceeded")
            except ValueError as exc:
                message = f"unable to parse '{line[:100]}': {exc}"
                return web.json_response({"code": "invalid", "message": message}, status=400)
            parsed.append(point)
        dropped, first_conflict, beyond_retention = 0, "", False
        now = time.time_ns()
        for point in parsed:
            if database.retention_ns and (point.time_ns or now) < now - database.retention_ns:
                dropped, beyond_retention = dropped + 1, True
                continue
            table = database.tables.get(point.measurement) or Table()
            conflict = next(
                (
                    (k, field_type(v), table.fields[k])
                    for k, v in point.fields.items()
                    if table.fields.get(k, field_type(v)) != field_type(v)
                ),
                None,
            )
            if conflict is not None:
                dropped += 1
                if not first_conflict:
                    first_conflict = (
                        f'field type conflict: input field "{conflict[0]}" on measurement '
                        f'"{point.measurement}" is type {conflict[1]}, already exists as type '
                        f"{conflict[2]}"
                    )
                continue
            self._store(database, point)
        if not dropped:
            return web.Response(status=204)
        reason = first_conflict or "points beyond retention policy"
        message = f"failure writing points to database: partial write: {reason} dropped={dropped}"
        assert first_conflict or beyond_retention
        return web.json_response({"code": "unprocessable entity", "message": message}, status=422)

    # --- storage ---------------------------------------------------------------------------------
    def _store(self, database: Database, line: ParsedLine) -> None:
        table = database.tables.setdefault(line.measurement, Table())
        table.tags.update(line.tags)
        table.fields.update({k: field_type(v) for k, v in line.fields.items()})
        key = (tuple(sorted(line.tags.items())), line.time_ns or time.time_ns())
        table.rows.setdefault(key, {}).update(line.fields)


@asynccontextmanager
async def serve(standin: InfluxStandIn) -> AsyncIterator[InfluxStandIn]:
    """``standin`` answering on a free loopback port (``standin.url``)."""
    async with serving(standin.handle) as url:
        standin.url = url
        yield standin
