"""The process's connections, built from one ``Settings`` object: the database engine, the session
factory and the Celery app that sends tasks.

Import order is one way: ``settings`` (a leaf) <- ``runtime`` <- ``db``, ``broker`` <- the rest.
Nothing is built at import time; each piece is built on first use from ``get_settings()``, so tests
and ``make up`` may set the environment after importing. ``reset()`` forgets the settings and
everything built from them (tests that change ``ORL_*`` variables call it).

Forked workers (Celery prefork) must not share the parent's connections: call ``dispose_engine()``
in the child before its first query (the miner's worker main process never opens the shared engine;
its reaper thread uses an engine of its own, ``make_engine(..., poolclass=NullPool)``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from services.common.settings import Settings, get_settings


# -- builders: a Settings object in, a new object out -------------------------------------------
def make_engine(settings: Settings, **kwargs: Any) -> Engine:
    """A Postgres engine with the options every service wants (``kwargs`` override them)."""
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_pre_ping", True)  # survive a database restart between requests
        kwargs.setdefault("pool_size", 5)
        kwargs.setdefault("max_overflow", 10)
    return create_engine(settings.database_url, **kwargs)


def celery_config(settings: Settings) -> dict[str, Any]:
    """Options both the sending side and the workers use (see the service conventions)."""
    return {
        "broker_url": settings.broker_url,
        # Unacked tasks come back after this long; it must exceed the longest task.
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "broker_connection_retry_on_startup": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # Job state lives in the database; Celery results would only duplicate it.
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
    }


def make_celery(settings: Settings, name: str = "orl") -> Celery:
    app = Celery(name)
    app.conf.update(celery_config(settings))
    return app


# -- the process-wide instances, each built on first use ---------------------------------------
@lru_cache(maxsize=1)
def get_engine() -> Engine:
    return make_engine(get_settings())


@lru_cache(maxsize=1)
def get_sessionmaker() -> sessionmaker[Session]:
    # expire_on_commit=False: objects returned from a finished session stay readable (the API
    # serialises them after commit).
    return sessionmaker(get_engine(), expire_on_commit=False)


@lru_cache(maxsize=1)
def get_celery() -> Celery:
    """The sending app (the API, trainers): tasks go by name, so it needs no task modules."""
    return make_celery(get_settings())


def dispose_engine() -> None:
    """Close every pooled connection and forget the engine (after a fork, or a settings change)."""
    if get_engine.cache_info().currsize:
        get_engine().dispose()
    get_engine.cache_clear()
    get_sessionmaker.cache_clear()


def reset() -> None:
    """Forget the settings and everything built from them; the next use reads the environment."""
    get_settings.cache_clear()
    dispose_engine()
    if get_celery.cache_info().currsize:
        get_celery().close()
    get_celery.cache_clear()
