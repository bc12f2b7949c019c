"""kn_plugin: knowledge neurons (Dai et al., 2021) for Captum and TransformerLens.

Everything the README and the tutorials use is importable from here."""

from kn_plugin.attribution import AttributionResult, KnowledgeAttribution, KnowledgeNeuronWarning
from kn_plugin.edit_metrics import EditCase, evaluate_edit
from kn_plugin.editing import (
                               WeightEdit,
                               calibrated_update,
                               constrained_update,
                               erase_relation,
                               unchanged_since,
                               update_fact,
                               weight_snapshot,
)
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.evaluation import intervention_effect, perplexity, relative_change, target_probs
from kn_plugin.families.adapter import SITES, adapter_for
from kn_plugin.hardware import SlowPrecisionWarning
from kn_plugin.inspection import inspect_neuron
from kn_plugin.integrations.captum import CaptumTarget, captum_target
from kn_plugin.integrations.transformer_lens import hook_name
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
from kn_plugin.locating import (
                               LocateConfig,
                               LocateResult,
                               LowProbabilityWarning,
                               Neuron,
                               RefinementNote,
                               coarse_neurons,
                               locate,
                               locate_many,
                               read_neurons_file,
                               refine,
)
from kn_plugin.models import LoadedModel, load_model, wrap
from kn_plugin.plotting import plot_locate
from kn_plugin.rome import generated_corpus, key_statistics, rome_edit, trace_layers
from kn_plugin.scoring import Assessment, EncodedFact, assess, encode_fact, target_log_prob, top_prediction

__all__ = [
    # models and facts
    "LoadedModel", "load_model", "wrap", "adapter_for", "SITES", "hook_name",
    "Assessment", "EncodedFact", "assess", "encode_fact", "target_log_prob",
    # attribution and locating
    "KnowledgeAttribution", "AttributionResult", "CaptumTarget", "captum_target",
    "locate", "locate_many", "LocateConfig", "LocateResult", "Neuron", "coarse_neurons", "refine", "read_neurons_file",
    "inspect_neuron", "plot_locate",
    # interventions and their measures
    "suppress", "amplify", "scale_neurons", "set_neurons", "fwd_hooks", "suppress_hook", "amplify_hook",
    "scale_hook", "set_hook", "intervention_effect", "relative_change", "target_probs", "perplexity",
    "top_prediction",
    # edits
    "WeightEdit", "update_fact", "calibrated_update", "constrained_update", "erase_relation", "rome_edit",
    "trace_layers", "key_statistics", "generated_corpus",
    "weight_snapshot", "unchanged_since", "EditCase", "evaluate_edit",
    # errors and warnings
    "KnowledgeNeuronError", "KnowledgeNeuronWarning", "RefinementNote", "LowProbabilityWarning",
    "SlowPrecisionWarning",
]
__version__ = "0.1.0"
