"""Results store of a screening run, on a local folder or an ``s3://`` / ``gs://`` URI (pyarrow.fs).

Layout under the root::

    probes/<candidate key>/<n_samples>.json   one probe result, written atomically
    decisions/<candidate key>.json            a candidate's pruned / failed / retried decision
    hints/<candidate key>.json                smaller probe settings after an out-of-memory restart
    probes.parquet                            every probe result (rewritten on demand)
    config.yaml, selection.json, report.md, curves.png

A probe file is written to a hidden temporary name and then moved into place, so a crash while
writing never leaves a partial file under the final name; files that are partial anyway (a
truncated upload, a disk error) are skipped with a warning when read. Candidate keys are a slug
plus a hash of the id, so no candidate id (``../../x``, ``/etc/passwd``) can place a file outside
the root. Every text written passes through :func:`lensray.redact.redact`, which removes the values of secret
environment variables (defence in depth: configs hold no secrets in the first place).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
import re
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lensray.errors import LensrayInputError, one_line
from lensray.redact import REDACTED, redact, secret_values

if TYPE_CHECKING:
    from lensray.core.curves import Curves
    from lensray.run.config import CandidateConfig, ScreenConfig

log = logging.getLogger(__name__)

PROBES_DIR = "probes"
TEMP_MARK = ".tmp-"
READ_THREADS = 16
MIN_FREE_BYTES = 64 * 2**20  # a local output location with less free space counts as full
REACH_TIMEOUT_S = 10.0  # a remote location that has not answered by then is reported unreachable
DAMAGED_MARK = ".damaged-"
PROBE_STATUSES = ("ok", "diverged", "failed")
_COUNTS = ("tokens", "flops", "wall_seconds", "train_seconds", "n_params", "steps", "peak_memory_bytes")
CREDENTIAL_KEYS = ("access_key", "secret_key", "session_token")
"""Query keys of a pyarrow URI that carry credentials (refused: they would reach config.yaml and logs)."""

def is_ok(record: Mapping[str, Any]) -> bool:
    """Whether a probe record measured a test loss: ``status`` "ok" (a record without one counts as ok)."""
    return record.get("status", "ok") == "ok"


def candidate_size(candidate_id: str, known: Optional[float], records: Iterable[Mapping[str, Any]]) -> Optional[float]:
    """A candidate's parameter count: ``known`` (the config's ``size``, else the replayed table's),
    else the ``n_params`` its stored probe ``records`` counted; None when neither has one."""
    if known:
        return float(known)
    return next((float(r["n_params"]) for r in records if r.get("candidate") == candidate_id and r.get("n_params")),
                None)


def candidate_key(candidate_id: str) -> str:
    """A file-name-safe key for a candidate: slug of the id plus 10 hex digits of its SHA-256.

    The key holds only ``[A-Za-z0-9._-]``, never starts with a dot and is never ``..``, so it
    stays one path component inside the store; the hash keeps distinct ids distinct.
    """
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", candidate_id).strip("._-")[:48] or "candidate"
    digest = hashlib.sha256(candidate_id.encode("utf-8")).hexdigest()[:10]
    return f"{slug}-{digest}"


def _check_name(name: str) -> str:
    parts = name.replace("\\", "/").split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"output name must be a relative path inside the store: {name!r}")
    return "/".join(parts)


def _jsonable(value: Any) -> Any:
    """numpy scalars/arrays and other objects → JSON types (used as ``json.dumps(default=...)``)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def dumps(obj: Any, indent: int | None = 2) -> str:
    """JSON text (NaN/inf written as null) of ``obj``, redacted; ``indent=None`` for one line.

    Strings are redacted before encoding (a secret with quotes or non-ASCII characters is escaped
    in JSON and would not match afterwards) and the text once more after it.
    """
    return redact(_json(obj, indent))


def _json(obj: Any, indent: int | None) -> str:
    separators = (",", ":") if indent is None else None
    cleaned = _clean(obj, secret_values())
    return json.dumps(cleaned, default=_jsonable, indent=indent, separators=separators, allow_nan=False)


