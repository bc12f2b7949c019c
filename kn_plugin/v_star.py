"""ROME's v* (Meng et al. 2022, eq. 4, as ``rome/compute_v.py`` computes it): the output one
layer's FFN must write at the subject's last token so that the rewriting prompts continue with
the new object (:func:`compute_v`; the editor around it is :mod:`kn_plugin.rome`).

A vector ``d`` is added to the layer's output at the subject's last token of every rewriting
prompt and optimised by Adam. ``d`` changes nothing before that token (causal attention), so
each step recomputes every prompt only from there on: the tokens before run once into the
model's own key-value cache (:class:`_CachedRows`). That shortcut is checked once per edit
against the model's full forward at ``d = 0``; where it does not hold, or the model keeps no
cache (a booted TransformerLens bridge wraps the attention modules, which then fill none), every
position is recomputed at each step (:class:`_FullRows`), with a warning. The
result states which (``rows``: ``cached`` or ``full``).
"""

from __future__ import annotations

import copy
import warnings

import torch

from kn_plugin.attribution import VERIFY_TOLERANCE, KnowledgeNeuronWarning
from kn_plugin.key_stats import padded
from kn_plugin.models import LoadedModel
from kn_plugin.scoring import cache_kwarg, logits_at


def _with_delta(model: LoadedModel, layer: int, rows: list[int], positions: list[int], delta: torch.Tensor, keep):
    """Hook adding ``delta`` to the layer's output at ``(rows[i], positions[i])``; ``keep``
    receives the unedited outputs there."""
    r = torch.tensor(rows)
    p = torch.tensor(positions)

    def fn(out):
        keep(out[r.to(out.device), p.to(out.device)].detach())
        out = out.clone()
        out[r.to(out.device), p.to(out.device)] += delta.to(out.dtype)
        return out

    return model.adapter.patch_output(layer, fn)


class _FullRows:
    """The rewriting rows and the KL row in one right-padded batch, every position recomputed
    (ROME's own way); the LM head runs only where the loss reads it."""

    name = "full"

    def __init__(self, model: LoadedModel, layer: int, rewrites: list, kl_ids: list[int], kl_lookup: int):
        self.model, self.layer, self.rewrites, self.kl_lookup = model, layer, rewrites, kl_lookup
        seqs = [r.ids for r in rewrites] + [kl_ids]
        self.ids = padded(seqs, model.device)
        self.lookups = [r.lookup for r in rewrites] + [kl_lookup]
        self.kept = sorted({p for r in rewrites for p in r.score_positions} | {kl_lookup})

    def __call__(self, delta: torch.Tensor, keep) -> tuple[torch.Tensor, torch.Tensor]:
        """``(nll of t' per rewriting row, log P on the KL row)`` with ``delta`` added at each
        row's subject token; ``keep`` receives the first row's unedited output there."""
        col = {p: i for i, p in enumerate(self.kept)}
        handle = _with_delta(self.model, self.layer, list(range(len(self.lookups))), self.lookups, delta,
                             lambda outs: keep(outs[0]))
        try:
            logp = torch.log_softmax(logits_at(self.model, self.ids, self.kept).float(), -1)
        finally:
            handle.remove()
        nll = torch.stack([-logp[i, [col[p] for p in r.score_positions], list(r.target_ids)].mean()
                           for i, r in enumerate(self.rewrites)])
        return nll, logp[len(self.rewrites), col[self.kl_lookup]]


class _CachedRows:
    """The same rows, each recomputed only from its subject token on: ``delta`` changes nothing
    before it (causal attention), so the tokens before are run once, into the model's own
    key-value cache, and every step feeds the rest with a copy of it. The rows are padded on the
    left so that their subject tokens share one column (masked, positions counted from each
    row's first token, as batched generation does), and on the right to one length."""

    name = "cached"

    def __init__(self, model: LoadedModel, layer: int, rewrites: list, kl_ids: list[int], kl_lookup: int):
        self.model, self.layer, self.n = model, layer, len(rewrites)
        self.rows = [(r.ids, r.lookup, r.score_positions, r.target_ids) for r in rewrites]
        self.rows.append((kl_ids, kl_lookup, (kl_lookup,), None))
        width = max(lookup for _, lookup, _, _ in self.rows)  # the shared column of the subject tokens
        tail = max(len(ids) - lookup for ids, lookup, _, _ in self.rows)
        b, dev = len(self.rows), model.device
        ids = torch.zeros((b, width + tail), dtype=torch.long, device=dev)
        mask = torch.zeros((b, width + tail), dtype=torch.long, device=dev)
        for i, (seq, lookup, _, _) in enumerate(self.rows):
            ids[i, width - lookup:width - lookup + len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - lookup:] = 1  # the right padding is never read by a real token
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.suffix, self.mask = ids[:, width:], mask
        self.suffix_positions = positions[:, width:]
        self.cache = None
        if width > 0:
            with torch.no_grad():
                out = model.hf_model(ids[:, :width], attention_mask=mask[:, :width],
                                     position_ids=positions[:, :width], use_cache=True)
            self.cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            if self.cache is None or self.cache.get_seq_length() != width:
                raise _NoCache(f"{type(model.hf_model).__name__} keeps no key/value cache of the prefix")
        self.kept = sorted({p - lookup for _, lookup, score, _ in self.rows for p in score})

    def __call__(self, delta: torch.Tensor, keep) -> tuple[torch.Tensor, torch.Tensor]:
        col = {p: i for i, p in enumerate(self.kept)}
        handle = _with_delta(self.model, self.layer, list(range(len(self.rows))), [0] * len(self.rows), delta,
                             lambda outs: keep(outs[0]))
        try:
            past = {} if self.cache is None else {cache_kwarg(self.model.hf_model): copy.deepcopy(self.cache),
                                                  "use_cache": True}
            logits = logits_at(self.model, self.suffix, self.kept, attention_mask=self.mask,
                               position_ids=self.suffix_positions, **past)
            logp = torch.log_softmax(logits.float(), -1)
        finally:
            handle.remove()
        nll = torch.stack([-logp[i, [col[p - lookup] for p in score], list(targets)].mean()
                           for i, (_, lookup, score, targets) in enumerate(self.rows[:self.n])])
        return nll, logp[self.n, col[0]]


