"""Loading candidates safely, and the tiny built-in candidates of the offline demo and tests.

Every candidate goes through one path: resolve the id to a local folder (a ``tiny:`` id is
built from a config and saved there, a hub id is fetched into the Hugging Face cache, a path
is used as is), check what the folder holds, then ``from_pretrained``.

Security: code from a model repository runs only with ``trust_remote_code=True`` (a warning
is logged); weights load from safetensors, and pickle-based checkpoints
(``pytorch_model.bin``) are refused unless ``allow_pickle=True``.

Tiny ids look like ``tiny:gpt2:n_layer=2,n_embd=64``; families: gpt2, llama, opt, t5, bart.
Options are config fields, plus ``seed`` (weight init) and ``pretrain`` (optimiser steps of a
quick seeded pre-training on a generic character corpus, so that tiny candidates differ in
zero-shot loss). Built models are cached in ``$LENSRAY_CACHE/tiny`` (default
``~/.cache/lensray/tiny``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Literal, Optional

from lensray.errors import LensrayInputError, one_line

log = logging.getLogger(__name__)

Kind = Literal["causal", "seq2seq"]
_SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "spiece.model",
                    "special_tokens_map.json", "tokenizer.model", "sentencepiece.bpe.model", "vocab.txt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def cache_dir() -> Path:
    """The lensray cache folder (env ``LENSRAY_CACHE``, default ``~/.cache/lensray``)."""
    return Path(os.environ.get("LENSRAY_CACHE", Path.home() / ".cache" / "lensray")).expanduser()


# --------------------------------------------------------------------------- tiny candidates

_TINY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 256,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "llama": {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 4, "max_position_embeddings": 256},
    "opt": {"num_hidden_layers": 2, "hidden_size": 64, "ffn_dim": 128, "num_attention_heads": 4,
            "max_position_embeddings": 256, "word_embed_proj_dim": 64, "dropout": 0.0, "attention_dropout": 0.0},
    "t5": {"num_layers": 2, "num_decoder_layers": 2, "d_model": 64, "d_ff": 128, "num_heads": 4, "d_kv": 16,
           "dropout_rate": 0.0},
    "bart": {"encoder_layers": 1, "decoder_layers": 1, "d_model": 64, "encoder_ffn_dim": 128,
             "decoder_ffn_dim": 128, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
             "max_position_embeddings": 256, "dropout": 0.0, "attention_dropout": 0.0},
}
_ALIASES = {"n_layer": {"llama": "num_hidden_layers", "opt": "num_hidden_layers", "t5": "num_layers"},
            "n_embd": {"llama": "hidden_size", "opt": "hidden_size", "t5": "d_model", "bart": "d_model"}}


def char_tokenizer() -> Any:
    """A character-level fast tokenizer (printable ASCII + newline), built offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def parse_tiny_id(model_id: str) -> tuple[str, dict[str, Any]]:
    """``tiny:gpt2:n_layer=2,n_embd=64`` -> ("gpt2", {"n_layer": 2, "n_embd": 64})."""
    parts = model_id.split(":", 2)
    family = parts[1] if len(parts) > 1 else ""
    if family not in _TINY_DEFAULTS:
        raise LensrayInputError(f"model {model_id!r}: unknown tiny family {family!r}; use one of {sorted(_TINY_DEFAULTS)}")
    opts: dict[str, Any] = {}
    for item in filter(None, (parts[2] if len(parts) > 2 else "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LensrayInputError(f"model {model_id!r}: option {item!r} is not key=value")
        try:
            opts[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            opts[key.strip()] = value
    for key, value in opts.items():
        default = 0 if key in ("seed", "pretrain") else _TINY_DEFAULTS[family].get(_ALIASES.get(key, {}).get(family, key))
        if default is not None:
            _check_option(model_id, key, value, default, minimum=0 if key in ("seed", "pretrain") else None)
    return family, opts


def _check_option(model_id: str, key: str, value: Any, default: Any, minimum: Optional[float] = None) -> None:
    """Raise unless a tiny option has the type of its default: an int (>= 1 for sizes, unless
    ``minimum``), a finite number >= 0, a bool or a string."""
    import math

    def bad(what: str) -> LensrayInputError:
        return LensrayInputError(f"model {model_id!r}: option {key}={value!r} must be {what}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
    elif isinstance(default, int):
        low = 1 if minimum is None else minimum
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise bad(f"an integer >= {low}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise bad("a finite number >= 0")
    elif isinstance(default, str) and not isinstance(value, str):
        raise bad("a string")


def _tiny_config(family: str, opts: dict[str, Any], tokenizer: Any, model_id: str) -> Any:
    import transformers

    fields = dict(_TINY_DEFAULTS[family])
    for key, value in opts.items():
        fields[_ALIASES.get(key, {}).get(family, key)] = value
    cls = transformers.AutoConfig.for_model(family).__class__
    known = cls().to_dict()
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise LensrayInputError(f"model {model_id!r}: unknown {family} config option(s) {unknown}")
    for key, value in opts.items():
        name = _ALIASES.get(key, {}).get(family, key)
        if name not in _TINY_DEFAULTS[family] and known.get(name) is not None:
            _check_option(model_id, key, value, known[name], minimum=-2**31)
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if family in ("t5", "bart"):
        ids["decoder_start_token_id"] = tokenizer.pad_token_id if family == "t5" else tokenizer.eos_token_id
    if family == "bart":
        ids["forced_eos_token_id"] = tokenizer.eos_token_id
    try:
        return cls(**fields, **ids)
    except Exception as exc:  # noqa: BLE001 - transformers validates configs with many error types
        raise LensrayInputError(f"model {model_id!r}: not a valid {family} config: {one_line(exc, 200)}") from None


def _pretrain(model: Any, tokenizer: Any, kind: Kind, steps: int, seed: int) -> None:
    """A few seeded optimiser steps on a generic character corpus (words of random letters)."""
    import random

    import torch

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        texts = [" ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 6))) for _ in range(6))
                 for _ in range(16)]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        if kind == "seq2seq":
            loss = model(**enc, labels=labels).loss
        else:
            logits = model(**enc).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def ensure_tiny(model_id: str) -> Path:
    """Build the tiny candidate ``model_id`` into the cache (once) and return its folder."""
    import torch
    import transformers

    family, opts = parse_tiny_id(model_id)
    seed = int(opts.pop("seed", 0))
    pretrain = int(opts.pop("pretrain", 0))
    key = hashlib.sha256(f"v1|{family}|{sorted(opts.items())}|{seed}|{pretrain}".encode()).hexdigest()[:16]
    folder = cache_dir() / "tiny" / f"{family}-{key}"
    if (folder / "config.json").is_file():
        return folder
    tokenizer = char_tokenizer()
    config = _tiny_config(family, opts, tokenizer, model_id)
    auto = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = auto.from_config(config)
        except (ValueError, TypeError, AssertionError, RuntimeError) as exc:  # e.g. a width not divisible by the heads
            raise LensrayInputError(f"model {model_id!r}: cannot be built: {one_line(exc, 200)}") from None
        if pretrain:
            _pretrain(model, tokenizer, "seq2seq" if config.is_encoder_decoder else "causal", pretrain, seed)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    # under torch.distributed, transformers writes weights on rank 0 only; every builder needs a full copy
    model.should_save_on_this_rank = lambda is_main_process: True
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not all((tmp / f).is_file() for f in ("config.json", "model.safetensors")):
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"building {model_id}: save_pretrained wrote no model into {tmp}")
    try:
        tmp.rename(folder)  # atomic: concurrent builders race harmlessly
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def tokenizer_of(model_id: str, trust_remote_code: bool = False) -> Any:
    """A candidate's tokenizer without its weights (tiny ids, local folders, hub ids or their local
    cache when the hub is unreachable); None where it cannot be had."""
    import transformers

    if model_id.startswith("tiny:"):
        return char_tokenizer()
    folder = Path(os.path.expanduser(model_id))
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder) if folder.is_dir() else model_id,
                                                          trust_remote_code=trust_remote_code,
                                                          local_files_only=hub_offline())
    except Exception as exc:  # noqa: BLE001 - no tokenizer: the plan falls back to the assumed figure
        log.debug("no tokenizer for %s: %s", model_id, one_line(exc))
        return None


def parameter_counts(candidates: list[tuple[str, bool]]) -> list[Optional[int]]:
    """Parameters of each ``(model id, trust_remote_code)``, counted from its config alone.

    The model is built on the meta device: no weights are read or fetched. Tiny ids are counted
    from their spec, local folders from their ``config.json``, hub ids from the hub's config (or
    the local cache when the hub is unreachable). None where no config can be had; the count is
    the probe's own (``sum(p.numel() for p in model.parameters())``, tied weights once).
    """
    local_only: Optional[bool] = None
    out: list[Optional[int]] = []
    for model_id, trust in candidates:
        folder = Path(os.path.expanduser(model_id))
        source = str(folder) if folder.is_dir() else model_id
        if source == model_id and local_only is None and _HUB_ID.match(model_id) and not model_id.startswith("tiny:"):
            local_only = hub_offline()  # once, at the first hub id
        out.append(_count_parameters(source, trust, bool(local_only)))
    return out


def _count_parameters(source: str, trust_remote_code: bool, local_only: bool) -> Optional[int]:
    """Parameters of a tiny id, a local folder or a hub id (see :func:`parameter_counts`)."""
    import torch
    import transformers

    try:
        if source.startswith("tiny:"):
            family, opts = parse_tiny_id(source)
            for key in ("seed", "pretrain"):
                opts.pop(key, None)
            config = _tiny_config(family, opts, char_tokenizer(), source)
        else:
            config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                             local_files_only=local_only)
        auto = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=trust_remote_code)
        return int(sum(p.numel() for p in model.parameters()))
    except Exception as exc:  # noqa: BLE001 - any unreadable config leaves the size unknown
        log.debug("no parameter count for %s: %s", source, one_line(exc))
        return None


