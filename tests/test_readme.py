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
