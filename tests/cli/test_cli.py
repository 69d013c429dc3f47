import subprocess
import sys

import pytest

from lensray.cli.main import build_parser, main
from lensray.errors import LensrayInputError


def test_parser_knows_every_command():
    parser = build_parser()
    for cmd in (["benchmark", "--curves", "x.csv"], ["probe", "--model", "m"], ["screen", "c.yaml"]):
        assert parser.parse_args(cmd).command == cmd[0]


def test_input_error_is_one_line_and_exit_2(capsys, monkeypatch):
    def boom(args):
        raise LensrayInputError("column 'size': row 3 is not a number\nsecond line")

    parser = build_parser()
    monkeypatch.setattr("lensray.cli.main.build_parser", lambda: parser)
    for action in parser._subparsers._group_actions[0].choices.values():
        action.set_defaults(func=boom)
    assert main(["benchmark", "--curves", "x.csv"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: column 'size': row 3 is not a number second line"
    assert "Traceback" not in err


def test_python_m_lensray_help():
    res = subprocess.run([sys.executable, "-m", "lensray", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    assert "benchmark" in res.stdout and "screen" in res.stdout


def test_input_error_line_never_shows_a_secret(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_cli_secret_value_123")
    missing = tmp_path / "hf_cli_secret_value_123.csv"
    assert main(["benchmark", "--curves", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "hf_cli_secret_value_123" not in err


def test_screen_plan_prints_the_worst_case_bill_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from lensray.core.synthetic_zoo import synthetic_zoo, write_curves_csv

    monkeypatch.setenv("LENSRAY_CACHE", str(tmp_path / "cache"))
    zoo = synthetic_zoo(4, seed=1)
    csv = write_curves_csv(zoo, tmp_path / "zoo.csv")
    out = tmp_path / "out"
    assert main(["screen", "--replay", str(csv), "--max-samples", "3200", "--plan", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    grid = [d for d in zoo.D if 0 < d <= 3200]
    worst = sum(6 * s * 35 * sum(grid) for s in zoo.size)
    full = sum(6 * s * 35 * 1_638_400 for s in zoo.size)
    assert f"worst case, nobody pruned: {worst:.3g} FLOPs to run" in text
    assert f"({100 * worst / full:.2f}% of full tuning)" in text
    assert all(cid[:32] in text for cid in zoo.ids)
    assert not out.exists()  # a plan starts no Ray and writes nothing

    config = tmp_path / "zoo.yaml"
    config.write_text("zoo:\n  - {id: a, model: 'tiny:gpt2:n_layer=1,n_embd=32'}\n  - {id: b, model: 'no-such-org/x'}\n"
                      "grid: {max_samples: 800}\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["screen", str(config), "--plan", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "not billed, 1 of 2 (no size, and no model config to count it from here: not a tiny id, a local folder or a cached hub id): b" in text
    assert not out.exists()


def test_set_and_the_shortcut_flags_are_one_ordered_list_of_overrides():
    args = build_parser().parse_args(["screen", "c.yaml", "--out", "o", "--set", "grid.max_samples=800",
                                      "--max-samples", "1600", "--set", "zoo[0].gpus=0.5"])
    assert args.sets == [("storage.path", "o"), ("grid.max_samples", 800), ("grid.max_samples", 1600),
                         ("zoo[0].gpus", 0.5)]
    probe = build_parser().parse_args(["probe", "--model", "m", "--ntk", "--seed", "3"])
    assert probe.sets == [("probe.ntk", True), ("probe.seed", 3)]
    assert build_parser().parse_args(["probe", "--model", "m"]).sets == []


def test_a_bad_set_is_one_line_naming_the_key(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("zoo: [{id: a, size: 1.0e+8}]\ngrid: {max_samples: 800}\n")
    for argv, words in [(["--set", "grid.max_sampels=800"], "grid.max_sampels: unknown key; did you mean 'max_samples'?"),
                        (["--set", "grid.max_samples"], "--set grid.max_samples: expected KEY=VALUE"),
                        (["--set", "pruning.top_k=many"], "pruning.top_k: Input should be a valid integer")]:
        assert main(["screen", str(config), "--plan", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {words}") and len(err.strip().splitlines()) == 1, err
    assert main(["screen", str(config), "--plan", "--set", "grid.start=100"]) == 0
    assert "grid: 0, 100, 200, 400, 800" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--help"], ["screen", "--help"], ["probe", "--help"], ["benchmark", "--help"]])
def test_help_is_plain_text_and_lists_the_choices(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    out = capsys.readouterr().out
    assert info.value.code == 0 and "``" not in out and ":class:" not in out and ":func:" not in out
    if argv[0] == "probe":
        assert "auto, cpu, cuda" in out
    if argv[0] == "benchmark":
        assert "ats" in out and "lensray" in out and "rectified" in out


def test_screen_keeps_rays_start_up_lines_out_of_the_terminal(tmp_path):
    """``lensray screen`` (replay, a local Ray) prints only lensray's own lines; Ray's start-up
    notices (token authentication, the local instance) are in the run's ray.log."""
    import os
    import re
    from pathlib import Path

    from lensray.core.synthetic_zoo import synthetic_zoo, write_curves_csv

    curves = write_curves_csv(synthetic_zoo(3, seed=3), tmp_path / "curves.csv")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # unset: Ray announces token authentication
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    res = subprocess.run([sys.executable, "-m", "lensray", "screen", "--replay", str(curves), "--max-samples", "3200",
                          "--out", str(out), "--set", "ray.num_cpus=2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    ours = re.compile(r"^(\[\s*\d+\.\d+s\] |note: |warning: )")
    assert [line for line in res.stderr.splitlines() if not ours.match(line)] == []
    assert res.stdout.splitlines()[0].startswith("selected: ")
    terminal = res.stdout + res.stderr
    for line in ("Token authentication", "Started a local Ray instance", "(raylet)", "-- "):
        assert line not in terminal
    log = (out / "ray.log").read_text()
    assert "Token authentication is enabled for this Ray cluster" in log and "Started a local Ray instance" in log


def test_a_reader_that_left_is_no_traceback():
    """Output to a pipe whose reader is gone (``lensray screen --plan | head``): exit 141, nothing on stderr."""
    import os

    read, write = os.pipe()
    os.close(read)
    try:
        res = subprocess.run([sys.executable, "-m", "lensray", "screen", "--plan"], stdout=write, stderr=subprocess.PIPE, text=True,
                             timeout=120)
    finally:
        os.close(write)
    assert res.returncode == 141 and res.stderr == ""
