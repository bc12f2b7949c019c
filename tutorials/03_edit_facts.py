# %% [markdown]
# # Update a fact and erase a relation, with exact undo
#
# Edits write into the value slots (rows of the second FFN weight that belong to knowledge
# neurons). The Hugging Face parameter and TransformerLens' `blocks[l].mlp.W_out` share that
# storage, so both frameworks see an edit at once; undo restores every weight bit for bit.
#
# Run: `python tutorials/03_edit_facts.py` (SmolLM2) or with `--smoke`.

# %%
import sys

import torch

from kn_plugin import (
    WeightEdit,
    encode_fact,
    erase_relation,
    load_model,
    locate,
    perplexity,
    target_probs,
    top_prediction,
    unchanged_since,
    update_fact,
    weight_snapshot,
)

SMOKE = "--smoke" in sys.argv
model = load_model("tiny-llama" if SMOKE else "smollm2")
snapshot = weight_snapshot(model)  # every parameter and buffer, to prove undo is exact


def unchanged() -> bool:
    return unchanged_since(snapshot)


# %% [markdown]
# ## Update <France, capital, Paris> -> <France, capital, Rome>
# The paper's rule `v <- v - lambda1 e(t) + lambda2 e(t')`, oriented by the sign of each
# neuron's activation on the prompts (gated SiLU neurons fire with either sign). With prompts,
# lambda2 is calibrated by default: the smallest of 0.5, 1, 2, 4, 8, 16 that puts " Rome" on top
# of every prompt (`lambda2=8` gives the paper's fixed value).

# %%
prompts = ["The capital of France is", "The capital city of France is", "The French capital is"]
kn = locate(model, prompts, " Paris", adaptive=True, progress=False)
edit = update_fact(model, kn.neurons, " Paris", " Rome", prompts=prompts)
print("lambda2 used:", edit.meta["lambda2"])
old = [encode_fact(model, p, " Paris") for p in prompts]
new = [encode_fact(model, p, " Rome") for p in prompts]
control = [encode_fact(model, "The capital of Germany is", " Berlin")]
print("before: P(Paris)", [round(x, 4) for x in target_probs(model, old)],
      "P(Rome)", [round(x, 4) for x in target_probs(model, new)],
      "P(Berlin | Germany)", round(target_probs(model, control)[0], 4))
with edit.applied(model):
    print("after:  P(Paris)", [round(x, 4) for x in target_probs(model, old)],
          "P(Rome)", [round(x, 4) for x in target_probs(model, new)],
          "P(Berlin | Germany)", round(target_probs(model, control)[0], 4))
    print("top prediction:", repr(model.tokenizer.decode([top_prediction(model, old[0])])))
    slot = edit.slots[0]
    assert torch.equal(model.bridge().blocks[slot[0]].mlp.W_out[slot[1]], edit.new[0])
print("undo exact:", unchanged())

# %% [markdown]
# ## Save, load, apply and revert an edit

# %%
edit.save("tutorial_edit.pt")
handle = WeightEdit.load("tutorial_edit.pt").apply(model)
print("applied from file; unchanged?", unchanged())
handle.revert()
print("reverted; unchanged?", unchanged())

# %% [markdown]
# ## Erase a relation
# Neurons shared by at least m facts of the relation get the unknown-token embedding.

# %%
capitals = [("France", " Paris"), ("Germany", " Berlin"), ("Japan", " Tokyo"), ("Italy", " Rome"),
            ("Spain", " Madrid")]
sets = []
for country, city in capitals:
    ps = [f"The capital of {country} is", f"The capital city of {country} is"]
    sets.append(locate(model, ps, city, adaptive=True, progress=False).neurons)
erase = erase_relation(model, sets, min_facts=3)
relation = [encode_fact(model, f"The capital of {c} is", t) for c, t in capitals]
others = [encode_fact(model, "The official language of France is", " French"),
          encode_fact(model, "People in Spain speak", " Spanish")]
print(f"erasing {len(erase.slots)} neurons shared by >= 3 facts ({erase.meta['replacement']})")
print(f"before: relation perplexity {perplexity(model, relation):.2f}, others {perplexity(model, others):.2f}")
with erase.applied(model):
    print(f"after:  relation perplexity {perplexity(model, relation):.2f}, others {perplexity(model, others):.2f}")
print("undo exact:", unchanged())
