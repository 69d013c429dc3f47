"""Command-line entry point: ``lensray <command>`` (also ``python -m lensray``).

Each command's arguments are declared here; its work lives in the module that owns it,
imported lazily so that ``lensray benchmark`` never imports torch or Ray.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from lensray.errors import LensrayInputError, one_line


BROKEN_PIPE = 141
"""Exit code when the output's reader went away (128 + SIGPIPE, as a shell reports a killed writer)."""
DESCRIPTION = "Pick the best pre-trained LLM to fine-tune for a task without fine-tuning them all."


def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    from lensray.core.selection import SELECTORS

    text = "reproduce the papers' selection protocol on a curves table"
    p = sub.add_parser("benchmark", help=text, description=text)
    p.add_argument("--curves", required=True, help="CSV table of fine-tuning curves (models x D)")
    p.add_argument("--ratios", default="8,16,32,64,128,256,512", help="budget ratios r: a method sees D <= target/r")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated selection methods, of: {', '.join(SELECTORS)} (default: all)")
    p.add_argument("--target", type=int, default=1_638_400, help="D*: the data size whose loss is predicted")
    p.add_argument("--out", default=None, help="folder for benchmark.md, benchmark.json and a plot")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_lazy("lensray.run.benchmark", "cli_main"))


class _Set(argparse.Action):
    """Append a config override ``(key, value)`` to ``namespace.sets``: ``--set KEY=VALUE``
    (value read as YAML), or a shortcut flag bound to one key."""

    def __init__(self, option_strings, dest, key: str | None = None, **kwargs):
        self.key = key
        super().__init__(option_strings, "sets", **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        from lensray.run.config import parse_set

        value = self.const if self.nargs == 0 else value
        sets = list(getattr(namespace, "sets", None) or [])
        sets.append((self.key, value) if self.key else parse_set(value))
        namespace.sets = sets


def _add_sets(p: argparse.ArgumentParser, shortcuts: dict[str, tuple[str, type, str]], example: str) -> None:
    """``--set KEY=VALUE`` and the shortcut flags ``{flag: (config key, type, help)}``, all config overrides."""
    p.set_defaults(sets=[])
    p.add_argument("--set", action=_Set, metavar="KEY=VALUE", default=[],
                   help=f"set a config key (dotted, e.g. {example}; the value is YAML); repeatable, later wins")
    for flag, (key, kind, text) in shortcuts.items():
        p.add_argument(flag, action=_Set, key=key, type=kind, metavar=flag.lstrip("-").split("-")[-1].upper(),
                       help=f"{text} (--set {key}=...)")


def _add_probe(sub: argparse._SubParsersAction) -> None:
    text = "fine-tune one candidate on nested subsets and print its curve"
    p = sub.add_parser("probe", help=text, description=text, epilog=_probe_choices())
    p.add_argument("--model", required=True, help="hub id or local folder of the candidate")
    p.add_argument("--task", default="synthetic", help="task YAML file, or 'synthetic' for the built-in task")
    p.add_argument("--sizes", default="0,200,400,800", help="comma-separated subset sizes (0 = zero-shot)")
    p.add_argument("--ntk", action=_Set, key="probe.ntk", nargs=0, const=True,
                   help="also compute the NTK features (--set probe.ntk=true)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_sets(p, {"--device": ("probe.device", str, f"one of: {', '.join(_choices('device'))}"),
                  "--seed": ("probe.seed", int, "random seed (subsets, init of heads, data order)")},
              "probe.epochs=1 or task.max_length=256")
    p.set_defaults(func=_lazy("lensray.cli.probe", "cli_main"))


def _probe_choices() -> str:
    """Help epilog: the choices of the probe options that only ``--set`` reaches."""
    fields = ("method", "dtype", "schedule")
    listed = "; ".join(f"probe.{f}: {' | '.join(_choices(f))}" for f in fields)
    return f"Probe options with choices (--set probe.KEY=VALUE): {listed}. Every config key: docs/CONFIG.md."


def _choices(field: str) -> tuple[str, ...]:
    """The values a ``probe.<field>`` option takes."""
    import typing

    from lensray.engine.probe import ProbeConfig

    return typing.get_args(ProbeConfig.model_fields[field].annotation)


def _add_screen(sub: argparse._SubParsersAction) -> None:
    text = "screen a zoo of candidates on Ray and select the best one"
    p = sub.add_parser("screen", help=text, description=text, epilog=_probe_choices())
    p.add_argument("config", nargs="?", default=None,
                   help="screening config YAML (default: the built-in demo screening, configs/demo.yaml)")
    p.add_argument("--resume", action="store_true", help="continue a killed run in the same output")
    p.add_argument("--replay", default=None, metavar="CSV",
                   help="curves table: replay recorded curves instead of fine-tuning")
    p.add_argument("--plan", action="store_true",
                   help="print what the run would probe and its worst-case compute, then exit (no Ray, nothing written)")
    _add_sets(p, {"--out": ("storage.path", str, "output folder or URI"),
                  "--address": ("ray.address", str, "Ray address (default: a local Ray)"),
                  "--max-samples": ("grid.max_samples", int, "largest probe size D_max (required with --replay)"),
                  "--target-samples": ("target_samples", int, "D*: the full fine-tuning data size")},
              "grid.max_samples=800 or zoo[0].gpus=1")
    p.set_defaults(func=_lazy("lensray.cli.screen", "cli_main"))


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib

        return importlib.import_module(module).__dict__[name](args)

    return run


def build_parser() -> argparse.ArgumentParser:
    from lensray import __version__

    parser = argparse.ArgumentParser(
        prog="lensray", description=DESCRIPTION,
        epilog="Every command is also 'python -m lensray ...'. Bad input ends with one 'error: ...' line and "
               "exit code 2; 'lensray <command> --help' lists each command's options.")
    parser.add_argument("--version", action="version", version=f"lensray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_benchmark, _add_probe, _add_screen):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except LensrayInputError as exc:
        from lensray.redact import redact

        msg = redact(one_line(exc))
        print(f"error: {msg}", file=sys.stderr)
        return LensrayInputError.exit_code
    except KeyboardInterrupt:
        print("interrupted: completed probes are saved; rerun with --resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of the output left (``| head``): no traceback
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor one at exit, when stdout is flushed
        return BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
