"""Rank-one model editing (ROME; Meng et al. 2022) on the weight knowledge-neuron edits change.

ROME's *keys* are the FFN activations at one token (kn's neurons) and its weight is the FFN
output projection of one layer: with ``V = value_slots(l)`` [d_mlp, d_model] the layer writes
``f(k) = k V + b``. An edit asks the layer to write ``v*`` for the key ``k*`` of a subject:

    W' = W + Lambda (C^-1 k*)^T,   Lambda = (v* - f(k*)) / ((C^-1 k*)^T k*)      (ROME eq. 2)

so that ``f'(k*) = v*`` exactly and ``f'(k) = f(k)`` for every key with ``k^T C^-1 k* = 0``.
In value-slot terms ``V' = V + c Lambda^T`` with ``c = C^-1 k* / (k*^T C^-1 k*)``: every slot of
the layer moves, so the edit is a :class:`~kn_plugin.editing.WeightEdit` of all ``d_mlp``
slots of the layer (kind ``"rome"``), applied, undone (bit for bit), saved and checked like
every kn edit.

* ``C = E[k k^T]``: the uncentred second moment of the layer's keys over every token of a
  corpus (ROME's ``layer_stats`` "mom2"), :func:`key_statistics`. ROME estimates it on
  Wikipedia; offline, kn uses text the model writes itself (:func:`generated_corpus`) or any
  texts given (the benchmark states which).
* ``k*``: the key at the subject's last token, averaged over the prompt alone and the prompt
  after each context prefix (ROME eq. 3; its prefixes are 10 texts of 5 tokens and 10 of 10
  tokens sampled from the model with top-k 5, as :func:`context_prefixes` makes them).
* ``v*``: ROME eq. 4 as its released code computes it (``rome/compute_v.py``): a vector ``d``
  added to the layer's output at the subject's last token of every rewriting prompt (the prompt
  alone and after each prefix, followed by the new object teacher-forced) minimises
  ``NLL(t') + kl_factor KL(P || P_0)`` (on ``"{subject} is a"`` at the subject's token, against
  the unedited model) ``+ weight_decay |d| / |f(k)|^2`` with Adam (lr 0.5, at most 20 steps,
  stopping below 0.05), ``d`` kept within ``clamp_norm x |f(k)|``; ``v* = f(k) + d``, ``f(k)``
  the output on the prompt alone. The defaults are ROME's GPT-2 XL hyper-parameters.

The optimisation of v* lives in :mod:`kn_plugin.v_star` (each step recomputes the rewriting
prompts only from the subject's token on, over the model's own cache, checked).

Where kn departs from the released code: the code's solve uses the key and output of the prompt
alone (``f'(k_prompt) = v*``); kn uses the paper's closed form with the mean key ``k*``.
Causal models only (ROME's setting): a masked LM is refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from kn_plugin.editing import WeightEdit
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.generation import sample_texts
from kn_plugin.key_stats import padded, second_moment
from kn_plugin.models import LoadedModel, accepts_model
from kn_plugin.scoring import encode_fact, target_log_prob
from kn_plugin.v_star import compute_v
from kn_plugin.validation import finite

#: ROME's prefixes: (tokens, texts) pairs (``context_template_length_params``)
PREFIX_LENGTHS = ((5, 10), (10, 10))


@dataclass(frozen=True)
class RomeConfig:
    """Checked settings of the v* optimisation (ROME's hyper-parameters for GPT-2 XL)."""

    steps: int = 20
    lr: float = 0.5
    weight_decay: float = 0.5
    clamp_norm: float = 4.0
    kl_factor: float = 0.0625
    stop_loss: float = 5e-2

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise KnowledgeNeuronError(f"ROME steps must be a positive integer, got {self.steps!r}")
        for name in ("lr", "clamp_norm"):
            if not finite(name, getattr(self, name)) > 0:
                raise KnowledgeNeuronError(f"ROME {name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "kl_factor", "stop_loss"):
            if finite(name, getattr(self, name)) < 0:
                raise KnowledgeNeuronError(f"ROME {name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class KeyStatistics:
    """Second moment ``C = E[k k^T]`` [d_mlp, d_mlp] (float64) of one layer's keys."""

    layer: int
    mom2: torch.Tensor
    n_tokens: int
    corpus: str  # what the texts were, for reports
    fingerprint: str  # the model whose keys they are

    def check(self, model: LoadedModel, layer: int) -> None:
        if self.layer != layer or tuple(self.mom2.shape) != (model.d_mlp, model.d_mlp):
            raise KnowledgeNeuronError(f"these key statistics are of layer {self.layer} "
                                       f"({self.mom2.shape[0]} keys), not of layer {layer} of {model.name}")
        if self.fingerprint != model.fingerprint:
            raise KnowledgeNeuronError("these key statistics were estimated on another model (or other weights)")


def _require_causal(model: LoadedModel) -> None:
    if model.is_masked:
        raise KnowledgeNeuronError(f"{model.name} is a masked LM: the rank-one editor (ROME) edits causal LMs")


def generated_corpus(model, n_texts: int, tokens: int, seed: int = 0) -> list[str]:
    """``n_texts`` texts of ``tokens`` tokens the model writes from its BOS (or EOS) token,
    sampled as ROME's ``generate_fast`` samples (top-k 5), seeded."""
    return sample_texts(model, [None] * n_texts, tokens, seed=seed)


def context_prefixes(model, seed: int = 0) -> list[str]:
    """ROME's context prefixes: 10 model-written texts of 5 tokens and 10 of 10 tokens."""
    return [t for tokens, n in PREFIX_LENGTHS for t in generated_corpus(model, n, tokens, seed=seed + tokens)]


@accepts_model
@torch.no_grad()
def key_statistics(model: LoadedModel, layer: int, texts: Iterable[str], corpus: str = "given texts",
                   max_tokens: int = 128, batch: int = 16) -> KeyStatistics:
    """``C = E[k k^T]`` of ``layer``'s keys over every token of ``texts`` (each cut to
    ``max_tokens``), accumulated in float64 (:func:`kn_plugin.key_stats.second_moment`)."""
    _require_causal(model)
    layer = model.adapter.check_layer(layer)
    mom2, n_tokens = second_moment(model, [(layer, i) for i in range(model.d_mlp)], texts, max_tokens, batch)
    return KeyStatistics(layer, mom2, n_tokens, corpus, model.fingerprint)


def subject_token(model: LoadedModel, text: str, start: int, subject: str) -> int:
    """Position of the last token of ``subject``, found in ``text`` at or after character
    ``start``, in ``tokenizer(text)`` (the tokens every kn forward of ``text`` sees)."""
    at = text.find(subject, start) if subject else -1
    if at < 0:
        raise KnowledgeNeuronError(f"the subject {subject!r} does not occur in the prompt {text[start:]!r}")
    end = at + len(subject)
    enc = model.tokenizer(text, return_offsets_mapping=True)
    hits = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > at and b > a]
    if not hits:
        raise KnowledgeNeuronError(f"no token of {text!r} covers the subject {subject!r}")
    return hits[-1]


@dataclass(frozen=True)
class _Rewrite:
    text: str
    ids: list[int]
    lookup: int
    score_positions: tuple[int, ...]
    target_ids: tuple[int, ...]


def _rewrites(model: LoadedModel, prompt: str, subject: str, new_target: str, prefixes: Sequence[str]) -> list:
    out = []
    for prefix in ["", *prefixes]:
        head = f"{prefix}. " if prefix else ""
        text = head + prompt
        fact = encode_fact(model, text, new_target)
        out.append(_Rewrite(text, fact.input_ids[0].tolist(), subject_token(model, text, len(head), subject),
                            fact.score_positions, fact.target_ids))
    return out


@accepts_model
def subject_keys(model: LoadedModel, layer: int, texts: Sequence[str], positions: Sequence[int]) -> torch.Tensor:
    """Keys [len(texts), d_mlp] (float64) of ``layer`` at ``positions[i]`` of ``texts[i]``."""
    seqs = [model.tokenizer(t)["input_ids"] for t in texts]
    rows = torch.arange(len(seqs))
    seen = []

    def grab(act):
        seen.append(act[rows.to(act.device), torch.as_tensor(list(positions), device=act.device)].double().cpu())
        return act

    with model.adapter.patched({layer: grab}), torch.no_grad():
        model.hf_model(padded(seqs, model.device))
    return seen[0]


def rank_one_rows(slots: torch.Tensor, bias: torch.Tensor | None, mom2: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor) -> torch.Tensor:
    """New value slots ``V + c (v* - f(k*))^T``, ``c = C^-1 k* / (k*^T C^-1 k*)`` (ROME eq. 2),
    solved in float64; returned in the slots' dtype."""
    V = slots.detach().double().cpu()
    try:
        c = torch.linalg.solve(mom2, key)
    except RuntimeError:
        raise KnowledgeNeuronError("the key statistics are singular: estimate them on more text") from None
    denom = float(c @ key)
    if not math.isfinite(denom) or denom <= 0:
        raise KnowledgeNeuronError(f"k*^T C^-1 k* = {denom}: the key statistics do not fit this key")
    out = key @ V + (bias.detach().double().cpu() if bias is not None else 0.0)
    return (V + torch.outer(c / denom, value - out)).to(slots.dtype)


#: texts x tokens of the corpus :func:`rome_edit` writes when no key statistics are given
DEFAULT_CORPUS = (200, 64)


def _checked(model: LoadedModel, layer: int, config: RomeConfig | None) -> tuple[int, RomeConfig]:
    _require_causal(model)
    layer = model.adapter.check_layer(layer)
    config = config if config is not None else RomeConfig()
    if not isinstance(config, RomeConfig):
        raise KnowledgeNeuronError(f"config must be a RomeConfig, got {type(config).__name__}")
    return layer, config


@accepts_model
def rome_request(model: LoadedModel, prompt: str, subject: str, new_target: str, layer: int,
                 prefixes: Sequence[str] | None = None, config: RomeConfig | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(k*, v*, log)`` of an edit (ROME eq. 3 and 4, float64): the mean key of ``layer`` at
    the subject's last token and the output the layer must write there."""
    layer, config = _checked(model, layer, config)
    prefixes = list(context_prefixes(model) if prefixes is None else prefixes)
    rewrites = _rewrites(model, prompt, subject, new_target, prefixes)
    kl_text = f"{subject} is a"
    kl_ids = model.tokenizer(kl_text)["input_ids"]
    kl_lookup = subject_token(model, kl_text, 0, subject)
    key = subject_keys(model, layer, [r.text for r in rewrites], [r.lookup for r in rewrites]).mean(0)  # ROME eq. 3
    value, log = compute_v(model, layer, rewrites, kl_ids, kl_lookup, config)
    return key, value, {"prefixes": len(prefixes), **log}


@accepts_model
def rome_edit(model: LoadedModel, prompt: str, subject: str, new_target: str, layer: int,
              stats: KeyStatistics | None = None, prefixes: Sequence[str] | None = None,
              config: RomeConfig | None = None, old_target: str | None = None) -> WeightEdit:
    """The rank-one edit of ``layer`` that makes ``prompt`` (which names ``subject``) continue
    with ``new_target`` (see the module docstring); the model is left unedited.

    ``stats``: :func:`key_statistics` of ``layer`` (default: estimated on
    :data:`DEFAULT_CORPUS` texts the model writes, seed 0); ``prefixes``: the context prefixes
    (default :func:`context_prefixes`, seed 0); ``config``: :class:`RomeConfig`;
    ``old_target``: the object replaced, checked to differ and recorded."""
    layer, config = _checked(model, layer, config)
    if old_target is not None and old_target.strip() == new_target.strip():
        raise KnowledgeNeuronError(f"the new object equals the old one ({old_target!r})")
    if stats is None:
        n, tokens = DEFAULT_CORPUS
        stats = key_statistics(model, layer, generated_corpus(model, n, tokens),
                               corpus=f"{n} texts of {tokens} tokens written by the model (top-k 5, seed 0)")
    stats.check(model, layer)
    key, value, log = rome_request(model, prompt, subject, new_target, layer, prefixes, config)
    old = model.adapter.value_slots(layer).detach().clone()
    new = rank_one_rows(old, model.adapter.site_bias(layer), stats.mom2, key, value)
    slots = [(layer, i) for i in range(model.d_mlp)]
    meta = {"method": "rome", "layer": layer, "prompt": prompt, "subject": subject, "new_target": new_target,
            "old_target": old_target, "stats_tokens": stats.n_tokens, "stats_corpus": stats.corpus,
            "config": vars(config), **log}
    return WeightEdit(model.name, model.n_layers, model.d_mlp, slots, old, new, "rome", meta,
                      model.fingerprint, model.signature)


@accepts_model
@torch.no_grad()
def trace_layers(model: LoadedModel, prompt: str, subject: str, target: str, samples: int = 10,
                 window: int = 10, noise: float = 3.0, seed: int = 0) -> list[float]:
    """ROME's causal trace of the FFN outputs: P(target) on the prompt with the subject's
    token embeddings corrupted by Gaussian noise (``noise`` x the standard deviation of the
    model's token embeddings; ROME uses that of subject embeddings), with the clean FFN outputs
    of the ``window`` layers around each layer restored at the subject's last token, minus the
    corrupted P(target): the indirect effect per layer (ROME picks the edited layer where it
    peaks). ``samples`` noise draws, seeded; the global random state is kept."""
    _require_causal(model)
    if samples < 1 or window < 1 or not finite("noise", noise) > 0:
        raise KnowledgeNeuronError("a causal trace needs samples >= 1, window >= 1 and noise > 0")
    fact = encode_fact(model, prompt, target)
    at = prompt.find(subject) if subject else -1
    if at < 0:
        raise KnowledgeNeuronError(f"the subject {subject!r} does not occur in the prompt {prompt!r}")
    enc = model.tokenizer(prompt, return_offsets_mapping=True)
    subj = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < at + len(subject) and b > at and b > a]
    if not subj:
        raise KnowledgeNeuronError(f"no token of {prompt!r} covers the subject {subject!r}")
    last = subj[-1]
    emb = model.hf_model.get_input_embeddings()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sample = torch.randint(0, model.adapter.vocab_size, (4096,), generator=gen)
        std = float(emb(sample.to(model.device)).float().std())
    ids = fact.input_ids.expand(samples + 1, -1)
    shape = (samples, len(subj), model.adapter.d_model)
    eps = (torch.randn(shape, generator=gen) * noise * std).to(model.device)
    n = model.n_layers
    clean: dict[int, torch.Tensor] = {}

    def corrupt(_mod, _args, out):
        out = out.clone()
        out[1:, subj[0]:subj[-1] + 1] += eps.to(out.dtype)
        return out

    def record(layer):
        def fn(out):
            clean[layer] = out[0, last].detach().clone()
            return out
        return fn

    def restore(layer):
        def fn(out):
            out = out.clone()
            out[1:, last] = clean[layer]
            return out
        return fn

    def run(hooks) -> float:
        handles = [emb.register_forward_hook(corrupt)]
        try:
            handles += [model.adapter.patch_output(layer, fn) for layer, fn in hooks]
            logits = model.hf_model(ids).logits
        finally:
            for h in handles:
                h.remove()
        return float(target_log_prob(logits[1:], fact).exp().mean())

    corrupted = run([(layer, record(layer)) for layer in range(n)])
    effects = []
    for layer in range(n):
        lo, hi = max(0, layer - window // 2), min(n, layer - (-window // 2))
        effects.append(run([(w, restore(w)) for w in range(lo, hi)]) - corrupted)
    return effects
