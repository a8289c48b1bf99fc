"""Tests for aoe_lightning.data.shards: packing, dtypes, the manifest and integrity checks."""

import hashlib
import json

import numpy as np
import pytest

from aoe_lightning.data.errors import DataFileNotFoundError, ManifestError, ShardIntegrityError
from aoe_lightning.data.prepare import prepare_dataset
from aoe_lightning.data.shards import (
    MANIFEST_NAME,
    Manifest,
    ShardWriter,
    dtype_for_vocab,
    load_manifest,
    manifest_json,
    open_split,
    verify_shards,
)

EOS = 9


def read_split(directory, shards, dtype):
    return np.concatenate([np.fromfile(directory / shard.file, dtype=dtype) for shard in shards])


def test_dtype_for_vocab():
    assert dtype_for_vocab(257) == np.uint16
    assert dtype_for_vocab(65_536) == np.uint16
    assert dtype_for_vocab(65_537) == np.uint32


def test_writer_puts_one_eos_after_each_document(tmp_path):
    writer = ShardWriter(tmp_path, "train", np.dtype(np.uint16), EOS, shard_size_tokens=1000)
    writer.add_document(np.array([1, 2, 3]))
    writer.add_document(np.array([4, 5]))
    writer.add_document(np.array([6]), continues=True)  # later piece of the document [4, 5]
    writer.add_document(np.array([7]))
    info = writer.close()
    expected = np.array([1, 2, 3, EOS, 4, 5, 6, EOS, 7, EOS], dtype=np.uint16)
    np.testing.assert_array_equal(read_split(tmp_path, info.shards, np.uint16), expected)
    assert info.num_tokens == len(expected)
    assert info.num_documents == 3


def test_writer_splits_into_shards_with_checksums(tmp_path):
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, EOS, size=n) for n in (5, 17, 1, 30, 8)]
    writer = ShardWriter(tmp_path, "val", np.dtype(np.uint16), EOS, shard_size_tokens=16)
    for document in documents:
        writer.add_document(document)
    info = writer.close()

    expected = np.concatenate([np.append(document, EOS) for document in documents]).astype(np.uint16)
    assert [shard.file for shard in info.shards] == [f"val-{i:05d}.bin" for i in range(len(info.shards))]
    assert [shard.num_tokens for shard in info.shards] == [16, 16, 16, 16] + [len(expected) - 64]
    np.testing.assert_array_equal(read_split(tmp_path, info.shards, np.uint16), expected)
    for shard in info.shards:
        data = (tmp_path / shard.file).read_bytes()
        assert shard.num_bytes == len(data) == 2 * shard.num_tokens
        assert shard.sha256 == hashlib.sha256(data).hexdigest()


def test_uint32_shards_keep_ids_above_65535(tmp_path):
    ids = np.array([0, 65_535, 65_536, 69_998, 123_456], dtype=np.int64)
    writer = ShardWriter(tmp_path, "train", dtype_for_vocab(123_457 + 1), eos_id=123_457, shard_size_tokens=100)
    writer.add_document(ids)
    info = writer.close()
    stored = np.fromfile(tmp_path / info.shards[0].file, dtype="<u4")
    np.testing.assert_array_equal(stored, np.append(ids, 123_457))
    assert info.shards[0].num_bytes == 4 * len(stored)


@pytest.fixture
def prepared(tmp_path):
    text_file = tmp_path / "corpus.jsonl"
    rows = [{"text": f"document number {i} " * (5 + i % 7)} for i in range(60)]
    text_file.write_text("\n".join(json.dumps(row) for row in rows))
    out = tmp_path / "data"
    prepare_dataset([str(text_file)], out, val_fraction=0.2, shard_size_tokens=500)
    return out


def test_manifest_round_trip(prepared):
    manifest = load_manifest(prepared)
    assert Manifest.from_dict(json.loads(manifest_json(manifest))) == manifest
    assert manifest.dtype == "uint16"
    assert manifest.vocab_size == 257
    assert manifest.eos_id == 256
    for split in ("train", "val"):
        info = manifest.splits[split]
        assert info.num_tokens == sum(shard.num_tokens for shard in info.shards)
        tokens = np.concatenate(open_split(prepared, manifest, split))
        assert len(tokens) == info.num_tokens
        assert int((tokens == 256).sum()) == info.num_documents
    assert len(manifest.splits["train"].shards) > 1


def test_verify_passes_on_intact_data(prepared):
    verify_shards(prepared, load_manifest(prepared))


def test_verify_detects_truncated_shard(prepared):
    manifest = load_manifest(prepared)
    path = prepared / manifest.splits["train"].shards[0].file
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ShardIntegrityError, match="has 998 bytes, the manifest expects 1000"):
        verify_shards(prepared, manifest, checksums=False)


def test_verify_detects_changed_bytes(prepared):
    manifest = load_manifest(prepared)
    path = prepared / manifest.splits["val"].shards[0].file
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    verify_shards(prepared, manifest, checksums=False)  # same size, so only the checksum can tell
    with pytest.raises(ShardIntegrityError, match="sha256"):
        verify_shards(prepared, manifest)


def test_verify_detects_missing_shard(prepared):
    manifest = load_manifest(prepared)
    (prepared / manifest.splits["train"].shards[-1].file).unlink()
    with pytest.raises(DataFileNotFoundError, match="does not exist"):
        verify_shards(prepared, manifest)


def test_missing_manifest(tmp_path):
    with pytest.raises(DataFileNotFoundError, match="aoe data prepare"):
        load_manifest(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{truncated", "could not be read"),
        ("[1, 2]", "not an object"),
        ('{"format": "other"}', "has format 'other'"),
        ('{"format": "aoe-lightning-token-shards", "format_version": 99}', "format_version 99"),
        ('{"format": "aoe-lightning-token-shards", "format_version": 1, "splits": {}}', "malformed"),
    ],
)
def test_corrupt_manifest(tmp_path, content, message):
    (tmp_path / MANIFEST_NAME).write_text(content)
    with pytest.raises(ManifestError, match=message):
        load_manifest(tmp_path)
