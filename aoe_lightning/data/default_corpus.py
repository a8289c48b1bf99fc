"""The built-in training corpus: the Python documentation topics that ship with every CPython install.

``pydoc_data.topics.topics`` maps each help topic (``"assignment"``, ``"while"``, ...) to plain English
text from the language reference. It lets a fresh machine train without downloads. It is small
(466,117 UTF-8 bytes in 79 topics for CPython 3.11.7), so it suits smoke tests and demos, not real
pre-training. Its text differs between Python versions, so the manifest records the Python version and a
sha256 of the text.
"""

from __future__ import annotations

from aoe_lightning.data.errors import EmptyCorpusError


def default_documents() -> list[str]:
    """Return the documentation topics, one document each, in sorted topic order."""
    try:
        from pydoc_data.topics import topics
    except ImportError as error:
        raise EmptyCorpusError(
            "the default corpus needs the standard-library module pydoc_data, which this Python install lacks; "
            "install the full Python standard library or pass --source with your own text"
        ) from error
    return [topics[name] for name in sorted(topics) if topics[name].strip()]
