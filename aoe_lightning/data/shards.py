"""Packed token shards and their manifest.

A prepared data folder contains:

- ``train-00000.bin``, ``train-00001.bin``, ... and ``val-00000.bin``, ...: raw little-endian ``uint16``
  (vocab_size <= 65536) or ``uint32`` token ids with no header, readable with
  ``np.memmap(path, dtype=manifest.dtype, mode="r")``. Documents are packed back to back and every
  document is followed by one end-of-text id.
- ``tokenizer.json`` for Hugging Face tokenizers (absent for the byte tokenizer).
- ``manifest.json``: the format version, the prepare settings, the tokenizer, the dtype, token and
  document counts per split, the sources with sha256 checksums of the input files, and every shard file
  with its token count, byte size and sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aoe_lightning.data.errors import DataFileNotFoundError, ManifestError, ShardIntegrityError
from aoe_lightning.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FORMAT = "aoe-lightning-token-shards"
MANIFEST_FORMAT_VERSION = 1
SPLITS = ("train", "val")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Return the smallest unsigned dtype that contains every id in ``[0, vocab_size)``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class ShardInfo:
    """One shard file: its name inside the data folder, token count, byte size and sha256."""

    file: str
    num_tokens: int
    num_bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    """Token and document totals of one split and its shards, in reading order."""

    num_tokens: int
    num_documents: int
    shards: list[ShardInfo]


@dataclass(frozen=True)
class Manifest:
    """Contents of ``manifest.json``."""

    vocab_size: int
    eos_id: int
    dtype: str
    tokenizer: dict[str, Any]  # {"type": "byte"} or {"type": "huggingface", "file", "sha256", "eos_token"}
    splits: dict[str, SplitInfo]
    sources: list[dict[str, Any]]
    config: dict[str, Any]  # the prepare settings, compared before an output folder is reused
    format: str = MANIFEST_FORMAT
    format_version: int = MANIFEST_FORMAT_VERSION
    created_by: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest") -> Manifest:
        if not isinstance(data, dict):
            raise ManifestError(f"{where} is a JSON {type(data).__name__}, not an object; prepare the data again")
        if data.get("format") != MANIFEST_FORMAT:
            raise ManifestError(
                f"{where} has format {data.get('format')!r}, expected {MANIFEST_FORMAT!r}; "
                "prepare the data with `aoe data prepare`"
            )
        if data.get("format_version") != MANIFEST_FORMAT_VERSION:
            raise ManifestError(
                f"{where} has format_version {data.get('format_version')!r}, this version reads "
                f"{MANIFEST_FORMAT_VERSION}; prepare the data again with this version"
            )
        try:
            splits = {
                name: SplitInfo(
                    num_tokens=int(split["num_tokens"]),
                    num_documents=int(split["num_documents"]),
                    shards=[ShardInfo(**shard) for shard in split["shards"]],
                )
                for name, split in data["splits"].items()
            }
            manifest = cls(
                vocab_size=int(data["vocab_size"]),
                eos_id=int(data["eos_id"]),
                dtype=str(data["dtype"]),
                tokenizer=dict(data["tokenizer"]),
                splits=splits,
                sources=list(data["sources"]),
                config=dict(data["config"]),
                created_by=dict(data.get("created_by", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ManifestError(
                f"{where} is malformed ({type(error).__name__}: {error}); prepare the data again"
            ) from error
        missing = [name for name in SPLITS if name not in splits]
        if missing:
            raise ManifestError(f"{where} lacks the split(s) {missing}; prepare the data again")
        if manifest.dtype not in ("uint16", "uint32"):
            raise ManifestError(f"{where} has dtype {manifest.dtype!r}, expected 'uint16' or 'uint32'")
        return manifest


def manifest_json(manifest: Manifest) -> str:
    """Serialise the manifest deterministically (sorted keys, fixed indentation)."""
    return json.dumps(manifest.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def load_manifest(data_dir: str | Path) -> Manifest:
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataFileNotFoundError(
            f"{str(path)!r} does not exist; prepare the folder with `aoe data prepare --out {data_dir}`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(
            f"{str(path)!r} could not be read ({type(error).__name__}: {error}); prepare the data again "
            "with --overwrite"
        ) from error
    return Manifest.from_dict(data, where=str(path))


def verify_shards(data_dir: str | Path, manifest: Manifest, checksums: bool = True) -> None:
    """Raise ``ShardIntegrityError`` unless every shard (and tokenizer file) has the manifest's size and sha256.

    Sizes are always checked. ``checksums=False`` skips hashing, which reads every byte of the data.
    """
    data_dir = Path(data_dir)
    files = [shard for split in manifest.splits.values() for shard in split.shards]
    itemsize = np.dtype(manifest.dtype).itemsize
    for shard in files:
        path = data_dir / shard.file
        if not path.is_file():
            raise DataFileNotFoundError(
                f"shard {str(path)!r} listed in the manifest does not exist; prepare the data again with --overwrite"
            )
        size = path.stat().st_size
        if size != shard.num_bytes or size != shard.num_tokens * itemsize:
            raise ShardIntegrityError(
                f"shard {str(path)!r} has {size} bytes, the manifest expects {shard.num_bytes} "
                f"({shard.num_tokens} tokens of {manifest.dtype}); prepare the data again with --overwrite"
            )
    if not checksums:
        return
    from aoe_lightning.data.corpus import file_sha256

    for shard in files:
        actual = file_sha256(data_dir / shard.file)
        if actual != shard.sha256:
            raise ShardIntegrityError(
                f"shard {str(data_dir / shard.file)!r} has sha256 {actual}, the manifest expects {shard.sha256}; "
                "prepare the data again with --overwrite"
            )
    if manifest.tokenizer.get("type") == "huggingface":
        path = data_dir / manifest.tokenizer["file"]
        if not path.is_file() or file_sha256(path) != manifest.tokenizer["sha256"]:
            raise ShardIntegrityError(
                f"tokenizer file {str(path)!r} is missing or its sha256 differs from the manifest; prepare "
                "the data again with --overwrite"
            )


def load_manifest_tokenizer(data_dir: str | Path, manifest: Manifest) -> Tokenizer:
    """Build the tokenizer that the shards were written with."""
    kind = manifest.tokenizer.get("type")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "huggingface":
        path = Path(data_dir) / manifest.tokenizer["file"]
        if not path.is_file():
            raise DataFileNotFoundError(
                f"tokenizer file {str(path)!r} listed in the manifest does not exist; prepare the data again"
            )
        return HFTokenizer.from_file(path, manifest.tokenizer["eos_token"])
    raise ManifestError(f"manifest tokenizer type {kind!r} is unknown; expected 'byte' or 'huggingface'")


def open_split(data_dir: str | Path, manifest: Manifest, split: str) -> list[np.memmap]:
    """Memory-map the shards of ``split`` ("train" or "val"), skipping empty ones."""
    dtype = np.dtype(manifest.dtype).newbyteorder("<")
    return [
        np.memmap(Path(data_dir) / shard.file, dtype=dtype, mode="r", shape=(shard.num_tokens,))
        for shard in manifest.splits[split].shards
        if shard.num_tokens > 0
    ]


class ShardWriter:
    """Writes one split as a sequence of shard files of at most ``shard_size_tokens`` tokens.

    ``add_document`` appends a document's ids. A document whose ``continues`` flag is set is a later
    piece of the same source document as the previous piece written to this split, so no end-of-text
    id separates the two. Every other document starts after an end-of-text id, and ``close()`` writes
    the final one, so each document in the shards is followed by exactly one end-of-text id.
    """

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, eos_id: int, shard_size_tokens: int) -> None:
        self.out_dir = out_dir
        self.split = split
        self.dtype = np.dtype(dtype)
        self.eos_id = eos_id
        self.shard_size_tokens = shard_size_tokens
        self.num_tokens = 0
        self.num_documents = 0
        self.shards: list[ShardInfo] = []
        self._open_document = False
        self._handle: Any = None
        self._digest: Any = None
        self._shard_tokens = 0

    def add_document(self, ids: np.ndarray, continues: bool = False) -> None:
        if self._open_document and not continues:
            self._write(np.array([self.eos_id], dtype=self.dtype))
            self.num_documents += 1
        self._write(ids.astype(self.dtype, copy=False))
        self._open_document = True

    def close(self) -> SplitInfo:
        if self._open_document:
            self._write(np.array([self.eos_id], dtype=self.dtype))
            self.num_documents += 1
            self._open_document = False
        self._close_shard()
        return SplitInfo(num_tokens=self.num_tokens, num_documents=self.num_documents, shards=list(self.shards))

    def _write(self, ids: np.ndarray) -> None:
        start = 0
        while start < len(ids):
            if self._handle is None:
                self._open_shard()
            take = min(len(ids) - start, self.shard_size_tokens - self._shard_tokens)
            data = ids[start : start + take].astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
            self._handle.write(data)
            self._digest.update(data)
            self._shard_tokens += take
            self.num_tokens += take
            start += take
            if self._shard_tokens == self.shard_size_tokens:
                self._close_shard()

    def _open_shard(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._handle = open(self.out_dir / name, "wb")
        self._digest = hashlib.sha256()
        self._shard_tokens = 0
        self._name = name

    def _close_shard(self) -> None:
        if self._handle is None:
            return
        self._handle.close()
        self.shards.append(
            ShardInfo(
                file=self._name,
                num_tokens=self._shard_tokens,
                num_bytes=self._shard_tokens * self.dtype.itemsize,
                sha256=self._digest.hexdigest(),
            )
        )
        self._handle = None
