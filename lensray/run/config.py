"""Screening configuration: YAML parsed with a safe loader, validated into typed objects.

Every option has a default and a description. Every problem with a config raises
:class:`~lensray.errors.LensrayInputError` with one line naming the field (``zoo[2].gpus: ...``),
before any Ray work starts. Nothing in a config is evaluated: YAML is read with ``yaml.safe_load``.
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lensray.engine.data import SYNTHETIC, TaskConfig, load_task
from lensray.errors import LensrayInputError
from lensray.engine.probe import ProbeConfig
from lensray.core.selection import SELECTORS
from lensray.redact import redact

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
PREDICTORS = tuple(SELECTORS)
MIN_GRID_POINTS = 3
MAX_GRID_POINTS = 64


class _Model(BaseModel):
    """Unknown keys and non-finite numbers (``.inf``, ``.nan``) are refused in every section."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RayConfig(_Model):
    """Where Ray runs."""

    address: str | None = Field(None, description="Ray address ('auto', 'ray://host:10001'); null = start a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (null = all); ignored with an address")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of the local Ray (null = detect); ignored with an address")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="candidates probed at once (null = the cluster's GPUs // GPUs per candidate, else its "
        "CPUs // CPUs per candidate; a replay: its CPUs)")


class StorageConfig(_Model):
    """Where results go."""

    path: str = Field("runs/lensray", min_length=1, description="output folder, or an s3:// / gs:// URI (pyarrow.fs)")


class GridConfig(_Model):
    """The nested subset sizes probed: start, start*factor, ... <= max_samples (and 0 if zero_shot)."""

    start: int = Field(200, ge=1, description="smallest non-zero subset size")
    factor: float = Field(2.0, gt=1.0, description="growth factor between consecutive sizes")
    max_samples: int = Field(3200, ge=1, description="largest subset size probed: the budget D_max")
    zero_shot: bool = Field(True, description="also evaluate the candidate before fine-tuning (D = 0)")

    def sizes(self) -> list[int]:
        """Subset sizes in increasing order, 0 first when ``zero_shot``."""
        sizes = [0] if self.zero_shot else []
        size = self.start
        while size <= self.max_samples and len(sizes) <= MAX_GRID_POINTS:
            sizes.append(size)
            size = max(int(round(size * self.factor)), size + 1)
        return sizes


class CandidateConfig(_Model):
    """One candidate checkpoint of the zoo."""

    id: str = Field(..., min_length=1, description="unique name of the candidate in outputs")
    model: str | None = Field(None, description="hub id, local folder or tiny:<family>:k=v spec (default: id)")
    size: float | None = Field(None, gt=0, description="number of parameters (null = counted when loaded)")
    family: str | None = Field(None, description="model family, used by selectors that share strength")
    gpus: float = Field(0, ge=0, description="GPUs per Ray Train worker")
    cpus: float = Field(1, gt=0, description="CPUs per Ray Train worker")
    workers: int = Field(1, ge=1, description="Ray Train workers (more than 1 for DDP/FSDP)")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="across workers: ddp replicates the model, fsdp "
                                             "shards parameters, gradients and optimiser state (FSDP2)")
    trust_remote_code: bool = Field(False, description="run code from the model repository (unsafe; warns)")
    allow_pickle: bool = Field(False, description="accept pickle-based checkpoints (unsafe)")

    @property
    def source(self) -> str:
        """What to load: ``model`` or, when unset, ``id``."""
        return self.model or self.id


class PredictorConfig(_Model):
    """How curves are extrapolated to ``target_samples``."""

    method: Literal[PREDICTORS] = Field("lensray", description="selection method (see lensray.core.selection)")  # type: ignore[valid-type]
    level: float = Field(0.9, gt=0, lt=1, description="coverage of the predictive interval")


class PruningConfig(_Model):
    """When the scheduler stops candidates that cannot win."""

    enabled: bool = Field(True, description="stop losing candidates early")
    top_k: int = Field(2, ge=1, description="a candidate is kept while it can still reach the top k")
    grace_points: int = Field(3, ge=3, description="probes (D > 0) a candidate runs before it can be stopped")
    scout: bool = Field(True, description="first probe every candidate up to the grace, then continue them best "
                        "predicted first: each is judged against the whole zoo's early curves (one more trial per "
                        "candidate, which loads its model again)")
    relative: bool = Field(True, description="judge two candidates on the interval of their difference, where the "
                           "zoo-common error cancels (lensray predictor); false: on their marginal intervals")


