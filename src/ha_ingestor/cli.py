"""Command line: ``ha-ingestor run``, ``ha-ingestor check``, ``ha-ingestor --version``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from ha_ingestor import __version__
from ha_ingestor.config import ConfigError, load_settings
from ha_ingestor.telemetry import configure_logging

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


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
    return parser


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

    if args.command == "check":
        return EXIT_OK if asyncio.run(check(settings)) else EXIT_FAILED
    return asyncio.run(run(settings))


if __name__ == "__main__":
    sys.exit(main())
