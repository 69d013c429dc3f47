import subprocess
import sys

from lensray.cli import build_parser, main
from lensray.errors import LensrayInputError


def test_parser_knows_every_command():
    parser = build_parser()
    for cmd in (["benchmark", "--curves", "x.csv"], ["probe", "--model", "m"], ["screen", "c.yaml"]):
        assert parser.parse_args(cmd).command == cmd[0]


def test_input_error_is_one_line_and_exit_2(capsys, monkeypatch):
    def boom(args):
        raise LensrayInputError("column 'size': row 3 is not a number\nsecond line")

    parser = build_parser()
    monkeypatch.setattr("lensray.cli.build_parser", lambda: parser)
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