class MlflowTracking(_Model):
    """An MLflow run per candidate and stage, named by its id (Ray's MLflowLoggerCallback; needs
    the ``mlflow`` or ``mlflow-skinny`` package, ``lensray[tracking]``); ``tracking.mlflow: {}``
    turns it on."""

    tracking_uri: str | None = Field(None, description="MLflow server (http://...), database (sqlite:///mlflow.db: "
                                     "the full mlflow package) or folder (file:///...: MLflow 3 needs "
                                     "MLFLOW_ALLOW_FILE_STORE=true); null: $MLFLOW_TRACKING_URI, else MLflow's default")
    experiment_name: str = Field("lensray", min_length=1, description="MLflow experiment")


class WandbTracking(_Model):
    """A W&B run per candidate and stage, named by its id (Ray's WandbLoggerCallback; needs
    ``wandb``, ``lensray[tracking]``, and WANDB_API_KEY or ``wandb login``, or WANDB_MODE=offline);
    ``tracking.wandb: {}`` turns it on."""

    project: str = Field("lensray", min_length=1, description="W&B project")
    group: str | None = Field(None, description="W&B group (null: the config's name)")


class TrackingConfig(_Model):
    """Experiment trackers: each probe's candidate, n_samples, loss, FLOPs and, once forecast, its
    predicted loss at D* and interval (predicted_loss, pred_lo, pred_hi) go to each."""

    csv: bool = Field(False, description="progress.csv per candidate under <out>/tune (Ray's CSVLoggerCallback)")
    json_lines: bool = Field(False, description="result.json (JSON lines) per candidate under <out>/tune (Ray's "
                             "JsonLoggerCallback)")
    tensorboard: bool = Field(False, description="TensorBoard event files under <out>/tune (Ray's TBXLoggerCallback)")
    mlflow: MlflowTracking | None = Field(None, description="log to MLflow")
    wandb: WandbTracking | None = Field(None, description="log to Weights & Biases")


