"""NTK features of the LensLLM law: a sketched empirical NTK and the predicted residual F(Θ, t).

Operational definition of LensLLM's F (Zeng et al., ICML 2025; the authors' code is no reference):

- **Probe set** X: the first ``n`` (default 32) samples of a training batch that have at least
  one target token (``labels != -100``). The per-sample output is the per-token mean negative
  log-likelihood of the target tokens, ``f_i = mean_{tokens} -log p(y_tok)``, computed here from
  the logits (causal LMs: logits shifted by one against the labels; encoder-decoders: decoder
  logits aligned with the labels). The targets are ``Y = 0``, so the residual ``r₀ = f₀(X) − Y``
  is the vector of per-sample losses of the pre-trained model.
- **Kernel**: ``Θ_ij = ⟨∇θ f_i, ∇θ f_j⟩`` over all trainable parameters, estimated as
  ``Θ = G Gᵀ`` where row ``G_i = S ∇θ f_i`` is the gradient compressed to ``k`` dimensions by a
  seeded **CountSketch** ``S``: parameter element ``e`` of tensor ``τ`` goes to bucket ``h_τ(e)``
  with sign ``s_τ(e)``, both drawn from a torch generator seeded by ``(seed, τ, chunk)``.
  ``E[SᵀS] = I``, so every entry of Θ is unbiased with variance
  ``(‖g_i‖²‖g_j‖² + ⟨g_i,g_j⟩² − 2Σ g_i²g_j²)/k`` (see ``DEFAULT_SKETCH_DIM`` for the error). The sketch is streamed: one backward per
  sample, and a post-accumulate-grad hook on each parameter adds the sketch of that tensor's
  gradient to ``G_i`` and frees the gradient at once, so memory beyond the model and its
  activations is ``O(n·k)`` plus one tensor's gradient (sketched in chunks of ``CHUNK`` elements);
  no ``P×k`` matrix and no full gradient vector ever exists.
- **Residual after t steps**: ``F(Θ, t) = ‖expm(−η Θ t) r₀‖²`` with the true matrix exponential
  through the eigendecomposition ``Θ = V diag(λ) Vᵀ`` (tiny negative eigenvalues clipped to 0):
  ``F(t) = Σ_j exp(−2ηλ_j t) (v_jᵀ r₀)²``. ``t`` is the probe's number of optimiser steps and
  ``η`` its learning rate; ``F(0) = ‖r₀‖²``. This is the residual of the linearised model under
  gradient flow on ``½‖f(X) − Y‖²``: exact for a linear model (tests/engine/test_ntk.py checks it
  against gradient descent), a feature for the law otherwise.

The model is used in eval mode (no dropout) and left as found: training mode, parameters,
``requires_grad`` flags and any existing ``.grad`` tensors are restored.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from lensray.core.ntk_term import residual_norm
from lensray.errors import LensrayInputError

DEFAULT_SKETCH_DIM = 32768
"""Default k. The expected squared relative Frobenius error of the sketched Θ is at most
``(1 + tr(Θ)²/‖Θ‖_F²)/k ≤ (n + 1)/k`` whatever the number of parameters P (equality for n
orthogonal equal-norm gradients): ≤ 3.2 % for n = 32 and ≤ 6.3 % for n = 128 at k = 32768.
Memory of the accumulator: n·2k float32 = 8 MiB for n = 32."""

CHUNK = 1 << 20
"""Elements of one gradient tensor sketched at a time (bounds the int64 bucket temporaries)."""


@dataclass
class NTKFeatures:
    """Sketched NTK of a model on a probe set and the LensLLM residual term.

    Attributes
    ----------
    theta : (n, n) sketched kernel G Gᵀ.
    residual : (n,) per-sample losses r₀.
    eigenvalues : (n,) eigenvalues of theta, descending, clipped at 0.
    eigenvectors : (n, n) matching eigenvectors (columns).
    learning_rate, steps : η and t used for ``F``.
    sketch_dim, seed : the sketch's k and seed.
    """

    theta: np.ndarray
    residual: np.ndarray
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    learning_rate: float
    steps: float
    sketch_dim: int
    seed: int
    n_skipped: int = 0
    seconds: float = 0.0
    coefficients: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.coefficients = self.eigenvectors.T @ self.residual

    @property
    def n_samples(self) -> int:
        return int(self.residual.shape[0])

    @property
    def trace(self) -> float:
        return float(np.trace(self.theta))

    @property
    def F(self) -> float:
        """F(Θ, t) at the probe's own η and t."""
        return float(self.F_at(self.steps))

    def F_at(self, t: float | np.ndarray, learning_rate: float | None = None) -> float | np.ndarray:
        """F(Θ, t) = ‖expm(−ηΘt) r₀‖² for any t (scalar or array); η defaults to the probe's."""
        eta = self.learning_rate if learning_rate is None else learning_rate
        return residual_norm(self.eigenvalues, self.coefficients, eta, t)

    def top_eigenvalues(self, m: int = 8) -> np.ndarray:
        return self.eigenvalues[:m].copy()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary; ``eigenvalues``, ``coefficients`` (Vᵀr₀) and ``learning_rate``
        give F at any t through :func:`lensray.core.ntk_term.residual_norm`."""
        return {
            "F": self.F,
            "trace": self.trace,
            "top_eigenvalues": self.top_eigenvalues().tolist(),
            "eigenvalues": self.eigenvalues.tolist(),
            "coefficients": self.coefficients.tolist(),
            "residual_norm2": float(self.residual @ self.residual),
            "mean_loss": float(self.residual.mean()),
            "learning_rate": float(self.learning_rate),
            "steps": float(self.steps),
            "n_samples": self.n_samples,
            "n_skipped": int(self.n_skipped),
            "sketch_dim": int(self.sketch_dim),
            "seed": int(self.seed),
            "seconds": float(self.seconds),
        }


def ntk_residual_norm(
    eigvals: np.ndarray, eigvecs: np.ndarray, r0: np.ndarray, eta: float, t: float | np.ndarray
) -> float | np.ndarray:
    """F(Θ, t) = ‖V exp(−ηΛt) Vᵀ r₀‖² from the eigendecomposition Θ = V diag(λ) Vᵀ."""
    coefficients = np.asarray(eigvecs, dtype=np.float64).T @ np.asarray(r0, dtype=np.float64)
    return residual_norm(eigvals, coefficients, eta, t)


def features_from_gram(
    theta: np.ndarray,
    residual: np.ndarray,
    *,
    learning_rate: float,
    steps: float,
    sketch_dim: int,
    seed: int,
    **extra: Any,
) -> NTKFeatures:
    """Eigendecompose a symmetric Gram matrix and wrap it with the residual into NTKFeatures."""
    theta = np.asarray(theta, dtype=np.float64)
    theta = 0.5 * (theta + theta.T)
    lam, vec = np.linalg.eigh(theta)
    order = np.argsort(lam)[::-1]
    lam = np.clip(lam[order], 0.0, None)
    return NTKFeatures(
        theta=theta,
        residual=np.asarray(residual, dtype=np.float64),
        eigenvalues=lam,
        eigenvectors=vec[:, order],
        learning_rate=float(learning_rate),
        steps=float(steps),
        sketch_dim=int(sketch_dim),
        seed=int(seed),
        **extra,
    )


# --------------------------------------------------------------------------- sketch


@lru_cache(maxsize=65536)
def _tensor_seed(seed: int, index: int, chunk: int) -> int:
    """A 63-bit generator seed for one chunk of parameter tensor ``index``."""
    return int(np.random.SeedSequence([int(seed), int(index), int(chunk)]).generate_state(1, dtype=np.uint64)[0] >> 1)


class CountSketch:
    """Seeded CountSketch of parameter tensors into ``k`` buckets, one tensor at a time.

    Element ``e`` of tensor ``τ`` draws ``u_e`` uniform in ``[0, 2k)`` from a torch generator
    seeded by ``(seed, τ, chunk)``: its bucket is ``u_e mod k`` and its sign ``+1`` if ``u_e < k``
    else ``−1``. Values are scattered into a ``2k`` accumulator (no multiply by signs) that
    :meth:`finish` folds into ``k`` dims. Hashes are regenerated on the fly, so no index table is
    stored; streams are deterministic per device type (CPU and CUDA generators differ).
    """

    def __init__(self, sketch_dim: int, seed: int = 0):
        if not 1 <= int(sketch_dim) < (1 << 30):
            raise LensrayInputError(f"sketch_dim: must be in [1, 2^30), got {sketch_dim}")
        self.k = int(sketch_dim)
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def accumulator(self, n: int, device: torch.device) -> torch.Tensor:
        """Zeroed (n, 2k) float32 accumulator for :meth:`add_`."""
        return torch.zeros(n, 2 * self.k, dtype=torch.float32, device=device)

    def add_(self, acc: torch.Tensor, index: int, values: torch.Tensor) -> None:
        """acc (2k,) += signed scatter of the flattened tensor ``values`` (hash of tensor ``index``)."""
        device = acc.device
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        flat = values.detach().reshape(-1)
        for c, start in enumerate(range(0, flat.numel(), CHUNK)):
            chunk = flat[start : start + CHUNK].to(device=device, dtype=acc.dtype)
            gen.manual_seed(_tensor_seed(self.seed, index, c))
            slots = torch.randint(0, 2 * self.k, (chunk.numel(),), generator=gen, device=device)
            acc.index_add_(0, slots, chunk)

    def finish(self, acc: torch.Tensor) -> torch.Tensor:
        """Fold a (..., 2k) accumulator into the (..., k) sketch: positive minus negative slots."""
        return acc[..., : self.k] - acc[..., self.k :]


# --------------------------------------------------------------------------- gradients


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LensrayInputError("model: has no trainable parameters for the NTK")
    return params


@contextmanager
def _eval_and_clean_grads(model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Eval mode, grads set aside; both restored on exit."""
    was_training = model.training
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g
        model.train(was_training)


