from pathlib import Path

from lensray.run.config import config_reference

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def test_config_reference_is_current():
    text = (REPO / "docs" / "CONFIG.md").read_text()
    start = text.index("<!-- config-reference:start")
    start = text.index("\n", start) + 1
    end = text.index("<!-- config-reference:end -->")
    assert text[start:end].strip() == config_reference().strip(), (
        "docs/CONFIG.md is stale: regenerate it from lensray.run.config.config_reference()"
    )


def test_readme_names_the_two_commands_and_job_submit():
    text = README.read_text()
    for needle in ("make demo", "make test", "ray job submit", "jobs/runtime_env.yaml"):
        assert needle in text


def test_readme_is_short_and_links_what_it_leaves_out():
    text = README.read_text()
    assert len(text.splitlines()) < 250
    for link in ("docs/CONFIG.md", "docs/INTERFACES.md", "BENCHMARKS.md", "cluster/README.md"):
        assert link in text and (REPO / link).is_file()


def _usage_lines() -> list[list[str]]:
    import shlex

    text = README.read_text()
    block = text[text.index("## Usage"):]
    block = block[block.index("```bash") + 7:block.index("```", block.index("```bash") + 7)]
    return [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.startswith("lensray ")]


def test_readme_usage_commands_that_start_no_ray_run(benchmarks_dir, tmp_path, monkeypatch, capsys):
    """Every command of the README's usage block that needs no Ray (a plan, a probe, the benchmark,
    --version) runs as written, with its outputs under a temporary folder."""
    import pytest

    from lensray.cli.main import main

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("LENSRAY_CACHE", str(tmp_path / "cache"))
    ran = 0
    for argv in _usage_lines():
        args = [a.replace("../shared/benchmarks", str(benchmarks_dir)).replace("runs/", f"{tmp_path}/") for a in argv[1:]]
        if not ("--plan" in args or args[0] in ("probe", "benchmark", "--version")):
            continue  # screenings start Ray: the demo test runs one as the README gives it
        if args[0] == "--version":
            with pytest.raises(SystemExit) as info:
                main(args)
            assert info.value.code == 0
        else:
            assert main(args) == 0, argv
        ran += 1
    assert ran >= 4
    assert "Traceback" not in capsys.readouterr().err


def _readme_args(argv: list[str], benchmarks_dir, tmp_path) -> list[str]:
    """A README command's arguments with its data and output paths under the test's folders."""
    return [a.replace("../shared/benchmarks", str(benchmarks_dir)).replace("runs/", f"{tmp_path}/") for a in argv[1:]]


def test_readme_screen_commands_plan_as_written(benchmarks_dir, tmp_path, monkeypatch, capsys):
    """Every screening of the README's usage block is accepted as written: its flags, overrides and
    config keys plan (``--plan`` added: no Ray, nothing written)."""
    from lensray.cli.main import main

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("LENSRAY_CACHE", str(tmp_path / "cache"))
    screens = [argv for argv in _usage_lines() if argv[1] == "screen"]
    assert len(screens) >= 5
    for argv in screens:
        args = _readme_args(argv, benchmarks_dir, tmp_path)
        assert main(args if "--plan" in args else [*args, "--plan"]) == 0, argv
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "error:" not in captured.err
    assert not any(tmp_path.glob("demo*")) and not (tmp_path / "flan").exists()


def _api_block() -> str:
    text = README.read_text()
    block = text[text.index("## Python API"):]
    start = block.index("```python") + len("```python")
    return block[start:block.index("```", start)]


def test_readme_python_api_block_names_what_exists(benchmarks_dir, tmp_path, monkeypatch):
    """The README's Python API block: its ``plan`` line runs as written, its ``screen`` call's config
    and overrides are accepted (planned, not run: the demo fine-tunes for minutes) and every
    attribute it reads is one of the results'."""
    import lensray

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("LENSRAY_CACHE", str(tmp_path / "cache"))
    block = _api_block().replace("../shared/benchmarks", str(benchmarks_dir)).replace('"runs/', f'"{tmp_path}/')
    calls, read = [], []

    class Read:
        """Stands for the results: records each attribute read, which must be one of lensray.Results'."""

        def __getattr__(self, name):
            assert isinstance(getattr(lensray.Results, name, None), property), f"lensray.Results has no {name!r}"
            read.append(name)

    class Lensray:
        """``lensray`` with ``screen`` planning its inputs instead of running them."""

        plan = staticmethod(lensray.plan)

        @staticmethod
        def screen(config=None, out=None, resume=False, replay=None, **overrides):
            calls.append(lensray.plan(config, out=out, replay=replay, **overrides))
            return Read()

    namespace: dict = {}
    exec(block.replace("import lensray\n", ""), {"lensray": Lensray}, namespace)  # noqa: S102 - the README's own code
    assert len(calls) == 1 and calls[0]["candidates"]
    assert namespace["bill"]["grid"][-1] == 25_600 and namespace["bill"]["candidates"]
    assert sorted(read) == ["bill", "probes", "ranking", "selected"]


@__import__("pytest").mark.slow
def test_readme_replay_screening_runs_as_written(benchmarks_dir, tmp_path, monkeypatch, capsys):
    """The README's replay screening runs as written (outputs under a temporary folder) and selects
    a candidate of the table."""
    import json

    import pytest

    from lensray.cli.main import main

    pytest.importorskip("ray")
    monkeypatch.chdir(REPO)
    (argv,) = [argv for argv in _usage_lines() if "--replay" in argv]
    assert main(_readme_args(argv, benchmarks_dir, tmp_path)) == 0
    selection = json.loads((tmp_path / "flan" / "selection.json").read_text())
    assert len(selection["ranking"]) == 30 and selection["selected"]
    assert capsys.readouterr().out.startswith(f"selected: {selection['selected']}")
