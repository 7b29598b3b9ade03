"""Command line: ``ha-ingestor run``, ``check``, ``import`` and ``--version``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from ha_ingestor import __version__
from ha_ingestor.config import ConfigError, Settings, load_settings
from ha_ingestor.telemetry import configure_logging

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ha-ingestor",
        description="Capture Home Assistant activity (MQTT and the event bus) into InfluxDB. "
        "Configured by HA_INGESTOR_* environment variables.",
    )
    parser.add_argument("--version", action="version", version=f"ha-ingestor {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run the service in the foreground (SIGTERM stops it)")
    commands.add_parser("check", help="validate the configuration and reach every endpoint")
    importing = commands.add_parser(
        "import",
        help="back-fill from Home Assistant's recorder (states and long-term statistics)",
        description="Back-fill InfluxDB from Home Assistant's recorder: state history as "
        "ha_state points (the same points the service writes) and long-term statistics as "
        "ha_statistics. Resumable (rerun with the same options), idempotent, safe beside a "
        "running service.",
    )
    importing.add_argument(
        "--since",
        required=True,
        metavar="TIME",
        help="start: an ISO 8601 time (without an offset: local time) or a duration before "
        "now such as 30d, 12h, 90m",
    )
    importing.add_argument(
        "--until",
        metavar="TIME",
        help="end (same forms; default: states up to the running service's checkpoint, "
        "else now; statistics up to now)",
    )
    importing.add_argument(
        "--entities",
        metavar="GLOBS",
        help="comma-separated entity / statistic id globs (sensor.*,light.kitchen)",
    )
    importing.add_argument("--no-states", action="store_true", help="skip the state history")
    importing.add_argument(
        "--no-statistics", action="store_true", help="skip the long-term statistics"
    )
    importing.add_argument(
        "--dry-run",
        action="store_true",
        help="count what would be imported, per entity and statistic; write nothing",
    )
    return parser


def _import(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from ha_ingestor.importer.command import run_import
    from ha_ingestor.importer.options import ImportOptionError, build_options

    try:
        options = build_options(
            since=args.since,
            until=args.until,
            entities=args.entities,
            states=not args.no_states,
            statistics=not args.no_statistics,
            dry_run=args.dry_run,
            now_ns=time.time_ns(),
        )
    except ImportOptionError as exc:
        print(f"ha-ingestor import: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return asyncio.run(run_import(settings, options))
    except KeyboardInterrupt:
        # What was read is durable (the spool commits on the way out), checkpoints with it.
        print(
            "ha-ingestor import: interrupted; rerun with the same options to continue",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"ha-ingestor: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_level, settings.log_format.value)
    # Imported here so that --version and configuration errors stay instant.
    from ha_ingestor.app import check, run

    if args.command == "import":
        return _import(args, settings)
    if args.command == "check":
        return EXIT_OK if asyncio.run(check(settings)) else EXIT_FAILED
    return asyncio.run(run(settings))


if __name__ == "__main__":
    sys.exit(main())
