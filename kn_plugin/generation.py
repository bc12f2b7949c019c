"""Text the model writes: seeded top-k sampling, as ROME's ``generate_fast`` (top-k 5).

Used for ROME's context prefixes and key statistics (:mod:`kn_plugin.rome`) and for the
fluency of edited models (:mod:`kn_plugin.edit_metrics`). The model's own ``generate`` runs
with its key-value cache; prompts of equal token length are batched together (no padding),
and the global random state is left as it was."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.models import LoadedModel, accepts_model


def _start_id(tok) -> int:
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tok, name, None)
        if value is not None:
            return int(value)
    raise KnowledgeNeuronError("the tokenizer has neither a BOS nor an EOS token to start generated text from")


@accepts_model
@torch.no_grad()
def sample_texts(model: LoadedModel, prompts: Sequence[str | None], tokens: int, seed: int = 0, top_k: int = 5,
                 batch: int = 32) -> list[str]:
    """For each prompt the ``tokens`` tokens sampled after it (its continuation only, decoded);
    a ``None`` prompt starts from the BOS (or EOS) token. Exactly ``tokens`` tokens are drawn
    (an end-of-text token does not stop a text)."""
    if model.is_masked:
        raise KnowledgeNeuronError(f"{model.name} is a masked LM: it does not write text left to right")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1 or top_k < 1:
        raise KnowledgeNeuronError(f"sampling needs tokens >= 1 and top_k >= 1, got {tokens!r}, {top_k!r}")
    tok = model.tokenizer
    start = _start_id(tok)
    encoded = []
    for p in prompts:
        if p is None:
            encoded.append([start])
        else:
            if not isinstance(p, str) or not p.strip():
                raise KnowledgeNeuronError("a generation prompt must be non-empty text")
            ids = tok(p)["input_ids"]
            encoded.append(ids if ids else [start])
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    out: list[str | None] = [None] * len(encoded)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for length in sorted(groups):
            members = groups[length]
            for lo in range(0, len(members), batch):
                rows = members[lo:lo + batch]
                ids = torch.tensor([encoded[i] for i in rows], dtype=torch.long, device=model.device)
                gen = model.hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=top_k,
                                              top_p=1.0, temperature=1.0, max_new_tokens=tokens,
                                              min_new_tokens=tokens, pad_token_id=start, eos_token_id=None)
                for i, row in zip(rows, gen):
                    out[i] = tok.decode(row[length:], skip_special_tokens=True)
    return out
