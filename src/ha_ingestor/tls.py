"""TLS client contexts from the ``*_CA_FILE``, ``*_CERT_FILE``, ``*_KEY_FILE`` and
``*_TLS_INSECURE`` settings: one rule for the MQTT broker, Home Assistant and InfluxDB."""

from __future__ import annotations

import ssl
from pathlib import Path

from ha_ingestor.config import Settings


def client_context(
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    *,
    insecure: bool = False,
) -> ssl.SSLContext:
    """A context that verifies the server (against ``ca_file`` if given, else the system's
    roots) unless ``insecure``; presents a client certificate when both files are given."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if cert_file and key_file:
        context.load_cert_chain(str(cert_file), str(key_file))
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def https_context(
    url: str, ca_file: Path | None = None, *, insecure: bool = False
) -> ssl.SSLContext | bool:
    """For aiohttp: a context for an ``https://``/``wss://`` URL, else True (its default)."""
    if not url.startswith(("https://", "wss://")):
        return True
    return client_context(ca_file, insecure=insecure)


def mqtt_tls_context(settings: Settings) -> ssl.SSLContext:
    """The broker connection's context (used when ``HA_INGESTOR_MQTT_TLS`` is on)."""
    return client_context(
        settings.mqtt_ca_file,
        settings.mqtt_cert_file,
        settings.mqtt_key_file,
        insecure=settings.mqtt_tls_insecure,
    )


def ha_tls_context(settings: Settings) -> ssl.SSLContext | bool:
    """Home Assistant's WebSocket connection (TLS when the URL is ``https://``)."""
    return https_context(
        settings.ha_url or "", settings.ha_ca_file, insecure=settings.ha_tls_insecure
    )


def influx_tls_context(settings: Settings) -> ssl.SSLContext | bool:
    """InfluxDB's HTTP connections (TLS when the URL is ``https://``)."""
    return https_context(
        settings.influx_url, settings.influx_ca_file, insecure=settings.influx_tls_insecure
    )
