"""Tokenizers shared by data preparation, the export and the evaluation adapter.

Every tokenizer implements the :class:`Tokenizer` protocol. ``to_dict()`` returns a JSON-serialisable dict
that :func:`tokenizer_from_dict` turns back into an identical tokenizer without reading files or the
network, so checkpoints and exports carry their tokenizer inside them.

Two kinds exist:

- ``ByteTokenizer``: UTF-8 bytes as ids 0-255 and id 256 as end of text. It needs no training or download.
- ``HFTokenizer``: any ``tokenizers.Tokenizer`` (a byte-level BPE trained on the corpus, a ``tokenizer.json``
  file or a Hugging Face hub tokenizer) plus the name of its end-of-text token. Its dict embeds the
  tokenizer's full JSON.

Both use the end-of-text id as ``bos_id`` too, because packed shards put that id, and nothing else,
before every document.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from aoe_lightning.data.errors import DataError, TokenizerLoadError, VocabSizeError

logger = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"
# End-of-text names tried, in this order, when a tokenizer.json or hub tokenizer is loaded without an
# explicit eos_token.
EOS_TOKEN_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]")


@runtime_checkable
class Tokenizer(Protocol):
    """Interface that the data pipeline, the export and the evaluation adapter rely on."""

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (every id is in ``[0, vocab_size)``)."""
        ...

    @property
    def eos_id(self) -> int:
        """End-of-document id, inserted between packed documents."""
        ...

    @property
    def bos_id(self) -> int:
        """Id that conditions an empty context."""
        ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, with id 256 as end of text (vocab_size 257)."""

    vocab_size = 257
    eos_id = 256
    bos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Decode byte ids to text, dropping the end-of-text id and replacing invalid UTF-8 with U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"type": "byte"}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash("byte")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eos_id=256)"


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` plus the end-of-text token that separates packed documents.

    Special tokens that appear literally in the input text are encoded as ordinary text, so a corpus that
    contains the string ``<|endoftext|>`` cannot inject an end-of-text id.
    """

    def __init__(self, tokenizer: Any, eos_token: str) -> None:
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise TokenizerLoadError(
                f"eos_token {eos_token!r} is not in the tokenizer's vocabulary; pass one of its special tokens "
                "as the end-of-text token"
            )
        self._tokenizer = tokenizer
        self._tokenizer.encode_special_tokens = True
        self._eos_token = eos_token
        self._eos_id = int(eos_id)
        # Ids need not be contiguous when added tokens sit above the base vocabulary.
        self._vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    @classmethod
    def from_str(cls, tokenizer_json: str, eos_token: str | None = None) -> HFTokenizer:
        from tokenizers import Tokenizer as _Tokenizer

        tokenizer = _Tokenizer.from_str(tokenizer_json)
        return cls(tokenizer, eos_token or _find_eos_token(tokenizer, "the tokenizer JSON"))

    @classmethod
    def from_file(cls, path: str | Path, eos_token: str | None = None) -> HFTokenizer:
        from tokenizers import Tokenizer as _Tokenizer

        try:
            tokenizer = _Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for malformed files
            raise TokenizerLoadError(
                f"tokenizer file {str(path)!r} could not be read ({error}); pass a tokenizer.json written by "
                "the Hugging Face tokenizers library"
            ) from error
        return cls(tokenizer, eos_token or _find_eos_token(tokenizer, str(path)))

    @classmethod
    def from_pretrained(cls, name: str, eos_token: str | None = None) -> HFTokenizer:
        """Download ``name`` from the Hugging Face hub (needs network access or a populated HF cache)."""
        from tokenizers import Tokenizer as _Tokenizer

        try:
            tokenizer = _Tokenizer.from_pretrained(name)
        except Exception as error:  # network, missing repository or missing tokenizer.json
            raise TokenizerLoadError(
                f"tokenizer {name!r} is not 'byte', 'bpe', an existing file or folder, or a Hugging Face hub "
                f"tokenizer that could be downloaded ({type(error).__name__}: {error}); check the name and the "
                "network, or pass a local tokenizer.json"
            ) from error
        return cls(tokenizer, eos_token or _find_eos_token(tokenizer, name))

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def bos_id(self) -> int:
        return self._eos_id

    @property
    def eos_token(self) -> str:
        return self._eos_token

    @property
    def backend(self) -> Any:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text, dropping the end-of-text id and other special tokens."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        self._tokenizer.save(str(path))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "huggingface", "tokenizer_json": self._tokenizer.to_str(), "eos_token": self._eos_token}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFTokenizer) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tokenizer_fingerprint(self))

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, eos_token={self._eos_token!r}, eos_id={self._eos_id})"


