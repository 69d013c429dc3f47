"""Candidate loading: tiny families through save_pretrained/from_pretrained, bad ids, refusals."""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch

from lensray.errors import LensrayInputError
from lensray.engine.models import load_candidate, parameter_counts, parse_tiny_id


pytestmark = pytest.mark.usefixtures("lensray_cache")


def _logits(model, tok, kind):
    enc = tok(["abc=XY"], return_tensors="pt")
    with torch.no_grad():
        if kind == "seq2seq":
            return model(**enc, decoder_input_ids=enc["input_ids"][:, :3]).logits
        return model(**enc).logits


@pytest.mark.parametrize("model_id, kind", [
    ("tiny:gpt2:n_layer=1,n_embd=32", "causal"),
    ("tiny:llama:n_layer=1,n_embd=32", "causal"),
    ("tiny:opt:n_layer=1,n_embd=32", "causal"),
    ("tiny:t5:n_layer=1,n_embd=32", "seq2seq"),
    ("tiny:bart", "seq2seq"),
])
def test_tiny_families_round_trip_through_from_pretrained(tmp_path, model_id, kind):
    model, tok, got = load_candidate(model_id)
    assert got == kind and not model.training
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    again, tok2, kind2 = load_candidate(str(tmp_path))
    assert kind2 == kind and type(again) is type(model)
    assert torch.equal(_logits(model, tok, kind), _logits(again, tok2, kind))


def test_tiny_ids_are_seeded_and_cached():
    a, _, _ = load_candidate("tiny:gpt2:n_layer=1,n_embd=32,seed=1")
    b, _, _ = load_candidate("tiny:gpt2:n_layer=1,n_embd=32,seed=1")
    c, _, _ = load_candidate("tiny:gpt2:n_layer=1,n_embd=32,seed=2")
    wa, wb, wc = (m.transformer.h[0].mlp.c_fc.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_pretrain_option_changes_zero_shot_weights():
    plain, _, _ = load_candidate("tiny:gpt2:n_layer=1,n_embd=32")
    trained, _, _ = load_candidate("tiny:gpt2:n_layer=1,n_embd=32,pretrain=3")
    assert not torch.equal(plain.lm_head.weight, trained.lm_head.weight)


def test_parse_tiny_id_and_bad_tiny_ids():
    assert parse_tiny_id("tiny:gpt2:n_layer=2,n_embd=64") == ("gpt2", {"n_layer": 2, "n_embd": 64})
    with pytest.raises(LensrayInputError, match="unknown tiny family 'rnn'"):
        load_candidate("tiny:rnn")
    with pytest.raises(LensrayInputError, match="not key=value"):
        load_candidate("tiny:gpt2:n_layer")
    with pytest.raises(LensrayInputError, match=r"unknown gpt2 config option\(s\) \['wings'\]"):
        load_candidate("tiny:gpt2:wings=2")


def test_missing_path_and_folder_without_model(tmp_path):
    with pytest.raises(LensrayInputError, match="does not exist"):
        load_candidate(str(tmp_path / "nothing"))
    with pytest.raises(LensrayInputError, match="no config.json"):
        load_candidate(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(LensrayInputError, match="no weights"):
        load_candidate(str(tmp_path))


def test_uncached_hub_id_fails_fast_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(LensrayInputError, match="'some-org/some-model' is not in the local Hugging Face cache"):
        load_candidate("some-org/some-model")
    assert time.perf_counter() - start < 10
    with pytest.raises(LensrayInputError, match="neither a local folder nor a valid hub id"):
        load_candidate("bad id with spaces")


def test_pickle_checkpoint_is_refused_unless_allowed(tmp_path):
    model, tok, _ = load_candidate("tiny:gpt2:n_layer=1,n_embd=32")
    # transformers 5 always writes safetensors (safe_serialization is gone): write the pickle by hand
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert (tmp_path / "pytorch_model.bin").is_file() and not (tmp_path / "model.safetensors").exists()
    with pytest.raises(LensrayInputError, match="pickle checkpoint.*refused.*allow_pickle"):
        load_candidate(str(tmp_path))
    loaded, tok2, _ = load_candidate(str(tmp_path), allow_pickle=True)
    assert torch.equal(_logits(model, tok, "causal"), _logits(loaded, tok2, "causal"))


def _remote_code_repo(folder):
    sentinel = folder / "SENTINEL"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "lensray_evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
    }))
    (folder / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('code ran')\n")
    (folder / "model.safetensors").write_bytes(b"")
    return sentinel


def test_remote_code_is_refused_without_trust_remote_code(tmp_path):
    sentinel = _remote_code_repo(tmp_path)
    with pytest.raises(LensrayInputError, match="needs code from its repository.*trust_remote_code"):
        load_candidate(str(tmp_path))
    assert not sentinel.exists()


def test_trust_remote_code_logs_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="lensray.engine.models"):
        load_candidate("tiny:gpt2:n_layer=1,n_embd=32", trust_remote_code=True)
    assert "trust_remote_code is set" in caplog.text


