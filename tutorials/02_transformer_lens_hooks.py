# %% [markdown]
# # Knowledge neurons in a TransformerLens hook pipeline
#
# `model.bridge()` is a TransformerLens 4.x `TransformerBridge` over the same weights. The
# neurons live at `blocks.{l}.mlp.hook_post`; kn_plugin's interventions are ordinary TL hook
# functions `(activation, hook) -> activation`, so they compose with any other hook.
#
# Run: `python tutorials/02_transformer_lens_hooks.py` (SmolLM2) or with `--smoke`.

# %%
import sys

import torch

from kn_plugin import encode_fact, fwd_hooks, hook_name, load_model, locate, target_log_prob

SMOKE = "--smoke" in sys.argv
model = load_model("tiny-llama" if SMOKE else "smollm2")
bridge = model.bridge()
prompts = ["The capital of France is", "The capital city of France is", "The French capital is"]
target = " Paris"
kn = locate(model, prompts, target, adaptive=True, progress=False)
print(f"{len(kn.neurons)} knowledge neurons:", [(n.layer, n.index) for n in kn.neurons])

# %% [markdown]
# ## Suppress and amplify with hook functions
# Use `EncodedFact.input_ids` (no extra BOS) and act at the prediction position.

# %%
fact = encode_fact(model, prompts[0], target)


def p_target(logits: torch.Tensor) -> float:
    return target_log_prob(logits, fact).exp().item()


with torch.no_grad():
    base = p_target(bridge(fact.input_ids))
    suppressed = p_target(bridge.run_with_hooks(
        fact.input_ids, fwd_hooks=fwd_hooks(kn.neurons, factor=0.0, position=fact.pred_pos)))
    amplified = p_target(bridge.run_with_hooks(
        fact.input_ids, fwd_hooks=fwd_hooks(kn.neurons, factor=2.0, position=fact.pred_pos)))
print(f"P({target!r}) = {base:.4f}; suppressed {suppressed:.4f}; amplified {amplified:.4f}")

# %% [markdown]
# ## Composing with other hooks
# Record how much the MLP of each layer writes at the prediction position while the knowledge
# neurons are suppressed, with a second, ordinary TL hook on `hook_mlp_out`, inside
# `bridge.hooks(...)`.

# %%
norms: dict[int, float] = {}


def record_mlp_out(activation, hook):
    norms[int(hook.name.split(".")[1])] = activation[0, fact.pred_pos].norm().item()
    return activation


recorders = [(f"blocks.{layer}.hook_mlp_out", record_mlp_out) for layer in range(model.n_layers)]
with torch.no_grad():
    with bridge.hooks(fwd_hooks=recorders):
        bridge(fact.input_ids)
    clean_norms = dict(norms)
    with bridge.hooks(fwd_hooks=recorders + fwd_hooks(kn.neurons, 0.0, position=fact.pred_pos)):
        p = p_target(bridge(fact.input_ids))
print(f"inside the composed context P = {p:.4f} (same as suppressed: {abs(p - suppressed) < 1e-6})")
for layer in sorted({n.layer for n in kn.neurons}):
    print(f"layer {layer:>2}: |MLP out| {clean_norms[layer]:.3f} -> {norms[layer]:.3f}")
print("hook point of layer 0:", hook_name(0))
