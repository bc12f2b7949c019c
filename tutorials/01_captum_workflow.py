# %% [markdown]
# # Knowledge neurons in a Captum workflow
#
# Each layer's FFN neurons at the prediction position are a Captum *layer* target:
# `captum_target(...)` gives `forward_func`, `layer`, `inputs` and `baselines` for any Captum
# layer method. Here we compute the paper's Integrated Gradients with
# `LayerIntegratedGradients`, compare it with `LayerGradientXActivation` and
# `LayerConductance`, and check it against kn_plugin's fast engine.
#
# Run: `python tutorials/01_captum_workflow.py` (SmolLM2) or with `--smoke` (tiny model, seconds).

# %%
import sys
from pathlib import Path

import torch
from captum.attr import LayerConductance, LayerGradientXActivation, LayerIntegratedGradients

from kn_plugin import KnowledgeAttribution, captum_target, load_model

SMOKE = "--smoke" in sys.argv
OUT = Path("tutorial_out")
OUT.mkdir(exist_ok=True)
model = load_model("tiny-llama" if SMOKE else "smollm2")
prompt, target = "The capital of France is", " Paris"
layer = model.n_layers - 1 if SMOKE else 24
print(f"{model.name}: {model.n_layers} layers x {model.d_mlp} FFN neurons; layer {layer}")

# %% [markdown]
# ## Integrated Gradients, the paper's way, through Captum
# `inputs` = 1 gives the real activation, `baselines` = 0 the zero baseline at the prediction
# position only. `riemann_right` is the paper's grid alpha = k/m, k = 1..m.

# %%
t = captum_target(model, prompt, target, layer)
lig = LayerIntegratedGradients(t.forward_func, t.layer)
ig = lig.attribute(t.inputs, baselines=t.baselines, n_steps=20, method="riemann_right")[0]
print("top IG neurons:", ig.topk(5).indices.tolist())

# %% [markdown]
# ## The same scores from kn_plugin's fast engine (all layers at once)

# %%
res = KnowledgeAttribution(model).attribute(prompt, target, progress=False)
diff = (res.scores[layer] - ig).abs().max() / ig.abs().max()
print(f"max difference to Captum, relative to the max score: {diff:.2e}")
assert diff < 1e-4

# %% [markdown]
# ## Other Captum layer methods on the same target

# %%
gxa = LayerGradientXActivation(t.forward_func, t.layer).attribute(t.inputs)[0]
cond = LayerConductance(t.forward_func, t.layer).attribute(t.inputs, baselines=t.baselines, n_steps=20)[0]


def overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> int:
    return len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist()))


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


for name, other in (("gradient x activation", gxa), ("conductance", cond)):
    print(f"IG vs {name}: top-10 overlap {overlap(ig, other)}/10, correlation {corr(ig, other):.3f}")
print(f"sum of IG {ig.sum():.4f} vs P(full) - P(zeroed) "
      f"{res.target_prob - res.zeroed_prob[layer].item():.4f} (completeness)")

# %%
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for ax, (name, other) in zip(axes, (("gradient x activation", gxa), ("conductance", cond))):
    ax.scatter(ig.numpy(), other.detach().numpy(), s=6)
    ax.set_xlabel("integrated gradients")
    ax.set_ylabel(name)
fig.suptitle(f"{model.name}, layer {layer}: {prompt!r} -> {target!r}")
fig.tight_layout()
fig.savefig(OUT / "01_captum_methods.png", dpi=100)
print("wrote", OUT / "01_captum_methods.png")
