import logging

import pytest
import torch

from kn_plugin.models import load_model

FACTS = {
    "tiny-llama": ("The capital of France is", " Paris"),
    "tiny-gpt2": ("The capital of France is", " Paris"),
    "tiny-bert": ("The capital of France is [MASK] .", "paris"),
}
MULTI = {
    "tiny-llama": ("The capital of", " France is"),
    "tiny-gpt2": ("The capital of", " France is"),
    "tiny-bert": ("The capital of [MASK] is paris .", "france germany"),
}
TINY = tuple(FACTS)


@pytest.fixture(scope="session")
def tiny_models():
    torch.manual_seed(0)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return {name: load_model(name) for name in TINY}


@pytest.fixture(scope="session")
def tiny_protocol_run(tmp_path_factory):
    """`kn bench pararel` on tiny-llama and four PARAREL relations (read, never written to)."""
    from test_pararel import ARGS

    from kn_plugin.cli import main

    out = tmp_path_factory.mktemp("protocol")
    assert main(ARGS + ["--out", str(out)]) == 0
    return out


@pytest.fixture(autouse=True)
def tiny_models_left_as_found(request):
    """Every test leaves the shared tiny models' weights, buffers and dtype as it found them."""
    if "tiny_models" not in request.fixturenames and "tiny" not in request.fixturenames:
        yield
        return
    models = request.getfixturevalue("tiny_models")
    before = {name: (m.weights_digest(), _hooks(m), m._bridge is None) for name, m in models.items()}
    yield
    changed = [name for name, m in models.items() if m.weights_digest() != before[name][0]]
    assert not changed, f"the test changed the weights of {changed}"
    # booting a TransformerLens bridge wraps the model's modules and wires its own capture hooks
    hooked = [name for name, m in models.items()
              if _hooks(m) != before[name][1] and not (before[name][2] and m._bridge is not None)]
    assert not hooked, f"the test left hooks on {hooked}"


#: hooks the frameworks install on first use and keep, as (module, qualified-name part): the capture
#: hooks a TransformerLens bridge wires on its first run, the output capturing of transformers. Any
#: other hook (a TL hook point's wrapper included) still counts as left by the test.
FRAMEWORK_HOOKS = (("transformer_lens.model_bridge.", "_maybe_wire_capture_hooks"),
                   ("transformers.utils.output_capturing", "output_capturing_hook"))


def _framework_hook(hook) -> bool:
    fn = getattr(hook, "__func__", hook)
    module, name = getattr(fn, "__module__", "") or "", getattr(fn, "__qualname__", "") or ""
    return any(module.startswith(m) and part in name for m, part in FRAMEWORK_HOOKS)


def _hooks(model):
    """How many hooks of each kind every module of the model carries (the frameworks' own aside)."""
    def count(hooks):
        return sum(not _framework_hook(h) for h in hooks.values())

    return [(count(mod._forward_hooks), count(mod._forward_pre_hooks), count(mod._backward_hooks))
            for mod in model.hf_model.modules()]


@pytest.fixture(params=TINY)
def tiny(request, tiny_models):
    return tiny_models[request.param]


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2")


def all_hooks(module: torch.nn.Module) -> int:
    """Number of forward (pre-)hooks on ``module`` and all its submodules."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
