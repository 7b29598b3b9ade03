"""``ha-ingestor check`` against a real Home Assistant: it makes the subscriptions ``run``
makes, so a token passes exactly when the service would work with it."""

from __future__ import annotations

import pytest

from ha_ingestor.checks import check_homeassistant
from ha_ingestor.config import Settings, load_settings
from ha_ingestor.errors import CheckError
from tests.support.homeassistant import HomeAssistant

pytestmark = [pytest.mark.homeassistant, pytest.mark.timeout(120)]


def settings(ha: HomeAssistant, token: str, **env: str) -> Settings:
    return load_settings(
        {
            "HA_INGESTOR_HA_URL": ha.url,
            "HA_INGESTOR_HA_TOKEN": token,
            "HA_INGESTOR_INFLUX_URL": "http://127.0.0.1:1",
            **{f"HA_INGESTOR_{k.upper()}": v for k, v in env.items()},
        }
    )


async def test_check_makes_the_subscriptions_run_makes(home_assistant: HomeAssistant) -> None:
    ha = home_assistant
    user_token = await ha.create_user(f"checker-{ha.release.id}", "checker-password-1")
    with pytest.raises(CheckError) as refused:
        await check_homeassistant(settings(ha, user_token))
    assert "administrator" in str(refused.value)
    assert "HA_INGESTOR_HA_EVENT_TYPES" in str(refused.value)
    assert user_token not in str(refused.value)
    # The documented way for a user's token: only events any user may subscribe to.
    allowed = settings(ha, user_token, ha_event_types="state_changed")
    assert "authenticated to 'Test Home'" in await check_homeassistant(allowed)
    assert "authenticated to 'Test Home'" in await check_homeassistant(settings(ha, ha.token))
    if ha.release.at_least("2024.4"):  # state_reported exists, and may not be subscribed to
        named = settings(ha, ha.token, ha_event_types="state_changed,state_reported")
        with pytest.raises(CheckError, match="'state_reported', named in HA_INGESTOR_HA_EVENT"):
            await check_homeassistant(named)
