"""The public Python API: ``lensray.screen``, ``lensray.plan``, ``lensray.load_config``,
``lensray.get_selector`` and ``__version__``."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata

import pytest

import lensray
from lensray.cli.main import main
from lensray.core.synthetic_zoo import synthetic_zoo, write_curves_csv
from lensray.errors import LensrayInputError

ZOO = [{"id": "a", "model": "tiny:gpt2"}, {"id": "b", "model": "tiny:llama"}]


def test_import_lensray_loads_neither_torch_nor_ray():
    code = "import lensray, sys; assert 'torch' not in sys.modules and 'ray' not in sys.modules, sorted(sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def test_version_from_the_package_metadata(capsys):
    assert lensray.__version__ == metadata.version("lensray")
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"lensray {lensray.__version__}"


def test_load_config_and_get_selector_are_the_modules_own():
    from lensray.core.selection import get_selector
    from lensray.run.config import load_config

    assert lensray.load_config is load_config and lensray.get_selector is get_selector
    assert "screen" in dir(lensray)
    with pytest.raises(AttributeError):
        lensray.no_such_name  # noqa: B018


def test_plan_takes_a_path_a_mapping_or_a_config_and_keyword_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("zoo: [{id: a, size: 1.0e+8}, {id: b, size: 2.0e+8}]\ngrid: {max_samples: 800}\n")
    out = tmp_path / "out"
    bills = [lensray.plan(source, out=out, grid__start=100) for source in
             (path, str(path), lensray.load_config(path), {"zoo": [{"id": "a", "size": 1e8}, {"id": "b", "size": 2e8}],
                                                           "grid": {"max_samples": 800}})]
    assert all(b == bills[0] for b in bills)
    assert bills[0]["grid"] == [0, 100, 200, 400, 800]
    worst = sum(6 * s * 35 * (100 + 200 + 400 + 800) for s in (1e8, 2e8))
    assert bills[0]["flops_todo"] == pytest.approx(worst)
    assert not out.exists()  # a plan writes nothing
    assert lensray.plan(path, **{"grid.max_samples": 400, "grid.start": 100})["grid"] == [0, 100, 200, 400]


def test_plan_of_a_replay_is_the_cli_plan(tmp_path, capsys):
    zoo = synthetic_zoo(4, seed=1)
    csv = write_curves_csv(zoo, tmp_path / "zoo.csv")
    bill = lensray.plan(replay=csv, grid__max_samples=3200)
    grid = [d for d in zoo.D if 0 < d <= 3200]
    assert bill["flops_todo"] == pytest.approx(sum(6 * s * 35 * sum(grid) for s in zoo.size))
    assert main(["screen", "--replay", str(csv), "--set", "grid.max_samples=3200", "--plan"]) == 0
    assert f"worst case, nobody pruned: {bill['flops_todo']:.3g} FLOPs to run" in capsys.readouterr().out


def test_bad_overrides_are_input_errors_naming_the_key(tmp_path):
    with pytest.raises(LensrayInputError, match=r"^grid\.max_sampels: unknown key; did you mean 'max_samples'"):
        lensray.plan({"zoo": ZOO}, grid__max_sampels=800)
    with pytest.raises(LensrayInputError, match="--max-samples: required with --replay"):
        lensray.plan(replay=write_curves_csv(synthetic_zoo(4, seed=1), tmp_path / "zoo.csv"))


@pytest.mark.slow
def test_screen_a_replay_then_resume_repeats_nothing(tmp_path):
    csv = write_curves_csv(synthetic_zoo(6, seed=3), tmp_path / "zoo.csv")
    out = tmp_path / "out"
    kwargs = dict(out=out, replay=csv, grid__max_samples=3200, ray__num_cpus=2, progress=False)
    results = lensray.screen(**kwargs)
    selection = results.selection
    assert json.loads((out / "selection.json").read_text())["selected"] == results.selected == selection["selected"]
    assert list(results.ranking["candidate"]) == [e["candidate"] for e in selection["ranking"]]
    assert len(results.probes) == 6 * 6 - sum(6 - e["n_probes"] for e in selection["ranking"])
    assert set(results.probes["candidate"]) <= set(results.ranking["candidate"])
    assert results.bill["flops_spent"] > 0
    probes = sorted(p.name for p in (out / "probes").rglob("*") if p.is_file())
    assert probes
    with pytest.raises(LensrayInputError, match="already holds probe results"):
        lensray.screen(**kwargs)
    again = lensray.screen(resume=True, **kwargs)
    assert again.selected == selection["selected"]
    assert sorted(p.name for p in (out / "probes").rglob("*") if p.is_file()) == probes
