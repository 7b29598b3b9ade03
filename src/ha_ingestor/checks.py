"""``ha-ingestor check``: reach every configured endpoint and say, per target, what is wrong."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TextIO

import aiohttp

from ha_ingestor.config import Settings
from ha_ingestor.errors import CheckError
from ha_ingestor.sinks.influxdb import InfluxClient
from ha_ingestor.tls import ha_tls_context, influx_tls_context, mqtt_tls_context

TIMEOUT = 10.0


async def check_mqtt(settings: Settings) -> str:
    from ha_ingestor.sources.mqtt import subscribe
    from ha_ingestor.sources.mqtt_client import (
        MQTT_5,
        MQTT_311,
        ConnectOptions,
        MqttConnection,
        MqttError,
        UnsupportedProtocolVersionError,
    )

    target = f"{settings.mqtt_host}:{settings.effective_mqtt_port}"
    password = settings.mqtt_password.get_secret_value() if settings.mqtt_password else None
    versions = {"5": [MQTT_5], "3.1.1": [MQTT_311], "auto": [MQTT_5, MQTT_311]}
    for version in versions[settings.mqtt_protocol]:
        options = ConnectOptions(
            host=settings.mqtt_host or "",
            port=settings.effective_mqtt_port,
            client_id=f"{settings.mqtt_client_id}-check",
            version=version,
            username=settings.mqtt_username,
            password=password,
            ssl=mqtt_tls_context(settings) if settings.mqtt_tls else None,
            timeout=TIMEOUT,
        )
        connection = MqttConnection(options, lambda *_: None)
        try:
            await connection.connect()
        except UnsupportedProtocolVersionError:
            if version == MQTT_311 or settings.mqtt_protocol != "auto":
                raise CheckError(f"{target}: broker refused MQTT protocol version") from None
            continue
        except OSError as exc:
            raise CheckError(f"{target}: {exc.strerror or exc}") from None
        except MqttError as exc:
            raise CheckError(f"{target}: {exc}") from None
        try:  # retain_handling 2: no retained messages sent for this subscription
            await subscribe(connection, settings, retain_handling=2)
        except PermissionError as exc:
            raise CheckError(f"{target}: connected, but the {exc}") from None
        except MqttError as exc:
            raise CheckError(f"{target}: {exc}") from None
        finally:
            await connection.close()
        return (
            f"connected to {target} (MQTT {'5' if version == MQTT_5 else '3.1.1'}), "
            f"subscribed to {', '.join(settings.mqtt_topics)}"
        )
    raise CheckError(f"{target}: no MQTT protocol version accepted")  # pragma: no cover


async def check_homeassistant(settings: Settings) -> str:
    from ha_ingestor.sources.ha_client import (
        AuthInvalidError,
        HomeAssistantClient,
        NotHomeAssistantError,
    )
    from ha_ingestor.sources.homeassistant import (
        EventTypeRefusedError,
        NotAllowedError,
        subscribe_events,
    )

    assert settings.ha_url is not None
    assert settings.ha_token is not None
    client = HomeAssistantClient(
        settings.ha_url,
        settings.ha_token.get_secret_value(),
        ssl_context=ha_tls_context(settings),
        call_timeout=TIMEOUT,
    )
    try:
        async with client:
            config = await client.call("get_config")
            location = (config or {}).get("location_name", "?")
            try:  # the subscriptions ``run`` makes, so a token that works for it passes
                await subscribe_events(client.call, settings.ha_event_types)
            except (NotAllowedError, EventTypeRefusedError) as exc:
                raise CheckError(f"{settings.ha_url}: authenticated, but {exc}") from None
    except AuthInvalidError:
        raise CheckError(
            f"{settings.ha_url}: token rejected (auth_invalid) — create a new long-lived "
            "token in your Home Assistant profile and set HA_INGESTOR_HA_TOKEN"
        ) from None
    except NotHomeAssistantError:
        raise CheckError(f"{settings.ha_url}: not a Home Assistant WebSocket API") from None
    return f"authenticated to {location!r} (Home Assistant {client.ha_version or '?'})"


async def check_influxdb(settings: Settings) -> str:
    connector = aiohttp.TCPConnector(ssl=influx_tls_context(settings))
    async with aiohttp.ClientSession(connector=connector) as session:
        client = InfluxClient(settings, session)
        return await client.check()


async def run_checks(settings: Settings, out: TextIO = sys.stdout) -> bool:
    checks: list[tuple[str, Callable[[Settings], Awaitable[str]]]] = []
    if settings.mqtt_enabled:
        checks.append(("mqtt", check_mqtt))
    if settings.ha_enabled:
        checks.append(("homeassistant", check_homeassistant))
    checks.append(("influxdb", check_influxdb))
    ok = True
    for name, check in checks:
        try:
            detail = await asyncio.wait_for(check(settings), TIMEOUT * 2)
        except CheckError as exc:
            ok = False
            print(f"FAIL {name}: {exc}", file=out)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            ok = False
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", file=out)
        else:
            print(f"ok   {name}: {detail}", file=out)
    return ok
