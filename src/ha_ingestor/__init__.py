"""HA Ingestor: capture all Home Assistant activity into InfluxDB."""

__version__ = "0.1.0"
