"""A job's ``params`` -> the configuration it runs with: the one reading, for every service.

The API calls ``check_job`` when a job is submitted, before any row exists; the trainer
(``services.trainer.spec``) and the miner (``services.miner.params``) call ``resolve_config`` and
``check_options`` again when the job runs (a job row may also come from a pipeline or a script).
All of them go through ``orl.config.apply_overrides`` and ``Config.validate``, the functions the
``orl`` CLI uses, so a value is accepted or refused the same way everywhere.

What params hold (docs/SERVICES.md, "Job parameters"):

- pretrain / train: ``preset``, any ``TrainConfig`` field by name (``epochs``, ``base_lr`` ...),
  ``set`` (overrides of any section: ``{"augment.image_size": 96}`` or ``{"augment":
  {"image_size": 96}}``), ``max_steps``, ``nproc``, ``device``; train also ``mine_job_id``,
  ``init_from_checkpoint_id``, ``init_from`` and ``stage1_checkpoint_id``.
- mine: ``checkpoint_id``, ``preset`` (its mining options), any ``MineConfig`` field by name,
  ``set`` (``mine.*`` keys only: the model is the checkpoint's).
- pipeline: ``{"pretrain": {...}, "mine": {...}, "train": {...}}``.

Defaults (one rule, ``orl.config.default_preset``): a job that starts from a checkpoint takes its
configuration (mine: the checkpoint's; train: that of the checkpoint its pairs were mined with);
a pretrain job without ``preset`` takes ``paper`` when it runs on a CUDA device, else ``cpu``,
decided by the trainer that runs it and recorded in the job's ``result["config"]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from orl.config import (
    PRESETS,
    Config,
    ConfigError,
    apply_overrides,
    default_preset,
    flatten_overrides,
    get_preset,
    section_fields,
)
from services.common import embedding_maps
from services.common.artifacts import artifact_file, checkpoint_config
from services.common.models import JOB_KINDS, MAX_ID, Artifact, Job
from services.common.paths import PathRefused

PIPELINE_STAGES = ("pretrain", "mine", "train")
TRAINER_KEYS = ("preset", "set", "max_steps", "nproc", "device")
TRAIN_KEYS = ("mine_job_id", "init_from_checkpoint_id", "init_from", "stage1_checkpoint_id")
MINE_KEYS = ("checkpoint_id", "preset", "set")
# The presets the default rule can choose for a pretrain job; at submission the device is not
# known yet, so params must be valid on top of each.
DEFAULT_CANDIDATES = ("cpu", "paper")
_WHAT = {"pretrain": "training", "train": "training", "mine": "mining"}


class ParamsError(ValueError):
    """A job's params cannot run. ``field`` names the parameter ("params.knn_k", ...)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


def _section(kind: str) -> str:
    return "mine" if kind == "mine" else "train"


def _keys(kind: str) -> tuple[str, ...]:
    if kind == "mine":
        return MINE_KEYS
    return TRAINER_KEYS + (TRAIN_KEYS if kind == "train" else ())


def check_keys(kind: str, params: Mapping[str, Any], prefix: str = "params") -> None:
    valid = _keys(kind) + section_fields(_section(kind))
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ParamsError(f"{prefix}.{unknown[0]}", f"unknown {_WHAT[kind]} parameter(s) {', '.join(unknown)}; "
                                                    f"valid: {', '.join(valid)}")


