"""Exception type raised for invalid input anywhere in kn_plugin."""

from __future__ import annotations


class KnowledgeNeuronError(ValueError):
    """Bad input: an unknown model, an empty prompt, an out-of-range threshold, ...

    It subclasses :class:`ValueError`, so ``except ValueError`` catches it too. The message
    is a single line meant for people; the ``kn`` CLI prints it without a traceback.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): how kn
    quotes an error from a library inside its own one-line message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
