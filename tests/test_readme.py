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
