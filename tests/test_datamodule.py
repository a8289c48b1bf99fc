"""Tests for TokenShardDataModule: windows, determinism, exact resume, rank split and bad input."""

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aoe_lightning.data.datamodule import TokenShardDataModule, TrainWindowDataset, sample_window_starts
from aoe_lightning.data.errors import (
    CorpusTooSmallError,
    DataFileNotFoundError,
    ShardIntegrityError,
    TokenizerMismatchError,
)
from aoe_lightning.data.prepare import prepare_dataset
from aoe_lightning.data.shards import load_manifest, open_split

SEQ_LEN = 16
BATCH = 4
DOCUMENTS = [f"Document {i}: " + "the cat sat on the mat and looked around. " * (2 + i % 6) for i in range(80)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Byte-level data with several train shards, so windows could cross shard boundaries if sampling were wrong."""
    root = tmp_path_factory.mktemp("prepared")
    source = write_jsonl(root / "docs.jsonl", DOCUMENTS)
    prepare_dataset([str(source)], root / "data", val_fraction=0.2, shard_size_tokens=1000)
    return root / "data"


def make_datamodule(data_dir: Path, **overrides) -> TokenShardDataModule:
    arguments = {"seq_len": SEQ_LEN, "batch_size": BATCH, "seed": 5, **overrides}
    datamodule = TokenShardDataModule(str(data_dir), **arguments)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def take(loader, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            return batches
    raise AssertionError("loader ended early")


def assert_same_batches(left, right) -> None:
    assert len(left) == len(right)
    for (x_left, y_left), (x_right, y_right) in zip(left, right):
        torch.testing.assert_close(x_left, x_right, rtol=0, atol=0)
        torch.testing.assert_close(y_left, y_right, rtol=0, atol=0)


def test_train_windows_are_shifted_shard_slices(data_dir):
    datamodule = make_datamodule(data_dir)
    manifest = load_manifest(data_dir)
    assert len(manifest.splits["train"].shards) > 3
    shards = [np.asarray(shard, dtype=np.int64) for shard in open_split(data_dir, manifest, "train")]
    dataset = TrainWindowDataset(datamodule._train_reader, SEQ_LEN, BATCH, seed=5)

    for batch_index in range(20):
        inputs, targets = dataset.batch(batch_index)
        assert inputs.shape == targets.shape == (BATCH, SEQ_LEN)
        assert inputs.dtype == targets.dtype == torch.int64
        torch.testing.assert_close(inputs[:, 1:], targets[:, :-1], rtol=0, atol=0)
        starts = sample_window_starts(5, batch_index, 0, 1, BATCH, dataset.num_starts)
        for row, global_start in enumerate(starts):
            shard, offset = dataset.locate(int(global_start))
            reference = shards[shard][offset : offset + SEQ_LEN + 1]
            assert len(reference) == SEQ_LEN + 1, "the window ends inside its shard"
            assert inputs[row].tolist() == reference[:-1].tolist()
            assert targets[row].tolist() == reference[1:].tolist()


def test_last_window_ends_at_shard_end(data_dir):
    datamodule = make_datamodule(data_dir)
    dataset = TrainWindowDataset(datamodule._train_reader, SEQ_LEN, BATCH, seed=5)
    lengths = datamodule._train_reader.lengths
    assert dataset.num_starts == sum(n - SEQ_LEN for n in lengths)
    shard, offset = dataset.locate(dataset.num_starts - 1)
    assert shard == len(lengths) - 1
    assert offset + SEQ_LEN + 1 == lengths[-1]
    shard, offset = dataset.locate(lengths[0] - SEQ_LEN)  # first start of the second shard
    assert (shard, offset) == (1, 0)
    shard, offset = dataset.locate(lengths[0] - SEQ_LEN - 1)  # last start of the first shard
    assert (shard, offset + SEQ_LEN + 1) == (0, lengths[0])


def test_same_seed_same_batches(data_dir):
    first = take(make_datamodule(data_dir).train_dataloader(), 5)
    second = take(make_datamodule(data_dir).train_dataloader(), 5)
    other_seed = take(make_datamodule(data_dir, seed=6).train_dataloader(), 5)
    assert_same_batches(first, second)
    assert not torch.equal(first[0][0], other_seed[0][0])
    assert not torch.equal(first[0][0], first[1][0])


def test_resume_continues_with_next_batch(data_dir):
    uninterrupted = take(make_datamodule(data_dir).train_dataloader(), 7)

    interrupted = make_datamodule(data_dir)
    take(interrupted.train_dataloader(), 3)
    state = interrupted.state_dict()
    assert state["train_batches_consumed"] == 3

    resumed = make_datamodule(data_dir)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed.train_dataloader(), 4), uninterrupted[3:])
    assert resumed.train_batches_consumed == 7


def test_workers_keep_batch_order(data_dir):
    serial = take(make_datamodule(data_dir).train_dataloader(), 6)
    parallel = take(make_datamodule(data_dir, num_workers=2).train_dataloader(), 6)
    assert_same_batches(serial, parallel)


def test_ranks_get_different_windows(data_dir):
    ranks = []
    for rank in (0, 1):
        datamodule = make_datamodule(data_dir)
        datamodule.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        ranks.append(take(datamodule.train_dataloader(), 3))
    single = take(make_datamodule(data_dir, batch_size=2 * BATCH).train_dataloader(), 3)
    for (x0, _), (x1, _), (x_global, _) in zip(ranks[0], ranks[1], single):
        assert not torch.equal(x0, x1)
        # The global batch is the same however it is split between ranks.
        torch.testing.assert_close(torch.cat([x0, x1]), x_global, rtol=0, atol=0)


def test_validation_windows_are_fixed_and_disjoint(data_dir):
    datamodule = make_datamodule(data_dir)
    manifest = load_manifest(data_dir)
    shards = [np.asarray(shard, dtype=np.int64) for shard in open_split(data_dir, manifest, "val")]
    loader = datamodule.val_dataloader()
    expected_windows = sum((len(shard) - 1) // SEQ_LEN for shard in shards)
    assert len(loader.dataset) == expected_windows

    inputs = torch.cat([x for x, _ in loader])
    targets = torch.cat([y for _, y in loader])
    reference = [
        shard[start : start + SEQ_LEN + 1]
        for shard in shards
        for start in range(0, (len(shard) - 1) // SEQ_LEN * SEQ_LEN, SEQ_LEN)
    ]
    assert inputs.tolist() == [window[:-1].tolist() for window in reference]
    assert targets.tolist() == [window[1:].tolist() for window in reference]
    assert_same_batches(list(loader), list(make_datamodule(data_dir).val_dataloader()))

    capped = make_datamodule(data_dir, val_batches=2).val_dataloader()
    assert len(capped) == 2
    torch.testing.assert_close(torch.cat([x for x, _ in capped]), inputs[: 2 * BATCH], rtol=0, atol=0)


def test_exposes_tokenizer_and_manifest(data_dir):
    datamodule = TokenShardDataModule(str(data_dir), seq_len=SEQ_LEN, batch_size=BATCH)
    with pytest.raises(RuntimeError, match="setup"):
        datamodule.tokenizer
    datamodule.setup("fit")
    assert datamodule.tokenizer.vocab_size == 257
    assert datamodule.manifest == load_manifest(data_dir)


def test_prepare_data_from_sources_with_bpe(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    datamodule = make_datamodule(
        tmp_path / "data", sources=[str(source)], tokenizer="bpe", bpe_vocab_size=300, val_fraction=0.2
    )
    assert datamodule.manifest.config["tokenizer"] == "bpe"
    assert datamodule.tokenizer.vocab_size == datamodule.manifest.vocab_size <= 300
    inputs, _ = take(datamodule.train_dataloader(), 1)[0]
    assert int(inputs.max()) < datamodule.tokenizer.vocab_size


def test_prepare_data_defaults_to_builtin_corpus(tmp_path):
    datamodule = make_datamodule(tmp_path / "data")
    assert datamodule.manifest.sources[0]["kind"] == "default"


def test_setup_without_manifest(tmp_path):
    datamodule = TokenShardDataModule(str(tmp_path), seq_len=SEQ_LEN, batch_size=BATCH)
    with pytest.raises(DataFileNotFoundError, match="call prepare_data"):
        datamodule.setup("fit")


def test_corpus_shorter_than_window(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    manifest = prepare_dataset([str(source)], tmp_path / "data", val_fraction=0.2)
    train_tokens = manifest.splits["train"].num_tokens
    val_tokens = manifest.splits["val"].num_tokens
    assert val_tokens < train_tokens

    datamodule = TokenShardDataModule(str(tmp_path / "data"), seq_len=val_tokens, batch_size=BATCH)
    with pytest.raises(CorpusTooSmallError, match=f"val split .* has {val_tokens} tokens.*seq_len \\+ 1 = {val_tokens + 1}"):
        datamodule.setup("fit")
    datamodule = TokenShardDataModule(str(tmp_path / "data"), seq_len=train_tokens, batch_size=BATCH)
    with pytest.raises(CorpusTooSmallError, match=f"train split .* has {train_tokens} tokens.*= {train_tokens + 1}"):
        datamodule.setup("fit")


def test_prepare_rejects_split_shorter_than_window(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS[:10])
    datamodule = TokenShardDataModule(
        str(tmp_path / "data"), seq_len=4096, batch_size=BATCH, sources=[str(source)], val_fraction=0.3
    )
    with pytest.raises(CorpusTooSmallError, match="fewer than the required 4097"):
        datamodule.prepare_data()


@pytest.mark.parametrize("bpe_vocab_size", [None, 300])
def test_tokenizer_mismatch_with_byte_data(data_dir, bpe_vocab_size):
    datamodule = TokenShardDataModule(
        str(data_dir), seq_len=SEQ_LEN, batch_size=BATCH, tokenizer="bpe", bpe_vocab_size=bpe_vocab_size
    )
    with pytest.raises(TokenizerMismatchError, match="prepared with tokenizer 'byte'.*tokenizer='byte'"):
        datamodule.setup("fit")


def test_tokenizer_mismatch_with_bpe_data(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    prepare_dataset([str(source)], tmp_path / "data", tokenizer="bpe", vocab_size=300, val_fraction=0.2)
    for tokenizer, bpe_vocab_size in (("byte", None), ("bpe", 400)):
        datamodule = TokenShardDataModule(
            str(tmp_path / "data"), seq_len=SEQ_LEN, batch_size=BATCH, tokenizer=tokenizer, bpe_vocab_size=bpe_vocab_size
        )
        with pytest.raises(TokenizerMismatchError, match=r"'bpe' \(vocab_size=300\)"):
            datamodule.setup("fit")
    # The tokenizer.json inside the folder is the same tokenizer, so it matches.
    same = TokenShardDataModule(
        str(tmp_path / "data"), seq_len=SEQ_LEN, batch_size=BATCH, tokenizer=str(tmp_path / "data" / "tokenizer.json")
    )
    same.setup("fit")


def test_corrupt_shard_detected_in_setup(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)
    prepare_dataset([str(source)], tmp_path / "data", val_fraction=0.2)
    shard = tmp_path / "data" / "train-00000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError, match="train-00000.bin' has sha256"):
        TokenShardDataModule(str(tmp_path / "data"), seq_len=SEQ_LEN, batch_size=BATCH).setup("fit")


def test_invalid_arguments():
    with pytest.raises(ValueError, match="seq_len=0 must be >= 1.*batch_size=-1 must be >= 1"):
        TokenShardDataModule("unused", seq_len=0, batch_size=-1)


class BatchRecorder(L.LightningModule):
    """Tiny bigram model that records every training batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(257, 8)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        self.seen.append(inputs.clone())
        logits = self.embedding(inputs) @ self.embedding.weight.T
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def validation_step(self, batch, batch_idx):
        inputs, targets = batch
        logits = self.embedding(inputs) @ self.embedding.weight.T
        self.log("val/loss", F.cross_entropy(logits.flatten(0, 1), targets.flatten()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_trainer(max_steps: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        val_check_interval=2,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_trainer_resume_sees_uninterrupted_batches(data_dir, tmp_path):
    uninterrupted = BatchRecorder()
    make_trainer(6).fit(uninterrupted, datamodule=make_datamodule(data_dir))
    assert len(uninterrupted.seen) == 6

    first_half = BatchRecorder()
    trainer = make_trainer(3)
    trainer.fit(first_half, datamodule=make_datamodule(data_dir))
    checkpoint_path = tmp_path / "step3.ckpt"
    trainer.save_checkpoint(checkpoint_path)
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    assert checkpoint["TokenShardDataModule"]["train_batches_consumed"] == 3

    second_half = BatchRecorder()
    make_trainer(6).fit(second_half, datamodule=make_datamodule(data_dir), ckpt_path=checkpoint_path)
    seen = first_half.seen + second_half.seen
    assert len(seen) == 6
    for resumed, reference in zip(seen, uninterrupted.seen):
        torch.testing.assert_close(resumed, reference, rtol=0, atol=0)
