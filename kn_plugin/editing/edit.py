"""A weight edit as an object (:class:`WeightEdit`): applied and undone bit for bit through a
per-model stack, saved and loaded with the model's fingerprint."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kn_plugin.editing.slots import _first, read_slots, write_slots
from kn_plugin.errors import KnowledgeNeuronError
from kn_plugin.files import temp_path
from kn_plugin.models import LoadedModel, accepts_model, wrap
from kn_plugin.validation import integer, output_path

EDIT_FORMAT = 1


@dataclass
class EditHandle:
    """An applied edit; ``revert()`` takes it back, bit for bit, in any order.

    Edits applied to one model form a stack (:class:`_EditStack`): reverting one restores the
    original rows of every slot the active edits touch and re-applies the others in their
    order, so that any order of reverts ends on the original weights."""

    model: LoadedModel
    slots: list[tuple[int, int]]
    rows: torch.Tensor
    active: bool = True
    token: int = field(default_factory=lambda: next(_TOKENS), repr=False)

    def revert(self) -> None:
        if self.active:
            _EditStack.of(self.model).remove(self.model, self)
            self.active = False


_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_TOKENS = itertools.count()


class _EditStack:
    """Active edits of one model (their slots and rows) and the original rows of the slots
    they touch. It holds no reference to the model, so a dropped model is freed."""

    def __init__(self):
        self.active: list[tuple[int, list[tuple[int, int]], torch.Tensor]] = []  # (id of handle, slots, rows)
        self.original: dict[tuple[int, int], torch.Tensor] = {}

    @classmethod
    def of(cls, model: LoadedModel) -> _EditStack:
        """The stack of the Hugging Face module (shared by every wrapper of it)."""
        stack = _STACKS.get(model.hf_model)
        if stack is None:
            stack = _STACKS[model.hf_model] = cls()
        return stack

    def push(self, model: LoadedModel, handle: EditHandle) -> None:
        new = [s for s in dict.fromkeys(handle.slots) if s not in self.original]
        if new:
            for slot, row in zip(new, read_slots(model, new)):
                self.original[slot] = row
        try:
            write_slots(model, handle.slots, handle.rows)
        except BaseException:
            self._restore(model)
            raise
        self.active.append((handle.token, handle.slots, handle.rows))

    def remove(self, model: LoadedModel, handle: EditHandle) -> None:
        self.active = [e for e in self.active if e[0] != handle.token]
        self._restore(model)

    def _restore(self, model: LoadedModel) -> None:
        slots = list(self.original)
        if slots:
            write_slots(model, slots, torch.stack([self.original[s] for s in slots]))
        for _, edit_slots, rows in self.active:
            write_slots(model, edit_slots, rows)
        touched = {s for _, edit_slots, _ in self.active for s in edit_slots}
        self.original = {s: r for s, r in self.original.items() if s in touched}


@dataclass
class WeightEdit:
    """New values for some value slots (and the values they replace)."""

    model: str
    n_layers: int
    d_mlp: int
    slots: list[tuple[int, int]]
    old: torch.Tensor  # [n, d_model]
    new: torch.Tensor  # [n, d_model]
    kind: str
    meta: dict = field(default_factory=dict)
    #: :attr:`LoadedModel.fingerprint` of the model the edit was made for
    fingerprint: str | None = None
    #: :attr:`LoadedModel.signature` of that model (its identity in every dtype)
    signature: str | None = None

    def check(self, model) -> None:
        model = wrap(model)
        if self.fingerprint is not None and not model.made(self.fingerprint, self.signature):
            raise KnowledgeNeuronError(
                f"this edit was made for {self.model} ({self.fingerprint}), not for {model.name} "
                f"({model.fingerprint})"
            )
        if (model.n_layers, model.d_mlp) != (self.n_layers, self.d_mlp) or (
            self.slots and self.new.dim() == 2 and self.new.shape[1] != model.adapter.d_model
        ):
            raise KnowledgeNeuronError(
                f"this edit was made for {self.model} ({self.n_layers} layers x {self.d_mlp} neurons), "
                f"not for {model.name} ({model.n_layers} x {model.d_mlp})"
            )
        for layer, index in self.slots:  # a crafted or damaged edit file is refused before any write
            if not (0 <= layer < model.n_layers and 0 <= index < model.d_mlp):
                raise KnowledgeNeuronError(f"the edit's value slot ({layer}, {index}) is out of range "
                                           f"0..{model.n_layers - 1} x 0..{model.d_mlp - 1}")
        shape = (len(self.slots), model.adapter.d_model)
        for name in ("old", "new") if self.slots else ():
            rows = getattr(self, name)
            if not isinstance(rows, torch.Tensor) or tuple(rows.shape) != shape or not rows.is_floating_point():
                raise KnowledgeNeuronError(f"the edit's {name!r} rows must be a float tensor of shape {list(shape)}, "
                                           f"got {getattr(rows, 'shape', type(rows).__name__)}")
            if not bool(torch.isfinite(rows).all()):
                raise KnowledgeNeuronError(f"the edit's {name!r} rows hold NaN or infinite values")

    def apply(self, model, tokenizer=None) -> EditHandle:
        """Write the new values; the returned handle undoes it. ``model``: anything
        :func:`kn_plugin.wrap` takes."""
        model = wrap(model, tokenizer=tokenizer)
        self.check(model)
        handle = EditHandle(model, list(self.slots), self.new)
        if self.slots:
            _EditStack.of(model).push(model, handle)
        return handle

    @contextmanager
    def applied(self, model, tokenizer=None) -> Iterator[EditHandle]:
        handle = self.apply(model, tokenizer=tokenizer)
        try:
            yield handle
        finally:
            handle.revert()

    def save(self, path: str | Path) -> Path:
        path = output_path(path, "edit file")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": EDIT_FORMAT, "model": self.model, "n_layers": self.n_layers,
                    "d_mlp": self.d_mlp, "slots": self.slots, "old": self.old, "new": self.new,
                    "kind": self.kind, "meta": self.meta, "fingerprint": self.fingerprint,
                    "signature": self.signature}, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> WeightEdit:
        if not Path(path).is_file():
            raise KnowledgeNeuronError(f"cannot read edit file {path}: no such file")
        try:
            data = torch.load(Path(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises many types on a file that is not its own
            raise KnowledgeNeuronError(f"{path} is not a kn_plugin edit file ({type(exc).__name__})") from None
        if not isinstance(data, dict) or data.get("format") != EDIT_FORMAT:
            raise KnowledgeNeuronError(f"{path} is not a kn_plugin edit file")
        try:
            slots = [(integer("a slot's layer", s[0]), integer("a slot's index", s[1])) for s in data["slots"]]
            if any(len(s) != 2 for s in data["slots"]):
                raise TypeError("a slot is a (layer, index) pair")
            edit = cls(data["model"], data["n_layers"], data["d_mlp"], slots, data["old"], data["new"],
                       data["kind"], data["meta"], data["fingerprint"], data.get("signature"))
        except (KeyError, TypeError, IndexError, KnowledgeNeuronError) as exc:
            raise KnowledgeNeuronError(f"{path}: incomplete or damaged edit file ({_first(exc)})") from None
        if not isinstance(edit.fingerprint, str):
            raise KnowledgeNeuronError(f"{path}: the edit file names no model fingerprint")
        return edit


@accepts_model(freeze=False)
def weight_snapshot(model: LoadedModel) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(live tensor, copy) for every parameter and buffer, to check later that nothing changed.

    Holds the tensors themselves, so it survives TransformerLens wrapping the modules (which
    renames ``state_dict`` keys)."""
    seen, out = set(), []
    for t in itertools.chain(model.hf_model.parameters(), model.hf_model.buffers()):
        key = (t.data_ptr(), tuple(t.shape), t.stride())
        if key not in seen:
            seen.add(key)
            out.append((t, t.detach().clone()))
    return out


