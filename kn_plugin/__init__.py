"""kn_plugin: knowledge neurons (Dai et al., 2021) for Captum and TransformerLens."""

from kn_plugin.adapters.captum import CaptumTarget, captum_target
from kn_plugin.adapters.families import SITES, adapter_for
from kn_plugin.adapters.transformer_lens import hook_name
from kn_plugin.assess import Assessment, EncodedFact, assess, encode_fact
from kn_plugin.attribution import AttributionResult, KnowledgeAttribution, KnowledgeNeuronWarning
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.interventions import (
                                     amplify,
                                     amplify_hook,
                                     fwd_hooks,
                                     scale_hook,
                                     scale_neurons,
                                     set_hook,
                                     set_neurons,
                                     suppress,
                                     suppress_hook,
)
from kn_plugin.models import LoadedModel, load_model, wrap
from kn_plugin.plotting import plot_locate
from kn_plugin.refinement import LocateResult, Neuron, coarse_neurons, locate, read_neurons_file, refine

__all__ = [
    "Assessment", "AttributionResult", "CaptumTarget", "EncodedFact", "KnowledgeAttribution",
    "KnowledgeNeuronError", "LoadedModel", "LocateResult", "Neuron", "amplify", "amplify_hook",
    "assess", "captum_target", "coarse_neurons", "encode_fact", "fwd_hooks", "hook_name",
    "load_model", "locate", "refine", "scale_hook", "scale_neurons", "set_hook", "set_neurons",
    "suppress", "suppress_hook", "wrap", "adapter_for", "SITES", "KnowledgeNeuronWarning",
    "plot_locate", "read_neurons_file",
]
__version__ = "0.1.0"