def test_unsupported_architecture_is_an_input_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(LensrayInputError, match="no_such_arch|unsupported"):
        load_candidate(str(tmp_path))


def test_corrupt_weights_are_an_input_error(tmp_path):
    model, tok, _ = load_candidate("tiny:gpt2:n_layer=1,n_embd=32")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LensrayInputError, match="cannot be loaded"):
        load_candidate(str(tmp_path))


def test_cached_hub_id_loads_offline_through_the_hub_path(monkeypatch, tmp_path):
    import huggingface_hub.constants

    model, tok, _ = load_candidate("tiny:gpt2:n_layer=1,n_embd=32")
    repo = tmp_path / "models--lensray-test--tiny-gpt2"
    snapshot = repo / "snapshots" / ("0" * 40)
    model.save_pretrained(snapshot)
    tok.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded, tok2, kind = load_candidate("lensray-test/tiny-gpt2")
    assert kind == "causal" and torch.equal(_logits(model, tok, kind), _logits(loaded, tok2, kind))


def test_parameter_counts_from_configs_match_the_loaded_models(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ids = ["tiny:gpt2:n_layer=1,n_embd=32,pretrain=2", "tiny:t5:n_layer=1,n_embd=32"]
    model, tok, _ = load_candidate("tiny:opt:n_layer=1,n_embd=32")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    counts = parameter_counts([(i, False) for i in ids] + [(str(tmp_path), False), ("no-such-org/no-model", False)])
    loaded = [load_candidate(i)[0] for i in ids] + [model]
    assert counts[:3] == [sum(p.numel() for p in m.parameters()) for m in loaded]
    assert counts[3] is None  # an uncached hub id with the hub offline: unknown, not an error


def _hub_cache(root, repo: str, files: dict[str, bytes]):
    """A Hugging Face cache holding one snapshot of ``repo`` with ``files``."""
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snap = folder / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    return snap


def test_source_problem_finds_what_cannot_load_without_reading_weights(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from lensray.engine.models import source_problem

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert source_problem("tiny:gpt2:n_layer=1") is None
    assert "unknown gpt2 config option" in source_problem("tiny:gpt2:n_wings=2")
    assert source_problem(str(tmp_path / "nope")).startswith(f"could not load {tmp_path / 'nope'}: model path")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"")
    assert "allow_pickle" in source_problem(str(pickled))
    assert source_problem(str(pickled), allow_pickle=True) is None
    # a hub id while offline: only the local cache counts
    missing = source_problem("nonexistent-org/no-model", offline=True)
    assert missing == ("could not load nonexistent-org/no-model: model 'nonexistent-org/no-model' is not in the local "
                       "Hugging Face cache and the hub is unreachable or HF_HUB_OFFLINE is set")
    _hub_cache(tmp_path / "hub", "org/cached", {"config.json": b"{}", "model.safetensors": b""})
    assert source_problem("org/cached", offline=True) is None
    _hub_cache(tmp_path / "hub", "org/config-only", {"config.json": b"{}"})
    assert "no weights" in source_problem("org/config-only", offline=True)
    assert source_problem("nonexistent-org/no-model", offline=False) is None  # online: the hub answers the loader
    assert "valid hub id" in source_problem("not a//valid id", offline=False)
