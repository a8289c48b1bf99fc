"""Tests for `aoe data prepare`: sources, splits, determinism, output-folder rules and bad input."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from aoe_lightning.data.corpus import split_document
from aoe_lightning.data.errors import (
    CorpusTooSmallError,
    DataError,
    DataFileNotFoundError,
    EmptyCorpusError,
    ManifestError,
    OutputExistsError,
)
from aoe_lightning.data.prepare import main, prepare_dataset
from aoe_lightning.data.shards import load_manifest, load_manifest_tokenizer, open_split
from aoe_lightning.data.tokenizer import END_OF_TEXT, load_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DOCUMENTS = [f"Document {i}: " + "lorem ipsum dolor sit amet, " * (3 + i % 5) + "end." for i in range(40)]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: text, "id": i}) + "\n" for i, text in enumerate(texts)))
    return path


def split_documents(directory: Path, split: str) -> list[str]:
    """Decode a prepared split into its EOS-separated documents."""
    manifest = load_manifest(directory)
    tokenizer = load_manifest_tokenizer(directory, manifest)
    tokens = np.concatenate(open_split(directory, manifest, split)).astype(np.int64)
    assert tokens[-1] == manifest.eos_id, "every document, the last included, is followed by EOS"
    boundaries = np.flatnonzero(tokens == manifest.eos_id)
    starts = np.concatenate([[0], boundaries[:-1] + 1])
    return [tokenizer.decode(tokens[start:end].tolist()) for start, end in zip(starts, boundaries)]


def assert_ordered_partition(train: list[str], val: list[str], documents: list[str]) -> None:
    """Check that train and val are disjoint subsequences of ``documents`` that together cover it."""
    position = {text: i for i, text in enumerate(documents)}
    train_index = [position[text] for text in train]
    val_index = [position[text] for text in val]
    assert train_index == sorted(train_index)
    assert val_index == sorted(val_index)
    assert sorted(train_index + val_index) == list(range(len(documents)))


def test_jsonl_byte_split_and_eos(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    manifest = prepare_dataset([str(source)], tmp_path / "out", val_fraction=0.25, seed=7)
    train = split_documents(tmp_path / "out", "train")
    val = split_documents(tmp_path / "out", "val")
    assert_ordered_partition(train, val, DOCUMENTS)
    assert 0 < len(val) < len(DOCUMENTS) / 2
    assert manifest.splits["train"].num_documents == len(train)
    assert manifest.splits["val"].num_documents == len(val)
    expected_tokens = sum(len(text.encode()) + 1 for text in DOCUMENTS)
    assert manifest.splits["train"].num_tokens + manifest.splits["val"].num_tokens == expected_tokens
    assert manifest.sources[0]["files"][0]["sha256"] == __import__("hashlib").sha256(source.read_bytes()).hexdigest()
    assert manifest.sources[0]["documents"] == len(DOCUMENTS)


def test_split_depends_on_seed(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    prepare_dataset([str(source)], tmp_path / "a", val_fraction=0.25, seed=1)
    prepare_dataset([str(source)], tmp_path / "b", val_fraction=0.25, seed=2)
    assert split_documents(tmp_path / "a", "val") != split_documents(tmp_path / "b", "val")


def test_folder_is_read_recursively_in_sorted_order(tmp_path):
    folder = tmp_path / "corpus"
    files = {
        "b/2.txt": "second folder text " * 10,
        "a.txt": "top-level text " * 10,
        "a/1.md": "markdown text " * 10,
        "a/0.rst": "restructured text " * 10,
        ".hidden/x.txt": "hidden " * 10,
        "image.bin": "not text",
        "rows.jsonl": json.dumps({"text": "jsonl row " * 10}) + "\n",
    }
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    manifest = prepare_dataset([str(folder)], tmp_path / "out", val_fraction=0.3)

    read = [Path(record["path"]) for record in manifest.sources[0]["files"]]
    expected = sorted(folder / name for name in files if name not in (".hidden/x.txt", "image.bin"))
    assert read == expected
    expected_texts = [(folder / path).read_text() if path.suffix != ".jsonl" else "jsonl row " * 10 for path in expected]
    assert_ordered_partition(split_documents(tmp_path / "out", "train"), split_documents(tmp_path / "out", "val"), expected_texts)


def test_parquet_with_text_field(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": DOCUMENTS, "n": list(range(len(DOCUMENTS)))}), path)
    prepare_dataset([str(path)], tmp_path / "out", text_field="body", val_fraction=0.25)
    assert_ordered_partition(split_documents(tmp_path / "out", "train"), split_documents(tmp_path / "out", "val"), DOCUMENTS)
    with pytest.raises(DataError, match="no column 'text'.*--text-field"):
        prepare_dataset([str(path)], tmp_path / "other")


def test_jsonl_missing_field(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS, field="content")
    with pytest.raises(DataError, match=r"docs.jsonl:1 has no field 'text'.*--text-field"):
        prepare_dataset([str(source)], tmp_path / "out")


def test_hf_dataset_source_streams_local_folder(tmp_path):
    folder = tmp_path / "hf_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", DOCUMENTS)
    manifest = prepare_dataset([f"hf:{folder}"], tmp_path / "out", val_fraction=0.25, max_documents=30)
    assert manifest.sources[0]["kind"] == "huggingface"
    assert manifest.sources[0]["split"] == "train"
    assert manifest.sources[0]["documents"] == 30
    assert_ordered_partition(
        split_documents(tmp_path / "out", "train"), split_documents(tmp_path / "out", "val"), DOCUMENTS[:30]
    )


def test_bpe_prepare_round_trips_and_saves_tokenizer(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    manifest = prepare_dataset([str(source)], tmp_path / "out", tokenizer="bpe", vocab_size=300, val_fraction=0.25)
    assert manifest.tokenizer["type"] == "huggingface"
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert manifest.vocab_size <= 300
    tokenizer = load_tokenizer(str(tmp_path / "out"))
    assert tokenizer.eos_id == manifest.eos_id
    train = split_documents(tmp_path / "out", "train")
    val = split_documents(tmp_path / "out", "val")
    assert_ordered_partition(train, val, DOCUMENTS)
    total_bytes = sum(len(text.encode()) for text in DOCUMENTS)
    assert manifest.splits["train"].num_tokens + manifest.splits["val"].num_tokens < total_bytes / 2


def test_uint32_shards_through_prepare(tmp_path):
    vocab = {f"w{i}": i for i in range(69_999)}
    vocab[END_OF_TEXT] = 69_999
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.save(str(tmp_path / "tokenizer.json"))
    rng = np.random.default_rng(0)
    documents = [" ".join(f"w{i}" for i in rng.integers(65_536, 69_999, size=50)) for _ in range(30)]
    source = write_jsonl(tmp_path / "docs.jsonl", documents)

    manifest = prepare_dataset(
        [str(source)], tmp_path / "out", tokenizer=str(tmp_path / "tokenizer.json"), val_fraction=0.3
    )
    assert manifest.dtype == "uint32"
    assert manifest.eos_id == 69_999
    tokens = np.concatenate([np.concatenate(open_split(tmp_path / "out", manifest, s)) for s in ("train", "val")])
    assert tokens.dtype == np.uint32
    assert tokens.max() == 69_999
    assert int((tokens > 65_535).sum()) == 30 * 50 + 30  # every word id and every EOS
    assert_ordered_partition(split_documents(tmp_path / "out", "train"), split_documents(tmp_path / "out", "val"), documents)


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_two_prepares_are_byte_identical(tmp_path, tokenizer):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    vocab_size = 300 if tokenizer == "bpe" else None
    for out in ("a", "b"):
        prepare_dataset([str(source)], tmp_path / out, tokenizer=tokenizer, vocab_size=vocab_size, shard_size_tokens=700)
    names = sorted(path.name for path in (tmp_path / "a").iterdir())
    assert names == sorted(path.name for path in (tmp_path / "b").iterdir())
    assert len([name for name in names if name.endswith(".bin")]) > 2
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_long_document_is_cut_into_pieces(tmp_path):
    lines = [f"line {i} of a long text with some words in it" for i in range(2000)]
    text = "\n".join(lines) + "\n"
    source = tmp_path / "long.txt"
    source.write_text(text)
    manifest = prepare_dataset([str(source)], tmp_path / "out", max_document_chars=2000, val_fraction=0.2)
    train = split_documents(tmp_path / "out", "train")
    val = split_documents(tmp_path / "out", "val")
    assert len(val) > 0
    # Each run of consecutive pieces is contiguous text of the file, and every character lands in one split.
    for document in train + val:
        assert document in text
        assert document.endswith("\n")
    assert sum(len(document) for document in train + val) == len(text)
    assert manifest.sources[0]["documents"] == 1


def test_split_document_pieces():
    text = "aaaa\nbbbb cccc\ndd" * 50
    pieces = split_document(text, 32)
    assert "".join(pieces) == text
    assert all(0 < len(piece) <= 32 for piece in pieces)
    assert all(piece.endswith("\n") for piece in pieces[:-1])
    assert split_document("x" * 10, 4) == ["xxxx", "xxxx", "xx"]
    assert split_document("short", 100) == ["short"]


def test_max_documents_and_max_tokens(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    manifest = prepare_dataset([str(source)], tmp_path / "a", max_documents=12, val_fraction=0.3)
    read = split_documents(tmp_path / "a", "train") + split_documents(tmp_path / "a", "val")
    assert sorted(read) == sorted(DOCUMENTS[:12])
    assert manifest.sources[0]["documents"] == 12

    cap = 1500
    manifest = prepare_dataset([str(source)], tmp_path / "b", max_tokens=cap, val_fraction=0.3)
    total = manifest.splits["train"].num_tokens + manifest.splits["val"].num_tokens
    sizes = np.cumsum([len(text.encode()) + 1 for text in DOCUMENTS])
    expected_documents = int(np.searchsorted(sizes, cap)) + 1  # the document that reaches the cap is kept
    assert total == sizes[expected_documents - 1]


def test_default_corpus(tmp_path):
    from aoe_lightning.data.default_corpus import default_documents

    documents = default_documents()
    manifest = prepare_dataset(["default"], tmp_path / "out")
    total_bytes = sum(len(text.encode()) for text in documents)
    assert manifest.sources[0]["kind"] == "default"
    assert manifest.sources[0]["documents"] == len(documents)
    tokens = manifest.splits["train"].num_tokens + manifest.splits["val"].num_tokens
    eos_count = manifest.splits["train"].num_documents + manifest.splits["val"].num_documents
    assert tokens == total_bytes + eos_count
    assert total_bytes > 100_000


def test_identical_prepare_is_noop(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    prepare_dataset([str(source)], tmp_path / "out")
    stamps = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "out").iterdir()}
    prepare_dataset([str(source)], tmp_path / "out")
    assert {path.name: path.stat().st_mtime_ns for path in (tmp_path / "out").iterdir()} == stamps


def test_different_prepare_needs_overwrite(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    out = tmp_path / "out"
    prepare_dataset([str(source)], out, shard_size_tokens=500)
    with pytest.raises(OutputExistsError, match=r"different settings \(seed\).*--overwrite"):
        prepare_dataset([str(source)], out, seed=99, shard_size_tokens=500)

    write_jsonl(source, DOCUMENTS[::-1])  # same settings, different content
    with pytest.raises(OutputExistsError, match="content changed"):
        prepare_dataset([str(source)], out, shard_size_tokens=500)

    old_shards = {path.name for path in out.glob("*.bin")}
    manifest = prepare_dataset([str(source)], out, seed=99, overwrite=True)
    assert manifest.config["seed"] == 99
    assert load_manifest(out) == manifest
    new_shards = {shard.file for split in manifest.splits.values() for shard in split.shards}
    assert {path.name for path in out.glob("*.bin")} == new_shards != old_shards
    assert not list(out.glob(".prepare-*"))


def test_corrupt_existing_manifest(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{oops")
    with pytest.raises(ManifestError, match="could not be read"):
        prepare_dataset([str(source)], out)
    prepare_dataset([str(source)], out, overwrite=True)
    load_manifest(out)


def test_missing_source(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="'nope.txt' does not exist") as raised:
        prepare_dataset(["nope.txt"], tmp_path / "out")
    assert isinstance(raised.value, FileNotFoundError)


def test_empty_inputs(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(EmptyCorpusError, match="empty.txt' contains no text"):
        prepare_dataset([str(empty)], tmp_path / "out")
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n ")
    with pytest.raises(EmptyCorpusError, match="blank.txt' contains no text"):
        prepare_dataset([str(blank)], tmp_path / "out")
    (tmp_path / "folder").mkdir()
    with pytest.raises(EmptyCorpusError, match="contains no"):
        prepare_dataset([str(tmp_path / "folder")], tmp_path / "out")
    (tmp_path / "folder" / "a.txt").write_text("")
    with pytest.raises(EmptyCorpusError, match="contain no text"):
        prepare_dataset([str(tmp_path / "folder")], tmp_path / "out")


def test_corpus_too_small_for_validation(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS[:3])
    with pytest.raises(CorpusTooSmallError, match=r"the val split has 0 tokens in 0 documents.*--val-fraction"):
        prepare_dataset([str(source)], tmp_path / "out", val_fraction=0.01)
    with pytest.raises(CorpusTooSmallError, match=r"the (train|val) split has \d+ tokens.*fewer than the required 5000"):
        prepare_dataset([str(source)], tmp_path / "out", val_fraction=0.5, min_split_tokens=5000)


def test_invalid_utf8_file(tmp_path):
    source = tmp_path / "latin1.txt"
    source.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt' is not valid UTF-8"):
        prepare_dataset([str(source)], tmp_path / "out")


def test_invalid_settings_listed_together(tmp_path):
    with pytest.raises(DataError, match=r"val_fraction=1.5 must be in \(0, 1\).*needs vocab_size"):
        prepare_dataset(["default"], tmp_path / "out", val_fraction=1.5, tokenizer="bpe")


def test_cli_prepare(tmp_path, capsys):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    status = main(["prepare", "--source", str(source), "--out", str(tmp_path / "out"), "--val-fraction", "0.25"])
    assert status == 0
    summary = json.loads(capsys.readouterr().out)
    manifest = load_manifest(tmp_path / "out")
    assert summary["train_tokens"] == manifest.splits["train"].num_tokens
    assert summary["val_tokens"] == manifest.splits["val"].num_tokens


def test_cli_error_is_one_line(tmp_path, capsys):
    status = main(["prepare", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert status == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error.startswith("aoe data prepare: error: source ")


@pytest.mark.skipif(not (SHARED_DATA / "train").is_dir(), reason=f"real text corpus not found at {SHARED_DATA}")
def test_tinyshakespeare_bpe(tmp_path):
    source = SHARED_DATA / "train" / "tinyshakespeare" / "input.txt"
    text = source.read_text(encoding="utf-8")
    manifest = prepare_dataset(
        [str(source)], tmp_path / "out", tokenizer="bpe", vocab_size=512, max_tokens=120_000, max_document_chars=8192
    )
    assert manifest.vocab_size == 512
    train = split_documents(tmp_path / "out", "train")
    val = split_documents(tmp_path / "out", "val")
    assert val, "the validation split contains at least one piece"
    read = sum(len(document) for document in train + val)
    assert 120_000 <= read < 120_000 + 8192
    for document in train + val:
        assert document in text[: read + 1]
    tokens = manifest.splits["train"].num_tokens + manifest.splits["val"].num_tokens
    assert tokens < read / 2  # a 512-token BPE roughly halves the byte count of English text