def _overrides(kind: str, params: Mapping[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(dotted overrides, dotted key -> the params field it came from)."""
    section = _section(kind)
    over: dict[str, Any] = {}
    where: dict[str, str] = {}
    for name in section_fields(section):
        if name in params:
            over[f"{section}.{name}"] = params[name]
            where[f"{section}.{name}"] = f"{prefix}.{name}"
    extra = params.get("set")
    if extra is None:
        return over, where
    if not isinstance(extra, Mapping):
        example = f"{section}.{section_fields(section)[0]}"
        raise ParamsError(f"{prefix}.set", f'{prefix}.set must be an object like {{"{example}": ...}} or '
                                           f'{{"{section}": {{...}}}}, got {extra!r}')
    try:
        flat = flatten_overrides(extra)
    except ConfigError as exc:
        raise ParamsError(f"{prefix}.set.{exc.field}" if exc.field else f"{prefix}.set", str(exc)) from None
    for key, value in flat.items():
        if kind == "mine" and not key.startswith("mine."):
            raise ParamsError(f"{prefix}.set.{key}", f"a mine job sets mine.* fields only; {key} comes from the "
                                                     "checkpoint (train a checkpoint with it instead)")
        if key in over:
            raise ParamsError(f"{prefix}.set.{key}", f"{key} is given twice, as {where[key]} and in {prefix}.set; "
                                                     "keep one")
        over[key] = value
        where[key] = f"{prefix}.set.{key}"
    return over, where


def resolve_config(kind: str, params: Mapping[str, Any], base: Config, prefix: str = "params") -> Config:
    """``base`` (a preset, or the checkpoint's configuration), then ``params.preset``, then the
    overrides in ``params``, validated. pretrain / train: a preset replaces the whole base; mine:
    only its mining options. Raises ParamsError naming the parameter."""
    check_keys(kind, params, prefix)
    cfg = base
    if params.get("preset") is not None:
        name = params["preset"]
        if not isinstance(name, str) or name not in PRESETS:
            raise ParamsError(f"{prefix}.preset", f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        preset = get_preset(name)
        cfg = replace(base, preset=name, mine=preset.mine) if kind == "mine" else preset
    over, where = _overrides(kind, params, prefix)
    try:
        return apply_overrides(cfg, over)
    except ConfigError as exc:
        # A range error on a field nobody set comes from the base (the checkpoint's config).
        raise ParamsError(where.get(exc.field, exc.field), str(exc)) from None


def default_base(device: str) -> Config:
    """The base of a pretrain job that names no preset, on the device it runs on."""
    return get_preset(default_preset(device))


# -- options that are not configuration fields -----------------------------------------------------
def _int_or_none(params: Mapping[str, Any], key: str, prefix: str, low: int = 1) -> None:
    v = params.get(key)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        raise ParamsError(f"{prefix}.{key}", f"{prefix}.{key} must be an integer, got {v!r}")
    if v < low:
        raise ParamsError(f"{prefix}.{key}", f"{prefix}.{key} must be at least {low}, got {v}")
    if v > MAX_ID:  # ids are Postgres bigints; counts that large mean a typo
        raise ParamsError(f"{prefix}.{key}", f"{prefix}.{key} must be at most {MAX_ID}, got {v}")


def check_options(kind: str, params: Mapping[str, Any], prefix: str = "params") -> None:
    """Types and ranges of the parameters that are not config fields (ids, nproc, device ...)."""
    ids = ("checkpoint_id",) if kind == "mine" else ("max_steps", "nproc") + (
        ("mine_job_id", "init_from_checkpoint_id", "stage1_checkpoint_id") if kind == "train" else ())
    for key in ids:
        _int_or_none(params, key, prefix)
    device = params.get("device")
    if device is not None and (not isinstance(device, str) or not (
            device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()))):
        raise ParamsError(f"{prefix}.device", f"{prefix}.device must be auto, cpu, cuda or cuda:N, got {device!r}")
    init = params.get("init_from")
    if init not in (None, "random", "stage1"):
        raise ParamsError(f"{prefix}.init_from", f"{prefix}.init_from must be 'stage1' or 'random', got {init!r}")


def usable_checkpoint(session: Session, value: Any, field: str, artifacts_dir: Path) -> tuple[Artifact, Config]:
    """The checkpoint artifact ``value`` names and its configuration; ParamsError when it is not
    one, or its file is gone or unreadable."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ID:
        raise ParamsError(field, f"{field} must be an artifacts id (integer from 1 to {MAX_ID}), got {value!r}")
    art = session.get(Artifact, value)
    if art is None or art.kind != "checkpoint":
        raise ParamsError(field, f"{field}={value} is not a checkpoint artifact; list them with "
                                 "GET /api/v1/checkpoints")
    try:
        path = artifact_file(art.path, artifacts_dir)
    except PathRefused:
        raise ParamsError(field, f"checkpoint {value}'s path leads outside the artifacts volume; "
                                 "pick another with GET /api/v1/checkpoints") from None
    if not path.is_file():
        raise ParamsError(field, f"checkpoint {value}'s file ({art.path}) is not on the artifacts volume; "
                                 "pick another with GET /api/v1/checkpoints")
    try:
        cfg = checkpoint_config(art, artifacts_dir).validate()
    except Exception as exc:  # a corrupt file, or a config this version cannot build
        raise ParamsError(field, f"checkpoint {value} ({art.path}) cannot be used: {exc}") from None
    return art, cfg


# -- at submission -------------------------------------------------------------------------------------
MAX_DEPTH = 16  # a pipeline's params are 4 levels deep (stage, set, section, field)


def _storable_text(text: str) -> bool:
    """Text jsonb takes: no NUL, and valid Unicode (JSON allows a lone "\\udb09"; Postgres refuses it)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_storable(value: Any, field: str) -> None:
    """Params are stored as Postgres jsonb, which holds no NaN or Infinity, no NUL character and
    no lone surrogate; JSON parsers accept all of them, so they are refused here, naming where
    they are, as is nesting deeper than MAX_DEPTH (no parameter is that deep; walking it would
    only cost the server)."""
    stack: list[tuple[Any, str, int]] = [(value, field, 0)]
    while stack:
        v, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ParamsError(where, f"params are nested deeper than {MAX_DEPTH} levels at {where}")
        if isinstance(v, float) and not math.isfinite(v):
            raise ParamsError(where, f"{where} must be a finite number, got {v!r}")
        if isinstance(v, str) and not _storable_text(v):
            raise ParamsError(where, f"{where} must not contain a NUL character or a lone surrogate")
        if isinstance(v, Mapping):
            for k, item in v.items():
                if not _storable_text(str(k)):
                    raise ParamsError(where, f"a key of {where} contains a NUL character or a lone surrogate")
                stack.append((item, f"{where}.{k}", depth + 1))
        elif isinstance(v, list):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(v))


def check_job(session: Session, kind: str, params: Mapping[str, Any], artifacts_dir: Path) -> None:
    """Everything that can be checked before a job exists; ParamsError naming the field.

    Unknown kinds and keys, wrong types, out-of-range values (on top of every base the job could
    run with), and references: a mine job's checkpoint must be a usable checkpoint, a train job's
    mine_job_id a mine job.
    """
    if kind == "register":
        raise ParamsError("kind", "register jobs are made by POST /api/v1/datasets (or /datasets/{id}/rescan)")
    if kind not in JOB_KINDS:
        valid = ", ".join(k for k in JOB_KINDS if k != "register")
        raise ParamsError("kind", f"unknown job kind {kind!r}; valid kinds: {valid}")
    if not isinstance(params, Mapping):
        raise ParamsError("params", "params must be an object")
    check_storable(params, "params")
    if kind == "embedding_map":
        # Its params are no config fields: embedding_maps reads them (the worker does again).
        try:
            mp = embedding_maps.parse_params(dict(params))
        except embedding_maps.MapParamsError as exc:
            raise ParamsError("params", str(exc)) from None
        usable_checkpoint(session, mp.checkpoint_id, "params.checkpoint_id", artifacts_dir)
        return
    if kind != "pipeline":
        _check_stage(session, kind, params, artifacts_dir, "params", None)
        return
    bad = [k for k, v in params.items() if k not in PIPELINE_STAGES or not isinstance(v, Mapping)]
    if bad:
        raise ParamsError(f"params.{bad[0]}", "pipeline params take one object per stage (keys pretrain, mine, "
                                              f"train); move or remove {', '.join(map(repr, bad))}")
    # The mine and train stages start from the pretrain stage's checkpoint, so its configuration
    # is their base, whichever preset the default rule picks for it.
    for stage1 in _pretrain_configs(params.get("pretrain") or {}, "params.pretrain"):
        for stage in ("mine", "train"):
            _check_stage(session, stage, params.get(stage) or {}, artifacts_dir, f"params.{stage}", stage1)


def _pretrain_configs(params: Mapping[str, Any], prefix: str) -> list[Config]:
    check_options("pretrain", params, prefix)
    names = DEFAULT_CANDIDATES if params.get("preset") is None else ("cpu",)  # a named preset replaces the base
    return [resolve_config("pretrain", params, get_preset(n), prefix) for n in names]


def _check_stage(session: Session, kind: str, params: Mapping[str, Any], artifacts_dir: Path, prefix: str,
                 stage1: Config | None) -> None:
    """One stage's params; ``stage1`` is the pipeline's pretrain config (None: a standalone job)."""
    if kind == "pretrain":
        _pretrain_configs(params, prefix)
        return
    check_keys(kind, params, prefix)
    check_options(kind, params, prefix)
    if kind == "mine":
        if stage1 is None:
            if params.get("checkpoint_id") is None:
                raise ParamsError(f"{prefix}.checkpoint_id", f"a mine job needs {prefix}.checkpoint_id: the "
                                  "artifacts id of a stage-1 checkpoint (GET /api/v1/checkpoints)")
            stage1 = usable_checkpoint(session, params["checkpoint_id"], f"{prefix}.checkpoint_id", artifacts_dir)[1]
        resolve_config("mine", params, stage1, prefix)
        return
    # train
    if stage1 is None:
        ref = params.get("mine_job_id")
        if ref is None:
            raise ParamsError(f"{prefix}.mine_job_id", f"a train job needs {prefix}.mine_job_id: the id of a mine "
                              "job whose pairs it trains on (GET /api/v1/jobs?kind=mine)")
        mine = session.get(Job, ref)  # an integer in range: check_options
        if mine is None or mine.kind != "mine":
            raise ParamsError(f"{prefix}.mine_job_id", f"{prefix}.mine_job_id={ref!r} is not a mine job; list them "
                              "with GET /api/v1/jobs?kind=mine")
        ckpt = ((mine.result or {}).get("plan") or {}).get("checkpoint_id") or (mine.params or {}).get("checkpoint_id")
        try:
            stage1 = usable_checkpoint(session, ckpt, "the mine job's checkpoint_id", artifacts_dir)[1]
        except ParamsError:
            stage1 = None  # the mine job will fail on it; training is checked on the default bases
    for key in ("init_from_checkpoint_id",):
        if params.get(key) is not None:
            usable_checkpoint(session, params[key], f"{prefix}.{key}", artifacts_dir)
    bases = [stage1] if stage1 is not None else [get_preset(n) for n in DEFAULT_CANDIDATES]
    for base in bases:
        resolve_config("train", params, base, prefix)
