"""Fine-tuning curves: the models x sample-sizes table of test losses, loaded and validated.

File format (the tables of ``../shared/benchmarks``, Lin et al. 2024): one row per model;
column ``config name`` holds the model id; every column whose name is a non-negative integer
``D`` holds the test loss after fine-tuning on ``D`` samples (``0`` is the zero-shot loss);
optional ``size`` (parameter count) and ``family`` columns. Other columns are ignored (a
pandas index column, notes, ...). Column names are matched after stripping spaces; the three
named columns case-insensitively.

Validation (each failure is a :class:`LensrayInputError` naming the row or column): the file
exists and is UTF-8 text; ``config name`` is present; no column name appears twice; the ``D``
columns are strictly increasing from left to right and at least ``MIN_POINTS`` of them have
``D > 0``; every row has as many cells as the header; model ids are non-empty and unique;
losses are finite positive numbers; sizes are empty (unknown) or finite positive numbers, plain or
with a K/M/B/T suffix (``1.3B``).

Missing points: an empty or ``NaN`` loss cell is rejected by default. With
``allow_missing=True`` it becomes ``NaN`` in :attr:`Curves.L` ("point not measured", e.g. a
candidate stopped early); selection methods then fit each row on its measured points and
report rows they cannot fit. ``size`` is optional in the file: methods that need it call
:meth:`Curves.require_size`, which raises a clear error naming the column.

NTK columns (optional; :mod:`lensray.core.ntk_term`, read into :attr:`Curves.ntk`):
``ntk_F@<D>`` (F(Θ, t) of the probe at size ``D``), ``ntk_t@<D>`` (its optimiser steps),
``ntk_eta`` (the probes' learning rate) and the pairs ``ntk_eig_<j>`` / ``ntk_coef_<j>``
(``j = 1, 2, ...``: the kernel's eigenvalues and ``Vᵀr₀``, so F extends to sizes without a
probe). Other ``ntk_*`` columns (``ntk_trace``, ``ntk_seconds``) are ignored. ``<D>`` must be
a sample-size column of the table and every ``ntk_eig_<j>`` needs its ``ntk_coef_<j>``; an empty
cell is a missing value (a row lacking F at a measured size is fitted with F free, see
:class:`lensray.core.selection.LensLLMSelector`); a cell that is not a finite number (F, t,
eigenvalues: >= 0; eta: > 0) is an error naming its row and column.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from lensray.core.ntk_term import NTKTerms
from lensray.errors import LensrayInputError

ID_COLUMN = "config name"
SIZE_COLUMN = "size"
FAMILY_COLUMN = "family"
MIN_POINTS = 3
"""Fewest points with D > 0 that a curve table (and any budget of it) must keep."""

_MISSING = {"", "nan", "na", "n/a", "null", "none"}


@dataclass
class Curves:
    """Test losses of ``n`` models at ``m`` fine-tuning sample sizes.

    Parameters
    ----------
    ids : list of str
        Model ids, unique.
    D : array (m,)
        Sample sizes, strictly increasing, float64; may start with 0 (zero-shot).
    L : array (n, m)
        Test losses; NaN marks a point that was not measured.
    size : array (n,), optional
        Parameter counts; NaN = unknown. Default: all unknown.
    family : list of (str or None), optional
        Model families; None = unknown. Default: all unknown.
    name : str
        Short name of the table (the file stem when loaded from a file).
    ntk : NTKTerms, optional
        NTK features of each probe (F per point, shape (n, m) like ``L``, NaN where absent, and
        the spectrum to evaluate F at other sizes); None when the table has none.
    """

    ids: list[str]
    D: np.ndarray
    L: np.ndarray
    size: np.ndarray | None = None
    family: list[str | None] | None = None
    name: str = field(default="")
    ntk: NTKTerms | None = None

    def __post_init__(self) -> None:
        self.ids = [str(i) for i in self.ids]
        self.D = np.asarray(self.D, dtype=np.float64).reshape(-1)
        self.L = np.asarray(self.L, dtype=np.float64)
        n, m = len(self.ids), self.D.size
        if self.L.shape != (n, m):
            raise ValueError(f"L has shape {self.L.shape}, expected ({n}, {m}) for {n} ids and {m} sizes")
        if m > 1 and not np.all(np.diff(self.D) > 0):
            raise ValueError("D must be strictly increasing")
        if len(set(self.ids)) != n:
            raise ValueError("ids must be unique")
        self.size = np.full(n, np.nan) if self.size is None else np.asarray(self.size, dtype=np.float64).reshape(-1)
        if self.size.shape != (n,):
            raise ValueError(f"size has shape {self.size.shape}, expected ({n},)")
        self.family = [None] * n if self.family is None else list(self.family)
        if len(self.family) != n:
            raise ValueError(f"family has {len(self.family)} entries, expected {n}")
        if self.ntk is not None and self.ntk.F.shape != (n, m):
            raise ValueError(f"ntk F has shape {self.ntk.F.shape}, expected ({n}, {m})")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def has_size(self) -> bool:
        """True when at least one model has a known size."""
        return bool(np.isfinite(self.size).any())

    def require_size(self, method: str = "this method") -> np.ndarray:
        """Return the sizes, raising when the table has none (NaN rows stay NaN: unknown size).

        Raises
        ------
        LensrayInputError
            If the ``size`` column is absent or empty.
        """
        if not self.has_size:
            where = f" of '{self.name}'" if self.name else ""
            raise LensrayInputError(
                f"column '{SIZE_COLUMN}' is required by {method} but is missing or empty in the curves table{where}"
            )
        return self.size.copy()

    def budget(self, max_samples: int) -> "Curves":
        """The columns a method may see under a budget: ``D <= max_samples`` (``D = 0`` kept).

        Raises
        ------
        LensrayInputError
            If fewer than ``MIN_POINTS`` columns with ``D > 0`` remain.
        """
        keep = self.D <= max_samples
        n_pos = int(np.count_nonzero(keep & (self.D > 0)))
        if n_pos < MIN_POINTS:
            raise LensrayInputError(
                f"budget max_samples={max_samples} leaves {n_pos} points with D > 0, need at least {MIN_POINTS} "
                f"(sample-size columns: {', '.join(_fmt(d) for d in self.D)})"
            )
        return Curves(self.ids, self.D[keep], self.L[:, keep], self.size.copy(), list(self.family), self.name,
                      None if self.ntk is None else self.ntk.columns(keep))

    def missing(self) -> dict[str, list[int]]:
        """Per model id, the sample sizes whose loss is not measured (NaN); complete rows are left out."""
        out = {}
        for i, cid in enumerate(self.ids):
            holes = [int(d) for d in self.D[~np.isfinite(self.L[i])]]
            if holes:
                out[cid] = holes
        return out

    def loss_at(self, d: int) -> np.ndarray:
        """Losses of every model at sample size ``d`` (a copy; NaN where not measured).

        Raises
        ------
        LensrayInputError
            If the table has no column ``d``.
        """
        hit = np.flatnonzero(self.D == d)
        if hit.size == 0:
            raise LensrayInputError(
                f"no column '{_fmt(d)}' in the curves table (sample-size columns: {', '.join(_fmt(x) for x in self.D)})"
            )
        return self.L[:, hit[0]].copy()

    def take(self, rows: Sequence[int] | np.ndarray) -> "Curves":
        """The models at positions ``rows``, in that order."""
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        return Curves(
            [self.ids[i] for i in idx], self.D.copy(), self.L[idx], self.size[idx], [self.family[i] for i in idx], self.name,
            None if self.ntk is None else self.ntk.take(idx),
        )


def load_curves_csv(path: str | Path, allow_missing: bool = False) -> Curves:
    """Load and validate a curves table (format in the module docstring).

    Parameters
    ----------
    path : str or Path
        CSV file.
    allow_missing : bool
        Accept empty/NaN loss cells as "not measured" (NaN) instead of rejecting them.

    Raises
    ------
    LensrayInputError
        On any invalid content, naming the row (model id and line) or column.
    """
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise LensrayInputError(f"curves file '{path}' is empty")
    header_line, header = rows[0]
    id_col, size_col, family_col, d_cols = _parse_header(header)
    ntk_cols = _ntk_header(header, [d for _, d in d_cols])
    if not rows[1:]:
        raise LensrayInputError(f"curves file '{path}' has a header but no model rows")

    ids: list[str] = []
    first_line: dict[str, int] = {}
    losses = np.empty((len(rows) - 1, len(d_cols)))
    sizes = np.full(len(rows) - 1, np.nan)
    families: list[str | None] = []
    ntk_cells: list[dict[str, list[float]]] = []
    for r, (line, cells) in enumerate(rows[1:]):
        if len(cells) != len(header):
            raise LensrayInputError(f"line {line} has {len(cells)} cells, the header has {len(header)}")
        model = cells[id_col].strip()
        if not model:
            raise LensrayInputError(f"line {line}: empty model id in column '{ID_COLUMN}'")
        if model in first_line:
            raise LensrayInputError(f"row '{model}' (line {line}): duplicate model id, first on line {first_line[model]}")
        first_line[model] = line
        ids.append(model)
        where = f"row '{model}' (line {line})"
        for j, (col, _) in enumerate(d_cols):
            losses[r, j] = _loss(cells[col], f"{where}, column '{header[col].strip()}'", allow_missing)
        if size_col is not None:
            sizes[r] = _size(cells[size_col], f"{where}, column '{header[size_col].strip()}'")
        fam = cells[family_col].strip() if family_col is not None else ""
        families.append(fam or None)
        if ntk_cols is not None:
            ntk_cells.append(_ntk_row(cells, header, ntk_cols, where))

    D = np.array([d for _, d in d_cols], dtype=np.float64)
    ntk = None
    if ntk_cols is not None:
        F, t, eta, eig, coef = (np.array([row[key] for row in ntk_cells], dtype=np.float64).reshape(len(ids), -1)
                                for key in ("F", "t", "eta", "eig", "coef"))
        ntk = NTKTerms(F, t, eta.reshape(-1) if eta.size else None, eig, coef)
    return Curves(ids, D, losses, sizes, families, name=path.stem, ntk=ntk)


def _read_rows(path: Path) -> list[tuple[int, list[str]]]:
    """Non-blank CSV records with the line number where each ends."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            return [(reader.line_num, cells) for cells in reader if any(c.strip() for c in cells)]
    except FileNotFoundError:
        raise LensrayInputError(f"curves file '{path}' not found") from None
    except IsADirectoryError:
        raise LensrayInputError(f"curves file '{path}' is a directory, not a CSV file") from None
    except PermissionError:
        raise LensrayInputError(f"curves file '{path}' is not readable (permission denied)") from None
    except UnicodeDecodeError as exc:
        raise LensrayInputError(f"curves file '{path}' is not UTF-8 text (byte {exc.start})") from None
    except csv.Error as exc:
        raise LensrayInputError(f"curves file '{path}' is not valid CSV: {exc}") from None