def sketch_per_sample_gradients(
    model: torch.nn.Module,
    output_fn: Callable[[int], torch.Tensor],
    n: int,
    *,
    sketch_dim: int = DEFAULT_SKETCH_DIM,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Sketched per-sample gradients of any scalar outputs of ``model``.

    Parameters
    ----------
    model : module whose trainable parameters define the gradients.
    output_fn : ``output_fn(i)`` returns the scalar output f_i (a 0-dim tensor with a graph).
    n : number of samples.

    Returns
    -------
    G : (n, k) float64, rows ``S ∇θ f_i``; ``G @ G.T`` estimates the NTK.
    outputs : (n,) float64, the values f_i.
    """
    params = _trainable(model)
    device = params[0].device
    sketch = CountSketch(sketch_dim, seed)
    acc = sketch.accumulator(n, device)
    outputs = np.zeros(n, dtype=np.float64)
    row: list[int] = [0]

    def hook_for(index: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            sketch.add_(acc[row[0]], index, p.grad)
            p.grad = None

        return hook

    with _eval_and_clean_grads(model, params):
        handles = [p.register_post_accumulate_grad_hook(hook_for(i)) for i, p in enumerate(params)]
        try:
            for i in range(n):
                row[0] = i
                f = output_fn(i)
                if f.ndim != 0:
                    raise ValueError(f"output_fn({i}) must return a scalar, got shape {tuple(f.shape)}")
                outputs[i] = float(f.detach())
                f.backward()
        finally:
            for h in handles:
                h.remove()
    return sketch.finish(acc).double().cpu().numpy(), outputs


# --------------------------------------------------------------------------- LM probe set


def _as_samples(batch_or_samples: Any) -> list[dict[str, torch.Tensor]]:
    """Rows of a padded batch dict, or a list of per-sample dicts, as 1-D long tensors."""
    if isinstance(batch_or_samples, Mapping):
        for key in ("input_ids", "labels"):
            if key not in batch_or_samples:
                raise LensrayInputError(f"batch: missing '{key}'")
        cols = {k: torch.as_tensor(v) for k, v in batch_or_samples.items() if k in ("input_ids", "attention_mask", "labels")}
        if cols["input_ids"].ndim != 2:
            raise LensrayInputError("batch: 'input_ids' must be 2-D (samples x tokens)")
        rows = [{k: v[i] for k, v in cols.items()} for i in range(cols["input_ids"].shape[0])]
    elif isinstance(batch_or_samples, Sequence) and not isinstance(batch_or_samples, (str, bytes)):
        rows = []
        for i, s in enumerate(batch_or_samples):
            if not isinstance(s, Mapping) or "input_ids" not in s or "labels" not in s:
                raise LensrayInputError(f"samples[{i}]: needs 'input_ids' and 'labels'")
            rows.append({k: torch.as_tensor(s[k]).reshape(-1) for k in ("input_ids", "attention_mask", "labels") if k in s})
    else:
        raise LensrayInputError("batch: expected a dict of tensors or a list of sample dicts")
    return rows


def _trim(row: dict[str, torch.Tensor], encoder_decoder: bool) -> dict[str, torch.Tensor]:
    """Drop padding: encoder positions with attention_mask 0; for causal LMs the labels too."""
    ids = row["input_ids"].long()
    mask = row.get("attention_mask")
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    labels = row["labels"].long()
    if not encoder_decoder and labels.shape != ids.shape:
        raise LensrayInputError("batch: causal-LM 'labels' must have the shape of 'input_ids'")
    out = {"input_ids": ids[keep], "attention_mask": torch.ones(int(keep.sum()), dtype=torch.long)}
    if encoder_decoder:
        nz = (labels != -100).nonzero()
        out["labels"] = labels[: int(nz.max()) + 1] if len(nz) else labels[:0]
    else:
        out["labels"] = labels[keep]
    return out


def _has_targets(row: dict[str, torch.Tensor], encoder_decoder: bool) -> bool:
    labels = row["labels"]
    targets = labels if encoder_decoder else labels[1:]
    return bool((targets != -100).any())


def _is_encoder_decoder(model: torch.nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def per_sample_nll(model: torch.nn.Module, row: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Per-token mean NLL of one (trimmed) sample's target tokens, from the logits."""
    encoder_decoder = _is_encoder_decoder(model)
    ids = row["input_ids"].unsqueeze(0).to(device)
    attn = row["attention_mask"].unsqueeze(0).to(device)
    labels = row["labels"].unsqueeze(0).to(device)
    if encoder_decoder:
        logits = model(input_ids=ids, attention_mask=attn, labels=labels).logits
    else:
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        labels = labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100
    )