def _clean(obj: Any, secrets: list[str]) -> Any:
    """``obj`` with NaN/inf floats as None and secret values in strings (keys too) replaced."""
    if isinstance(obj, str):
        for value in secrets:
            obj = obj.replace(value, REDACTED)
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {_clean(str(k), secrets): _clean(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v, secrets) for v in obj]
    if hasattr(obj, "tolist"):
        return _clean(obj.tolist(), secrets)
    return obj


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def record_problem(record: Any, stem: str, folder: str) -> str | None:
    """What is wrong with a stored probe record read from ``<folder>/<stem>.json`` (None: nothing).

    A record is a mapping with the ``candidate`` whose key is ``folder``, an integer
    ``n_samples`` equal to ``stem``, a known ``status``, a finite positive ``test_loss`` when
    the status is ``ok`` (None or such a number otherwise) and non-negative finite counts
    (``tokens``, ``flops``, ...) or None.
    """
    if not isinstance(record, dict):
        return f"a {type(record).__name__}, not a mapping"
    cand, n = record.get("candidate"), record.get("n_samples")
    if not isinstance(cand, str) or candidate_key(cand) != folder:
        return f"candidate {cand!r} does not belong in folder {folder}"
    if isinstance(n, bool) or not isinstance(n, int) or n < 0 or str(n) != stem:
        return f"n_samples {n!r} does not match the file name {stem}.json"
    status = record.get("status", "ok")
    if status not in PROBE_STATUSES:
        return f"status {status!r} is not one of {', '.join(PROBE_STATUSES)}"
    loss = record.get("test_loss")
    if status == "ok" and not (_number(loss) and loss > 0):
        return f"test_loss {loss!r} is not a finite positive number"
    if loss is not None and not (_number(loss) and loss > 0):
        return f"test_loss {loss!r} is neither null nor a finite positive number"
    for key in _COUNTS:
        value = record.get(key)
        if value is not None and not (_number(value) and value >= 0):
            return f"{key} {value!r} is neither null nor a finite number >= 0"
    return None


def _within(seconds: float, uri: str, work: Any) -> None:
    """Run ``work()`` (which opens and checks ``uri``) in a thread; an input error when it fails or
    does not finish within ``seconds`` (an unreachable endpoint otherwise hangs for minutes)."""
    box: dict[str, BaseException] = {}

    def run() -> None:
        try:
            work()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=run, name="lensray-storage-check", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise LensrayInputError(f"storage.path: cannot reach {uri}: timed out after {seconds:g} s "
                                "(no network, no credentials or a wrong endpoint)")
    exc = box.get("error")
    if exc is None:
        return
    if not isinstance(exc, (LensrayInputError, OSError, pa.ArrowException, ValueError)):
        raise exc
    if isinstance(exc, LensrayInputError) and str(exc).startswith("storage.path: cannot open"):
        raise exc  # not a URI pyarrow can open: already one clear line
    detail = one_line(exc, 300).removeprefix("storage.path: ")
    low = detail.lower()
    why = ("no credentials: " if "credential" in low else
           "bucket missing: " if any(w in low for w in ("nosuchbucket", "does not exist", "not found", "404")) else "")
    raise LensrayInputError(f"storage.path: cannot reach {uri}: {why}{detail}") from None


def _refuse_credentials(uri: str) -> None:
    """Credentials in a URI's query are refused: the URI is written to config.yaml and printed."""
    query = uri.partition("?")[2] if "://" in uri else ""
    keys = [k for k in CREDENTIAL_KEYS if re.search(rf"(^|&){k}=", query)]
    if keys:
        raise LensrayInputError(f"storage.path: credentials in the URI ({', '.join(keys)}) are refused; set "
                                "them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...)")


