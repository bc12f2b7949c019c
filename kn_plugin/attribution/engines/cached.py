"""The model-agnostic fast engine: the model's own modules and key-value cache, only the
positions from the prediction position on recomputed."""

from __future__ import annotations

import copy

import torch

from kn_plugin.attribution.engines.base import EngineFailure, spend_saved, target_logp_grad
from kn_plugin.attribution.engines.verified import VerifiedEngine, _leaf, per_layer_alphas
from kn_plugin.scoring import cache_kwarg, prefix_cache


class CachedEngine(VerifiedEngine):
    """Model-agnostic shortcut for causal LMs, through the model's own modules and cache API.

    Scaling the activation at the prediction position changes nothing before it. The engine
    runs the prompt prefix once with ``use_cache=True``; every pass then feeds only the tokens
    from the prediction position on, for all (layer, alpha) rows at once, to the model's own
    forward with a copy of that cache (``batch_repeat_interleave``), patching each row's layer
    with a hook. Sliding windows, QK-norms, soft-capping, multipliers and partial rotary are
    the model's own code.
    """

    name = "cached"

    def applicable(self, model):
        return not model.is_masked

    def capture(self, model):
        return None if model.is_masked else ()

    def prepare(self, model, fact, clean=None):
        """The model's cache of the prefix: a copy of the clean pass's cache cut to the prefix
        where that gives exactly the prefix's positions, else a forward of the prefix."""
        start = fact.pred_pos
        if start == 0:
            return None, 0
        cache = prefix_cache(clean.cache, start) if clean is not None else None
        if cache is None:
            with torch.no_grad():
                out = model.hf_model(fact.input_ids[:, :start], use_cache=True)
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            raise EngineFailure(f"cached engine: {type(model.hf_model).__name__} returns no key/value cache",
                                mismatch=True)
        if cache.get_seq_length() != start:  # e.g. TransformerLens' attention components skip it
            raise EngineFailure(f"cached engine: the model's cache holds {cache.get_seq_length()} of the "
                                f"{start} prefix positions (attention modules replaced by a "
                                "TransformerLens bridge?)", mismatch=True)
        return cache, start

    def log_probs(self, model, state, fact, layers, activations, alphas):
        cache, start = state
        per_layer = per_layer_alphas(alphas, layers)
        rows = sum(len(a) for a in per_layer.values())
        past = None
        if cache is not None:
            past = copy.deepcopy(cache)
            past.batch_repeat_interleave(rows)
        leaves = []

        def patch(row, x):
            def fn(act):
                act = act.clone()
                act[row:row + len(x), 0] = x.to(act.dtype)
                return act

            return fn

        fns, row = [], 0
        for layer, layer_alphas in per_layer.items():
            x = _leaf(layer_alphas, activations[layer])
            leaves.append(x)
            fns.append((layer, patch(row, x)))
            row += len(x)
        with model.adapter.patched(fns):
            suffix = fact.input_ids[:, start:].expand(rows, -1)
            logits = model.hf_model(suffix, **{cache_kwarg(model.hf_model): past},
                                    use_cache=past is not None).logits
        rel = [p - start for p in fact.score_positions]
        scored = logits if rel == list(range(logits.shape[1])) else logits[:, rel]  # no copy when all are scored
        return _TargetLogProb.apply(scored, torch.tensor(fact.target_ids, device=logits.device)), leaves


class _TargetLogProb(torch.autograd.Function):
    """``sum_i log softmax(logits[:, i])[target[i]]`` per row, in at least float32
    with the stepper's lean backward: autograd's indexing and log-softmax backward write three
    [rows, vocab] tensors (zeros, the scattered gradient, the softmax term); this writes one
    (:func:`~kn_plugin.attribution.engines.base.target_logp_grad`)."""

    @staticmethod
    def forward(ctx, logits, target):  # logits [rows, n, vocab], target [n]
        rows, n, vocab = logits.shape
        work = torch.promote_types(logits.dtype, torch.float32)  # at least float32; float64 stays
        logp = torch.log_softmax(logits.reshape(rows * n, vocab).to(work), dim=-1)
        flat = target.repeat(rows)
        ctx.save_for_backward(logp, flat)
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        return logp.gather(1, flat[:, None]).view(rows, n).sum(-1)

    @staticmethod
    def backward(ctx, grad):
        spend_saved(ctx)
        logp, flat = ctx.saved_tensors
        dz = target_logp_grad(logp, flat, grad.repeat_interleave(ctx.shape[1]))
        return dz.view(ctx.shape).to(ctx.dtype), None
