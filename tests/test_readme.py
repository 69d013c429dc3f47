from pathlib import Path

from lensray.run.config import config_reference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_reference_is_current():
    text = README.read_text()
    start = text.index("<!-- config-reference:start")
    start = text.index("\n", start) + 1
    end = text.index("<!-- config-reference:end -->")
    assert text[start:end].strip() == config_reference().strip(), (
        "README config reference is stale: regenerate it from lensray.run.config.config_reference()"
    )


def test_readme_names_the_two_commands_and_job_submit():
    text = README.read_text()
    for needle in ("make demo", "make test", "ray job submit", "jobs/runtime_env.yaml"):
        assert needle in text
