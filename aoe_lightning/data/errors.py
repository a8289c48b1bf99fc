"""Exceptions for invalid data, tokenizers and prepared shards.

Every error is a ``ValueError`` (``DataFileNotFoundError`` is also a ``FileNotFoundError``), and every
message is one line that names the bad value and how to fix it.
"""


class DataError(ValueError):
    """Invalid corpus, tokenizer, manifest or shard."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A source file, prepared data folder or shard that does not exist."""


class EmptyCorpusError(DataError):
    """A source or corpus that contains no text."""


class CorpusTooSmallError(DataError):
    """A split with fewer tokens than one window of ``seq_len + 1`` tokens."""


class VocabSizeError(DataError):
    """A tokenizer vocabulary that does not fit the model's embedding."""


class TokenizerMismatchError(DataError):
    """A requested tokenizer that differs from the one the shards were written with."""


class TokenizerLoadError(DataError):
    """A tokenizer spec that names no usable tokenizer."""


class ManifestError(DataError):
    """A ``manifest.json`` that is missing, unreadable or malformed."""


class ShardIntegrityError(DataError):
    """A shard whose size or sha256 differs from the manifest."""


class OutputExistsError(DataError):
    """An output folder that already contains different prepared data."""