def _find_eos_token(tokenizer: Any, where: str) -> str:
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    for candidate in EOS_TOKEN_CANDIDATES:
        if candidate in vocab:
            return candidate
    raise TokenizerLoadError(
        f"tokenizer {where!r} has none of the usual end-of-text tokens {list(EOS_TOKEN_CANDIDATES)}; "
        "pass its end-of-text token explicitly (--eos-token)"
    )


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, length: int | None = None) -> HFTokenizer:
    """Train a byte-level BPE on ``texts`` with ``<|endoftext|>`` as its only special token.

    The initial alphabet contains all 256 byte symbols, so every string round-trips through encode/decode.
    ``vocab_size`` counts the 256 byte symbols, the end-of-text token and the merges; a small corpus can
    end with fewer tokens than requested. ``length`` is only used for the progress estimate.
    """
    from tokenizers import Tokenizer as _Tokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    minimum = 256 + 1
    if vocab_size < minimum:
        raise VocabSizeError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE; use at least {minimum} "
            "(256 byte symbols + the end-of-text token)"
        )
    tokenizer = _Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    trained = HFTokenizer(tokenizer, END_OF_TEXT)
    logger.info("trained byte-level BPE: %d tokens (requested %d)", trained.vocab_size, vocab_size)
    return trained


def tokenizer_from_dict(config: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from its ``to_dict()`` output, without touching files or the network."""
    if not isinstance(config, dict) or "type" not in config:
        raise DataError(f"tokenizer dict {config!r} has no 'type' key; pass the output of Tokenizer.to_dict()")
    kind = config["type"]
    if kind == "byte":
        return ByteTokenizer()
    if kind == "huggingface":
        missing = [key for key in ("tokenizer_json", "eos_token") if key not in config]
        if missing:
            raise DataError(f"huggingface tokenizer dict lacks {missing}; pass the output of Tokenizer.to_dict()")
        return HFTokenizer.from_str(config["tokenizer_json"], config["eos_token"])
    raise DataError(f"tokenizer type {kind!r} is unknown; expected 'byte' or 'huggingface'")


def load_tokenizer(spec: str, eos_token: str | None = None) -> Tokenizer:
    """Load a tokenizer from ``spec``.

    ``spec`` is one of: ``"byte"``; a prepared data folder (its manifest names the tokenizer, which is
    how a BPE trained by ``aoe data prepare --tokenizer bpe`` is loaded); a folder holding
    ``tokenizer.json``; a ``tokenizer.json`` file; or a Hugging Face hub name (downloads it).
    ``eos_token`` overrides the end-of-text token of a ``tokenizer.json`` or hub tokenizer.
    """
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        raise TokenizerLoadError(
            "tokenizer 'bpe' is trained while preparing data; to load it, pass the prepared data folder or "
            "the tokenizer.json inside it"
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        from aoe_lightning.data.shards import MANIFEST_NAME, load_manifest, load_manifest_tokenizer

        if (path / MANIFEST_NAME).is_file():
            return load_manifest_tokenizer(path, load_manifest(path))
        if (path / "tokenizer.json").is_file():
            return HFTokenizer.from_file(path / "tokenizer.json", eos_token)
        raise TokenizerLoadError(
            f"folder {spec!r} has neither manifest.json nor tokenizer.json; pass a prepared data folder "
            "or a tokenizer.json file"
        )
    if path.is_file():
        return HFTokenizer.from_file(path, eos_token)
    if path.suffix == ".json" or spec.startswith((".", "/", "~")):
        raise TokenizerLoadError(f"tokenizer file {spec!r} does not exist; check the path")
    return HFTokenizer.from_pretrained(spec, eos_token)


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """Return the sha256 of the tokenizer's canonical ``to_dict()`` JSON."""
    canonical = json.dumps(tokenizer.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_vocab_fits(tokenizer_vocab_size: int, model_vocab_size: int) -> None:
    """Raise ``VocabSizeError`` if the tokenizer can emit ids that the model's embedding has no row for."""
    if tokenizer_vocab_size > model_vocab_size:
        raise VocabSizeError(
            f"tokenizer vocab_size={tokenizer_vocab_size} exceeds the model's vocab_size={model_vocab_size}; "
            f"set the model's vocab_size to at least {tokenizer_vocab_size}"
        )
