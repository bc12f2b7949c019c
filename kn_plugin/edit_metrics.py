"""Edits scored as the editing field scores them: CounterFact's metrics (Meng et al. 2022).

Definitions follow ROME's released evaluation code (``experiments/py/eval_utils_counterfact.py``
and ``experiments/summarize.py``):

* A prompt's score for an object is the mean negative log-probability of the object's tokens
  (teacher-forced after the prompt; one-token objects: ``-log P``), kn's scoring rule
  (:mod:`kn_plugin.scoring`) averaged per token.
* **Efficacy** on the rewrite prompt: success ``ES`` = share of cases with
  ``P(t') > P(t)`` (compared on the mean-token scores), magnitude ``EM`` = mean of
  ``exp(-nll(t')) - exp(-nll(t))``.
* **Paraphrase** (generalisation) ``PS`` / ``PM``: the same on held-out paraphrases, averaged
  over a case's paraphrases first, then over cases.
* **Neighbourhood** (specificity) ``NS`` / ``NM``: on prompts about other subjects, the share
  where the prompt's own answer still beats ``t'``. CounterFact's neighbours share the edited
  fact's true object; kn takes each neighbour's own answer (for such neighbours, the same).
* **Score** ``S``: the harmonic mean of ES, PS and NS (``scipy.stats.hmean``, of the means).
* **Fluency** ``GE``: the weighted n-gram entropy of generated text,
  ``mean(2/3 H_2, 4/3 H_3)`` in bits over each text's word bigrams and trigrams, averaged
  over texts. ROME splits words with NLTK's ``word_tokenize``; kn splits on the regular
  expression ``\\w+|[^\\w\\s]`` (words and punctuation), which needs no downloaded data.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.generation import sample_texts
from kn_plugin.models import LoadedModel, accepts_model
from kn_plugin.scoring import encode_fact, target_log_prob

NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)
_WORDS = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class EditCase:
    """One counterfactual edit <subject, relation, t> -> t' and the prompts that test it."""

    subject: str
    prompt: str  # the rewrite prompt (names the subject; continues with the object)
    target_true: str
    target_new: str
    paraphrases: tuple[str, ...] = ()
    neighbours: tuple[tuple[str, str], ...] = ()  # (prompt, its own answer) about other subjects
    generation_prompts: tuple[str, ...] = ()
    key: str = ""
    relation: str = ""

    def __post_init__(self):
        for name in ("subject", "prompt", "target_true", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise KnowledgeNeuronError(f"an edit case needs a non-empty {name.replace('_', ' ')}")
        if self.target_true.strip() == self.target_new.strip():
            raise KnowledgeNeuronError(f"the new object equals the old one ({self.target_true!r})")
        if self.subject not in self.prompt:
            raise KnowledgeNeuronError(f"the rewrite prompt {self.prompt!r} does not name the subject {self.subject!r}")
        for p in self.paraphrases:
            if not isinstance(p, str) or not p.strip():
                raise KnowledgeNeuronError("paraphrases must be non-empty prompts")
        for pair in self.neighbours:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise KnowledgeNeuronError(f"a neighbour is a (prompt, answer) pair, got {pair!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@accepts_model
def mean_token_nll(model: LoadedModel, prompt: str, target: str) -> float:
    """``-(1/n) sum_i log P(t_i | prompt, t_<i)`` for the ``n`` tokens of ``target``."""
    return mean_token_nlls(model, [(prompt, target)])[0]


@accepts_model
@torch.no_grad()
def mean_token_nlls(model: LoadedModel, pairs: Sequence[tuple[str, str]], batch: int = 32) -> list[float]:
    """:func:`mean_token_nll` of each ``(prompt, target)``, in right-padded batches (under
    causal attention no real token sees the padding, so each row scores as it would alone)."""
    facts = [encode_fact(model, p, t) for p, t in pairs]
    out = []
    for lo in range(0, len(facts), batch):
        chunk = facts[lo:lo + batch]
        width = max(f.input_ids.shape[1] for f in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long, device=model.device)
        for i, f in enumerate(chunk):
            ids[i, :f.input_ids.shape[1]] = f.input_ids[0]
        logits = model.hf_model(ids).logits
        out += [-target_log_prob(logits[i:i + 1], f)[0].item() / len(f.target_ids) for i, f in enumerate(chunk)]
    return out


def _pairs(model: LoadedModel, prompts: Iterable[str], first: str | Sequence[str], second: str) -> list[dict]:
    prompts = list(prompts)
    firsts = [first] * len(prompts) if isinstance(first, str) else list(first)
    nll = mean_token_nlls(model, [(p, a) for p, a in zip(prompts, firsts)] + [(p, second) for p in prompts])
    return [{"a": a, "b": b} for a, b in zip(nll[:len(prompts)], nll[len(prompts):])]


@accepts_model
def case_scores(model: LoadedModel, case: EditCase) -> dict:
    """Mean-token NLLs of a case's prompts: ``rewrite`` and ``paraphrase`` as
    ``{"new": nll(t'), "true": nll(t)}``, ``neighbourhood`` as ``{"true": nll(own answer),
    "new": nll(t')}``; one entry per prompt."""
    def named(pairs, a, b):
        return [{a: p["a"], b: p["b"]} for p in pairs]

    return {
        "rewrite": named(_pairs(model, [case.prompt], case.target_new, case.target_true), "new", "true"),
        "paraphrase": named(_pairs(model, case.paraphrases, case.target_new, case.target_true), "new", "true"),
        "neighbourhood": named(_pairs(model, [p for p, _ in case.neighbours], [a for _, a in case.neighbours],
                                      case.target_new), "true", "new"),
    }


def case_metrics(scores: dict) -> dict:
    """Per case (ROME's summarize): success and magnitude of each prompt kind, each averaged
    over the case's prompts of that kind; a kind without prompts is None."""
    out = {}
    for kind, prefix, better, worse in (("rewrite", "E", "new", "true"), ("paraphrase", "P", "new", "true"),
                                        ("neighbourhood", "N", "true", "new")):
        rows = scores.get(kind) or []
        if not rows:
            out[f"{prefix}S"] = out[f"{prefix}M"] = None
            continue
        out[f"{prefix}S"] = sum(r[worse] > r[better] for r in rows) / len(rows)
        out[f"{prefix}M"] = sum(math.exp(-r[better]) - math.exp(-r[worse]) for r in rows) / len(rows)
    return out


def score(es: float | None, ps: float | None, ns: float | None) -> float | None:
    """ROME's score S: the harmonic mean of efficacy, paraphrase and neighbourhood success."""
    from scipy.stats import hmean

    if es is None or ps is None or ns is None:
        return None
    return float(hmean([es, ps, ns])) if min(es, ps, ns) > 0 else 0.0


def summarize(per_case: Sequence[dict]) -> dict:
    """Means over cases of each case metric (cases without a kind left out of its mean), and S."""
    out: dict = {"n": len(per_case)}
    for name in ("ES", "EM", "PS", "PM", "NS", "NM"):
        vals = [c[name] for c in per_case if c.get(name) is not None]
        out[name] = sum(vals) / len(vals) if vals else None
    out["S"] = score(out["ES"], out["PS"], out["NS"])
    return out


def words(text: str) -> list[str]:
    return _WORDS.findall(text)


def ngram_entropy_of(text: str, orders: Sequence[int] = NGRAM_ORDERS,
                     weights: Sequence[float] = NGRAM_WEIGHTS) -> float:
    """ROME's ``compute_n_gram_entropy``: mean over n of ``w_n x H_n`` (bits), ``H_n`` the
    entropy of the text's word n-gram frequencies (0 for a text with no n-gram)."""
    toks = words(text)
    parts = []
    for n, w in zip(orders, weights):
        grams = Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        parts.append(w * h)
    return sum(parts) / len(parts)


def ngram_entropy(texts: Sequence[str]) -> float:
    """ROME's fluency GE: the arithmetic mean of :func:`ngram_entropy_of` over texts."""
    if not texts:
        raise KnowledgeNeuronError("fluency needs at least one generated text")
    return sum(ngram_entropy_of(t) for t in texts) / len(texts)


@accepts_model
def fluency(model: LoadedModel, prompts: Sequence[str], tokens: int = 100, seed: int = 0) -> dict:
    """GE of ``tokens`` tokens the model writes after each prompt (ROME: 100), and the texts."""
    texts = sample_texts(model, list(prompts), tokens, seed=seed)
    return {"ngram_entropy": ngram_entropy(texts), "texts": texts}


@dataclass
class EditEvaluation:
    """Scores of one case before and after an edit (``kn_plugin.edit_metrics`` definitions)."""

    before: dict
    after: dict
    metrics_before: dict = field(default_factory=dict)
    metrics_after: dict = field(default_factory=dict)
    fluency_before: float | None = None
    fluency_after: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@accepts_model(freeze=False)
def evaluate_edit(model: LoadedModel, case: EditCase, edit, tokens: int = 100, seed: int = 0,
                  generate: bool = True) -> EditEvaluation:
    """The case's scores (and fluency on its generation prompts) before and with ``edit``
    applied (a :class:`~kn_plugin.editing.WeightEdit`); the model is left unedited."""
    def measure():
        scores = case_scores(model, case)
        ge = (fluency(model, case.generation_prompts, tokens, seed)["ngram_entropy"]
              if generate and case.generation_prompts else None)
        return scores, ge

    before, ge_before = measure()
    with edit.applied(model):
        after, ge_after = measure()
    return EditEvaluation(before, after, case_metrics(before), case_metrics(after), ge_before, ge_after)
