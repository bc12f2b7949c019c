"""Editing operators on value slots: update a fact, erase a relation; every edit is undoable.

The value slot of neuron ``(l, i)`` is row ``i`` of ``adapter.value_slots(l)`` ([d_mlp, d_model]),
a view of the framework's own weight: the Hugging Face parameter, which TransformerLens'
``bridge.blocks[l].mlp.W_out`` shares. Edits write into that storage, so both frameworks see
them at once, and undo restores the rows saved at apply time bit for bit.

* ``update_fact``: ``v_i <- v_i - lambda1 * e(t) + lambda2 * e(t')`` on the fact's neurons
  (paper: lambda1 = 1, lambda2 = 8), oriented by the sign of each neuron's activation when
  prompts are given (see ``update_fact``). ``scale="norm"`` rescales each embedding to the norm of the
  value slot first, and ``shared``/``max_share`` skip neurons shared by more than 10% of the
  relation's facts, as the authors' released code does. With prompts the default lambda2 is
  calibrated per fact (``lambda2="auto"``, :func:`calibrated_update`); without them it is the
  paper's 8.
* ``erase_relation``: neurons shared by at least ``min_facts`` facts of a relation get their
  value slots set to the unknown-token embedding (``replacement="unk"``), or to zeros or the
  mean embedding; ``"auto"`` uses the unknown token when the tokenizer has one, else the mean.
* Multi-token targets: ``e(t)`` is the input embedding of the target's *first* token, the one
  predicted at the prediction position (rank and top-1 refer to it too).
"""

from kn_plugin.editing.edit import (
    EDIT_FORMAT,
    EditHandle,
    WeightEdit,
    check_model_folder,
    unchanged_since,
    weight_snapshot,
    write_edited_model,
)
from kn_plugin.editing.erase import erase_relation, neuron_shares, replacement_vector, shared_neurons
from kn_plugin.editing.slots import read_slots, token_embedding, write_slots
from kn_plugin.editing.update import (
    CONSTRAINED_CORPUS,
    CONSTRAINED_LADDER,
    LAMBDA2_LADDER,
    PAPER_LAMBDA2,
    activation_signs,
    calibrated_update,
    constrained_update,
    update_fact,
)

__all__ = [
    "CONSTRAINED_CORPUS", "CONSTRAINED_LADDER", "EDIT_FORMAT", "EditHandle", "LAMBDA2_LADDER", "PAPER_LAMBDA2", "WeightEdit",
    "activation_signs", "calibrated_update", "check_model_folder", "constrained_update", "erase_relation", "neuron_shares",
    "read_slots", "replacement_vector", "shared_neurons", "token_embedding", "unchanged_since", "update_fact",
    "weight_snapshot", "write_edited_model", "write_slots",
]
