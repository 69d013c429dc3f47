"""The Python API: :func:`screen` and :func:`plan`, the ``lensray screen`` command as functions.

Both take the config as a :class:`~lensray.run.config.ScreenConfig`, a mapping or a YAML path,
and config overrides as keywords: ``grid__max_samples=800`` sets ``grid.max_samples`` (a double
underscore is a dot; dotted keys also pass as ``**{"zoo[0].gpus": 1}``). Bad input raises
:class:`~lensray.errors.LensrayInputError` before any Ray work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from lensray.run.config import ScreenConfig, run_inputs

ConfigSource = Union[ScreenConfig, Mapping[str, Any], str, Path, None]


def _inputs(config: ConfigSource, out: Optional[str | Path], replay: Optional[str | Path],
            overrides: Mapping[str, Any]) -> tuple[ScreenConfig, Any]:
    sets = {key.replace("__", "."): value for key, value in overrides.items()}
    if out is not None:
        sets["storage.path"] = str(out)
    if isinstance(config, ScreenConfig):
        config = config.model_dump(mode="json")
    return run_inputs(config, sets, replay=replay)


@dataclass(frozen=True)
class Results:
    """What a screening returns: its ``selection.json`` and where its outputs are.

    Attributes
    ----------
    selection : dict
        The ``selection.json`` content (docs/INTERFACES.md).
    uri : str
        The output folder or URI (``probes/``, ``probes.parquet``, ``report.md``, ``curves.png``).
    """

    selection: dict[str, Any]
    uri: str

    @property
    def selected(self) -> Optional[str]:
        """The candidate to fine-tune (None when every candidate failed)."""
        return self.selection["selected"]

    @property
    def bill(self) -> dict[str, Any]:
        """The compute bill: FLOPs spent, FLOPs of full tuning, saved fraction, GPU and wall seconds."""
        return self.selection["compute"]

    @property
    def ranking(self) -> Any:
        """The ranking as a pandas DataFrame, one row per candidate, best first."""
        import pandas as pd

        return pd.DataFrame(self.selection["ranking"])

    @property
    def probes(self) -> Any:
        """Every probe result as a pandas DataFrame (``probes.parquet``)."""
        from lensray.run.store import ProbeStore

        return ProbeStore(self.uri, check=False).read_parquet().to_pandas()


def screen(config: ConfigSource = None, out: Optional[str | Path] = None, resume: bool = False,
           replay: Optional[str | Path] = None, progress: bool = True, callbacks: Sequence[Any] = (),
           **overrides: Any) -> Results:
    """Screen a zoo and select the candidate to fine-tune (``lensray screen``).

    Parameters
    ----------
    config
        ScreenConfig, mapping or YAML path; None: ``configs/demo.yaml`` (or, with ``replay``,
        the table's rows as the zoo).
    out
        Output folder or URI (``storage.path``).
    resume
        Continue the run in ``out``; stored probes are not repeated.
    replay
        Curves CSV: replay its recorded curves instead of fine-tuning (needs ``grid__max_samples``).
    progress
        Print progress lines on stderr.
    callbacks
        Ray Tune callbacks (trackers: ``ray.air.integrations.mlflow.MLflowLoggerCallback``,
        ``ray.tune.logger.TBXLoggerCallback`` ...), each given every probe's result.
    **overrides
        Config keys to set, ``section__key=value``.

    Returns
    -------
    Results
    """
    from lensray.run.screen import screen as run_screen

    cfg, curves = _inputs(config, out, replay, overrides)
    selection = run_screen(cfg, resume=resume, backend="train" if curves is None else "replay", replay=curves,
                           progress=progress, callbacks=callbacks)
    return Results(selection, selection.get("output") or cfg.storage.path)


def plan(config: ConfigSource = None, out: Optional[str | Path] = None, replay: Optional[str | Path] = None,
         **overrides: Any) -> dict[str, Any]:
    """What a run would probe and its worst-case compute (``lensray screen --plan``); starts no Ray, writes nothing.

    Takes the arguments of :func:`screen`; returns :func:`~lensray.run.ranking.plan_bill`'s bill.
    """
    from lensray.run.ranking import plan_bill

    cfg, curves = _inputs(config, out, replay, overrides)
    return plan_bill(cfg, replay=curves)
