"""The staircase engine on the hand-written family steppers (:mod:`kn_plugin.families.steppers`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kn_plugin.attribution.engines.base import VERIFY_TOLERANCE, EngineFailure, spend_saved, target_logp_grad
from kn_plugin.attribution.engines.cached import CachedEngine
from kn_plugin.attribution.engines.verified import VerifiedEngine, _leaf, per_layer_alphas
from kn_plugin.families import steppers
from kn_plugin.scoring import EncodedFact, cache_key_values, sequence_log_prob

logger = logging.getLogger(__name__)


@dataclass
class _CleanStates:
    """Per-layer states of the clean pass computed by the family's hand-written stepper."""

    mids: list[torch.Tensor]  # [1, seq, ...] what ``post`` needs besides the activation
    acts: list[torch.Tensor]  # [1, seq, d_mlp]
    kvs: list  # per layer (k, v) [1, heads, seq, head_dim], or None (bidirectional models)


class StepperEngine(VerifiedEngine):
    """Hand-written family steppers (:mod:`kn_plugin.families.steppers`), where they verify.

    Scaling layer ``l``'s activation at the prediction position leaves everything below layer
    ``l`` unchanged, and in a causal model every earlier position too. The engine runs one
    clean pass, keeps each layer's residual state, activation and keys/values, and then, for
    each batch of alpha steps, recomputes only layers ``l..L-1`` and (causal models) only the
    positions from the prediction position on, all attributed layers in one staircase pass.
    The LM head is applied only where targets are scored.
    """

    name = "stepper"

    def applicable(self, model):
        return steppers.stepper_for(model.adapter) is not None

    def capture(self, model):
        stepper = steppers.stepper_for(model.adapter)
        return (stepper.mid_path,) if stepper is not None and stepper.causal and stepper.mid_path else None

    def reference_zeroed(self, model, fact, layers, activations, clean):
        """The model's own forward, in its incremental form (the prefix through the model's
        cache API, then only the positions from the prediction position on): the same numbers
        as a full forward at a fraction of the cost. It is trusted only after its alpha = 1 row
        reproduces the full forward's clean log P(target); otherwise (a TransformerLens bridge,
        whose attention skips the cache) the full forward is the reference."""
        if model.is_masked:
            return super().reference_zeroed(model, fact, layers, activations, clean)
        cached = CachedEngine()
        try:
            state = cached.prepare(model, fact, clean)
            ordered = tuple(sorted(layers))
            # one pass: alpha = 0 for every layer (that layer zeroed), and alpha = 1 once (the clean forward)
            points = [torch.tensor([0.0, 1.0] if r == 0 else [0.0], dtype=model.dtype, device=model.device)
                      for r in range(len(ordered))]
            with torch.no_grad():
                rows, _ = cached.log_probs(model, state, fact, ordered, activations, points)
            kept, logp = rows[1:2], torch.cat([rows[:1], rows[2:]])
            err = (kept.double().cpu() - clean.logp.double().cpu()).abs().max().item()
            if not err <= VERIFY_TOLERANCE.get(model.dtype, 0.1):
                raise EngineFailure(f"incremental forward differs from the full one by {err:.2g}")
        except Exception as exc:  # the full forward below is the reference then
            logger.debug("incremental reference unavailable (%s): full forward", exc)
            return super().reference_zeroed(model, fact, layers, activations, clean)
        by_layer = dict(zip(ordered, logp.double().cpu().tolist()))
        return torch.tensor([by_layer[layer] for layer in layers], dtype=torch.float64)

    def prepare(self, model, fact, clean):
        """The clean states: from the model's own forward where it captured them (each layer's
        activation and the input of ``mid_path``, keys and values from its cache), else from a
        forward of the stepper. Either way the self-check tests every row built on them."""
        stepper = steppers.stepper_for(model.adapter)
        kvs = cache_key_values(clean.cache, model.n_layers, fact.seq_len) if stepper.causal else None
        mids = clean.inputs.get(stepper.mid_path) if stepper.mid_path else None
        if kvs is not None and mids is not None and clean.layer_acts is not None:
            return stepper, _CleanStates(mids, clean.layer_acts, kvs)
        with torch.no_grad():
            h = stepper.embed(fact.input_ids)
            mids, acts, kvs = [], [], []
            for layer in range(model.n_layers):
                mid, act, kv = stepper.pre(layer, h, None, 0)
                mids.append(mid)
                acts.append(act)
                kvs.append(kv)
                h = stepper.post(layer, act, mid)
        return stepper, _CleanStates(mids, acts, kvs)

    def log_probs(self, model, state, fact, layers, activations, alphas):
        stepper, clean = state
        start = fact.pred_pos if stepper.causal else 0
        return _staircase(stepper, clean, fact, tuple(sorted(layers)), activations, alphas, start)