# --------------------------------------------------------------------------- resolving ids


def _offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "LENSRAY_OFFLINE")
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in flags)


def hub_offline() -> bool:
    """True when offline mode is set (HF_HUB_OFFLINE, LENSRAY_OFFLINE) or the hub cannot be reached.

    Checked before any hub access so that an uncached id fails in seconds, not after the
    hub client's retries.
    """
    return _offline() or not _hub_reachable()


def _hub_reachable(timeout: float = 3.0) -> bool:
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # reachable only through the proxy: let the hub client try
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_folder(model_id: str, allow_pickle: bool, trust_remote_code: bool) -> Path:
    """Fetch (or find in the cache) the files of a hub model; fails fast when offline.

    Only what loading needs is fetched: configs, safetensors, tokenizer files; pickle
    weights only with ``allow_pickle``, Python files only with ``trust_remote_code``.
    """
    from huggingface_hub import snapshot_download

    if not _HUB_ID.match(model_id):
        raise LensrayInputError(f"model {model_id!r} is neither a local folder nor a valid hub id")
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
    patterns += (["*.bin"] if allow_pickle else []) + (["*.py"] if trust_remote_code else [])
    local_only = hub_offline()
    try:
        return Path(snapshot_download(model_id, allow_patterns=patterns, local_files_only=local_only))
    except Exception as exc:
        if local_only:
            raise LensrayInputError(f"model {model_id!r} is not in the local Hugging Face cache and the hub is "
                                    "unreachable or HF_HUB_OFFLINE is set") from exc
        reason = one_line(exc, 200)
        raise LensrayInputError(f"model {model_id!r} could not be fetched from the hub: {reason}") from exc


