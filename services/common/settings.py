"""Configuration from ``ORL_*`` environment variables (see docs/SERVICES.md).

Read once, on first call of ``get_settings()``, never at import time: tests and ``make up`` set the
environment after importing, and a Celery worker forks after importing. A leaf: it imports no other
service module. What is built from the settings (engine, sessions, Celery app) is in
``services.common.runtime``, whose ``reset()`` also forgets the cached settings (tests).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ORL_", extra="ignore", frozen=True)

    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/orl"
    broker_url: str = "redis://127.0.0.1:6379/0"
    # A plain string, not list[Path]: pydantic-settings would expect JSON for a list, while the
    # documented format is colon-separated like PATH.
    data_roots: str = "./data"
    artifacts_dir: Path = Path("./.state/artifacts")
    api_token: str | None = None
    # Optional: when set, every API read needs it (or api_token). The dashboard is given this one
    # only, so reaching its port never hands anyone the write token (docs/SERVICES.md, "Security").
    api_read_token: str | None = None
    # The largest request body the API reads (413 above); every body is a small JSON object.
    max_body_bytes: int = Field(1 << 20, ge=1024)
    api_url: str = "http://127.0.0.1:8000"
    # The API as a browser reaches it, when that differs from api_url (compose: http://api:8000
    # inside, the published port outside). The dashboard reads it for URLs it hands the browser.
    api_public_url: str | None = None
    visibility_timeout_s: int = Field(3600, gt=0)
    heartbeat_s: float = Field(10.0, gt=0)
    lease_s: float = Field(60.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    shard_size: int = Field(200, ge=1)
    device: Literal["cpu", "cuda", "auto"] = "auto"
    # How a miner worker spends its cores (services/miner/threads.py, orl.device.plan_threads):
    # the cores it may use (None: its CPU affinity), the cpu worker's pool processes (None:
    # min(2, cores)) and the selective-search processes of each shard (None: cores / processes).
    worker_cores: int | None = Field(None, ge=1)
    cpu_concurrency: int | None = Field(None, ge=1)
    ss_processes: int | None = Field(None, ge=1)

    @field_validator("database_url")
    @classmethod
    def _postgres_only(cls, v: str) -> str:
        if not v.startswith("postgresql"):
            raise ValueError("ORL_DATABASE_URL must be a Postgres URL (postgresql+psycopg://user@host:port/db)")
        # Plain postgresql:// would pick psycopg2, which is not installed; psycopg 3 is.
        if v.startswith("postgresql://"):
            v = "postgresql+psycopg://" + v[len("postgresql://"):]
        return v

    @field_validator("api_token", "api_read_token")
    @classmethod
    def _empty_token_is_none(cls, v: str | None) -> str | None:
        return v or None

    @model_validator(mode="after")
    def _read_token_differs(self) -> Settings:
        if self.api_read_token is not None and self.api_read_token == self.api_token:
            # Whoever holds the read token (the dashboard, its viewers' requests) could then write.
            raise ValueError("ORL_API_READ_TOKEN must differ from ORL_API_TOKEN: the read token is handed to the "
                             "dashboard, the write token must not be")
        return self

    @field_validator("worker_cores", "cpu_concurrency", "ss_processes", mode="before")
    @classmethod
    def _empty_count_is_none(cls, v: object) -> object:
        # docker-compose passes an unset host variable through as "" (`${ORL_SS_PROCESSES:-}`).
        return None if isinstance(v, str) and not v.strip() else v

    @property
    def data_root_paths(self) -> list[Path]:
        """The data roots, absolute and with symlinks resolved (the form containment is checked in)."""
        return [Path(p).expanduser().resolve() for p in self.data_roots.split(":") if p.strip()]

    @property
    def artifacts_path(self) -> Path:
        return Path(self.artifacts_dir).expanduser().resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