def _staircase(stepper, clean: _CleanStates, fact: EncodedFact, layers: tuple[int, ...],
               activations: torch.Tensor, alphas: torch.Tensor, start: int):
    """log P(target) for every (layer, alpha) row in one batched pass, and the leaves.

    ``layers`` is sorted; rows come layer by layer, ``len(alphas)`` rows each (or, with a list
    of alpha tensors aligned with ``layers``, each layer its own points). Walking up
    the stack, the rows of layer ``j`` join at the second half of layer ``j`` (with the
    patched activation ``alpha * a`` as a leaf tensor), while the rows already in flight run
    layer ``j`` in full, against the clean keys/values of the positions before ``start``.
    """
    p, n_layers = fact.pred_pos - start, len(clean.acts)
    per_layer = per_layer_alphas(alphas, layers)
    leaves = []
    h = None
    for j in range(layers[0], n_layers):
        if h is not None:
            past = None
            if stepper.causal:
                k, v = clean.kvs[j]
                past = (k[:, :, :start], v[:, :, :start])
            mid, act, _ = stepper.pre(j, h, past, start)
            h = stepper.post(j, act, mid)
        if j in per_layer:
            x = _leaf(per_layer[j], activations[j])
            leaves.append(x)
            act = clean.acts[j][:, start:].expand(len(x), -1, -1)
            act = torch.cat([act[:, :p], x[:, None].to(act.dtype), act[:, p + 1:]], 1)
            new = stepper.post(j, act, clean.mids[j][:, start:].expand(len(x), -1, -1))
            h = new if h is None else torch.cat([h, new], 0)
    rel = torch.tensor(fact.score_positions, device=h.device) - start
    unembed = stepper.unembedding()
    if unembed is None:
        return sequence_log_prob(stepper.logits(h[:, rel]), fact.target_ids), leaves
    norm, weight, bias = unembed
    x = norm(h[:, rel])  # [rows, n_tgt, d_model]
    rows, n_tgt, d = x.shape
    tgt = torch.tensor(fact.target_ids, device=x.device).repeat(rows)
    logp = _TargetLogProb.apply(x.reshape(rows * n_tgt, d), weight, bias, tgt)
    return logp.view(rows, n_tgt).sum(-1), leaves


class _TargetLogProb(torch.autograd.Function):
    """log softmax(x @ W.T + b)[target] per row, with a lean backward.

    Autograd's log_softmax + gather keeps several [rows, vocab] tensors; this keeps only the
    log-probabilities and turns them into the gradient in place: d/dx = g * (W[t] - softmax @ W).
    Gradients flow to ``x`` only (the weights are frozen).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, target):
        with torch.autocast(x.device.type, enabled=False):  # the LM head stays in the model's dtype
            logp = torch.log_softmax(torch.nn.functional.linear(x.to(weight.dtype), weight, bias).float(), dim=-1)
        ctx.save_for_backward(weight, logp, target)
        return logp.gather(1, target[:, None]).squeeze(1)

    @staticmethod
    def backward(ctx, grad):
        spend_saved(ctx)
        weight, logp, target = ctx.saved_tensors
        dz = target_logp_grad(logp, target, grad)
        with torch.autocast(weight.device.type, enabled=False):
            return dz.to(weight.dtype) @ weight, None, None, None