def resolve_model_dir(model_id: str, allow_pickle: bool = False, trust_remote_code: bool = False) -> Path:
    """Local folder holding the candidate's config, weights and tokenizer."""
    if model_id.startswith("tiny:"):
        return ensure_tiny(model_id)
    path = Path(os.path.expanduser(model_id))
    if path.exists() or model_id.startswith((".", "/", "~")):
        if not path.exists():
            raise LensrayInputError(f"model path {model_id} does not exist")
        if not path.is_dir():
            raise LensrayInputError(f"model path {model_id} is not a folder")
        return path
    return _hub_folder(model_id, allow_pickle, trust_remote_code)


def source_problem(model_id: str, trust_remote_code: bool = False, allow_pickle: bool = False,
                   offline: Optional[bool] = None) -> Optional[str]:
    """Why candidate ``model_id`` cannot be loaded, found without reading weights; None when it may load.

    A tiny id must parse; a local folder must exist and hold a config, safetensors weights (a
    pickle checkpoint only with ``allow_pickle``) and no repository code unless trusted; a hub id
    must be valid and, when the hub is offline (``offline``; default :func:`hub_offline`), have
    its config and weights in the local Hugging Face cache. An online hub id is left to the
    loader (the hub answers there). The reason reads like the loader's own.
    """
    from huggingface_hub import try_to_load_from_cache

    try:
        if model_id.startswith("tiny:"):
            family, opts = parse_tiny_id(model_id)
            _tiny_config(family, {k: v for k, v in opts.items() if k not in ("seed", "pretrain")}, char_tokenizer(),
                         model_id)
            return None
        path = Path(os.path.expanduser(model_id))
        if path.exists() or model_id.startswith((".", "/", "~")):
            folder = resolve_model_dir(model_id, allow_pickle, trust_remote_code)
        elif not _HUB_ID.match(model_id):
            raise LensrayInputError(f"model {model_id!r} is neither a local folder nor a valid hub id")
        elif not (hub_offline() if offline is None else offline):
            return None
        else:
            config = try_to_load_from_cache(model_id, "config.json")
            if not isinstance(config, str):
                raise LensrayInputError(f"model {model_id!r} is not in the local Hugging Face cache and the hub is "
                                        "unreachable or HF_HUB_OFFLINE is set")
            folder = Path(config).parent
        _check_folder(folder, model_id, allow_pickle, trust_remote_code)
    except LensrayInputError as exc:
        return f"could not load {model_id}: {one_line(exc)}"
    return None


