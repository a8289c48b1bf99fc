"""Reading documents from plain text, JSONL, Parquet, folders, the default corpus and Hugging Face datasets.

A source spec is one of:

- ``default``: the built-in corpus (:mod:`aoe_lightning.data.default_corpus`).
- a path to a file: ``.jsonl`` and ``.parquet`` files yield one document per row (the ``text_field``
  column), any other file is read as one UTF-8 text document.
- a path to a folder: every ``.txt``, ``.text``, ``.md``, ``.rst``, ``.jsonl`` and ``.parquet`` file below
  it, recursively, in sorted path order. Hidden files and other suffixes are skipped.
- ``hf:NAME`` or ``hf:NAME:CONFIG``: a Hugging Face dataset streamed with
  ``datasets.load_dataset(NAME, CONFIG, split=..., streaming=True)``. NAME may also be a local dataset
  folder or script.

Every source records what it read (for files: paths, sizes and sha256) for the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aoe_lightning.data.errors import DataError, DataFileNotFoundError, EmptyCorpusError

logger = logging.getLogger(__name__)

FOLDER_SUFFIXES = (".txt", ".text", ".md", ".rst", ".jsonl", ".parquet")
HF_PREFIX = "hf:"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Source:
    """One ``--source`` value: yields document texts and records what was read."""

    def __init__(self, spec: str, kind: str) -> None:
        self.spec = spec
        self.kind = kind
        self.num_documents = 0

    def documents(self) -> Iterator[str]:
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        """Manifest entry for this source, valid after ``documents()`` has been consumed."""
        return {"source": self.spec, "kind": self.kind, "documents": self.num_documents}


class _LocalSource(Source):
    """Files on disk; records the size and sha256 of each file it opens."""

    def __init__(self, spec: str, kind: str, files: list[Path], text_field: str) -> None:
        super().__init__(spec, kind)
        self.files = files
        self.text_field = text_field
        self._file_records: list[dict[str, Any]] = []

    def documents(self) -> Iterator[str]:
        explicit_file = self.kind != "folder"
        for path in self.files:
            record = {"path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)}
            self._file_records.append(record)
            documents_in_file = 0
            for text in _read_file(path, self.text_field):
                documents_in_file += 1
                self.num_documents += 1
                yield text
            if documents_in_file == 0:
                if explicit_file:
                    raise EmptyCorpusError(
                        f"source file {str(path)!r} contains no text ({record['bytes']} bytes); pass a file with text"
                    )
                logger.warning("skipping %s: it contains no text", path)

    def record(self) -> dict[str, Any]:
        return {**super().record(), "files": self._file_records}


class DefaultSource(Source):
    """The built-in corpus; records the Python version because its text changes between versions."""

    def __init__(self) -> None:
        super().__init__("default", "default")

    def documents(self) -> Iterator[str]:
        from aoe_lightning.data.default_corpus import default_documents

        for text in default_documents():
            self.num_documents += 1
            yield text

    def record(self) -> dict[str, Any]:
        version = ".".join(str(part) for part in sys.version_info[:3])
        return {**super().record(), "python_version": version}


class HFDatasetSource(Source):
    """A streamed Hugging Face dataset; records its name, config and split."""

    def __init__(self, spec: str, name: str, config: str | None, split: str, text_field: str) -> None:
        super().__init__(spec, "huggingface")
        self.name = name
        self.config = config
        self.split = split
        self.text_field = text_field

    def documents(self) -> Iterator[str]:
        import datasets

        try:
            dataset = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        except Exception as error:  # datasets raises many types: network, missing config, missing split
            raise DataError(
                f"Hugging Face dataset {self.spec!r} (split {self.split!r}) could not be opened "
                f"({type(error).__name__}: {error}); check the name, config, split and network access"
            ) from error
        for row_index, row in enumerate(dataset):
            text = _text_of_row(row, self.text_field, f"{self.spec} row {row_index}")
            if not text.strip():
                continue
            self.num_documents += 1
            yield text

    def record(self) -> dict[str, Any]:
        return {
            **super().record(),
            "name": self.name,
            "config": self.config,
            "split": self.split,
        }


def resolve_source(spec: str, text_field: str = "text", hf_split: str = "train") -> Source:
    """Turn one source spec into a :class:`Source`, raising ``DataFileNotFoundError`` for missing paths."""
    if spec == "default":
        return DefaultSource()
    if spec.startswith(HF_PREFIX):
        name, _, config = spec[len(HF_PREFIX) :].partition(":")
        if not name:
            raise DataError(f"source {spec!r} names no dataset; use hf:NAME or hf:NAME:CONFIG")
        return HFDatasetSource(spec, name, config or None, hf_split, text_field)

    path = Path(spec).expanduser().resolve()
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in FOLDER_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise EmptyCorpusError(
                f"folder {spec!r} contains no {'/'.join(FOLDER_SUFFIXES)} files; add text files or pass the "
                "files directly"
            )
        return _LocalSource(str(path), "folder", files, text_field)
    if path.is_file():
        return _LocalSource(str(path), _file_kind(path), [path], text_field)
    raise DataFileNotFoundError(
        f"source {spec!r} does not exist; pass an existing file or folder, 'default', or hf:NAME[:CONFIG] "
        "for a Hugging Face dataset"
    )


def _file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "text"


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    kind = _file_kind(path)
    if kind == "jsonl":
        yield from _read_jsonl(path, text_field)
    elif kind == "parquet":
        yield from _read_parquet(path, text_field)
    else:
        text = _decode_utf8(path.read_bytes(), str(path))
        if text.strip():
            yield text


def _decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{where!r} is not valid UTF-8 (byte {error.start}: {error.reason}); convert it to UTF-8 or "
            "remove it from the sources"
        ) from error


def _text_of_row(row: Any, text_field: str, where: str) -> str:
    if not isinstance(row, dict) or text_field not in row:
        fields = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where} has no field {text_field!r} (fields: {fields}); pass the right --text-field")
    text = row[text_field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataError(
            f"{where} field {text_field!r} is a {type(text).__name__}, not a string; pass a text field "
            "with --text-field"
        )
    return text


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, "rb") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            line = _decode_utf8(raw_line, where).strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where} is not valid JSON ({error.msg}); fix or remove that line") from error
            text = _text_of_row(row, text_field, where)
            if text.strip():
                yield text


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet_file = pq.ParquetFile(path)
    columns = parquet_file.schema_arrow.names
    if text_field not in columns:
        raise DataError(f"{str(path)!r} has no column {text_field!r} (columns: {columns}); pass the right --text-field")
    for batch in parquet_file.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(
                    f"{str(path)!r} column {text_field!r} contains {type(text).__name__} values, not strings; "
                    "pass a text column with --text-field"
                )
            if text.strip():
                yield text


def split_document(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars`` characters whose concatenation is ``text``.

    Each cut falls after the last newline in the second half of the piece, else after the last space
    there, else at ``max_chars``, so pieces usually end on a line boundary.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars={max_chars} must be >= 1")
    pieces = []
    start = 0
    while len(text) - start > max_chars:
        window = text[start : start + max_chars]
        half = max_chars // 2
        cut = window.rfind("\n", half) + 1
        if cut == 0:
            cut = window.rfind(" ", half) + 1
        if cut == 0:
            cut = max_chars
        pieces.append(window[:cut])
        start += cut
    pieces.append(text[start:])
    return pieces
