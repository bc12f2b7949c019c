"""Facts and their paraphrased cloze prompts.

``DEMO_FACTS`` are a few common facts with paraphrases written for kn_plugin (SmolLM2 predicts
each target at rank 0 for every prompt listed). PARAREL is read from a folder the user gives.
"""

from __future__ import annotations

from dataclasses import dataclass


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
