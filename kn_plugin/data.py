"""Facts and their paraphrased cloze prompts.

``DEMO_FACTS`` are a few common facts with paraphrases written for kn_plugin (SmolLM2 predicts
each target at rank 0 for every prompt listed). PARAREL is read from a folder the user gives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kn_plugin.errors import KnowledgeNeuronError


@dataclass(frozen=True)
class Fact:
    """A fact <subject, relation, object> with paraphrased cloze prompts for a causal LM."""

    subject: str
    relation: str
    target: str
    prompts: tuple[str, ...]


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
    "subject": "France", "relation": "capital"}`` (``"prompt"`` for a single prompt;
    ``subject`` and ``relation`` optional)."""
    facts = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise KnowledgeNeuronError(f"cannot read facts file {path}: {exc}") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompts = row.get("prompts") or [row["prompt"]]
            facts.append(Fact(row.get("subject", ""), row.get("relation", ""), row["target"],
                              tuple(prompts)))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise KnowledgeNeuronError(
                f"{path}:{n}: expected {{'prompts': [...], 'target': ...}} ({exc})"
            ) from exc
    if not facts:
        raise KnowledgeNeuronError(f"{path} holds no facts")
    return facts
