"""Settings: one frozen object read from ``MUSE_*`` environment variables and an optional TOML file.

Override order, lowest first: built-in defaults < TOML file (``MUSE_CONFIG``) < environment
variables < explicit keyword arguments to :func:`load_settings`.

The defaults are the *embedded* deployment, needing no server: a SQLite file, a Milvus Lite file
and kombu's ``filesystem://`` broker, all under ``MUSE_DATA_DIR``. The *server* deployment only
changes values (PostgreSQL, a Milvus server, Redis or RabbitMQ).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from muse.configs import read_toml
from muse.errors import ConfigurationError

#: Index types accepted by ``MUSE_INDEX_TYPE``. GPU ones need a GPU Milvus server and use IP on
#: L2-normalised vectors (equal to cosine); CPU ones use COSINE.
CPU_INDEX_TYPES = ("FLAT", "IVF_FLAT", "HNSW", "AUTOINDEX")
GPU_INDEX_TYPES = ("GPU_BRUTE_FORCE", "GPU_IVF_FLAT", "GPU_CAGRA")
DATABASE_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg2")
BROKER_SCHEMES = ("filesystem", "redis", "rediss", "amqp", "pyamqp", "memory")
BULK_SCHEMES = ("file", "s3")

#: Environment variable -> settings field. The single list of ``MUSE_*`` variables.
ENV_VARS: dict[str, str] = {
    "MUSE_DATA_DIR": "data_dir",
    "MUSE_DATABASE_URL": "database_url",
    "MUSE_MILVUS_URI": "milvus_uri",
    "MUSE_MILVUS_TOKEN": "milvus_token",
    "MUSE_MILVUS_PREFIX": "milvus_prefix",
    "MUSE_BROKER_URL": "broker_url",
    "MUSE_DEVICE": "device",
    "MUSE_INDEX_TYPE": "index_type",
    "MUSE_INDEX_PARAMS": "index_params",
    "MUSE_SEARCH_PARAMS": "search_params",
    "MUSE_SEQUENCE_URL": "sequence_url",
    "MUSE_GSU_ADDRESSES": "gsu_addresses",
    "MUSE_SEARCH_CONSISTENCY": "search_consistency",
    "MUSE_MILVUS_TIMEOUT_S": "milvus_timeout_s",
    "MUSE_MILVUS_SEARCH_TIMEOUT_S": "milvus_search_timeout_s",
    "MUSE_BACKFILL_LEASE_S": "backfill_lease_s",
    "MUSE_BACKFILL_STALL_S": "backfill_stall_s",
    "MUSE_BACKFILL_RETRIES": "backfill_retries",
    "MUSE_BACKFILL_BACKOFF_S": "backfill_backoff_s",
    "MUSE_BACKFILL_OUTAGE_S": "backfill_outage_s",
    "MUSE_QUEUE_PREFIX": "queue_prefix",
    "MUSE_BULK_URL": "bulk_url",
    "MUSE_BULK_MIN_ROWS": "bulk_min_rows",
    "MUSE_REGISTER_MAX_ROWS": "register_max_rows",
    "MUSE_BULK_S3_ENDPOINT": "bulk_s3_endpoint",
    "MUSE_BULK_S3_ACCESS_KEY": "bulk_s3_access_key",
    "MUSE_BULK_S3_SECRET_KEY": "bulk_s3_secret_key",
}
#: Consistency levels a Milvus search may ask for (Milvus' names).
CONSISTENCY_LEVELS = ("Strong", "Session", "Bounded", "Eventually")
#: Numeric settings and their type (environment values are converted and checked).
NUMERIC_FIELDS: dict[str, type] = {
    "milvus_timeout_s": float,
    "milvus_search_timeout_s": float,
    "backfill_lease_s": float,
    "backfill_stall_s": float,
    "backfill_retries": int,
    "backfill_backoff_s": float,
    "backfill_outage_s": float,
    "bulk_min_rows": int,
    "register_max_rows": int,
}


@dataclass(frozen=True)
class Settings:
    """Resolved settings. Build with :func:`load_settings`, not directly."""

    data_dir: Path = Path("muse-data")  # root of every embedded file (datasets, checkpoints, dbs)
    database_url: str = ""  # SQLAlchemy URL; "" -> sqlite file under data_dir
    milvus_uri: str = ""  # Milvus Lite file path or http://host:19530; "" -> Lite file under data_dir
    milvus_token: str = ""  # "user:password" or an API token for a Milvus server
    milvus_prefix: str = "muse"  # collection name prefix, so several deployments share a server
    broker_url: str = ""  # Celery broker; "" -> filesystem:// queue under data_dir
    device: str = "auto"  # auto | cpu | cuda | cuda:N (auto: cuda when available)
    index_type: str = "FLAT"  # one of CPU_INDEX_TYPES or GPU_INDEX_TYPES
    index_params: dict[str, Any] = field(default_factory=dict)  # e.g. {"nlist": 128}
    search_params: dict[str, Any] = field(default_factory=dict)  # e.g. {"nprobe": 16}
    # users' item-id sequences (muse.sequences): "" -> file under data_dir (embedded) or the Milvus
    # behaviour collection itself (server); "redis://host:6379/1" on the server deployment
    sequence_url: str = ""
    gsu_addresses: str = ""  # "host:port,host:port" of `muse serve` servers (RemoteRetriever)
    # Consistency of Milvus-path searches: Bounded (~5x the throughput of Strong on 2.3; a write
    # becomes visible within Milvus' bounded staleness, a few seconds). Ask for Strong per call
    # where a read must see the write just made.
    search_consistency: str = "Bounded"
    milvus_timeout_s: float = 30.0  # deadline of each Milvus write, query and admin call
    milvus_search_timeout_s: float = 5.0  # deadline of each Milvus vector search
    backfill_lease_s: float = 60.0  # a running chunk's lease; renewed every third of it while it runs
    backfill_stall_s: float = 600.0  # foreground `muse backfill` gives up after this long without progress
    backfill_retries: int = 6  # retries of a chunk's own failures (exponential backoff); outages spend none
    backfill_backoff_s: float = 2.0  # first retry delay; doubles per retry, capped at 120 s
    # a backfill waits this long for a backend that is down (Milvus, the database, the broker) without
    # spending attempts; past it the job fails with a sentence naming the backend
    backfill_outage_s: float = 1800.0
    # prepended to the indexer's queue names (and Redis keys), so that several deployments (or
    # tests) share one broker without taking each other's messages
    queue_prefix: str = ""
    # Milvus bulk import (indexer.bulk): where the behaviour files go. "" -> file://<data_dir>/bulk,
    # read by a Milvus server with local storage on this host; s3://BUCKET/PREFIX uploads them to
    # the MinIO/S3 bucket the Milvus server itself stores its data in.
    bulk_url: str = ""
    bulk_min_rows: int = 2_000_000  # `muse backfill` imports behaviours in bulk from this many on (server Milvus)
    # a dataset's items (users) get one metadata row each up to this many; above, the dataset's
    # files stay the only record of them (the open Taobao-MM: 35M items, 9M users)
    register_max_rows: int = 200_000
    bulk_s3_endpoint: str = ""  # host:port of MinIO/S3 for s3:// (http://... or https://...; bare = http)
    bulk_s3_access_key: str = ""
    bulk_s3_secret_key: str = ""

    @property
    def embedded_milvus(self) -> bool:
        """True when ``milvus_uri`` is a local Milvus Lite file."""
        return not self.milvus_uri.startswith(("http://", "https://", "tcp://", "grpc://"))

    @property
    def gpu_index(self) -> bool:
        return self.index_type in GPU_INDEX_TYPES

    @property
    def metric_type(self) -> str:
        """COSINE on CPU indexes; IP on GPU indexes (vectors are stored L2-normalised)."""
        return "IP" if self.gpu_index else "COSINE"

    @property
    def broker_dir(self) -> Path:
        """Folder of the filesystem broker (embedded deployment)."""
        return self.data_dir / "broker"

    def resolve_device(self) -> str:
        """The torch device string to use: ``auto`` becomes ``cuda`` when available, else ``cpu``.

        Raises:
            ConfigurationError: ``MUSE_DEVICE`` names a CUDA device this machine does not have.
        """
        if self.device == "cpu":
            return "cpu"
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(self.device[5:]) if self.device.startswith("cuda:") else 0
        if index >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA device"
            raise ConfigurationError(
                f"MUSE_DEVICE={self.device!r} but torch sees {have} on this machine; "
                "set MUSE_DEVICE=cpu or auto" + (f" or cuda:0..cuda:{count - 1}" if count else "")
            )
        return self.device

    def path(self, *parts: str) -> Path:
        """A path under ``data_dir``."""
        return self.data_dir.joinpath(*parts)


def _parse_json_dict(name: str, raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as e:
        raise ConfigurationError(f"{name} must be a JSON object, got {raw!r}: {e}") from e
    if not isinstance(value, dict):
        raise ConfigurationError(f"{name} must be a JSON object, got {raw!r}")
    return value


def _parse_number(name: str, raw: str, kind: type) -> float | int:
    try:
        return kind(raw)
    except ValueError as e:
        what = "a whole number" if kind is int else "a number"
        raise ConfigurationError(f"{name}={raw!r} must be {what}") from e


def _validate(s: Settings) -> Settings:
    db_scheme = urlparse(s.database_url).scheme
    if db_scheme not in DATABASE_SCHEMES:
        raise ConfigurationError(
            f"MUSE_DATABASE_URL={s.database_url!r}: unknown scheme {db_scheme!r}; "
            f"valid: {', '.join(DATABASE_SCHEMES)}"
        )
    broker_scheme = urlparse(s.broker_url).scheme
    if broker_scheme not in BROKER_SCHEMES:
        raise ConfigurationError(
            f"MUSE_BROKER_URL={s.broker_url!r}: unknown scheme {broker_scheme!r}; "
            f"valid: {', '.join(BROKER_SCHEMES)}"
        )
    if not s.embedded_milvus:
        parsed = urlparse(s.milvus_uri)
        if not parsed.hostname:
            raise ConfigurationError(f"MUSE_MILVUS_URI={s.milvus_uri!r}: no host in the URI")
    elif not s.milvus_uri.endswith(".db"):
        raise ConfigurationError(
            f"MUSE_MILVUS_URI={s.milvus_uri!r}: a Milvus Lite path must end in '.db' "
            "(or give http://host:19530 for a server)"
        )
    valid_types = CPU_INDEX_TYPES + GPU_INDEX_TYPES
    if s.index_type not in valid_types:
        raise ConfigurationError(
            f"MUSE_INDEX_TYPE={s.index_type!r} is unknown; valid: {', '.join(valid_types)}"
        )
    if s.embedded_milvus and s.gpu_index:
        raise ConfigurationError(
            f"MUSE_INDEX_TYPE={s.index_type!r} needs a GPU Milvus server, but MUSE_MILVUS_URI is "
            f"the Milvus Lite file {s.milvus_uri!r}"
        )
    if s.search_consistency not in CONSISTENCY_LEVELS:
        raise ConfigurationError(
            f"MUSE_SEARCH_CONSISTENCY={s.search_consistency!r} is unknown; valid: {', '.join(CONSISTENCY_LEVELS)}"
        )
    for name, kind in NUMERIC_FIELDS.items():
        value = getattr(s, name)
        var = next(v for v, n in ENV_VARS.items() if n == name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value == value or value < 0:
            raise ConfigurationError(f"{var}={value!r} must be a number >= 0")
        if kind is int and int(value) != value:
            raise ConfigurationError(f"{var}={value!r} must be a whole number")
    bulk_scheme = urlparse(s.bulk_url).scheme
    if bulk_scheme not in BULK_SCHEMES:
        raise ConfigurationError(
            f"MUSE_BULK_URL={s.bulk_url!r}: unknown scheme {bulk_scheme!r}; valid: file:///ABSOLUTE/DIR, s3://BUCKET/PREFIX"
        )
    if bulk_scheme == "s3" and not (urlparse(s.bulk_url).netloc and s.bulk_s3_endpoint):
        raise ConfigurationError(
            f"MUSE_BULK_URL={s.bulk_url!r} needs a bucket (s3://BUCKET/PREFIX) and MUSE_BULK_S3_ENDPOINT (host:port of MinIO/S3)"
        )
    dev = s.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigurationError(f"MUSE_DEVICE={dev!r} is invalid; valid: auto, cpu, cuda, cuda:N")
    return s


def load_settings(env: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Read settings: defaults < ``MUSE_CONFIG`` TOML < environment < ``overrides``.

    Args:
        env: the environment to read (default ``os.environ``).
        overrides: field values that win over everything else.

    Raises:
        ConfigurationError: an unknown key, a malformed value or an unknown scheme, naming it.
    """
    env = dict(os.environ if env is None else env)
    values: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(Settings)}

    config_path = env.get("MUSE_CONFIG")
    if config_path:
        doc = read_toml(config_path, f"MUSE_CONFIG={config_path!r}")
        section = doc.get("muse", doc)
        unknown = set(section) - fields
        if unknown:
            raise ConfigurationError(
                f"MUSE_CONFIG={config_path!r}: unknown keys {sorted(unknown)}; valid: {sorted(fields)}"
            )
        values.update(section)

    for var, name in ENV_VARS.items():
        if var in env and env[var] != "":
            raw = env[var]
            if name in ("index_params", "search_params"):
                values[name] = _parse_json_dict(var, raw)
            elif name in NUMERIC_FIELDS:
                values[name] = _parse_number(var, raw, NUMERIC_FIELDS[name])
            else:
                values[name] = raw

    unknown = set(overrides) - fields
    if unknown:
        raise ConfigurationError(f"unknown settings {sorted(unknown)}; valid: {sorted(fields)}")
    values.update(overrides)

    data_dir = Path(values.get("data_dir", "muse-data")).expanduser()
    values["data_dir"] = data_dir
    if not values.get("database_url"):
        values["database_url"] = f"sqlite:///{(data_dir / 'muse.sqlite').absolute()}"
    if not values.get("milvus_uri"):
        values["milvus_uri"] = str((data_dir / "milvus.db").absolute())
    if str(values["database_url"]).startswith(("postgresql://", "postgres://")):
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; this project ships psycopg2.
        values["database_url"] = "postgresql+psycopg2://" + str(values["database_url"]).split("://", 1)[1]
    if not values.get("broker_url"):
        values["broker_url"] = "filesystem://"
    if not values.get("bulk_url"):
        values["bulk_url"] = (data_dir / "bulk").absolute().as_uri()
    elif str(values["bulk_url"]).startswith("/"):
        values["bulk_url"] = Path(values["bulk_url"]).as_uri()
    values["index_type"] = str(values.get("index_type", "FLAT")).upper()
    return _validate(Settings(**values))
