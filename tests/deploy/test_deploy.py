"""Deployment artefacts: their wiring is checked here, since no container engine runs in tests."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from ha_ingestor.config import SECRET_FIELDS, Settings, env_name
from ha_ingestor.docs_gen import render
from ha_ingestor.telemetry import Metrics
from tests.support.servers import InfluxDB1

ROOT = Path(__file__).resolve().parents[2]
KNOWN_VARIABLES = {env_name(f) for f in Settings.model_fields} | {
    env_name(f) + "_FILE" for f in SECRET_FIELDS
}


def load_compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def test_compose_wires_the_stack_with_health_checks_and_known_settings() -> None:
    compose = load_compose()
    services = compose["services"]
    assert set(services) >= {
        "mosquitto",
        "influxdb",
        "homeassistant",
        "ha-ingestor",
        "grafana",
        "prometheus",
    }
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has a health check"
    ingestor = services["ha-ingestor"]
    env = ingestor["environment"]
    assert set(env) <= KNOWN_VARIABLES, set(env) - KNOWN_VARIABLES
    assert env["HA_INGESTOR_MQTT_HOST"] == "mosquitto"
    assert env["HA_INGESTOR_INFLUX_URL"].startswith("http://influxdb:8086")
    assert env["HA_INGESTOR_HA_URL"].startswith("http://homeassistant:8123")
    for dependency in ("mosquitto", "influxdb", "homeassistant"):
        assert ingestor["depends_on"][dependency]["condition"] == "service_healthy"
    port = env["HA_INGESTOR_HTTP_PORT"]
    assert f"{port}:{port}" in ingestor["ports"]
    assert f":{port}/healthz" in " ".join(ingestor["healthcheck"]["test"])
    assert any(v.endswith(":/data") for v in ingestor["volumes"])
    assert env["HA_INGESTOR_SPOOL_DIR"].startswith("/data")
    # Secrets come from .env, never from the file itself.
    for key in ("HA_INGESTOR_HA_TOKEN", "HA_INGESTOR_INFLUX_TOKEN"):
        assert re.fullmatch(r"\$\{[A-Z_]+\}", env[key])
    example = (ROOT / ".env.example").read_text()
    referenced = set(re.findall(r"\$\{([A-Z_]+)\}", (ROOT / "docker-compose.yml").read_text()))
    for variable in referenced:
        assert re.search(rf"^{variable}=", example, re.M), f"{variable} documented in .env.example"
    scrape = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == [f"ha-ingestor:{port}"]


def kubernetes_documents() -> dict[str, dict[str, Any]]:
    docs = yaml.safe_load_all((ROOT / "deploy/kubernetes/ha-ingestor.yaml").read_text())
    return {doc["kind"]: doc for doc in docs}


def test_kubernetes_manifests_have_probes_spool_volume_and_secret() -> None:
    docs = kubernetes_documents()
    pod = docs["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    config = docs["ConfigMap"]["data"]
    assert set(config) <= KNOWN_VARIABLES
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == config["HA_INGESTOR_HTTP_PORT"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert config["HA_INGESTOR_SPOOL_DIR"].startswith(mounts["spool"])
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert (
        volumes["spool"]["persistentVolumeClaim"]["claimName"]
        == docs["PersistentVolumeClaim"]["metadata"]["name"]
    )
    assert volumes["secrets"]["secret"]["secretName"] == docs["Secret"]["metadata"]["name"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) <= KNOWN_VARIABLES
    for variable, path in env.items():
        assert path.startswith(mounts["secrets"]), variable
        assert Path(path).name in docs["Secret"]["stringData"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_dockerfile_runs_unprivileged_with_a_healthcheck_and_a_volume() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001", dockerfile, re.M)
    assert "HEALTHCHECK" in dockerfile
    assert "/healthz" in dockerfile
    assert "curl" not in dockerfile.split("HEALTHCHECK", 1)[1]
    assert 'VOLUME ["/data"]' in dockerfile
    assert "HA_INGESTOR_SPOOL_DIR=/data/spool" in dockerfile
    assert dockerfile.count("FROM ") == 2, "multi-stage"


def test_systemd_unit_uses_known_settings() -> None:
    unit = (ROOT / "deploy/systemd/ha-ingestor.service").read_text()
    for variable in re.findall(r"Environment=(HA_INGESTOR_[A-Z_]+)=", unit):
        assert variable in KNOWN_VARIABLES
    assert "ExecStart=" in unit
    assert "ha-ingestor run" in unit


def test_configuration_reference_is_generated_from_the_settings_model() -> None:
    written = (ROOT / "docs/configuration.md").read_text()
    assert written == render(), (
        "docs/configuration.md is out of date: run "
        "`.venv/bin/python -m ha_ingestor.docs_gen > docs/configuration.md`"
    )
    for variable in KNOWN_VARIABLES:
        assert f"`{variable}`" in written


def dashboard(name: str) -> dict[str, Any]:
    return dict(json.loads((ROOT / "deploy/grafana/dashboards" / name).read_text()))


def test_health_dashboard_uses_only_metrics_the_service_exports() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    names = {
        sample_name
        for family in registry.collect()
        for sample_name in [
            family.name,
            family.name + "_total",
            family.name + "_bucket",
            family.name + "_info",
        ]
    }
    for panel in dashboard("ha-ingestor-health.json")["panels"]:
        for target in panel["targets"]:
            used = set(re.findall(r"ha_ingestor_[a-z_]+", target["expr"]))
            assert used, panel["title"]
            assert used <= names, (panel["title"], used - names)


@pytest.fixture(scope="module")
def activity_database(influxdb: InfluxDB1) -> str:
    """A small data set in the documented schema, written through the line protocol."""
    database = "dashboard_fixture"
    influxdb.create_database(database)
    now = 1_795_000_000_000_000_000
    lines = []
    for i in range(60):
        t = now + i * 1_000_000_000
        lines.append(
            f"ha_state,domain=sensor,entity_id=sensor.kitchen_temperature,instance=home,unit=°C "
            f'state="{20 + i / 10}",value={20 + i / 10},attributes="{{}}" {t}'
        )
        lines.append(
            f'ha_state,domain=light,entity_id=light.hall,instance=home state="{"on" if i % 2 else "unavailable"}" {t + 1}'
        )
        lines.append(
            f'ha_event,domain=light,event_type=call_service,instance=home,service=turn_on data="{{}}" {t + 2}'
        )
        lines.append(
            f'ha_event,entity_id=automation.night,event_type=automation_triggered,instance=home data="{{}}",name="Night" {t + 3}'
        )
        lines.append(
            f'ha_event,entity_id=script.bump,event_type=script_started,instance=home data="{{}}",name="Bump" {t + 4}'
        )
        lines.append(
            f'mqtt_message,instance=home,topic=zigbee2mqtt/kitchen payload="{{}}",qos=0i,retained=false,size=2i {t + 5}'
        )
    influxdb.write(database, "\n".join(lines))
    return database


def test_every_data_dashboard_query_runs_and_returns_data(
    influxdb: InfluxDB1, activity_database: str
) -> None:
    board = dashboard("home-assistant-activity.json")
    time_filter = "time >= 1794999990000000000 AND time <= 1795000100000000000"
    macros = {
        "$timeFilter": time_filter,
        "$__interval": "10s",
        "$entity": "sensor.kitchen_temperature",
    }
    queries = [t["query"] for p in board["panels"] for t in p["targets"]]
    queries += [v["query"] for v in board["templating"]["list"]]
    for template in queries:
        query = template
        for macro, value in macros.items():
            query = query.replace(macro, value)
        series = influxdb.query(query, activity_database)
        values = [v for s in series for v in s["values"]]
        assert any(any(x not in (None, 0) for x in row[1:]) for row in values), query


def test_docs_gen_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ha_ingestor.docs_gen"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("# Configuration reference")


def test_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
