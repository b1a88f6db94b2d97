"""compose.yaml describes the server deployment with the settings this code reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from muse.settings import ENV_VARS, load_settings

yaml = pytest.importorskip("yaml")
COMPOSE = Path(__file__).resolve().parents[1] / "compose.yaml"


def _doc() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_every_muse_variable_is_a_setting():
    services = _doc()["services"]
    seen: set[str] = set()
    for svc in services.values():
        env = svc.get("environment") or {}
        seen |= {k for k in env if k.startswith("MUSE_")}
    assert seen, "compose sets no MUSE_* variable"
    assert seen <= set(ENV_VARS), f"unknown settings in compose.yaml: {sorted(seen - set(ENV_VARS))}"


def test_stack_shape():
    services = _doc()["services"]
    for name in ("milvus", "etcd", "minio", "postgres", "redis", "migrate", "worker-gpu", "worker-cpu"):
        assert name in services, name
    assert services["milvus"]["image"].endswith("-gpu")
    for gpu_service in ("milvus", "worker-gpu"):
        devices = services[gpu_service]["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] for d in devices)
    assert "gpu" in services["worker-gpu"]["command"]
    assert "cpu" in services["worker-cpu"]["command"]
    assert services["migrate"]["command"] == ["muse", "db", "upgrade"]


def test_compose_environment_is_valid_settings():
    env = _doc()["services"]["worker-cpu"]["environment"]
    values = {k: str(v) for k, v in env.items() if k.startswith("MUSE_") and "${" not in str(v)}
    values["MUSE_DATABASE_URL"] = "postgresql+psycopg2://muse:pw@postgres:5432/muse"
    s = load_settings(env=values)
    assert not s.embedded_milvus and s.broker_url.startswith("redis://")


def test_no_secrets_committed():
    text = COMPOSE.read_text()
    assert "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD" in text
    assert "password=" not in text.lower()