class ProbeStore:
    """Probe results and outputs of one screening run.

    Parameters
    ----------
    uri
        Local folder (created if missing) or a URI that ``pyarrow.fs.FileSystem.from_uri`` opens.
    check
        Verify up front that the location is writable (write, read back and delete a sentinel).
        A remote location must answer within ``REACH_TIMEOUT_S`` either way.
    set_aside
        Rename damaged probe files when reading them (False: only skip them, writing nothing).

    Raises
    ------
    LensrayInputError
        ``storage.path: ...`` when the location cannot be opened or written (read-only, full,
        a file in the way, no credentials).
    """

    def __init__(self, uri: str, check: bool = True, set_aside: bool = True):
        self.set_aside = set_aside
        _refuse_credentials(str(uri))
        if "://" in str(uri):
            _within(REACH_TIMEOUT_S, str(uri), lambda: self._open_remote(str(uri), check))
            return
        self.fs, self.root = self._open(str(uri))
        # a local path is made absolute: Ray workers run in other working directories
        self.uri = self.root
        if check:
            self.check_writable()

    def _open_remote(self, uri: str, check: bool) -> None:
        self.fs, self.root = self._open(uri)
        self.uri = uri
        if check:
            self.check_writable()
        else:
            self.fs.get_file_info(self.root)  # a listing answers, or raises, or times out

    @staticmethod
    def _open(uri: str) -> tuple[pafs.FileSystem, str]:
        try:
            if "://" in uri:
                fs, root = pafs.FileSystem.from_uri(uri)
                return fs, root.rstrip("/")
            return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise LensrayInputError(f"storage.path: cannot open {uri}: {one_line(exc)}") from None

    def path(self, name: str) -> str:
        """Full filesystem path of ``name`` (relative, inside the store)."""
        return f"{self.root}/{_check_name(name)}"

    def uri_of(self, name: str) -> str:
        """URI of ``name`` that ``pyarrow.fs.FileSystem.from_uri`` opens as this store does: the
        name goes before the URI's query (``s3://b/run?endpoint_override=...`` ->
        ``s3://b/run/tune?endpoint_override=...``); a local store gives its path."""
        if "://" not in self.uri:
            return self.path(name)
        base, sep, query = self.uri.partition("?")
        return f"{base.rstrip('/')}/{_check_name(name)}{sep}{query}"

    def check_writable(self) -> None:
        """Create the root, write, read back and delete a sentinel file; a local disk must have free space."""
        sentinel = self.path(f".lensray-write-check{TEMP_MARK}{uuid.uuid4().hex}")
        payload = uuid.uuid4().bytes * 64
        try:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(sentinel) as out:
                out.write(payload)
            with self.fs.open_input_stream(sentinel) as inp:
                back = inp.read()
            self.fs.delete_file(sentinel)
        except (OSError, pa.ArrowException) as exc:
            raise LensrayInputError(f"storage.path: {self.uri} is not writable: {one_line(exc)}") from None
        if back != payload:
            raise LensrayInputError(f"storage.path: {self.uri} returned different bytes than were written")
        if isinstance(self.fs, pafs.LocalFileSystem):
            free = shutil.disk_usage(self.root).free
            if free < MIN_FREE_BYTES:
                raise LensrayInputError(
                    f"storage.path: {self.uri} is nearly full ({free / 2**20:.1f} MiB free, "
                    f"at least {MIN_FREE_BYTES // 2**20} MiB needed)"
                )

    # ---- generic files -------------------------------------------------------------------------

    def _write_atomic(self, path: str, data: bytes) -> None:
        parent, _, base = path.rpartition("/")
        tmp = f"{parent}/.{base}{TEMP_MARK}{uuid.uuid4().hex}"
        self.fs.create_dir(parent, recursive=True)
        try:
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)
            self.fs.move(tmp, path)
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except (OSError, pa.ArrowException):
                pass
            raise

    def write_bytes(self, name: str, data: bytes) -> str:
        """Write ``data`` atomically to ``name``; returns the full path."""
        path = self.path(name)
        self._write_atomic(path, data)
        return path

    def write_text(self, name: str, text: str) -> str:
        """Write redacted ``text`` atomically to ``name``; returns the full path."""
        return self.write_bytes(name, redact(text).encode("utf-8"))

    def write_json(self, name: str, obj: Any) -> str:
        """Write ``obj`` as redacted JSON (NaN → null) atomically to ``name``; returns the full path."""
        return self.write_bytes(name, dumps(obj).encode("utf-8"))

    def read_text(self, name: str) -> str | None:
        """Text of ``name``, or None when it does not exist."""
        try:
            with self.fs.open_input_stream(self.path(name)) as inp:
                return inp.read().decode("utf-8")
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        """Whether ``name`` exists in the store."""
        return self.fs.get_file_info(self.path(name)).type != pafs.FileType.NotFound

    # ---- probe results -------------------------------------------------------------------------

    def put(self, candidate_id: str, result: Mapping[str, Any]) -> str:
        """Persist one probe result (must hold ``n_samples``) atomically; returns its path.

        The stored record is ``result`` with ``candidate`` set to ``candidate_id``.
        """
        n = result.get("n_samples")
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise ValueError(f"probe result of {candidate_id!r} needs an integer n_samples, got {n!r}")
        rest = {k: v for k, v in result.items() if k not in ("candidate", "n_samples")}
        record = {"candidate": candidate_id, "n_samples": int(n), **rest}
        path = f"{self.root}/{PROBES_DIR}/{candidate_key(candidate_id)}/{int(n)}.json"
        self._write_atomic(path, dumps(record).encode("utf-8"))
        return path

    def completed(self, candidate_id: str) -> dict[int, dict]:
        """Stored results of one candidate, by ``n_samples`` (partial or corrupt files skipped)."""
        folder = f"{self.root}/{PROBES_DIR}/{candidate_key(candidate_id)}"
        return {r["n_samples"]: r for r in self._read_tree(folder) if r["candidate"] == candidate_id}

    def get_all(self) -> list[dict]:
        """Every stored probe result, sorted by candidate and ``n_samples``."""
        records = self._read_tree(f"{self.root}/{PROBES_DIR}")
        return sorted(records, key=lambda r: (r["candidate"], r["n_samples"]))

    def _read_tree(self, folder: str) -> list[dict]:
        """Valid records under ``folder``: one listing, then parallel reads (object stores are slow per file)."""
        selector = pafs.FileSelector(folder, allow_not_found=True, recursive=True)
        paths = [
            info.path
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.File
            and info.base_name.endswith(".json")
            and not info.base_name.startswith(".")
            and TEMP_MARK not in info.base_name
        ]
        if len(paths) <= 8:
            records = [self._read_record(p) for p in paths]
        else:
            with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
                records = list(pool.map(self._read_record, paths))
        return [r for r in records if r is not None]

    def _read_record(self, path: str) -> dict | None:
        """The record at ``path``, or None (with a warning) when it is unreadable or damaged.

        A damaged file is set aside as ``<name>.damaged-<time>`` (``set_aside``), so that its
        probe runs again and the file is kept for inspection.
        """
        try:
            with self.fs.open_input_stream(path) as inp:
                record = json.loads(inp.read().decode("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, pa.ArrowException, UnicodeDecodeError, ValueError) as exc:
            problem = f"unreadable: {one_line(exc, 200)}"
        else:
            stem = path.rpartition("/")[2].removesuffix(".json")
            folder = path.rpartition("/")[0].rpartition("/")[2]
            problem = record_problem(record, stem, folder)
            if problem is None:
                return record
        self._set_aside(path, problem)
        return None

    def _set_aside(self, path: str, problem: str) -> None:
        if not self.set_aside:
            log.warning("ignoring damaged probe result %s (%s); a run probes it again", path, problem)
            return
        aside = f"{path}{DAMAGED_MARK}{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        try:
            self.fs.move(path, aside)
        except (OSError, pa.ArrowException) as exc:
            log.warning("ignoring damaged probe result %s (%s); could not set it aside: %s", path, problem,
                        one_line(exc, 200))
            return
        log.warning("damaged probe result %s (%s) set aside as %s; that probe runs again", path, problem,
                    aside.rpartition("/")[2])

    def write_parquet(self, records: Iterable[Mapping[str, Any]] | None = None, name: str = "probes.parquet") -> str:
        """Write probe results (default: every stored one) as a Parquet table; returns its path.

        Nested values (dicts, lists) become JSON text columns; strings are redacted.
        """
        rows = list(self.get_all() if records is None else records)
        table = _to_table(rows)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return self.write_bytes(name, sink.getvalue().to_pybytes())

    def read_parquet(self, name: str = "probes.parquet") -> pa.Table:
        """The Parquet table ``name`` written by :meth:`write_parquet`."""
        with self.fs.open_input_file(self.path(name)) as fh:
            return pq.read_table(fh)


def _to_table(rows: list[Mapping[str, Any]]) -> pa.Table:
    columns: dict[str, list[Any]] = {}
    for row in rows:
        for key in row:
            columns.setdefault(str(key), [])
    for row in rows:
        for key, values in columns.items():
            values.append(_cell(row.get(key)))
    arrays = {}
    for key, values in columns.items():
        try:
            arrays[key] = pa.array(values)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            arrays[key] = pa.array([None if v is None else str(v) for v in values], type=pa.string())
    secrets = secret_values()
    for key, array in arrays.items():
        if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
            for secret in secrets:
                array = pc.replace_substring(array, pattern=secret, replacement=REDACTED)
            arrays[key] = array
    return pa.table(arrays) if arrays else pa.table({"candidate": pa.array([], type=pa.string())})


def _cell(value: Any) -> Any:
    """A Parquet cell: nested values as one-line JSON text, numpy scalars as Python ones (redacted later)."""
    if isinstance(value, (Mapping, list, tuple, np.ndarray)):
        return _json(value, indent=None)
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------------------------------------
# decisions, memory hints and plans: what the store holds besides probe records

DECISIONS_DIR = "decisions"


HINTS_DIR = "hints"


@dataclass
class CandidatePlan:
    """One candidate's state at start: stored probes, decision, sizes still to probe."""

    candidate: CandidateConfig
    done: dict[int, dict] = field(default_factory=dict)
    decision: Optional[dict] = None
    todo: list[int] = field(default_factory=list)

    @property
    def needs_trial(self) -> bool:
        """Whether a trial must run: sizes remain and no pruning decision was taken."""
        return bool(self.todo) and not (self.decision and self.decision.get("status") == "pruned")


def decision_name(candidate_id: str) -> str:
    """Store name of a candidate's pruned/failed decision."""
    return f"{DECISIONS_DIR}/{candidate_key(candidate_id)}.json"


def read_decision(store: ProbeStore, candidate_id: str) -> Optional[dict]:
    """The stored pruned/failed decision of a candidate, if any (a damaged one is ignored with a warning)."""
    decision = _read_candidate_json(store, decision_name(candidate_id), candidate_id, "decision")
    if decision is not None and decision.get("status") not in ("pruned", "failed", "retried"):
        log.warning("ignoring decision of %s with status %r", candidate_id, decision.get("status"))
        return None
    if decision is not None and decision.get("status") == "pruned" and not (
            isinstance(decision.get("n_samples"), int) and not isinstance(decision.get("n_samples"), bool)):
        log.warning("ignoring pruning decision of %s without an integer n_samples", candidate_id)
        return None
    return decision


def _read_candidate_json(store: ProbeStore, name: str, candidate_id: str, what: str) -> Optional[dict]:
    text = store.read_text(name)
    if text is None:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        log.warning("ignoring unreadable %s of %s", what, candidate_id)
        return None
    return record if isinstance(record, dict) and record.get("candidate") == candidate_id else None


def memory_hint_name(candidate_id: str) -> str:
    """Store name of the smaller probe settings a candidate restarts with after running out of
    memory inside a collective."""
    return f"{HINTS_DIR}/{candidate_key(candidate_id)}.json"


def memory_settings(store: ProbeStore, candidate_id: str, probe: Mapping[str, Any]) -> tuple[dict, Optional[dict]]:
    """The probe settings to run ``candidate_id`` with, and its stored memory hint (if it applies).

    A hint applies while the configured micro-batch is the one it was derived from (a resume
    with another ``probe.micro_batch`` starts afresh). Its ``settings`` are None when even
    micro-batch 1 ran out of memory.
    """
    hint = _read_candidate_json(store, memory_hint_name(candidate_id), candidate_id, "memory hint")
    if hint is None or hint.get("configured_micro_batch") != probe.get("micro_batch"):
        return dict(probe), None
    return {**probe, **(hint.get("settings") or {})}, hint


def record_collective_oom(store: ProbeStore, candidate_id: str, exc: Any, probe: Mapping[str, Any],
                          previous: Optional[dict]) -> Optional[dict]:
    """Persist the smaller settings to restart with after ``exc`` (a ``CollectiveOutOfMemory``).

    The hint keeps the attempts of the probe at ``exc.n_samples`` across restarts, so its
    record shows every attempt. At micro-batch 1 there is nothing smaller: the hint's
    ``settings`` are None and the candidate is recorded as failed.
    """
    earlier = previous["attempt_log"] if previous and previous.get("n_samples") == exc.n_samples else []
    smaller = exc.smaller()
    reason = str(exc) if smaller else f"{exc}; nothing smaller to retry with (lower task.max_length or use strategy fsdp)"
    hint = {"candidate": candidate_id, "configured_micro_batch": probe.get("micro_batch"), "settings": smaller,
            "n_samples": exc.n_samples, "attempt_log": earlier + exc.attempt_log, "reason": reason,
            "time": time.time()}
    store.write_json(memory_hint_name(candidate_id), hint)
    if smaller is None:
        write_decision(store, candidate_id, "failed", exc.n_samples, reason)
    return hint


def write_decision(store: ProbeStore, candidate_id: str, status: str, n_samples: Optional[int], reason: str) -> None:
    """Persist a candidate's pruned/failed decision (atomic)."""
    store.write_json(
        decision_name(candidate_id),
        {"candidate": candidate_id, "status": status, "n_samples": n_samples, "reason": reason, "time": time.time()},
    )


def make_plan(config: ScreenConfig, store: ProbeStore, grid: list[int],
              gaps: Optional[Mapping[str, set[int]]] = None) -> list[CandidatePlan]:
    """Read the store: what each candidate has done and what remains (``gaps``: sizes a
    candidate has no probe for, e.g. a replayed table's missing cells; never to do)."""
    plans = []
    for cand in config.zoo:
        done = {n: r for n, r in store.completed(cand.id).items() if is_ok(r)}
        decision = read_decision(store, cand.id)
        if decision and decision.get("status") != "pruned":
            decision = None  # failures are retried on resume
        skip = (gaps or {}).get(cand.id, set())
        todo = [d for d in grid if d not in done and d not in skip]
        plans.append(CandidatePlan(cand, done, decision, todo))
    return plans


def probe_grid(config: ScreenConfig, replay: Optional[Curves]) -> list[int]:
    """The sizes probed: the config's grid, or a replayed table's sizes up to ``grid.max_samples``."""
    if replay is None:
        return config.grid_sizes()
    return [int(d) for d in replay.D if d <= config.grid.max_samples]


def replay_gaps(replay: Optional[Curves], grid: list[int]) -> dict[str, set[int]]:
    """Sizes of ``grid`` at which a replayed candidate has no recorded loss (no probe to replay)."""
    if replay is None:
        return {}
    sizes = set(grid)
    gaps = {cid: sizes.intersection(holes) for cid, holes in replay.missing().items()}
    return {cid: g for cid, g in gaps.items() if g}
