"""The reference engine: the model's own forward with a hook, alpha steps in batches; and the
multi-prompt batching of several prompts of one fact."""

from __future__ import annotations

import torch

from kn_plugin.attribution.config import EngineRun, IGConfig
from kn_plugin.attribution.engines.base import (
    VERIFY_TOLERANCE,
    AttributionEngine,
    EngineFailure,
    _finish,
    _grid,
    _weighted_sum,
    zeroed_probs,
)
from kn_plugin.models import LoadedModel
from kn_plugin.scoring import EncodedFact, target_log_prob


class BatchedEngine(AttributionEngine):
    """Reference engine: full forward/backward passes, ``batch_size`` alpha steps per pass."""

    name = "batched"

    def run(self, model, fact, layers, activations, config, bar, clean=None, notes=None, zeroed=None):
        """``zeroed``: P(target) with each layer zeroed, when a run of the same fact measured it."""
        alphas, weights = _grid(config, activations)
        w_chunks = weights.split(config.batch_size) if weights is not None else [None] * len(alphas)
        out = []
        for layer in layers:
            a = activations[layer]
            grad_sum = torch.zeros_like(a, dtype=torch.float32)
            for chunk, w in zip(alphas.split(config.batch_size), w_chunks):
                grad_sum += _weighted_sum(self._grad(model, fact, layer, chunk[:, None] * a[None]), w)
                bar.update(len(chunk))
            out.append(_finish(a, grad_sum, config, weights is not None))
        zeroed = zeroed if zeroed is not None else zeroed_probs(model, fact, layers)
        return EngineRun(torch.stack(out), zeroed, self.name, list(notes or []),
                         resume=lambda layers, config, bar: self.run(model, fact, layers, activations, config, bar,
                                                                     zeroed=zeroed),
                         gradients=lambda points, bar: self.gradients(model, fact, activations, points, bar,
                                                                      config.batch_size))

    def gradients(self, model, fact, activations, points, bar, batch_size: int = 10) -> dict[int, torch.Tensor]:
        """dP(target)/dx at ``x = alpha * a`` for explicit points per layer (``{layer: alphas}`` ->
        ``{layer: [len(alphas), d_mlp]}`` float32), ``batch_size`` points per full pass."""
        out = {}
        for layer, alphas in points.items():
            a, parts = activations[layer], []
            for chunk in alphas.to(activations.dtype).to(activations.device).split(batch_size):
                parts.append(self._grad(model, fact, layer, chunk[:, None] * a[None]).float())
                bar.update(len(chunk))
            out[layer] = torch.cat(parts) if parts else torch.zeros(0, a.shape[-1])
        return out

    @staticmethod
    def _grad(model, fact, layer, x):
        """dP(target)/dx for the rows of ``x`` ([b, d_mlp]) as layer ``layer``'s activation at the prediction position."""
        x = x.detach().requires_grad_(True)

        def patch(act):
            act = act.clone()
            act[:, fact.pred_pos] = x
            return act

        with model.adapter.patched({layer: patch}), torch.enable_grad():
            logits = model.hf_model(fact.input_ids.expand(len(x), -1)).logits
            prob = target_log_prob(logits, fact).exp().sum()
            (grad,) = torch.autograd.grad(prob, x)
        return grad


def _padded_inputs(model: LoadedModel, facts: list[EncodedFact]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts right-padded to one length ([k, L] ids, [k, L] attention mask): pads come after
    every real token, so no real position moves."""
    tok = model.tokenizer
    pad = next((i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None), 0)
    length = max(f.seq_len for f in facts)
    ids = torch.full((len(facts), length), pad, dtype=facts[0].input_ids.dtype, device=facts[0].input_ids.device)
    mask = torch.zeros_like(ids)
    for i, f in enumerate(facts):
        ids[i, :f.seq_len] = f.input_ids[0]
        mask[i, :f.seq_len] = 1
    return ids, mask


def _prompts_log_probs(model: LoadedModel, facts: list[EncodedFact], ids, mask, layer: int | None,
                       xs: list[torch.Tensor] | None, rows: int) -> torch.Tensor:
    """log P(target) of ``rows`` copies of every padded prompt (prompt-major), with prompt ``i``'s
    activation at its prediction position set to ``xs[i]`` ([rows, d_mlp]) in ``layer``."""
    fns = {}
    if layer is not None:
        def patch(act):
            act = act.clone()
            for i, f in enumerate(facts):
                act[i * rows:(i + 1) * rows, f.pred_pos] = xs[i].to(act.dtype)
            return act

        fns = {layer: patch}
    with model.adapter.patched(fns):
        logits = model.hf_model(ids.repeat_interleave(rows, 0), attention_mask=mask.repeat_interleave(rows, 0)).logits
    return torch.cat([target_log_prob(logits[i * rows:(i + 1) * rows], f) for i, f in enumerate(facts)])


#: ``AttributionResult.engine`` of prompts attributed together (:meth:`KnowledgeAttribution.attribute_prompts`)
PROMPT_BATCH_ENGINE = "batched-prompts"


def prompt_batch_scores(model: LoadedModel, facts: list[EncodedFact], activations: list[torch.Tensor],
                        clean_logps: list[torch.Tensor], layers: tuple[int, ...], config: IGConfig,
                        bar) -> list[torch.Tensor]:
    """IG scores of several prompts in shared full passes: each pass holds ``batch_size`` alpha
    steps of every prompt for one layer (the batched engine's rule, prompts right-padded).

    It proves itself first: the padded clean pass must give every prompt's own log P(target)
    (within :data:`VERIFY_TOLERANCE`), else :class:`EngineFailure`."""
    ids, mask = _padded_inputs(model, facts)
    with torch.no_grad():
        logp = _prompts_log_probs(model, facts, ids, mask, None, None, 1).double().cpu()
    err = (logp - torch.cat(clean_logps).double().cpu()).abs().nan_to_num(nan=float("inf")).max().item()
    tol = VERIFY_TOLERANCE.get(model.dtype, 0.1)
    if err > tol:
        raise EngineFailure(f"padded prompts differ from their own forward by {err:.2g} in log P(target)",
                            mismatch=True)
    alphas, weights = _grid(config, activations[0])
    w_chunks = weights.split(config.batch_size) if weights is not None else [None] * len(alphas)
    out = [torch.zeros(len(layers), model.d_mlp, dtype=torch.float32) for _ in facts]
    for r, layer in enumerate(layers):
        sums = [torch.zeros(model.d_mlp, dtype=torch.float32, device=a.device) for a in activations]
        for chunk, w in zip(alphas.split(config.batch_size), w_chunks):
            xs = [(chunk[:, None] * a[layer][None]).requires_grad_(True) for a in activations]
            with torch.enable_grad():
                lp = _prompts_log_probs(model, facts, ids, mask, layer, xs, len(chunk))
                grads = torch.autograd.grad(lp.exp().sum(), xs)
            for i, g in enumerate(grads):
                sums[i] += _weighted_sum(g, w)
            bar.update(len(chunk) * len(facts))
        for i, a in enumerate(activations):
            out[i][r] = _finish(a[layer], sums[i], config, weights is not None).cpu()
    return out