def _parse_header(header: list[str]) -> tuple[int, int | None, int | None, list[tuple[int, int]]]:
    """Positions of the id, size and family columns, and (position, D) of every sample-size column."""
    names = [h.strip() for h in header]
    seen: dict[str, int] = {}
    for pos, name in enumerate(names):
        key = name.lower()
        if not name:
            continue
        if key in seen:
            raise LensrayInputError(f"duplicate column '{name}' (columns {seen[key] + 1} and {pos + 1})")
        seen[key] = pos
    if ID_COLUMN not in seen:
        raise LensrayInputError(f"missing column '{ID_COLUMN}' (the model id); header: {', '.join(names)}")

    d_cols: list[tuple[int, int]] = []
    for pos, name in enumerate(names):
        d = _sample_size(name)
        if d is None:
            continue
        if d_cols and d <= d_cols[-1][1]:
            prev = names[d_cols[-1][0]]
            kind = "duplicate sample-size column" if d == d_cols[-1][1] else "sample-size columns not increasing"
            raise LensrayInputError(f"{kind}: column '{name}' comes after column '{prev}'")
        d_cols.append((pos, d))
    n_pos = sum(1 for _, d in d_cols if d > 0)
    if n_pos < MIN_POINTS:
        raise LensrayInputError(
            f"the curves table needs at least {MIN_POINTS} sample-size columns with D > 0 (columns named 200, 400, ...), "
            f"found {n_pos}"
        )
    return seen[ID_COLUMN], seen.get(SIZE_COLUMN), seen.get(FAMILY_COLUMN), d_cols


