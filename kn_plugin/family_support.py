"""Which model families kn_plugin supports, measured on tiny random models.

:func:`probe_family` builds the tiny model of a family (:data:`kn_plugin.tiny.TINY_FAMILIES`),
wraps it as a user would, runs the default engine on one fact and boots a TransformerLens
bridge over it; :func:`family_table` turns those observations into the README's family
table. The test suite checks that the README shows exactly what this measures
(``kn families --write README.md`` rewrites it).
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from kn_plugin.attribution import KnowledgeAttribution
from kn_plugin.models import wrap
from kn_plugin.tiny import TINY_FAMILIES, tiny_family

logger = logging.getLogger(__name__)

TABLE_BEGIN = "<!-- families:begin -->"
TABLE_END = "<!-- families:end -->"
FACTS = {False: ("The capital of France is", " Paris"), True: ("The capital of France is [MASK] .", "paris")}


@dataclass(frozen=True)
class FamilyRow:
    family: str
    config: str
    site: str
    scoring: str  # "causal" or "masked"
    engine: str  # the engine the default ("fast") actually ran
    bridge: bool  # TransformerLens 4.x boots it


def probe_family(family: str):
    """``(FamilyRow, LoadedModel)`` for ``family``'s tiny model; the bridge is booted when
    TransformerLens can (the LoadedModel keeps it)."""
    hf_model, tokenizer = tiny_family(family)
    loaded = wrap(hf_model, tokenizer=tokenizer, name=f"tiny-{family}")
    prompt, target = FACTS[loaded.is_masked]
    result = KnowledgeAttribution(loaded).attribute(prompt, target, steps=2, progress=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded.bridge()
        bridge = True
    except Exception as exc:  # TransformerLens refuses the architecture
        logger.info("TransformerLens does not boot %s: %s", family, exc)
        bridge = False
    row = FamilyRow(family, TINY_FAMILIES[family][0], loaded.adapter.site.path,
                    "masked" if loaded.is_masked else "causal", result.engine, bridge)
    return row, loaded


ENGINE_TEXT = {"stepper": "yes (hand-written stepper)", "cached": "yes (model's own modules + cache)",
               "batched": "no (batched reference)"}


def family_table(rows: list[FamilyRow]) -> str:
    lines = ["| family | transformers config | neuron site (input of) | scoring | fast path | TransformerLens |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r.family} | `{r.config}` | `{r.site}` | {r.scoring} | {ENGINE_TEXT[r.engine]} | "
                     f"{'boots' if r.bridge else 'does not boot'} |")
    return "\n".join(lines)


def readme_table(text: str) -> str | None:
    """The family table between the markers of a README, or None."""
    m = re.search(re.escape(TABLE_BEGIN) + r"\n(.*?)" + re.escape(TABLE_END), text, re.S)
    return m.group(1).rstrip("\n") if m else None


def write_readme_table(path: str | Path, table: str) -> None:
    path = Path(path)
    text = path.read_text()
    if readme_table(text) is None:
        raise ValueError(f"{path} has no {TABLE_BEGIN} ... {TABLE_END} section")
    text = re.sub(re.escape(TABLE_BEGIN) + r"\n.*?" + re.escape(TABLE_END),
                  lambda _: f"{TABLE_BEGIN}\n{table}\n{TABLE_END}", text, flags=re.S)
    path.write_text(text)
