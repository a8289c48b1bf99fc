"""``aoe data prepare``: tokenize sources into packed train/validation shards with a manifest.

Pipeline:

1. Read documents from every source in order (:mod:`aoe_lightning.data.corpus`) and cut documents longer
   than ``max_document_chars`` into pieces at line breaks, so that even a single large file can be split.
2. Assign each piece to the validation split with probability ``val_fraction``, from a hash of
   ``(seed, piece number)``. The assignment depends only on the seed and the order of the text, not on
   the tokenizer, and needs no second pass over a streamed dataset.
3. For ``--tokenizer bpe``, cache the pieces in a temporary file and train a byte-level BPE on the
   training pieces only.
4. Tokenize and pack each split into shards (:class:`aoe_lightning.data.shards.ShardWriter`). Consecutive
   pieces of one document that land in the same split stay joined, and each document is followed by
   one end-of-text id.
5. Write the shards into a temporary folder, then move them into place and write ``manifest.json`` last.

With the same package versions, the same inputs and settings give byte-identical shards and manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from aoe_lightning.data.corpus import Source, file_sha256, resolve_source, split_document
from aoe_lightning.data.errors import (
    CorpusTooSmallError,
    DataError,
    EmptyCorpusError,
    ManifestError,
    OutputExistsError,
)
from aoe_lightning.data.shards import (
    MANIFEST_NAME,
    TOKENIZER_FILE,
    Manifest,
    ShardWriter,
    SplitInfo,
    dtype_for_vocab,
    load_manifest,
    manifest_json,
)
from aoe_lightning.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer, train_bpe_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_VAL_FRACTION = 0.05
DEFAULT_SEED = 1234
DEFAULT_MAX_DOCUMENT_CHARS = 16_384
DEFAULT_SHARD_SIZE_TOKENS = 1 << 27  # 256 MiB of uint16 per shard
ENCODE_BATCH_SIZE = 64


@dataclass(frozen=True)
class PrepareConfig:
    """Settings of one prepare run. Everything except the output folder and the size checks goes into the manifest."""

    sources: list[str]
    out_dir: str
    tokenizer: str = "byte"  # "byte", "bpe", a tokenizer.json path, a prepared data folder or a hub name
    vocab_size: int | None = None  # BPE vocabulary size; required with tokenizer="bpe"
    eos_token: str | None = None  # end-of-text token of a tokenizer.json or hub tokenizer; None: detect it
    text_field: str = "text"  # JSONL / Parquet / Hugging Face field that contains the text
    hf_split: str = "train"  # split of hf: sources
    val_fraction: float = DEFAULT_VAL_FRACTION  # probability that a document piece goes to validation
    seed: int = DEFAULT_SEED  # seed of the train/validation assignment
    max_documents: int | None = None  # stop after this many source documents
    max_tokens: int | None = None  # stop after the piece that reaches this many tokens (bytes for bpe)
    max_document_chars: int = DEFAULT_MAX_DOCUMENT_CHARS  # longer documents are cut into pieces
    shard_size_tokens: int = DEFAULT_SHARD_SIZE_TOKENS  # maximum tokens per shard file
    min_split_tokens: int = 1  # each split must contain at least this many tokens (seq_len + 1 for training)

    def validate(self) -> None:
        """Raise one ``DataError`` that lists every invalid setting."""
        problems = []
        if not self.sources:
            problems.append("sources is empty (pass at least one --source, e.g. --source default)")
        if not 0.0 < self.val_fraction < 1.0:
            problems.append(f"val_fraction={self.val_fraction} must be in (0, 1)")
        if self.tokenizer == "bpe" and self.vocab_size is None:
            problems.append("tokenizer='bpe' needs vocab_size (--vocab-size), e.g. 4096")
        if self.tokenizer != "bpe" and self.vocab_size is not None:
            problems.append(f"vocab_size={self.vocab_size} applies only to tokenizer='bpe', not {self.tokenizer!r}")
        if self.vocab_size is not None and self.vocab_size < 257:
            problems.append(f"vocab_size={self.vocab_size} must be >= 257 (256 byte symbols + end of text)")
        for name in ("max_documents", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name}={value} must be >= 1 or None")
        for name in ("max_document_chars", "shard_size_tokens", "min_split_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if problems:
            raise DataError("invalid prepare settings: " + "; ".join(problems))

    def manifest_config(self, resolved_sources: list[str]) -> dict[str, Any]:
        config = asdict(self)
        del config["out_dir"], config["min_split_tokens"]
        config["sources"] = resolved_sources
        return config


@dataclass(frozen=True)
class _Piece:
    source_index: int
    document_index: int
    piece_index: int  # position of this piece inside its document
    is_validation: bool
    text: str


def prepare_dataset(
    sources: Sequence[str],
    out_dir: str | Path,
    *,
    tokenizer: str = "byte",
    vocab_size: int | None = None,
    eos_token: str | None = None,
    text_field: str = "text",
    hf_split: str = "train",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SEED,
    max_documents: int | None = None,
    max_tokens: int | None = None,
    max_document_chars: int = DEFAULT_MAX_DOCUMENT_CHARS,
    shard_size_tokens: int = DEFAULT_SHARD_SIZE_TOKENS,
    min_split_tokens: int = 1,
    overwrite: bool = False,
) -> Manifest:
    """Prepare ``sources`` into ``out_dir`` and return the manifest (see the module docstring).

    An ``out_dir`` that already contains prepared data is left unchanged when the new manifest would be
    identical. Different prepared data raises ``OutputExistsError`` unless ``overwrite`` is set.
    """
    config = PrepareConfig(
        sources=list(sources),
        out_dir=str(out_dir),
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        eos_token=eos_token,
        text_field=text_field,
        hf_split=hf_split,
        val_fraction=val_fraction,
        seed=seed,
        max_documents=max_documents,
        max_tokens=max_tokens,
        max_document_chars=max_document_chars,
        shard_size_tokens=shard_size_tokens,
        min_split_tokens=min_split_tokens,
    )
    config.validate()
    resolved = [resolve_source(spec, text_field, hf_split) for spec in config.sources]
    manifest_config = config.manifest_config([source.spec for source in resolved])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = _existing_manifest(out, manifest_config, overwrite)

    work_dir = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out))
    try:
        manifest = _build(config, manifest_config, resolved, work_dir)
        if existing is not None and _same_data(existing, manifest):
            logger.info("%s already contains identical prepared data; nothing was written", out)
            return existing
        if existing is not None and not overwrite:
            raise OutputExistsError(
                f"{str(out)!r} contains prepared data from different input (the sources' content changed); "
                "pass --overwrite to replace it or choose another --out"
            )
        _install(work_dir, out, manifest, existing)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return manifest


def _existing_manifest(out: Path, manifest_config: dict[str, Any], overwrite: bool) -> Manifest | None:
    """Return the manifest already in ``out``, raising early when it cannot be reused or replaced."""
    if not (out / MANIFEST_NAME).exists():
        return None
    try:
        existing = load_manifest(out)
    except ManifestError:
        if overwrite:
            logger.warning("replacing the unreadable %s", out / MANIFEST_NAME)
            return None
        raise
    if existing.config != manifest_config and not overwrite:
        keys = set(existing.config) | set(manifest_config)
        changed = sorted(key for key in keys if existing.config.get(key) != manifest_config.get(key))
        raise OutputExistsError(
            f"{str(out)!r} already contains data prepared with different settings ({', '.join(changed)}); "
            "pass --overwrite to replace it or choose another --out"
        )
    return existing


def _same_data(left: Manifest, right: Manifest) -> bool:
    # The package version does not change the data, so it does not make two preparations different.
    return {**left.to_dict(), "created_by": None} == {**right.to_dict(), "created_by": None}


def _install(work_dir: Path, out: Path, manifest: Manifest, existing: Manifest | None) -> None:
    """Move the new files from ``work_dir`` into ``out`` and write the manifest last."""
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    new_files = [shard.file for split in manifest.splits.values() for shard in split.shards]
    if manifest.tokenizer.get("type") == "huggingface":
        new_files.append(manifest.tokenizer["file"])
    if existing is not None:
        old_files = [shard.file for split in existing.splits.values() for shard in split.shards]
        if existing.tokenizer.get("type") == "huggingface":
            old_files.append(existing.tokenizer["file"])
        for name in set(old_files) - set(new_files):
            (out / name).unlink(missing_ok=True)
    for name in new_files:
        os.replace(work_dir / name, out / name)
    temporary = out / (MANIFEST_NAME + ".tmp")
    temporary.write_text(manifest_json(manifest), encoding="utf-8")
    os.replace(temporary, out / MANIFEST_NAME)


def _build(config: PrepareConfig, manifest_config: dict[str, Any], sources: list[Source], work_dir: Path) -> Manifest:
    """Read, split, tokenize and pack into ``work_dir``; return the manifest for those files."""
    if config.tokenizer == "bpe":
        cache_path = work_dir / "pieces.cache"
        with open(cache_path, "wb") as cache:
            for piece in _iter_pieces(sources, config, max_bytes=config.max_tokens):
                _write_cached_piece(cache, piece)
        assert config.vocab_size is not None  # checked by PrepareConfig.validate
        tokenizer: Tokenizer = train_bpe_tokenizer(
            (piece.text for piece in _read_cached_pieces(cache_path) if not piece.is_validation),
            config.vocab_size,
        )
        pieces: Iterable[_Piece] = _read_cached_pieces(cache_path)
        token_cap = None
    else:
        tokenizer = load_tokenizer(config.tokenizer, config.eos_token)
        pieces = _iter_pieces(sources, config, max_bytes=None)
        token_cap = config.max_tokens

    dtype = dtype_for_vocab(tokenizer.vocab_size)
    writers = {
        split: ShardWriter(work_dir, split, dtype, tokenizer.eos_id, config.shard_size_tokens)
        for split in ("train", "val")
    }
    source_stats = _pack(pieces, tokenizer, writers, token_cap, len(sources))
    splits = {split: writer.close() for split, writer in writers.items()}
    _check_split_sizes(config, splits)

    if isinstance(tokenizer, HFTokenizer):
        tokenizer.save(work_dir / TOKENIZER_FILE)
        tokenizer_entry: dict[str, Any] = {
            "type": "huggingface",
            "file": TOKENIZER_FILE,
            "sha256": file_sha256(work_dir / TOKENIZER_FILE),
            "eos_token": tokenizer.eos_token,
        }
    else:
        tokenizer_entry = tokenizer.to_dict()

    source_records = []
    for source, stats in zip(sources, source_stats):
        record = source.record()
        record["documents"] = stats["documents"]
        record["content_sha256"] = stats["digest"].hexdigest()
        source_records.append(record)
    manifest = Manifest(
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        dtype=dtype.name,
        tokenizer=tokenizer_entry,
        splits=splits,
        sources=source_records,
        config=manifest_config,
        created_by={"package": "aoe-lightning", "version": _package_version()},
    )
    logger.info(
        "prepared %d train tokens (%d documents, %d shards) and %d validation tokens (%d documents) as %s",
        splits["train"].num_tokens,
        splits["train"].num_documents,
        len(splits["train"].shards),
        splits["val"].num_tokens,
        splits["val"].num_documents,
        dtype.name,
    )
    return manifest


def _pack(
    pieces: Iterable[_Piece],
    tokenizer: Tokenizer,
    writers: dict[str, ShardWriter],
    token_cap: int | None,
    num_sources: int,
) -> list[dict[str, Any]]:
    """Tokenize ``pieces`` into the split writers; return per-source document counts and text digests."""
    from tqdm.auto import tqdm

    stats = [{"documents": 0, "digest": hashlib.sha256()} for _ in range(num_sources)]
    last_written: dict[str, tuple[int, int]] = {}
    total_tokens = 0
    progress = tqdm(desc="tokenizing", unit=" pieces", disable=None)
    encode_batch = getattr(tokenizer, "encode_batch", None)
    try:
        for batch in _batched(pieces, ENCODE_BATCH_SIZE):
            texts = [piece.text for piece in batch]
            id_lists = encode_batch(texts) if encode_batch else [tokenizer.encode(text) for text in texts]
            for piece, ids in zip(batch, id_lists):
                array = _checked_ids(ids, tokenizer.vocab_size)
                split = "val" if piece.is_validation else "train"
                previous = last_written.get(split)
                continues = previous == (piece.document_index, piece.piece_index - 1)
                writers[split].add_document(array, continues=continues)
                last_written[split] = (piece.document_index, piece.piece_index)
                total_tokens += len(array) + (0 if continues else 1)
                if piece.piece_index == 0:
                    stats[piece.source_index]["documents"] += 1
                stats[piece.source_index]["digest"].update(piece.text.encode("utf-8"))
                progress.update(1)
                if token_cap is not None and total_tokens >= token_cap:
                    logger.info("stopping at --max-tokens %d", token_cap)
                    return stats
            progress.set_postfix(tokens=total_tokens)
    finally:
        progress.close()
    return stats


def _checked_ids(ids: Sequence[int], vocab_size: int) -> np.ndarray:
    array = np.asarray(ids, dtype=np.int64)
    if array.size and (array.min() < 0 or array.max() >= vocab_size):
        raise DataError(
            f"the tokenizer emitted id {int(array.max())} (or {int(array.min())}) outside [0, {vocab_size}); "
            "use a tokenizer whose ids are below its vocab_size"
        )
    return array


def _check_split_sizes(config: PrepareConfig, splits: dict[str, SplitInfo]) -> None:
    total_documents = splits["train"].num_documents + splits["val"].num_documents
    if total_documents == 0:
        raise EmptyCorpusError(f"sources {config.sources} contain no text; pass sources that contain documents")
    for split, info in splits.items():
        if info.num_tokens >= config.min_split_tokens and info.num_documents > 0:
            continue
        fix = (
            "raise --val-fraction, add text or lower --max-document-chars"
            if split == "val"
            else "lower --val-fraction or add text"
        )
        raise CorpusTooSmallError(
            f"the {split} split has {info.num_tokens} tokens in {info.num_documents} documents "
            f"(of {total_documents} documents, val_fraction={config.val_fraction}, seed={config.seed}), "
            f"fewer than the required {config.min_split_tokens}; {fix}"
        )


def _iter_pieces(sources: list[Source], config: PrepareConfig, max_bytes: int | None) -> Iterator[_Piece]:
    """Yield document pieces in source order with their split, honouring max_documents and ``max_bytes``."""
    document_index = 0
    piece_number = 0
    total_bytes = 0
    for source_index, source in enumerate(sources):
        if config.max_documents is not None and document_index >= config.max_documents:
            return
        for text in source.documents():
            for piece_index, piece_text in enumerate(split_document(text, config.max_document_chars)):
                is_validation = _is_validation(config.seed, piece_number, config.val_fraction)
                yield _Piece(source_index, document_index, piece_index, is_validation, piece_text)
                piece_number += 1
                total_bytes += len(piece_text.encode("utf-8"))
                if max_bytes is not None and total_bytes >= max_bytes:
                    logger.info("stopping at --max-tokens %d (counted as UTF-8 bytes for bpe)", max_bytes)
                    return
            document_index += 1
            if config.max_documents is not None and document_index >= config.max_documents:
                return


def _is_validation(seed: int, piece_number: int, val_fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{piece_number}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


_CACHE_HEADER = struct.Struct("<IQI?Q")  # source index, document index, piece index, is validation, text bytes


def _write_cached_piece(cache: BinaryIO, piece: _Piece) -> None:
    data = piece.text.encode("utf-8")
    header = _CACHE_HEADER.pack(
        piece.source_index, piece.document_index, piece.piece_index, piece.is_validation, len(data)
    )
    cache.write(header)
    cache.write(data)


def _read_cached_pieces(path: Path) -> Iterator[_Piece]:
    with open(path, "rb") as cache:
        while header := cache.read(_CACHE_HEADER.size):
            source_index, document_index, piece_index, is_validation, size = _CACHE_HEADER.unpack(header)
            text = cache.read(size).decode("utf-8")
            yield _Piece(source_index, document_index, piece_index, is_validation, text)


def _batched(items: Iterable[_Piece], size: int) -> Iterator[list[_Piece]]:
    batch: list[_Piece] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aoe-lightning")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aoe data", description="Prepare text corpora as packed token shards.")
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser(
        "prepare",
        help="tokenize sources into train/validation shards with a manifest",
        description=(
            "Tokenize text into packed train/validation token shards plus manifest.json. "
            "Example: aoe data prepare --source default --out data/default"
        ),
    )
    prepare.add_argument(
        "--source",
        action="append",
        required=True,
        help="text/JSONL/Parquet file, folder (read recursively in sorted order), 'default' (the built-in "
        "corpus) or hf:NAME[:CONFIG] (a streamed Hugging Face dataset); repeat for several sources",
    )
    prepare.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    prepare.add_argument(
        "--tokenizer",
        default="byte",
        help="'byte' (UTF-8 bytes, vocab 257), 'bpe' (train a byte-level BPE on the training split, needs "
        "--vocab-size), a tokenizer.json path, or a Hugging Face hub tokenizer name (default: byte)",
    )
    prepare.add_argument("--vocab-size", type=int, help="vocabulary size of the trained BPE, e.g. 4096")
    prepare.add_argument(
        "--eos-token", help="end-of-text token of a tokenizer.json or hub tokenizer (default: detect it)"
    )
    prepare.add_argument(
        "--text-field", default="text", help="JSONL/Parquet/dataset field with the text (default: text)"
    )
    prepare.add_argument("--hf-split", default="train", help="split of hf: sources (default: train)")
    prepare.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help=f"probability that a document piece goes to validation (default: {DEFAULT_VAL_FRACTION})",
    )
    prepare.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed of the split (default: {DEFAULT_SEED})")
    prepare.add_argument("--max-documents", type=int, help="stop after this many source documents")
    prepare.add_argument(
        "--max-tokens",
        type=int,
        help="stop after the document piece that reaches this many tokens; with --tokenizer bpe it counts "
        "UTF-8 bytes, because the tokenizer is trained on what was read",
    )
    prepare.add_argument(
        "--max-document-chars",
        type=int,
        default=DEFAULT_MAX_DOCUMENT_CHARS,
        help="cut longer documents into pieces at line breaks; pieces are the unit of the train/validation "
        f"split (default: {DEFAULT_MAX_DOCUMENT_CHARS})",
    )
    prepare.add_argument(
        "--shard-size-tokens",
        type=int,
        default=DEFAULT_SHARD_SIZE_TOKENS,
        help=f"maximum tokens per shard file (default: {DEFAULT_SHARD_SIZE_TOKENS})",
    )
    prepare.add_argument(
        "--seq-len",
        type=int,
        help="fail unless each split contains at least one training window of seq_len + 1 tokens",
    )
    prepare.add_argument("--overwrite", action="store_true", help="replace different prepared data in --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``aoe data ...`` with ``argv`` (the arguments after ``data``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        manifest = prepare_dataset(
            args.source,
            args.out,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            eos_token=args.eos_token,
            text_field=args.text_field,
            hf_split=args.hf_split,
            val_fraction=args.val_fraction,
            seed=args.seed,
            max_documents=args.max_documents,
            max_tokens=args.max_tokens,
            max_document_chars=args.max_document_chars,
            shard_size_tokens=args.shard_size_tokens,
            min_split_tokens=1 if args.seq_len is None else args.seq_len + 1,
            overwrite=args.overwrite,
        )
    except DataError as error:
        print(f"aoe data prepare: error: {error}", file=sys.stderr)
        return 2
    train, val = manifest.splits["train"], manifest.splits["val"]
    print(
        json.dumps(
            {
                "out": str(Path(args.out).resolve()),
                "vocab_size": manifest.vocab_size,
                "dtype": manifest.dtype,
                "train_tokens": train.num_tokens,
                "train_documents": train.num_documents,
                "val_tokens": val.num_tokens,
                "val_documents": val.num_documents,
            }
        )
    )
    return 0