def ntk_features(
    model: torch.nn.Module,
    batch_or_samples: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    learning_rate: float,
    steps: float,
    n_samples: int = 32,
    sketch_dim: int = DEFAULT_SKETCH_DIM,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> NTKFeatures:
    """NTK features of a causal LM or encoder-decoder on its first ``n_samples`` probe samples.

    Parameters
    ----------
    model : a transformers model (``model.config.is_encoder_decoder`` picks the loss alignment).
    batch_or_samples : dict with ``input_ids``, ``attention_mask`` (optional), ``labels``
        (−100 = ignored; decoder labels for seq2seq), padded 2-D; or a list of per-sample dicts.
    learning_rate, steps : η and t of the probe, used for ``F`` (``F_at`` takes any t).
    n_samples : probe-set size n; samples without target tokens are skipped and counted.
    sketch_dim, seed : CountSketch size k and seed.
    device : where the inputs go; defaults to the device of the model's first parameter.
    """
    import time

    if n_samples < 1:
        raise LensrayInputError(f"ntk n_samples: must be >= 1, got {n_samples}")
    if not np.isfinite(learning_rate) or learning_rate < 0:
        raise LensrayInputError(f"ntk learning_rate: must be finite and >= 0, got {learning_rate}")
    if not np.isfinite(steps) or steps < 0:
        raise LensrayInputError(f"ntk steps: must be finite and >= 0, got {steps}")
    start = time.perf_counter()
    encoder_decoder = _is_encoder_decoder(model)
    rows = [_trim(r, encoder_decoder) for r in _as_samples(batch_or_samples)]
    usable = [r for r in rows if _has_targets(r, encoder_decoder)]
    skipped = len(rows) - len(usable)
    if not usable:
        raise LensrayInputError(f"batch: none of {len(rows)} samples has target tokens (labels != -100)")
    usable = usable[:n_samples]
    dev = torch.device(device) if device is not None else _trainable(model)[0].device
    G, losses = sketch_per_sample_gradients(
        model, lambda i: per_sample_nll(model, usable[i], dev), len(usable), sketch_dim=sketch_dim, seed=seed
    )
    if not np.all(np.isfinite(G)) or not np.all(np.isfinite(losses)):
        raise FloatingPointError("NTK: non-finite per-sample loss or gradient")
    return features_from_gram(
        G @ G.T,
        losses,
        learning_rate=learning_rate,
        steps=steps,
        sketch_dim=sketch_dim,
        seed=seed,
        n_skipped=skipped,
        seconds=time.perf_counter() - start,
    )