class _NoCache(Exception):
    pass


def _rows(model: LoadedModel, layer: int, rewrites: list, kl_ids: list[int], kl_lookup: int):
    """The cached rows where the model keeps a cache and they agree with the full rows at
    ``delta = 0`` (within :data:`~kn_plugin.attribution.VERIFY_TOLERANCE` on every row's NLL and
    the KL row's log-probabilities); else the full rows, with a warning."""
    full = _FullRows(model, layer, rewrites, kl_ids, kl_lookup)
    try:
        cached = _CachedRows(model, layer, rewrites, kl_ids, kl_lookup)
    except _NoCache as e:
        warnings.warn(f"ROME v*: {e}; every position is recomputed at each step", KnowledgeNeuronWarning,
                      stacklevel=3)
        return full
    zero = torch.zeros(model.adapter.d_model, dtype=torch.float32, device=model.device)
    with torch.no_grad():
        a, b = full(zero, lambda _: None), cached(zero, lambda _: None)
    err = max(float((a[0] - b[0]).abs().max()), float((a[1] - b[1]).abs().max()))
    tol = VERIFY_TOLERANCE.get(model.dtype, 0.1)
    if not err <= tol:
        warnings.warn(f"ROME v*: the cached rows differ from the model's full forward by {err:.3g} in log P "
                      f"(tolerance {tol:g}); every position is recomputed at each step", KnowledgeNeuronWarning,
                      stacklevel=3)
        return full
    return cached


def compute_v(model: LoadedModel, layer: int, rewrites: list, kl_ids: list[int], kl_lookup: int,
              config) -> tuple[torch.Tensor, dict]:
    """ROME's v* (see the module docstring): ``(v*, log)``. ``rewrites``: the rewriting prompts
    (token ids, the subject's last token, the positions scoring the new object and its tokens);
    ``kl_ids``/``kl_lookup``: the KL prompt and its subject token; ``config``: a
    :class:`~kn_plugin.rome.RomeConfig`; ``model`` frozen by the caller."""
    rows = _rows(model, layer, rewrites, kl_ids, kl_lookup)
    d_model = model.adapter.d_model
    delta = torch.zeros(d_model, dtype=torch.float32, device=model.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=config.lr)
    init: dict = {}
    history = []

    def keep(out):
        init.setdefault("out", out.float().clone())

    with torch.enable_grad():
        for it in range(config.steps):
            opt.zero_grad()
            nll_each, kl_logp = rows(delta, keep)
            nll = nll_each.mean()
            kl_logp = kl_logp[None]
            if "kl" not in init:
                init["kl"] = kl_logp.detach().clone()
            kl = config.kl_factor * torch.nn.functional.kl_div(init["kl"], kl_logp, log_target=True,
                                                               reduction="batchmean")
            decay = config.weight_decay * (delta.norm() / init["out"].norm() ** 2)
            loss = nll + kl + decay
            history.append({"loss": loss.item(), "nll": nll.item(), "kl": kl.item(),
                            "p_new": torch.exp(-nll_each.detach()).mean().item()})
            if loss.item() < config.stop_loss or it == config.steps - 1:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():
                limit = config.clamp_norm * init["out"].norm()
                if delta.norm() > limit:
                    delta.mul_(limit / delta.norm())
    v = (init["out"] + delta.detach()).double().cpu()
    return v, {"steps_run": len(history), "loss": history[-1]["loss"], "p_new_opt": history[-1]["p_new"],
               "delta_norm": float(delta.detach().norm()), "out_norm": float(init["out"].norm()),
               "rows": rows.name}
