# %% [markdown]
# # Comparing attribution methods for knowledge neurons
#
# `locate(..., method=...)` takes the paper's Integrated Gradients (`"ig"`), its raw-activation
# baseline (`"activation"`), one-pass methods (`"grad_x_act"`, `"atp"`), Captum's
# `LayerConductance` (`"conductance"`), any Captum layer attribution class, or your own
# function. Every method goes through the same coarse/refined selection, so their neurons can
# be compared on the same fact, and tested by suppressing them.
#
# Run: `python tutorials/04_compare_methods.py` (SmolLM2) or with `--smoke` (tiny model, seconds).

# %%
import sys
import time
import warnings

import torch
from captum.attr import LayerGradientXActivation

from kn_plugin import KnowledgeAttribution, RefinementNote, encode_fact, intervention_effect, load_model, locate

SMOKE = "--smoke" in sys.argv
model = load_model("tiny-llama" if SMOKE else "smollm2")
prompts = ["The capital of France is", "The capital city of France is", "The French capital is"]
target = " Paris"
print(f"{model.name}: {model.n_layers} layers x {model.d_mlp} FFN neurons")

# %% [markdown]
# ## A method of your own
# Any function `fn(model, fact) -> [n_layers, d_mlp]` is a method. Here: the activation times
# the norm of the neuron's value slot (how strongly the neuron can write into the residual stream).


# %%
def activation_x_slot_norm(m, fact):
    acts = KnowledgeAttribution(m).attribute(fact.input_ids, fact.target, layers=[], progress=False).activations
    norms = torch.stack([m.adapter.value_slots(layer).float().norm(dim=-1).cpu() for layer in range(m.n_layers)])
    return acts * norms


# %% [markdown]
# ## Locate with every method, timed

# %%
methods = {"ig": "ig", "grad_x_act": "grad_x_act", "atp": "atp", "activation": "activation",
           "Captum LayerGradientXActivation": LayerGradientXActivation, "activation x slot norm": activation_x_slot_norm}
if not SMOKE:
    methods["conductance"] = "conductance"  # Captum, one layer at a time: slow on a real model
found = {}
warnings.simplefilter("ignore", RefinementNote)  # printed below from res.note
for label, method in methods.items():
    t0 = time.perf_counter()
    found[label] = locate(model, prompts, target, method=method, progress=False)
    res = found[label]
    print(f"{label:>32}: {len(res.neurons):>3} neurons in {time.perf_counter() - t0:6.2f} s  (recorded as {res.method})"
          + (f"\n{'':>34}note: {res.note}" if res.note else ""))

# %% [markdown]
# ## Do they find the same neurons?

# %%
ig = {n.key for n in found["ig"].neurons}
for label, res in found.items():
    keys = {n.key for n in res.neurons}
    jaccard = len(keys & ig) / len(keys | ig) if keys | ig else float("nan")
    print(f"{label:>32}: Jaccard with IG {jaccard:.2f}")

# %% [markdown]
# ## Do their neurons carry the fact? Suppress them (x0) and compare with random neurons

# %%
facts = [encode_fact(model, p, target) for p in prompts]
for label, res in found.items():
    neurons = [n.key for n in res.neurons]
    if not neurons:
        print(f"{label:>32}: no neurons")
        continue
    eff = intervention_effect(model, facts, neurons, 0.0, random_draws=3)
    print(f"{label:>32}: P(target) {eff.relative_change:+.1%} (random neurons {eff.random_relative_change:+.1%})")

# %% [markdown]
# For a measured comparison over many facts, with unrelated-fact controls and a report, run
# `kn bench methods --pararel PATH --out methods_out` (docs/methods-smollm2 holds one on SmolLM2).
