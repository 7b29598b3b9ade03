"""``ha-ingestor check`` honours the TLS settings of Home Assistant and InfluxDB: a server with a
self-signed certificate is refused by default, and reached with ``*_CA_FILE`` (verified) or
``*_TLS_INSECURE`` (not verified)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ha_ingestor.checks import check_homeassistant, check_influxdb
from ha_ingestor.config import Settings, load_settings
from ha_ingestor.errors import CheckError
from tests.support.homeassistant import HomeAssistant
from tests.support.servers import HOST, InfluxDB1
from tests.support.tls_proxy import TlsProxy, self_signed_certificate


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path)


@pytest.fixture
async def https_influxdb(influxdb: InfluxDB1, certificate: tuple[Path, Path]) -> AsyncIterator[str]:
    async with TlsProxy(influxdb.port, *certificate) as proxy:
        yield f"https://{HOST}:{proxy.port}"


@pytest.fixture
async def https_home_assistant(
    home_assistant: HomeAssistant, certificate: tuple[Path, Path]
) -> AsyncIterator[str]:
    async with TlsProxy(home_assistant.port, *certificate) as proxy:
        yield f"https://{HOST}:{proxy.port}"


def settings(influx_url: str, ha_url: str, token: str, **env: str) -> Settings:
    return load_settings(
        {
            "HA_INGESTOR_HA_URL": ha_url,
            "HA_INGESTOR_HA_TOKEN": token,
            "HA_INGESTOR_INFLUX_URL": influx_url,
            "HA_INGESTOR_INFLUX_API": "v1",
            "HA_INGESTOR_INFLUX_DATABASE": "tls_check",
            **{f"HA_INGESTOR_{k.upper()}": v for k, v in env.items()},
        }
    )


@pytest.mark.timeout(120)
async def test_check_refuses_an_unknown_certificate_and_honours_ca_file_and_insecure(
    https_influxdb: str,
    https_home_assistant: str,
    home_assistant: HomeAssistant,
    certificate: tuple[Path, Path],
) -> None:
    cert, _ = certificate
    plain = settings(https_influxdb, https_home_assistant, home_assistant.token)
    with pytest.raises(CheckError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        await check_influxdb(plain)
    with pytest.raises(
        ssl.SSLCertVerificationError,
        match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed",
    ):
        await check_homeassistant(plain)
    for env in (
        {"influx_ca_file": str(cert), "ha_ca_file": str(cert)},
        {"influx_tls_insecure": "true", "ha_tls_insecure": "true"},
    ):
        configured = settings(https_influxdb, https_home_assistant, home_assistant.token, **env)
        assert "writing to 'tls_check'" in await check_influxdb(configured)
        assert "authenticated to 'Test Home'" in await check_homeassistant(configured)