def check_weights(folder: Path, model_id: str, allow_pickle: bool) -> bool:
    """Whether to load safetensors (True) or, with ``allow_pickle``, a pickle checkpoint (False)."""
    if not (folder / "config.json").is_file():
        raise LensrayInputError(f"model {model_id!r}: no config.json in {folder} (not a model folder)")
    if any((folder / f).is_file() for f in _SAFE_WEIGHTS):
        return True
    if any((folder / f).is_file() for f in _PICKLE_WEIGHTS):
        if not allow_pickle:
            raise LensrayInputError(
                f"model {model_id!r} only has a pickle checkpoint (pytorch_model.bin), which can run code when "
                "loaded; refused (set allow_pickle: true for this candidate to load it anyway)"
            )
        return False
    raise LensrayInputError(f"model {model_id!r}: no weights (model.safetensors) in {folder}")


def _check_folder(folder: Path, model_id: str, allow_pickle: bool, trust_remote_code: bool) -> bool:
    """:func:`check_weights`, and a refusal of repository code unless ``trust_remote_code``."""
    safetensors = check_weights(folder, model_id, allow_pickle)
    if not trust_remote_code and _needs_remote_code(folder):
        raise LensrayInputError(
            f"model {model_id!r} needs code from its repository (auto_map); refused (set "
            "trust_remote_code: true for this candidate to run it)"
        )
    return safetensors


def _needs_remote_code(folder: Path) -> bool:
    """Whether the folder's config or tokenizer config points at code shipped with the model."""
    for name in ("config.json", "tokenizer_config.json"):
        try:
            meta = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("auto_map"):
            return True
    return False


def load_candidate(model_id_or_path: str, trust_remote_code: bool = False,
                   allow_pickle: bool = False, dtype: str = "float32") -> tuple[Any, Any, Kind]:
    """Load a candidate's model and tokenizer, safely.

    Parameters
    ----------
    model_id_or_path:
        A hub id (``org/name``), a local folder, or a tiny id (``tiny:gpt2:n_layer=2``).
    trust_remote_code:
        Allow running code shipped with the model repository (a warning is logged).
    allow_pickle:
        Allow loading a pickle-based checkpoint (``pytorch_model.bin``).
    dtype:
        ``"float32"``, ``"bfloat16"`` or ``"auto"`` (the checkpoint's own).

    Returns
    -------
    (model, tokenizer, kind) with kind ``"causal"`` or ``"seq2seq"``; the model is in eval mode
    on the CPU, in ``dtype``.

    Raises
    ------
    LensrayInputError
        Unknown id, folder without a model, pickle weights without opt-in, remote code without
        opt-in, unsupported architecture.
    """
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if trust_remote_code:
        log.warning("candidate %s: trust_remote_code is set; code from its repository will run", model_id_or_path)
    folder = resolve_model_dir(model_id_or_path, allow_pickle, trust_remote_code)
    safetensors = _check_folder(folder, model_id_or_path, allow_pickle, trust_remote_code)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise LensrayInputError(
                f"model {model_id_or_path!r} needs code from its repository; refused (set trust_remote_code: true "
                "for this candidate to run it)"
            ) from exc
        raise LensrayInputError(f"model {model_id_or_path!r}: unsupported config: {str(exc).splitlines()[0]}") from exc
    except OSError as exc:
        raise LensrayInputError(f"model {model_id_or_path!r}: unreadable config: {str(exc).splitlines()[0]}") from exc
    kind: Kind = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
    auto = transformers.AutoModelForSeq2SeqLM if kind == "seq2seq" else transformers.AutoModelForCausalLM
    try:
        model = auto.from_pretrained(folder, config=config, trust_remote_code=trust_remote_code,
                                     use_safetensors=safetensors, dtype=dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise LensrayInputError(f"model {model_id_or_path!r} needs code from its repository; refused "
                                    "(set trust_remote_code: true for this candidate)") from exc
        raise LensrayInputError(f"model {model_id_or_path!r} cannot be loaded: {str(exc).splitlines()[0]}") from exc
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # corrupt or mismatched weights surface as many types (SafetensorError ...)
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise LensrayInputError(f"model {model_id_or_path!r} cannot be loaded: {first}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if tokenizer.eos_token_id is None:
        raise LensrayInputError(f"model {model_id_or_path!r}: its tokenizer has no end-of-sequence token")
    model.eval()
    return model, tokenizer, kind