NTK_PREFIX = "ntk_"


def _ntk_header(header: list[str], sizes: list[int]) -> dict[str, list[int | None]] | None:
    """Positions of the NTK columns (module docstring) by kind, each aligned with ``sizes`` for
    ``F`` and ``t`` (None: no column for that size) and with ``j`` for ``eig``/``coef``; None when
    the table has no NTK column."""
    names = [h.strip() for h in header]
    per_size: dict[str, dict[int, int]] = {"F": {}, "t": {}}
    spectrum: dict[str, dict[int, int]] = {"eig": {}, "coef": {}}
    eta = None
    for pos, name in enumerate(names):
        low = name.lower()
        if not low.startswith(NTK_PREFIX):
            continue
        kind, _, rest = low[len(NTK_PREFIX):].partition("@")
        if rest or kind in ("f", "t"):
            if kind not in ("f", "t") or not rest.isdigit():
                raise LensrayInputError(f"column '{name}': NTK columns per size are named ntk_F@<D> or ntk_t@<D>, "
                                        "with <D> a sample-size column")
            if int(rest) not in sizes:
                raise LensrayInputError(f"column '{name}': there is no sample-size column '{int(rest)}' for it")
            per_size["F" if kind == "f" else "t"][int(rest)] = pos
        elif kind == "eta":
            eta = pos
        elif kind.startswith(("eig_", "coef_")):
            part, _, j = kind.partition("_")
            if not j.isdigit() or int(j) < 1:
                raise LensrayInputError(f"column '{name}': spectrum columns are named ntk_eig_<j> and ntk_coef_<j>, "
                                        "j = 1, 2, ...")
            spectrum[part][int(j)] = pos
    for part, other in (("eig", "coef"), ("coef", "eig")):
        lone = sorted(set(spectrum[part]) - set(spectrum[other]))
        if lone:
            raise LensrayInputError(f"column '{names[spectrum[part][lone[0]]]}' has no partner column "
                                    f"'ntk_{other}_{lone[0]}'")
    if not per_size["F"]:
        if per_size["t"] or spectrum["eig"] or eta is not None:
            raise LensrayInputError("NTK columns without any ntk_F@<D> column: the F(Θ, t) of each probe is needed")
        return None
    js = sorted(spectrum["eig"])
    return {"F": [per_size["F"].get(d) for d in sizes], "t": [per_size["t"].get(d) for d in sizes],
            "eta": [eta] if eta is not None else [], "eig": [spectrum["eig"][j] for j in js],
            "coef": [spectrum["coef"][j] for j in js]}


