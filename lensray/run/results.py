"""The result of a screening: :class:`Selection` of :class:`RankingEntry` rows and the :class:`Compute` bill.

Built by :func:`lensray.run.ranking.rank`, rendered by :mod:`lensray.run.report`; ``to_dict``
is the ``selection.json`` schema (docs/INTERFACES.md) and ``from_dict`` reads it back, raising
ValueError naming the first missing key or bad value.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal, Mapping, Optional

Status = Literal["finished", "pruned", "failed"]
STATUSES: tuple[str, ...] = ("finished", "pruned", "failed")


@dataclass
class RankingEntry:
    """One candidate's row of the ranking.

    Attributes
    ----------
    candidate, status
        Id and outcome: ``finished`` (every probe run), ``pruned`` (stopped early), ``failed``.
    predicted_loss, interval
        The predictor's loss at D* and its interval (None for a failed candidate).
    pruned_at
        Size of the last probe of a pruned candidate.
    params
        The predictor's fitted parameters by name (None when it has none, or the candidate failed).
    flops, n_probes
        Compute charged to the candidate's probes; probes stored.
    error, reason
        Why it failed; why it was pruned, or why it ran to the end.
    """

    candidate: str
    status: Status
    predicted_loss: Optional[float]
    interval: tuple[Optional[float], Optional[float]]
    pruned_at: Optional[int]
    params: Optional[dict[str, float]]
    flops: float
    error: Optional[str]
    reason: Optional[str] = None
    n_probes: int = 0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status: {self.status!r} is not one of {STATUSES}")
        if self.params is not None and not isinstance(self.params, Mapping):
            raise ValueError(f"params: expected a mapping of parameter name to value, got {type(self.params).__name__}")
        lo, hi = (list(self.interval or []) + [None, None])[:2]
        self.interval = (lo, hi)

    @property
    def has_prediction(self) -> bool:
        """Whether the row has a finite predicted loss."""
        return self.predicted_loss is not None and math.isfinite(float(self.predicted_loss))


@dataclass
class Compute:
    """The bill: FLOPs spent on probes against full fine-tuning of every candidate on D*, and time.

    ``uncharged``: probed candidates without a parameter count, outside both sides of the bill.
    ``wall_seconds`` is the first finished run's; ``resume_wall_seconds`` each later ``--resume``'s.
    """

    flops_spent: float
    flops_full_tuning: float
    saved_fraction: Optional[float]
    gpu_seconds: float
    wall_seconds: float
    uncharged: list[str] = field(default_factory=list)
    resume_wall_seconds: list[float] = field(default_factory=list)


@dataclass
class Selection:
    """The outcome of a screening (``selection.json``).

    Attributes
    ----------
    selected
        Id of the best-ranked candidate that did not fail; None when every candidate failed.
    ranking
        Finished candidates by predicted loss, then pruned ones, then failed ones.
    compute
        The bill.
    backend, target_samples, grid, predictor
        How the run was made.
    notes
        What the predictor reports about its fit (e.g. the LensLLM law's mode).
    output
        The absolute URI of the outputs.
    """

    selected: Optional[str]
    ranking: list[RankingEntry]
    compute: Compute
    backend: str = ""
    target_samples: int = 0
    grid: list[int] = field(default_factory=list)
    predictor: str = ""
    notes: list[str] = field(default_factory=list)
    output: Optional[str] = None

    def entry(self, candidate: str) -> Optional[RankingEntry]:
        """The row of ``candidate`` (None if absent)."""
        return next((e for e in self.ranking if e.candidate == candidate), None)

    def to_dict(self) -> dict[str, Any]:
        """The ``selection.json`` content (``uncharged`` only when some candidate is)."""
        out = asdict(self)
        for row in out["ranking"]:
            row["interval"] = list(row["interval"])
        for key in ("uncharged", "resume_wall_seconds"):
            if not out["compute"][key]:
                del out["compute"][key]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Selection":
        """Read a ``selection.json`` dict; ValueError naming the first missing key or bad value."""
        for key in ("selected", "ranking", "compute"):
            if key not in data:
                raise ValueError(f"selection: missing key {key!r}")
        ranking = []
        for i, row in enumerate(data["ranking"]):
            missing = [k for k in _required(RankingEntry) if k not in row]
            if missing:
                raise ValueError(f"selection.ranking[{i}]: missing key(s) {missing}")
            try:
                ranking.append(RankingEntry(**{k: row[k] for k in _names(RankingEntry) if k in row}))
            except ValueError as exc:
                raise ValueError(f"selection.ranking[{i}].{exc}") from None
        missing = [k for k in _required(Compute) if k not in data["compute"]]
        if missing:
            raise ValueError(f"selection.compute: missing key(s) {missing}")
        compute = Compute(**{k: data["compute"][k] for k in _names(Compute) if k in data["compute"]})
        rest = {k: data[k] for k in _names(cls) if k in data and k not in ("ranking", "compute")}
        return cls(ranking=ranking, compute=compute, **rest)


def _names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def _required(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]


RANKING_KEYS = tuple(_required(RankingEntry))
"""Keys every ranking row of ``selection.json`` holds (``reason`` and ``n_probes`` too, when written by a run)."""
COMPUTE_KEYS = tuple(_required(Compute))
"""Keys the ``compute`` bill always holds (``uncharged`` too, when some candidate is)."""