class ScreenConfig(_Model):
    """A whole screening run."""

    name: str = Field("lensray", min_length=1, description="run name")
    ray: RayConfig = Field(default_factory=RayConfig, description="where Ray runs")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="where results go")
    target_samples: int = Field(1_638_400, ge=1, description="D*: the full fine-tuning data size")
    grid: GridConfig = Field(default_factory=GridConfig, description="the subset sizes probed")
    zoo: list[CandidateConfig] = Field(default_factory=list, description="the candidates")
    task: TaskConfig = Field(default_factory=TaskConfig, description="the fine-tuning task (lensray.engine.data)")
    probe: ProbeConfig = Field(default_factory=ProbeConfig, description="probe hyperparameters (lensray.engine.probe)")
    predictor: PredictorConfig = Field(default_factory=PredictorConfig, description="extrapolation to D*")
    pruning: PruningConfig = Field(default_factory=PruningConfig, description="early stopping")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="experiment trackers")
    tokens_per_sample: float = Field(35, gt=0, description="tokens per sample for the compute bill (replay)")

    @model_validator(mode="after")
    def _ntk_follows_the_predictor(self) -> "ScreenConfig":
        """``probe.ntk`` unset: the probes compute the NTK features exactly when the predictor uses them."""
        if self.probe.ntk is None:
            self.probe.ntk = self.predictor.method == "lensllm"
        return self

    def grid_sizes(self) -> list[int]:
        """The subset sizes probed, increasing, 0 first when zero-shot is on."""
        return self.grid.sizes()

    def candidate(self, candidate_id: str) -> CandidateConfig:
        """The candidate with this id (KeyError if absent)."""
        for cand in self.zoo:
            if cand.id == candidate_id:
                return cand
        raise KeyError(candidate_id)

    def to_yaml(self) -> str:
        """The resolved config as YAML (what ``config.yaml`` in the output holds)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_config(
    source: str | Path | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    check_task: bool = True,
) -> ScreenConfig:
    """Read and validate a screening config.

    Parameters
    ----------
    source
        YAML file path, an already parsed mapping, or None for ``configs/demo.yaml``.
    overrides
        Keys set after reading (:func:`set_key`), e.g. ``{"storage.path": "out", "zoo[0].gpus": 1}``.
    check_task
        Check that the built-in synthetic task's train split holds ``grid.max_samples`` samples
        (False for replay runs, which fine-tune nothing).

    Raises
    ------
    LensrayInputError
        One line naming the field, for a missing file, YAML syntax errors, unknown keys (with a
        did-you-mean), wrong types and inconsistent values.
    """
    data = copy.deepcopy(dict(source)) if isinstance(source, Mapping) else read_yaml(source or DEFAULT_CONFIG)
    config = validate(ScreenConfig, data, overrides)
    _check_semantics(config)
    if check_task and config.task.source == SYNTHETIC:  # cheap here; file and hub tasks are sized by the driver
        check_train_size(config, len(load_task(config.task).train))
    for cand in config.zoo:
        if cand.trust_remote_code:
            log.warning("zoo candidate %r sets trust_remote_code: true: code from its repository will run", cand.id)
    return config


def read_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML file as a mapping, read with the safe loader (no tags, nothing evaluated).

    Every problem raises :class:`LensrayInputError` with one line starting ``{what}: `` and
    naming the file (and the line and column of a syntax error).
    """
    path = Path(path)
    if not path.is_file():
        raise LensrayInputError(f"{what}: file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        kind = "YAML tag not allowed (plain YAML only)" if isinstance(exc, yaml.constructor.ConstructorError) \
            else "YAML syntax error"
        raise LensrayInputError(f"{what}: {kind} in {path}{where}: {problem}") from None
    except UnicodeDecodeError:
        raise LensrayInputError(f"{what}: {path} is not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LensrayInputError(f"{what}: {path} must hold a mapping of keys, not a {type(data).__name__}")
    return data


def parse_set(text: str) -> tuple[str, Any]:
    """``"grid.max_samples=800"`` -> ``("grid.max_samples", 800)``: the value is read as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise LensrayInputError(f"--set {text}: expected KEY=VALUE, e.g. grid.max_samples=800")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise LensrayInputError(f"--set {key}: value {raw!r} is not plain YAML") from None
    return key, value


_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key (``grid.max_samples``, ``zoo[0].gpus``) in parsed config data, creating sections."""
    parts: list[str | int] = [int(i) if i else name for name, i in _PART.findall(key)]
    if not parts or _join(parts) != key:
        raise LensrayInputError(f"{key}: not a config key (use dotted names, e.g. grid.max_samples or zoo[0].gpus)")
    node: Any = data
    for depth, part in enumerate(parts):
        above = _join(parts[:depth]) or "config"
        if isinstance(part, int) and not (isinstance(node, list) and part < len(node)):
            raise LensrayInputError(f"{key}: {above} has no entry {part}")
        if isinstance(part, str) and not isinstance(node, dict):
            raise LensrayInputError(f"{above}: must be a mapping of settings, got {type(node).__name__} {node!r:.40} "
                                    f"(so {key} cannot be set)")
        if depth == len(parts) - 1:
            node[part] = value
        else:
            if isinstance(part, str) and node.get(part) is None:
                node[part] = {}
            node = node[part]


def _join(parts: list[str | int] | tuple) -> str:
    """``["zoo", 0, "gpus"]`` -> ``"zoo[0].gpus"``."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")


M = typing.TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
             where: str = "") -> M:
    """``model`` from parsed data with ``overrides`` set (:func:`set_key`); errors as one line (:func:`describe`)."""
    data = copy.deepcopy(dict(data))
    for key, value in (overrides or {}).items():
        set_key(data, key, value)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise LensrayInputError(where + describe(exc, model)) from None


def describe(exc: ValidationError, model: type[BaseModel]) -> str:
    """The first error of ``exc`` (unknown keys first, with a did-you-mean) as ``field.path: message``."""
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    where = _join(list(first["loc"])) or "config"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        names = _field_names(model, first["loc"][:-1])
        close = difflib.get_close_matches(str(first["loc"][-1]), names, n=1)
        msg = f"unknown key; did you mean '{close[0]}'?" if close else f"unknown key; known keys: {', '.join(sorted(names))}"
    elif first["type"] != "missing" and "input" in first and not isinstance(first["input"], (dict, list)):
        msg = f"{msg} (got {first['input']!r})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {msg}{more}"


def _field_names(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The keys of the section at ``loc`` (list indices skipped)."""
    for part in loc:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        model = _unwrap(field.annotation) if field is not None else None
    if model is None:
        return []
    return sorted({f.alias or n for n, f in model.model_fields.items()} | set(model.model_fields))


def _unwrap(annotation: Any) -> Any:
    """The BaseModel inside ``X | None`` / ``list[X]`` annotations (None when there is none)."""
    origin = typing.get_origin(annotation)
    if origin is None:
        return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    for arg in typing.get_args(annotation):
        found = _unwrap(arg)
        if found is not None:
            return found
    return None


def _check_semantics(config: ScreenConfig) -> None:
    grid = config.grid
    if grid.max_samples >= config.target_samples:
        raise LensrayInputError(
            f"grid.max_samples: {grid.max_samples} must be smaller than target_samples ({config.target_samples})"
        )
    points = [d for d in grid.sizes() if d > 0]
    if len(points) < MIN_GRID_POINTS:
        raise LensrayInputError(
            f"grid: {len(points)} subset size(s) > 0 between start {grid.start} and max_samples {grid.max_samples} "
            f"(factor {grid.factor:g}); at least {MIN_GRID_POINTS} are needed to fit a curve"
        )
    if len(points) > MAX_GRID_POINTS:
        raise LensrayInputError(f"grid: more than {MAX_GRID_POINTS} subset sizes; raise grid.factor or lower max_samples")
    if not config.zoo:
        raise LensrayInputError("zoo: empty; list at least one candidate")
    seen: dict[str, int] = {}
    for i, cand in enumerate(config.zoo):
        if cand.id in seen:
            raise LensrayInputError(f"zoo[{i}].id: duplicate candidate id {cand.id!r} (also zoo[{seen[cand.id]}])")
        if redact(cand.id) != cand.id:  # ids are written to every output, where secrets never go
            raise LensrayInputError(f"zoo[{i}].id: holds the value of a secret environment variable; choose another id")
        seen[cand.id] = i
        if cand.source.startswith("tiny:"):
            from lensray.engine.models import parse_tiny_id

            try:
                parse_tiny_id(cand.source)
            except LensrayInputError as exc:
                raise LensrayInputError(f"zoo[{i}].model: {exc}") from None
        if cand.strategy == "fsdp" and cand.workers > 1 and config.probe.ntk:
            raise LensrayInputError(f"zoo[{i}].strategy: fsdp shards the parameters, the NTK features (probe.ntk, on "
                                    "by default with predictor lensllm) need whole per-sample gradients; use strategy "
                                    "ddp or set probe.ntk: false")


def check_train_size(config: ScreenConfig, n_train: int) -> None:
    """Raise when the task's train split cannot hold the largest probe subset (``grid.max_samples``)."""
    if n_train < config.grid.max_samples:
        raise LensrayInputError(
            f"grid.max_samples: {config.grid.max_samples} is larger than the train split of task "
            f"{config.task.source!r} ({n_train} rows); lower grid.max_samples or use more data"
        )


def config_reference() -> str:
    """Markdown table of every config option: key, type, default and doc line.

    docs/CONFIG.md holds this table; ``tests/test_readme.py`` keeps them equal.
    """
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            inner = _unwrap(field.annotation)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                walk(inner, f"{key}[]." if typing.get_origin(field.annotation) is list else f"{key}.")
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            if typing.get_origin(field.annotation) is Literal:
                kind = " or ".join(repr(v) for v in typing.get_args(field.annotation))
            else:
                kind = getattr(field.annotation, "__name__", None) or str(field.annotation).replace("typing.", "")
            doc = (field.description or "").replace("|", "\\|").replace("\n", "\\n")
            rows.append(f"| `{key}` | {kind.replace(' | ', ' or ')} | `{default}` | {doc} |")

    walk(ScreenConfig, "")
    return "\n".join(rows)


DEFAULT_REPLAY_OUT = "runs/replay"


def run_inputs(
    source: str | Path | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    replay: str | Path | None = None,
    warn: typing.Callable[[str], None] = log.warning,
) -> tuple[ScreenConfig, Any]:
    """The validated config of a run and, with ``replay`` (a curves CSV), its curves (else None).

    Everything is checked here, before any Ray work: the config (:func:`load_config`), the task
    (:func:`check_task`), a replay table (:func:`replay_config`) and, inside a Ray job, that the
    output is not a relative path (:func:`check_job_output`).
    """
    if replay is not None:
        config, curves = replay_config(replay, source, overrides, warn)
    else:
        config, curves = load_config(source, overrides), None
        check_task(config)
    check_job_output(config.storage.path)
    return config, curves


def replay_config(
    curves_path: str | Path,
    source: str | Path | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    warn: typing.Callable[[str], None] = log.warning,
) -> tuple[ScreenConfig, Any]:
    """Config and curves of a replay run: the zoo is the table's rows, or the zoo of ``source``.

    ``overrides`` must set ``grid.max_samples`` (the probe budget); the settings of ``source``
    (predictor, pruning, ...) apply. ``warn`` gets one line each for losses missing under the
    budget and for rows without a size.
    """
    from lensray.core.curves import load_curves_csv

    overrides = dict(overrides or {})
    max_samples = overrides.get("grid.max_samples")
    if max_samples is None:
        raise LensrayInputError("--max-samples: required with --replay (the probe budget D_max; "
                                "or --set grid.max_samples=N)")
    if not isinstance(max_samples, int) or isinstance(max_samples, bool):
        raise LensrayInputError(f"grid.max_samples: must be an integer, got {max_samples!r}")
    curves = load_curves_csv(curves_path, allow_missing=True)
    curves.budget(max_samples)  # at least 3 points with D > 0 under the budget
    zoo = [{"id": cid, **({"size": float(s)} if s == s else {}), "family": f}
           for cid, s, f in zip(curves.ids, curves.size, curves.family)]
    positive = [int(d) for d in curves.D if d > 0]
    base = {"name": f"replay-{Path(curves_path).stem}", "zoo": zoo, "storage": {"path": DEFAULT_REPLAY_OUT},
            "grid": {"start": positive[0], "factor": 2, "zero_shot": bool((curves.D == 0).any())}}
    if source is None:
        config = load_config(base, overrides, check_task=False)
    else:  # the given settings on the table's zoo unless they list their own
        given = copy.deepcopy(dict(source)) if isinstance(source, Mapping) else read_yaml(source)
        grid = given.get("grid") or {}
        grid = {**base["grid"], **grid} if isinstance(grid, dict) else grid  # not a mapping: refused by validation
        config = load_config({**base, **given, "grid": grid}, overrides, check_task=False)
        missing = [c.id for c in config.zoo if c.id not in curves.ids]
        if missing:
            raise LensrayInputError(f"zoo: candidate {missing[0]!r} has no row in {curves_path} (column 'config name')")
        curves = curves.take([curves.ids.index(c.id) for c in config.zoo])
    _warn_incomplete(curves.budget(max_samples), str(curves_path), {c.id for c in config.zoo if c.size}, warn)
    return config, curves


def _warn_incomplete(seen: Any, path: str, sized: set[str], warn: typing.Callable[[str], None]) -> None:
    """Warn about losses missing under the budget (those probes are skipped) and rows without a
    size, in the table or in the config's zoo (``sized``): their probes are not billed."""
    import numpy as np

    holes = [(cid, d) for cid, sizes in seen.missing().items() for d in sizes]
    if holes:
        where = "; ".join(f"row '{c}' column '{d}'" for c, d in holes[:3]) + (" ..." if len(holes) > 3 else "")
        warn(f"{path}: {len(holes)} loss(es) missing under the budget ({where}); those probes are "
             "skipped and the candidates fitted on the rest")
    unsized = [cid for cid, s in zip(seen.ids, seen.size) if not np.isfinite(s) and cid not in sized]
    if unsized:
        names = ", ".join(unsized[:3]) + (" ..." if len(unsized) > 3 else "")
        warn(f"{path}: no size for {len(unsized)} candidate(s) ({names}); their probes are not billed "
             "and the saved fraction covers the others")


def check_task(config: ScreenConfig) -> None:
    """Before any Ray work: the task must be had, and its train split hold ``grid.max_samples`` rows.

    A local-file task, or a hub dataset while the hub is offline, is loaded here (from the files,
    or the local cache); an online hub dataset must exist on the hub
    (:func:`lensray.engine.data.check_hub_dataset`). Errors name ``task.source``, exit 2.
    (:func:`load_config` sizes the synthetic task itself.)
    """
    from lensray.engine.data import _local_files, check_hub_dataset
    from lensray.engine.models import hub_offline

    if config.task.source == SYNTHETIC:
        return
    import datasets

    datasets.disable_progress_bars()  # an error stays one line; the driver prints its own progress
    if _local_files(config.task.source) is not None or hub_offline():
        check_train_size(config, len(load_task(config.task).train))
    else:
        check_hub_dataset(config.task)


JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor in the environment of every ``ray job submit`` entrypoint."""


def check_job_output(path: str) -> None:
    """Inside a Ray job a relative output path is refused (LensrayInputError, exit 2).

    The job runs in a temporary copy of the submitter's working dir on the head node, which Ray
    deletes with the session, and the submitter's own working dir cannot be known from the job
    (it may be another machine), so a relative path cannot be resolved to where the user meant.
    """
    if "://" in path or os.path.isabs(os.path.expanduser(path)) or JOB_ENV not in os.environ:
        return
    raise LensrayInputError(
        f"storage.path: {path!r} is relative, and inside a Ray job it would land in the job's temporary "
        "copy of the working dir (deleted with the session); give --out an absolute path on storage every "
        "node shares, or a URI such as s3://bucket/runs/name")
