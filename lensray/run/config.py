"""Screening configuration: YAML parsed with a safe loader, validated into typed objects.

Every option has a default and a description. Every problem with a config raises
:class:`~lensray.errors.LensrayInputError` with one line naming the field (``zoo[2].gpus: ...``),
before any Ray work starts. Nothing in a config is evaluated: YAML is read with ``yaml.safe_load``.
"""

from __future__ import annotations

import copy
import difflib
import logging
import typing
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
                        "predicted first: each is judged against the whole zoo's early curves (one more worker-group "
                        "start per candidate)")
    relative: bool = Field(True, description="judge two candidates on the interval of their difference, where the "
                           "zoo-common error cancels (lensray predictor); false: on their marginal intervals")


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
    tokens_per_sample: float = Field(35, gt=0, description="tokens per sample for the compute bill (replay)")

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
        Dotted keys set after reading, e.g. ``{"storage.path": "out", "ray.address": "auto"}``;
        entries whose value is None are ignored (unset CLI flags).
    check_task
        Check that the built-in synthetic task's train split holds ``grid.max_samples`` samples
        (False for replay runs, which fine-tune nothing).

    Raises
    ------
    LensrayInputError
        One line naming the field, for a missing file, YAML syntax errors, unknown keys (with a
        did-you-mean), wrong types and inconsistent values.
    """
    data = _read(source)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
    _check_keys(data, ScreenConfig, "")
    try:
        config = ScreenConfig.model_validate(data)
    except ValidationError as exc:
        raise LensrayInputError(_describe(exc)) from None
    _check_semantics(config)
    if check_task and config.task.source == SYNTHETIC:  # cheap here; file and hub tasks are sized by the driver
        check_train_size(config, len(load_task(config.task).train))
    for cand in config.zoo:
        if cand.trust_remote_code:
            log.warning("zoo candidate %r sets trust_remote_code: true: code from its repository will run", cand.id)
    return config


def _read(source: str | Path | Mapping[str, Any] | None) -> dict[str, Any]:
    if source is None:
        source = DEFAULT_CONFIG
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source))
    path = Path(source)
    if not path.is_file():
        raise LensrayInputError(f"config: file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        kind = "YAML tag not allowed (plain YAML only)" if isinstance(exc, yaml.constructor.ConstructorError) \
            else "YAML syntax error"
        raise LensrayInputError(f"config: {kind} in {path}{where}: {problem}") from None
    except UnicodeDecodeError:
        raise LensrayInputError(f"config: {path} is not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LensrayInputError(f"config: {path} must hold a mapping of keys, not a {type(data).__name__}")
    return data


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


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


def _check_keys(data: Any, model: type[BaseModel], path: str) -> None:
    """Unknown keys, with a did-you-mean, for every model whose config forbids extras."""
    if not isinstance(data, dict):
        return  # a wrong type is reported by pydantic
    fields = model.model_fields
    names = {f.alias or n: n for n, f in fields.items()} | {n: n for n in fields}
    for key, value in data.items():
        here = f"{path}.{key}" if path else str(key)
        if key not in names:
            if model.model_config.get("extra") != "forbid":
                continue
            close = difflib.get_close_matches(str(key), list(names), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(names))}"
            raise LensrayInputError(f"{here}: unknown key{hint}")
        annotation = fields[names[key]].annotation
        sub = _unwrap(annotation)
        if sub is None:
            continue
        if typing.get_origin(annotation) is list and isinstance(value, list):
            for i, item in enumerate(value):
                _check_keys(item, sub, f"{here}[{i}]")
        else:
            _check_keys(value, sub, here)


def _describe(exc: ValidationError) -> str:
    errors = exc.errors()
    first = errors[0]
    where = ""
    for part in first["loc"]:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    msg = first["msg"]
    if first["type"] not in ("missing",) and "input" in first and not isinstance(first["input"], (dict, list)):
        msg = f"{msg} (got {first['input']!r})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where or 'config'}: {msg}{more}"


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
            raise LensrayInputError(f"zoo[{i}].strategy: fsdp shards the parameters, the NTK features (probe.ntk) need "
                                    "whole per-sample gradients; use strategy ddp or turn probe.ntk off")


def check_train_size(config: ScreenConfig, n_train: int) -> None:
    """Raise when the task's train split cannot hold the largest probe subset (``grid.max_samples``)."""
    if n_train < config.grid.max_samples:
        raise LensrayInputError(
            f"grid.max_samples: {config.grid.max_samples} is larger than the train split of task "
            f"{config.task.source!r} ({n_train} rows); lower grid.max_samples or use more data"
        )


def config_reference() -> str:
    """Markdown table of every config option: key, type, default and doc line.

    The README's config reference is this table; ``tests/test_readme.py`` keeps them equal.
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
