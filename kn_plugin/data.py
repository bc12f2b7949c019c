"""Facts and their paraphrased cloze prompts.

``DEMO_FACTS`` are a few common facts with paraphrases written for kn_plugin (SmolLM2 predicts
each target at rank 0 for every prompt listed). PARAREL is read from a folder the user gives.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.validation import read_text


@dataclass(frozen=True)
class Fact:
    """A fact <subject, relation, object> with paraphrased cloze prompts for a causal LM."""

    subject: str
    relation: str
    target: str
    prompts: tuple[str, ...]
    key: str = ""  # names the fact's result file in runs over many facts (default: from its position)


DEMO_FACTS: tuple[Fact, ...] = (
    Fact("France", "capital", " Paris", (
        "The capital of France is", "The capital city of France is", "The French capital is",
    )),
    Fact("Germany", "capital", " Berlin", (
        "The capital of Germany is", "The capital city of Germany is", "The German capital is",
        "Germany's capital city is",
    )),
    Fact("Japan", "capital", " Tokyo", (
        "The capital of Japan is", "The capital city of Japan is", "The Japanese capital is",
    )),
    Fact("France", "language", " French", (
        "The official language of France is", "People in France speak", "In France, people speak",
    )),
)


def read_facts_jsonl(path: str | Path) -> list[Fact]:
    """Facts from a JSONL file, one per line:
    ``{"prompts": ["The capital of France is", ...], "target": " Paris",
    "subject": "France", "relation": "capital", "key": "france-capital"}`` (``"prompt"`` for a
    single prompt; ``subject``, ``relation`` and ``key`` optional)."""
    facts = []

    lines = read_text(path, "facts file").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompts = row.get("prompts") or [row["prompt"]]
            if not isinstance(prompts, list):
                raise TypeError(f"'prompts' must be a list of strings, got {type(prompts).__name__} (one prompt: "
                                "'prompt': '...')")
            if not isinstance(row["target"], str) or not all(isinstance(p, str) for p in prompts):
                raise TypeError("prompts and target must be strings")
            if not isinstance(row.get("key", ""), str):
                raise TypeError("key must be a string")
            facts.append(Fact(row.get("subject", ""), row.get("relation", ""), row["target"],
                              tuple(prompts), row.get("key", "")))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise KnowledgeNeuronError(
                f"{path}:{n}: expected {{'prompts': [...], 'target': ...}} ({exc})"
            ) from exc
    if not facts:
        raise KnowledgeNeuronError(f"{path} holds no facts")
    return facts


# --- PARAREL -------------------------------------------------------------------------------

PARAREL_ENV = "KN_PARAREL"
PAPER_ERASE_RELATIONS = ("P19", "P27", "P106", "P937")


@dataclass(frozen=True)
class ParaRelFact:
    """One PARAREL fact with its cloze prompts (one per usable template)."""

    relation: str
    index: int  # line number in facts/<relation>.jsonl
    uuid: str
    subject: str
    obj: str
    target: str  # what is scored: " obj" for causal models, "obj" for masked ones
    prompts: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.relation}-{self.index:05d}"


def pararel_dir(path: str | Path | None = None) -> Path:
    """The PARAREL folder: ``path``, else ``$KN_PARAREL``; never downloaded."""
    chosen = path or os.environ.get(PARAREL_ENV)
    if not chosen:
        raise KnowledgeNeuronError(f"give the PARAREL folder (--pararel DIR or ${PARAREL_ENV})")
    folder = Path(chosen).expanduser()
    if not (folder / "patterns").is_dir() or not (folder / "facts").is_dir():
        raise KnowledgeNeuronError(f"{folder} is not a PARAREL folder (needs patterns/ and facts/)")
    return folder


def _jsonl(path: Path, keys: tuple[str, ...] = ()) -> list[dict]:
    """The rows of a PARAREL JSONL file, each an object with text ``keys``; a damaged file is
    one error line naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KnowledgeNeuronError(f"PARAREL file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise KnowledgeNeuronError(f"cannot read PARAREL file {path}: {exc.strerror or exc}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise KnowledgeNeuronError(f"PARAREL file {path}, line {number}: not JSON ({exc.msg})") from None
        missing = [k for k in keys if not isinstance(row, dict) or not isinstance(row.get(k), str)]
        if missing:
            raise KnowledgeNeuronError(f"PARAREL file {path}, line {number}: no text field {missing[0]!r}")
        rows.append(row)
    return rows


def pararel_relations(root: Path, relations: list[str] | None) -> list[str]:
    """The relations asked for (default: all), each checked against the folder's patterns."""
    available = sorted(p.stem for p in (root / "patterns").glob("P*.jsonl"))
    wanted = list(relations) if relations else available
    unknown = [r for r in wanted if r not in available]
    if unknown:
        raise KnowledgeNeuronError(f"unknown PARAREL relations {unknown}; available: {', '.join(available)}")
    return wanted


def cloze_prompt(pattern: str, subject: str, masked: bool, mask_token: str | None = None) -> str | None:
    """A template filled with the subject: for causal models the text before ``[Y]`` (only when
    ``[Y]`` comes last, before final punctuation), for masked models ``[Y]`` -> the mask token."""
    text = pattern.strip().replace("[X]", subject)
    if text.count("[Y]") != 1:
        return None
    if masked:
        return text.replace("[Y]", mask_token or "[MASK]")
    head, tail = text.split("[Y]")
    if tail.strip(" .") or not head.strip():
        return None
    return head.rstrip()


def load_pararel(
    folder: str | Path | None = None, relations: list[str] | None = None, masked: bool = False,
    mask_token: str | None = None, min_templates: int = 4, min_prompts: int = 2,
    facts_per_relation: int | None = None, seed: int = 0, tokenizer=None, single_token: bool = False,
) -> dict[str, list[ParaRelFact]]:
    """PARAREL facts per relation, with one prompt per usable template.

    By default, as the paper: relations with more than 3 templates (``min_templates=4``). For
    causal models only templates whose ``[Y]`` comes last are usable; relations left with fewer
    than ``min_prompts`` usable templates are skipped. ``facts_per_relation`` facts are drawn
    per relation with a fixed ``seed`` (same draw on every run), kept in file order.
    Objects that span several tokens are kept (scored under the multi-token rule of
    :mod:`kn_plugin.scoring`) unless ``single_token`` is set, which needs the ``tokenizer``; the
    draw happens before that filter, so a relation may keep fewer facts.
    """
    if single_token and tokenizer is None:
        raise KnowledgeNeuronError("single_token filtering needs the model's tokenizer")

    root = pararel_dir(folder)
    wanted = pararel_relations(root, relations)
    out: dict[str, list[ParaRelFact]] = {}
    for rel in wanted:
        patterns = [row["pattern"] for row in _jsonl(root / "patterns" / f"{rel}.jsonl", ("pattern",))]
        if len(patterns) < min_templates:
            continue
        facts_path = root / "facts" / f"{rel}.jsonl"
        if not facts_path.exists():
            continue
        rows = _jsonl(facts_path, ("sub_label", "obj_label"))
        indices = list(range(len(rows)))
        if facts_per_relation is not None and facts_per_relation < len(rows):
            indices = sorted(random.Random(f"{seed}-{rel}").sample(indices, facts_per_relation))
        facts = []
        for i in indices:
            row = rows[i]
            prompts = [cloze_prompt(p, row["sub_label"], masked, mask_token) for p in patterns]
            prompts = list(dict.fromkeys(p for p in prompts if p))
            if len(prompts) < min_prompts:
                break  # same templates for every fact of the relation
            target = row["obj_label"] if masked else " " + row["obj_label"]
            if single_token and len(tokenizer(target, add_special_tokens=False)["input_ids"]) != 1:
                continue
            facts.append(ParaRelFact(rel, i, row.get("uuid", ""), row["sub_label"],
                                     row["obj_label"], target, tuple(prompts)))
        if facts:
            out[rel] = facts
    if not out:
        raise KnowledgeNeuronError("no PARAREL relation is usable with these settings")
    return out
