"""One settings object for the whole product.

Values come, in decreasing priority, from keyword arguments, ``QCELERY_*``
environment variables (plus MLflow's own ``MLFLOW_TRACKING_URI``), and an optional
TOML file named by ``QCELERY_CONFIG`` (default ``./qcelery.toml`` when present).
Build it once at the edge (CLI, worker start-up, test fixture) and pass it down;
library functions never read the environment themselves.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

DEFAULT_CONFIG_FILE = "qcelery.toml"


# a failover list of URLs ("amqp://h1//;amqp://h2//"): split only where a new URL starts,
# so a ';' inside a password does not cut it in two
_URL_LIST_SEP = re.compile(r";(?=[A-Za-z][A-Za-z0-9+.-]*://)")

#: the fields holding URLs that may carry credentials
#: result backend URLs Celery serves with its Redis backend
REDIS_BACKEND_SCHEMES = ("redis://", "rediss://", "sentinel://")
URL_FIELDS = ("mongo_url", "broker_url", "result_backend", "mlflow_tracking_uri")

#: how a worker takes a task (``qcelery.lease``): ``find_one_and_update`` (one command,
#: the design's claim, what real MongoDB answers from its index), ``two_step`` (a
#: conditional update by id, then a read; for servers whose findAndModify scans the
#: collection, like SecantusDB), or ``auto`` (``two_step`` on SecantusDB, else
#: ``find_one_and_update``)
ClaimStrategy = Literal["auto", "find_one_and_update", "two_step"]
CLAIM_STRATEGIES: tuple[str, ...] = get_args(ClaimStrategy)


def _mask_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # the credentials end at the last '@' (an unescaped '@', '/', '?' or '#' in a password
    # is common enough; masking too much of an odd URL is safer than showing a secret)
    at = rest.rfind("@")
    if at < 0:
        return url
    user, colon, _ = rest[:at].partition(":")
    if not colon:
        return url
    return f"{scheme}://{user}:***@{rest[at + 1 :]}"


def mask_url(url: str | None) -> str:
    """Return ``url`` with any password replaced by ``***`` (safe for logs and errors).

    Works on lists of URLs separated by ``;`` (Celery's failover brokers), Mongo URLs
    with several hosts, and passwords holding unescaped ``@``, ``/``, ``:`` or ``;``."""
    if not url:
        return str(url)
    return ";".join(_mask_one(part) for part in _URL_LIST_SEP.split(url))


class Settings(BaseSettings):
    """Everything qcelery can be configured with; defaults serve the embedded servers."""

    # hide_input_in_errors: a ValidationError must not echo a URL with its password
    model_config = SettingsConfigDict(env_prefix="QCELERY_", extra="forbid", validate_default=True, hide_input_in_errors=True)

    mongo_url: str = "mongodb://127.0.0.1:27017"
    mongo_db: str = "qcelery"
    mongo_timeout_ms: int = Field(3000, gt=0, description="server selection / connect timeout")
    broker_url: str = "redis://127.0.0.1:6379/0"
    result_backend: str | None = Field(None, description="defaults to broker_url when that is Redis")
    mlflow_tracking_uri: str | None = Field(
        None,
        validation_alias=AliasChoices("mlflow_tracking_uri", "QCELERY_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"),
        description="defaults to a local store under run_dir",
    )
    run_dir: Path = Path(".qcelery")

    lease_seconds: float = Field(60.0, gt=0)
    heartbeat_seconds: float = Field(10.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    recover_interval: float = Field(5.0, gt=0, description="beat: how often expired leases are recovered")
    sweep_interval: float = Field(15.0, gt=0, description="beat: how often unpublished waiting tasks are swept")
    sweep_after: float = Field(60.0, gt=0, description="re-publish waiting tasks last published longer ago")
    aggregate_countdown: float = Field(2.0, gt=0, description="re-check delay of an aggregation waiting for tasks")
    result_gc_interval: float = Field(3600.0, gt=0, description="beat: how often result files no task refers to are deleted")
    result_gc_after: float = Field(3600.0, gt=0, description="only result files older than this (seconds) are collected")
    calendar: str = "XSHG"
    gridfs_threshold: int = Field(1_000_000, gt=0, description="results larger than this (bytes) go to GridFS")
    max_def_bytes: int = Field(15_000_000, gt=0, description="largest pickled task definition accepted")
    max_tasks: int = Field(1_000_000, gt=0, description="most tasks one workflow may generate; more are refused before any is built")
    # NoDecode: the variable may be a JSON list or a comma-separated one (split below)
    allowed_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "modules task data may name, added to the defaults (qcelery, qlib, lightgbm, xgboost, catboost, sklearn, torch, "
            "numpy, pandas and the standard data types): what task definitions and batches import and what results "
            "and caches unpickle; 'pkg' admits pkg and its sub-modules, 'pkg.mod:Name' one object"
        ),
    )
    dispatch_window: int = Field(
        0,
        ge=0,
        description="messages a batch keeps on the broker (its window); 0: 4 per worker process serving its queue, at least 16",
    )
    task_func: str = "qcelery.trainer.task_train"
    default_queue: str = "cpu"
    soft_time_limit: float | None = None
    time_limit: float | None = None
    claim_strategy: ClaimStrategy = Field("auto", description="how workers claim tasks; see CLAIM_STRATEGIES")

    @field_validator("claim_strategy", mode="before")
    @classmethod
    def _known_claim_strategy(cls, v: Any) -> Any:
        # pydantic's own message for a Literal hides the value (hide_input_in_errors)
        if v not in CLAIM_STRATEGIES:
            raise ValueError(
                f"claim_strategy {v!r} is not one of {', '.join(CLAIM_STRATEGIES)}: "
                "use auto (the default) unless a test or benchmark must force one claim path"
            )
        return v

    @field_validator("allowed_modules", mode="before")
    @classmethod
    def _split_allowed_modules(cls, v: Any) -> Any:
        if isinstance(v, str):  # QCELERY_ALLOWED_MODULES='["a", "b"]' or 'a,b'
            text = v.strip()
            return json.loads(text) if text.startswith("[") else [p.strip() for p in text.split(",") if p.strip()]
        return v

    @field_validator("allowed_modules")
    @classmethod
    def _check_allowed_modules(cls, v: list[str]) -> list[str]:
        from .serial import allow_list

        allow_list(v)  # a malformed entry is refused here, not at the first task
        return [entry.strip() for entry in v]

    @field_validator("heartbeat_seconds")
    @classmethod
    def _heartbeat_below_lease(cls, v: float, info: Any) -> float:
        lease = info.data.get("lease_seconds")
        if lease is not None and v >= lease:
            raise ValueError(f"heartbeat_seconds ({v}) must be smaller than lease_seconds ({lease})")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = os.environ.get("QCELERY_CONFIG") or DEFAULT_CONFIG_FILE
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if Path(path).is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        elif os.environ.get("QCELERY_CONFIG"):
            from .errors import ConfigError

            raise ConfigError(f"QCELERY_CONFIG names {path!r}, which is not a file")
        return tuple(sources)

    @property
    def effective_result_backend(self) -> str:
        """The Celery result backend: ``result_backend``, else a Redis broker's own URL.

        It must be Redis: the chord that fires a batch's aggregation keeps its size and
        counts its finished parts there (``producer._publish_slots``)."""
        from .errors import ConfigError

        if self.result_backend:
            if not self.result_backend.startswith(REDIS_BACKEND_SCHEMES):
                raise ConfigError(
                    f"QCELERY_RESULT_BACKEND {mask_url(self.result_backend)} is not a Redis URL "
                    f"({', '.join(REDIS_BACKEND_SCHEMES)}): the chord that starts each batch's "
                    "aggregation counts its tasks in Redis"
                )
            return self.result_backend
        if self.broker_url.startswith(REDIS_BACKEND_SCHEMES):
            return self.broker_url
        raise ConfigError(
            f"broker {mask_url(self.broker_url)} is not Redis: set QCELERY_RESULT_BACKEND (e.g. redis://host:6379/1) for chord results"
        )

    @property
    def effective_tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        # MLflow's SQLite store (its file store is deprecated in MLflow 3); fine for one
        # process at a time: `qcelery up` serves it through a tracking server instead
        return f"sqlite:///{Path(self.run_dir).resolve() / 'mlflow.db'}"

    def to_env(self) -> dict[str, str]:
        """These settings as ``QCELERY_*`` variables, to start workers and beat with."""
        env: dict[str, str] = {}
        for key, value in self.model_dump().items():
            if value is None:
                continue
            env[f"QCELERY_{key.upper()}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        return env

    def masked(self) -> dict[str, Any]:
        """The settings as a dict with every URL's password masked (for logs)."""
        data = self.model_dump()
        for key in URL_FIELDS:
            data[key] = mask_url(data[key]) if data[key] else data[key]
        return data

    def __repr_args__(self) -> Any:
        # repr()/str() end up in logs and tracebacks: mask the URLs there too
        for key, value in super().__repr_args__():
            yield key, (mask_url(value) if key in URL_FIELDS and isinstance(value, str) else value)


def load_settings(**overrides: Any) -> Settings:
    """Build the settings once (environment + optional TOML + ``overrides``)."""
    return Settings(**overrides)