def _ntk_row(cells: list[str], header: list[str], cols: dict[str, list[int | None]], where: str) -> dict[str, list[float]]:
    """One row's NTK cells by kind (NaN where the table has no column for a size)."""
    return {kind: [math.nan if c is None else _ntk_value(cells[c], f"{where}, column '{header[c].strip()}'", kind)
                   for c in positions] for kind, positions in cols.items()}


def _ntk_value(cell: str, where: str, kind: str) -> float:
    """One NTK cell (NaN when empty); >= 0 except coefficients (any sign) and the learning rate (> 0)."""
    value = _number(cell)
    if value is None:
        raise LensrayInputError(f"{where}: NTK value {cell.strip()!r} is not a number")
    if math.isnan(value):
        return value
    if not math.isfinite(value) or (kind != "coef" and value < 0) or (kind == "eta" and value == 0):
        need = "a finite number" if kind == "coef" else "a finite positive number" if kind == "eta" \
            else "a finite number >= 0"
        raise LensrayInputError(f"{where}: NTK value must be {need}, got {cell.strip()}")
    return value


def _sample_size(name: str) -> int | None:
    """The sample size a column name stands for, or None if it is not numeric."""
    try:
        value = float(name)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    if value < 0 or value != int(value):
        raise LensrayInputError(f"column '{name}': a sample-size column name must be a non-negative integer")
    return int(value)


def _number(cell: str) -> float | None:
    """The float in a cell; NaN for a missing-value marker; None if not a number."""
    text = cell.strip()
    if text.lower() in _MISSING:
        return math.nan
    try:
        return float(text)
    except ValueError:
        return None


def _loss(cell: str, where: str, allow_missing: bool) -> float:
    value = _number(cell)
    if value is None:
        raise LensrayInputError(f"{where}: loss {cell.strip()!r} is not a number")
    if math.isnan(value):
        if allow_missing:
            return value
        raise LensrayInputError(f"{where}: loss is missing (empty or NaN)")
    if not math.isfinite(value) or value <= 0:
        raise LensrayInputError(f"{where}: loss must be a finite positive number, got {cell.strip()}")
    return value


_SIZE_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def _size(cell: str, where: str) -> float:
    """A parameter count: a number, or one with a K/M/B/T suffix ("1.3B", "350m")."""
    value = _number(cell)
    text = cell.strip()
    if value is None and len(text) > 1 and text[-1].lower() in _SIZE_SUFFIX:
        base = _number(text[:-1])
        value = None if base is None else base * _SIZE_SUFFIX[text[-1].lower()]
    if value is None:
        raise LensrayInputError(f"{where}: size {cell.strip()!r} is not a number")
    if not math.isnan(value) and (not math.isfinite(value) or value <= 0):
        raise LensrayInputError(f"{where}: size must be a finite positive number, got {cell.strip()}")
    return value


def _fmt(d: float) -> str:
    return str(int(d)) if float(d).is_integer() else str(d)