def unchanged_since(snapshot: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """True when every tensor of ``weight_snapshot`` is bit-identical to its copy."""
    return all(torch.equal(t, copy) for t, copy in snapshot)


#: the file ``write_edited_model`` puts in every folder it writes (and the mark it replaces only such folders by)
EDITED_MODEL_RECORD = "kn_plugin_edit.json"


def check_model_folder(out: str | Path, force: bool = False) -> Path:
    """``out`` as :func:`write_edited_model` may write it: new or empty, or (with ``force``) a
    folder it wrote before; anything else is refused in one line, before any model is loaded."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise KnowledgeNeuronError(f"--out {out} exists and is not empty: kn writes an edited model only into a "
                                       "new folder (--force replaces a folder an earlier `kn edit apply` wrote)")
        if not (out / EDITED_MODEL_RECORD).is_file():
            raise KnowledgeNeuronError(f"--out {out} was not written by `kn edit apply` (no {EDITED_MODEL_RECORD}): "
                                       "kn does not replace it, even with --force")
    return out


@accepts_model(freeze=False)
def write_edited_model(model: LoadedModel, edit: WeightEdit, out: str | Path, force: bool = False,
                       source: str | None = None) -> Path:
    """The model with ``edit`` applied, written as a Hugging Face folder ``out`` (config, weights,
    tokenizer and :data:`EDITED_MODEL_RECORD`); the model itself is left unedited.

    ``out`` must be new or empty; ``force`` replaces only a folder this function wrote before.
    The folder is written beside ``out`` and moved into place, so a kill leaves either the old
    folder or the new one, never a half-written model. ``source``: where the edit came from."""
    out = check_model_folder(out, force)
    edit.check(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    try:
        with edit.applied(model):
            model.hf_model.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        (tmp / EDITED_MODEL_RECORD).write_text(json.dumps({
            "base_model": model.name, "base_fingerprint": model.fingerprint, "edit": source,
            "kind": edit.kind, "slots": edit.slots, **{k: v for k, v in edit.meta.items() if k != "skipped"},
        }, indent=2, default=str))
        old = None
        if out.exists():
            old = temp_path(out, ".old")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
