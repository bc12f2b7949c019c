"""Knowledge assessing: how strongly a model predicts a target for a cloze prompt.

Scoring rule (the same everywhere in kn_plugin):

* **Causal LMs**: the prompt is a prefix and the target is its continuation (write the
  leading space yourself: ``" Paris"``). The *prediction position* is the last prompt token.
  A target of n tokens is scored by teacher forcing on ``prompt + target[:-1]``:
  ``P(t) = prod_i P(t_i | prompt, t_<i)``.
* **Masked LMs**: the prompt holds the tokenizer's mask token (``[MASK]``) once. For a target
  of n word pieces the mask is widened to n masks, and ``P(t) = prod_i P(t_i at mask_i)``
  (all masks predicted jointly in one pass). The prediction position is the first mask.

Rank and top-k always refer to the first target token at the prediction position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.models import LoadedModel


@dataclass(frozen=True)
class EncodedFact:
    """A prompt/target pair turned into model input.

    ``input_ids``: [1, seq]; ``score_positions[i]`` is the position whose logits score
    ``target_ids[i]``; ``pred_pos`` is where knowledge neurons are read and patched.
    """

    prompt: str
    target: str
    input_ids: torch.Tensor
    target_ids: tuple[int, ...]
    score_positions: tuple[int, ...]
    pred_pos: int

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]


@dataclass(frozen=True)
class Assessment:
    prompt: str
    target: str
    prob: float
    log_prob: float
    rank: int  # rank of the first target token at the prediction position (0 = top)
    top_k: list[tuple[str, float]]
    n_target_tokens: int


def _max_len(model: LoadedModel) -> int | None:
    cfg = model.hf_model.config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def encode_fact(model: LoadedModel, prompt: str, target: str) -> EncodedFact:
    """Tokenize a fact under the scoring rule above, with clear errors for bad input."""
    tok = model.tokenizer
    if not isinstance(prompt, str) or not prompt.strip():
        raise KnowledgeNeuronError("the prompt is empty")
    if not isinstance(target, str):
        raise KnowledgeNeuronError("the target must be a string")
    target_ids = tok(target, add_special_tokens=False)["input_ids"]
    if not target.strip() or not target_ids:
        raise KnowledgeNeuronError(f"the target {target!r} tokenizes to nothing")
    if model.is_masked:
        mask = tok.mask_token
        if mask is None or prompt.count(mask) != 1:
            raise KnowledgeNeuronError(
                f"a masked-model prompt needs exactly one mask slot {mask!r}: {prompt!r}"
            )
        widened = prompt.replace(mask, " ".join([mask] * len(target_ids)))
        ids = tok(widened, return_tensors="pt")["input_ids"]
        positions = (ids[0] == tok.mask_token_id).nonzero().flatten().tolist()
        if len(positions) != len(target_ids):
            raise KnowledgeNeuronError(f"could not place {len(target_ids)} mask slots in {prompt!r}")
        pred_pos = positions[0]
    else:
        prompt_ids = tok(prompt, return_tensors="pt")["input_ids"]
        if prompt_ids.shape[1] == 0:
            raise KnowledgeNeuronError(f"the prompt {prompt!r} tokenizes to nothing")
        ids = torch.cat([prompt_ids, torch.tensor([target_ids[:-1]], dtype=prompt_ids.dtype)], 1)
        pred_pos = prompt_ids.shape[1] - 1
        positions = list(range(pred_pos, pred_pos + len(target_ids)))
    limit = _max_len(model)
    if limit is not None and ids.shape[1] > limit:
        raise KnowledgeNeuronError(
            f"prompt plus target is {ids.shape[1]} tokens, longer than the model's context of {limit}"
        )
    return EncodedFact(prompt, target, ids.to(model.device), tuple(target_ids), tuple(positions),
                       pred_pos)


def sequence_log_prob(logits: torch.Tensor, target_ids: tuple[int, ...]) -> torch.Tensor:
    """sum_i log softmax(logits[:, i])[target_ids[i]]: logits [batch, n_tgt, vocab] -> [batch]."""
    tgt = torch.tensor(target_ids, device=logits.device)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp[:, torch.arange(len(tgt), device=logits.device), tgt].sum(-1)


def target_log_prob(logits: torch.Tensor, fact: EncodedFact) -> torch.Tensor:
    """log P(target) from logits [batch, seq, vocab] -> [batch] under the scoring rule."""
    pos = torch.tensor(fact.score_positions, device=logits.device)
    return sequence_log_prob(logits[:, pos], fact.target_ids)


def assess(model: LoadedModel, prompt: str, target: str, k: int = 5) -> Assessment:
    """Probability, rank and top-k predictions of ``target`` for ``prompt``."""
    fact = encode_fact(model, prompt, target)
    with torch.no_grad():
        logits = model.hf_model(fact.input_ids).logits
    log_prob = target_log_prob(logits, fact)[0].item()
    probs = torch.softmax(logits[0, fact.pred_pos].float(), -1)
    rank = int((probs > probs[fact.target_ids[0]]).sum().item())
    top = torch.topk(probs, k)
    top_k = [(model.tokenizer.decode([i]), p) for i, p in zip(top.indices.tolist(), top.values.tolist())]
    return Assessment(prompt, target, float(torch.tensor(log_prob).exp()), log_prob, rank, top_k,
                      len(fact.target_ids))
