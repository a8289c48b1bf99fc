"""Data pipeline: tokenizers, corpus reading, packed token shards and the LightningDataModule.

``TokenShardDataModule`` is imported lazily because importing Lightning takes several seconds, and the
export and evaluation code need only the tokenizers.
"""

from typing import Any

from aoe_lightning.data.errors import (
    CorpusTooSmallError,
    DataError,
    DataFileNotFoundError,
    EmptyCorpusError,
    ManifestError,
    OutputExistsError,
    ShardIntegrityError,
    TokenizerLoadError,
    TokenizerMismatchError,
    VocabSizeError,
)
from aoe_lightning.data.prepare import prepare_dataset
from aoe_lightning.data.shards import Manifest, load_manifest, load_manifest_tokenizer, verify_shards
from aoe_lightning.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    check_vocab_fits,
    load_tokenizer,
    tokenizer_from_dict,
    train_bpe_tokenizer,
)

__all__ = [
    "ByteTokenizer",
    "CorpusTooSmallError",
    "DataError",
    "DataFileNotFoundError",
    "EmptyCorpusError",
    "HFTokenizer",
    "Manifest",
    "ManifestError",
    "OutputExistsError",
    "ShardIntegrityError",
    "TokenShardDataModule",
    "Tokenizer",
    "TokenizerLoadError",
    "TokenizerMismatchError",
    "VocabSizeError",
    "check_vocab_fits",
    "load_manifest",
    "load_manifest_tokenizer",
    "load_tokenizer",
    "prepare_dataset",
    "tokenizer_from_dict",
    "train_bpe_tokenizer",
    "verify_shards",
]


def __getattr__(name: str) -> Any:
    if name == "TokenShardDataModule":
        from aoe_lightning.data.datamodule import TokenShardDataModule

        return TokenShardDataModule
    raise AttributeError(f"module 'aoe_lightning.data' has no attribute {name!r}")
