"""Settings: defaults are the embedded deployment; bad values fail fast naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from muse.errors import BackendUnavailable, ConfigurationError
from muse.settings import ENV_VARS, load_settings


def test_defaults_are_embedded(tmp_path: Path):
    s = load_settings(env={"MUSE_DATA_DIR": str(tmp_path)})
    assert s.database_url == f"sqlite:///{tmp_path / 'muse.sqlite'}"
    assert s.milvus_uri == str(tmp_path / "milvus.db") and s.embedded_milvus
    assert s.broker_url == "filesystem://"
    assert s.metric_type == "COSINE" and s.device == "auto"


def test_env_and_overrides_order(tmp_path: Path):
    cfg = tmp_path / "muse.toml"
    cfg.write_text('[muse]\nindex_type = "HNSW"\nmilvus_prefix = "fromfile"\n')
    env = {"MUSE_CONFIG": str(cfg), "MUSE_MILVUS_PREFIX": "fromenv", "MUSE_INDEX_PARAMS": '{"M": 8}'}
    s = load_settings(env=env, device="cpu")
    assert s.index_type == "HNSW"  # file
    assert s.milvus_prefix == "fromenv"  # env beats file
    assert s.index_params == {"M": 8}
    assert load_settings(env=env, milvus_prefix="explicit").milvus_prefix == "explicit"


def test_server_deployment_values():
    s = load_settings(
        env={
            "MUSE_DATABASE_URL": "postgresql+psycopg2://u@db:5432/muse",
            "MUSE_MILVUS_URI": "http://milvus:19530",
            "MUSE_BROKER_URL": "redis://redis:6379/0",
            "MUSE_INDEX_TYPE": "gpu_cagra",
        }
    )
    assert not s.embedded_milvus and s.gpu_index and s.metric_type == "IP"
    assert load_settings(env={"MUSE_DATABASE_URL": "postgresql://u@db/m"}).database_url == (
        "postgresql+psycopg2://u@db/m"
    )


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"MUSE_DATABASE_URL": "mysql://x/y"}, "MUSE_DATABASE_URL"),
        ({"MUSE_BROKER_URL": "kafka://x"}, "MUSE_BROKER_URL"),
        ({"MUSE_MILVUS_URI": "vectors.txt"}, "MUSE_MILVUS_URI"),
        ({"MUSE_INDEX_TYPE": "DISKANN2"}, "MUSE_INDEX_TYPE"),
        ({"MUSE_INDEX_TYPE": "GPU_CAGRA"}, "MUSE_INDEX_TYPE"),  # GPU index on Milvus Lite
        ({"MUSE_DEVICE": "tpu"}, "MUSE_DEVICE"),
        ({"MUSE_INDEX_PARAMS": "[1, 2]"}, "MUSE_INDEX_PARAMS"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], names: str):
    with pytest.raises(ConfigurationError, match=names):
        load_settings(env=env)


def test_unknown_keys_rejected(tmp_path: Path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("milvus_urii = 'x'\n")
    with pytest.raises(ConfigurationError, match="milvus_urii"):
        load_settings(env={"MUSE_CONFIG": str(cfg)})
    with pytest.raises(ConfigurationError, match="nope"):
        load_settings(env={}, nope=1)


def test_unreachable_servers_fail_fast_naming_the_setting(tmp_path: Path):
    from muse.db import check_database
    from muse.vectorstore import VectorStore

    s = load_settings(
        env={},
        data_dir=tmp_path,
        database_url="postgresql+psycopg2://postgres@127.0.0.1:1/none",
        milvus_uri="http://127.0.0.1:1",
    )
    with pytest.raises(BackendUnavailable, match="MUSE_DATABASE_URL"):
        check_database(s)
    with pytest.raises(BackendUnavailable, match="MUSE_MILVUS_URI"):
        VectorStore(s).check()


def test_env_var_list_matches_fields():
    from dataclasses import fields

    from muse.settings import Settings

    names = {f.name for f in fields(Settings)}
    assert set(ENV_VARS.values()) <= names


def test_queue_prefix_is_a_setting(tmp_path: Path):
    """MUSE_QUEUE_PREFIX is read like every other variable (empty by default); an override wins."""
    assert load_settings(env={}, data_dir=tmp_path).queue_prefix == ""
    assert load_settings(env={"MUSE_QUEUE_PREFIX": "prod-"}, data_dir=tmp_path).queue_prefix == "prod-"
    assert load_settings(env={"MUSE_QUEUE_PREFIX": "prod-"}, data_dir=tmp_path, queue_prefix="t-").queue_prefix == "t-"
