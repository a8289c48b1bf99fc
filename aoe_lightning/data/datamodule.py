"""``TokenShardDataModule``: fixed-length windows from prepared token shards, resumable and rank-aware.

Training batch ``b`` is a pure function of ``(seed, b, rank, world_size)``: a generator seeded with
``(seed, b)`` draws ``world_size * batch_size`` window starts over all training shards, and rank ``r``
takes the ``r``-th block of ``batch_size`` of them. Ranks therefore get different windows, the global
batch does not depend on how it is split between ranks, and resuming needs only the number of batches
already consumed, which ``state_dict()`` stores.

Every window contains ``seq_len + 1`` consecutive tokens of one shard. A batch is the tuple
``(inputs, targets)`` of int64 tensors of shape ``(batch_size, seq_len)``, with ``targets`` shifted
left by one token. Validation uses fixed windows with stride ``seq_len``, so every validation token
after the first of each shard is predicted exactly once.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from aoe_lightning.data.errors import CorpusTooSmallError, DataFileNotFoundError, TokenizerMismatchError
from aoe_lightning.data.prepare import DEFAULT_SEED, DEFAULT_VAL_FRACTION, prepare_dataset
from aoe_lightning.data.shards import (
    MANIFEST_NAME,
    Manifest,
    load_manifest,
    load_manifest_tokenizer,
    verify_shards,
)
from aoe_lightning.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_fingerprint

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


def sample_window_starts(
    seed: int, batch_index: int, rank: int, world_size: int, batch_size: int, num_starts: int
) -> np.ndarray:
    """Return the ``batch_size`` global window starts of ``rank`` for training batch ``batch_index``.

    ``num_starts`` is the number of valid window starts over all training shards.
    """
    rng = np.random.default_rng([seed, batch_index])
    starts = rng.integers(0, num_starts, size=world_size * batch_size, dtype=np.int64)
    return starts[rank * batch_size : (rank + 1) * batch_size]


class _ShardReader:
    """Memory-maps shards lazily, so that the object pickles cheaply into DataLoader workers."""

    def __init__(self, paths: list[str], lengths: list[int], dtype: str) -> None:
        self.paths = paths
        self.lengths = lengths
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._maps: list[np.memmap] | None = None

    def window(self, shard: int, start: int, length: int) -> torch.Tensor:
        if self._maps is None:
            self._maps = [
                np.memmap(path, dtype=self.dtype, mode="r", shape=(n,)) for path, n in zip(self.paths, self.lengths)
            ]
        tokens = self._maps[shard][start : start + length]
        assert len(tokens) == length, f"window [{start}, {start + length}) overruns shard {self.paths[shard]}"
        return torch.from_numpy(tokens.astype(np.int64))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}


class TrainWindowDataset(IterableDataset):
    """Endless stream of training batches starting at ``start_batch``.

    With several DataLoader workers, worker ``w`` of ``W`` produces batches ``start_batch + w``,
    ``start_batch + w + W``, ..., and the DataLoader's round-robin collection restores batch order.
    """

    def __init__(
        self,
        reader: _ShardReader,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ) -> None:
        self.reader = reader
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        # A shard of n tokens has n - seq_len starts whose window of seq_len + 1 tokens fits in it.
        starts_per_shard = [max(0, n - seq_len) for n in reader.lengths]
        self.bounds = np.concatenate([[0], np.cumsum(starts_per_shard)]).astype(np.int64)
        self.num_starts = int(self.bounds[-1])

    def locate(self, global_start: int) -> tuple[int, int]:
        """Map a global window start to ``(shard index, offset in that shard)``."""
        shard = int(np.searchsorted(self.bounds, global_start, side="right")) - 1
        return shard, int(global_start - self.bounds[shard])

    def batch(self, batch_index: int) -> Batch:
        starts = sample_window_starts(
            self.seed, batch_index, self.rank, self.world_size, self.batch_size, self.num_starts
        )
        windows = torch.stack([self.reader.window(*self.locate(int(g)), self.seq_len + 1) for g in starts])
        return windows[:, :-1], windows[:, 1:]

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        for batch_index in itertools.count(self.start_batch + worker_id, num_workers):
            yield self.batch(batch_index)


class ValWindowDataset(Dataset):
    """Validation windows of ``seq_len + 1`` tokens at stride ``seq_len`` in every shard, in shard order."""

    def __init__(self, reader: _ShardReader, seq_len: int, max_windows: int | None = None) -> None:
        self.reader = reader
        self.seq_len = seq_len
        self.index = [
            (shard, window * seq_len)
            for shard, n in enumerate(reader.lengths)
            for window in range(max(0, (n - 1) // seq_len))
        ]
        if max_windows is not None:
            self.index = self.index[:max_windows]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> Batch:
        shard, start = self.index[item]
        window = self.reader.window(shard, start, self.seq_len + 1)
        return window[:-1], window[1:]


class _ResumableTrainLoader:
    """Training iterable that restarts at the data module's count of consumed batches.

    A DataLoader is built on each ``iter()``, starting at that count. Under a Trainer the count advances
    in ``on_before_batch_transfer``, i.e. when the training loop consumes a batch, because the loop
    fetches one batch ahead. Without a Trainer, it advances as batches are yielded.
    """

    def __init__(self, datamodule: TokenShardDataModule) -> None:
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[Batch]:
        datamodule = self.datamodule
        for batch in datamodule._build_train_loader(start_batch=datamodule.train_batches_consumed):
            if datamodule.trainer is None:
                datamodule._train_batches_consumed += 1
            yield batch


class TokenShardDataModule(L.LightningDataModule):
    """Training and validation windows from a folder prepared by ``aoe data prepare``.

    If ``data_dir`` contains no ``manifest.json``, ``prepare_data()`` prepares it from ``sources`` (or from
    the built-in default corpus when ``sources`` is None) with ``tokenizer``. The training loader is
    endless, so train with ``max_steps`` and an integer ``val_check_interval``.

    Args:
        data_dir: Folder with prepared shards and manifest.json, or where to prepare them.
        seq_len: Tokens per training example; each window contains seq_len + 1 tokens (inputs + shifted targets).
        batch_size: Windows per batch on each device.
        sources: Files, folders, "default" or "hf:NAME[:CONFIG]" to prepare when data_dir contains no manifest.
        tokenizer: "byte", "bpe" (trained on the sources while preparing), a tokenizer.json path or a
            Hugging Face hub name. It must match the tokenizer in an existing manifest.
        bpe_vocab_size: Vocabulary size of a "bpe" tokenizer; with existing data it must match the manifest.
        val_fraction: Probability that a document piece goes to validation when preparing.
        seed: Seed of the train/validation split when preparing and of the training window sampling.
        num_workers: DataLoader worker processes.
        val_batches: Maximum number of validation batches per device and validation run; None uses all
            validation windows.
        text_field: Field with the text in JSONL, Parquet and Hugging Face sources.
        max_tokens: Stop preparing after this many tokens (UTF-8 bytes for "bpe"); None reads everything.
        verify_checksums: Check the sha256 of every shard in setup(); sizes are always checked.
    """

    def __init__(
        self,
        data_dir: str,
        seq_len: int,
        batch_size: int,
        sources: list[str] | None = None,
        tokenizer: str = "byte",
        bpe_vocab_size: int | None = None,
        val_fraction: float = DEFAULT_VAL_FRACTION,
        seed: int = DEFAULT_SEED,
        num_workers: int = 0,
        val_batches: int | None = None,
        text_field: str = "text",
        max_tokens: int | None = None,
        verify_checksums: bool = True,
    ) -> None:
        super().__init__()
        problems = []
        if seq_len < 1:
            problems.append(f"seq_len={seq_len} must be >= 1")
        if batch_size < 1:
            problems.append(f"batch_size={batch_size} must be >= 1")
        if seed < 0:
            problems.append(f"seed={seed} must be >= 0")
        if num_workers < 0:
            problems.append(f"num_workers={num_workers} must be >= 0")
        if val_batches is not None and val_batches < 1:
            problems.append(f"val_batches={val_batches} must be >= 1 or None")
        if problems:
            raise ValueError("invalid TokenShardDataModule arguments: " + "; ".join(problems))
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.sources = sources
        self.tokenizer_spec = tokenizer
        self.vocab_size = bpe_vocab_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.val_batches = val_batches
        self.text_field = text_field
        self.max_tokens = max_tokens
        self.verify_checksums = verify_checksums
        self._manifest: Manifest | None = None
        self._tokenizer: Tokenizer | None = None
        self._train_reader: _ShardReader | None = None
        self._val_reader: _ShardReader | None = None
        self._train_batches_consumed = 0

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            raise RuntimeError("TokenShardDataModule.manifest is available after setup(); call setup() first")
        return self._manifest

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise RuntimeError("TokenShardDataModule.tokenizer is available after setup(); call setup() first")
        return self._tokenizer

    @property
    def train_batches_consumed(self) -> int:
        """Training batches consumed so far; batch number ``train_batches_consumed`` comes next."""
        return self._train_batches_consumed

    def prepare_data(self) -> None:
        if (Path(self.data_dir) / MANIFEST_NAME).exists():
            return
        sources = self.sources or ["default"]
        logger.info("preparing %s from %s with tokenizer %r", self.data_dir, sources, self.tokenizer_spec)
        prepare_dataset(
            sources,
            self.data_dir,
            tokenizer=self.tokenizer_spec,
            vocab_size=self.vocab_size,
            text_field=self.text_field,
            val_fraction=self.val_fraction,
            seed=self.seed,
            max_tokens=self.max_tokens,
            min_split_tokens=self.seq_len + 1,
        )

    def setup(self, stage: str | None = None) -> None:
        if self._manifest is not None:
            return
        data_dir = Path(self.data_dir)
        if not (data_dir / MANIFEST_NAME).exists():
            raise DataFileNotFoundError(
                f"data_dir {self.data_dir!r} contains no {MANIFEST_NAME}; call prepare_data() before setup() or "
                f"run `aoe data prepare --out {self.data_dir}`"
            )
        manifest = load_manifest(data_dir)
        verify_shards(data_dir, manifest, checksums=self.verify_checksums)
        tokenizer = load_manifest_tokenizer(data_dir, manifest)
        self._check_tokenizer(manifest, tokenizer)

        readers = {}
        for split in ("train", "val"):
            shards = [shard for shard in manifest.splits[split].shards if shard.num_tokens > 0]
            readers[split] = _ShardReader(
                [str(data_dir / shard.file) for shard in shards], [shard.num_tokens for shard in shards], manifest.dtype
            )
        window = self.seq_len + 1
        if not any(n >= window for n in readers["train"].lengths):
            raise CorpusTooSmallError(
                f"the train split of {self.data_dir!r} has {manifest.splits['train'].num_tokens} tokens, no shard "
                f"contains one window of seq_len + 1 = {window} tokens; lower seq_len={self.seq_len} or prepare "
                "more text"
            )
        if not any(n >= window for n in readers["val"].lengths):
            raise CorpusTooSmallError(
                f"the val split of {self.data_dir!r} has {manifest.splits['val'].num_tokens} tokens, fewer than one "
                f"window of seq_len + 1 = {window} tokens; lower seq_len={self.seq_len}, or prepare again with a "
                "larger val_fraction or more text"
            )
        self._manifest = manifest
        self._tokenizer = tokenizer
        self._train_reader = readers["train"]
        self._val_reader = readers["val"]

    def _check_tokenizer(self, manifest: Manifest, tokenizer: Tokenizer) -> None:
        """Raise ``TokenizerMismatchError`` unless the requested tokenizer is the one in the manifest."""
        prepared_with = manifest.config.get("tokenizer")
        prepared_vocab = manifest.config.get("vocab_size")
        requested = self.tokenizer_spec
        if requested == "bpe":
            matches = prepared_with == "bpe" and self.vocab_size in (None, prepared_vocab)
        elif requested == "byte":
            matches = manifest.tokenizer.get("type") == "byte"
        elif requested == prepared_with:
            matches = True
        else:
            matches = tokenizer_fingerprint(load_tokenizer(requested)) == tokenizer_fingerprint(tokenizer)
        if not matches:
            prepared_description = f"{prepared_with!r}"
            if prepared_vocab:
                prepared_description += f" (vocab_size={prepared_vocab})"
            requested_description = f"{requested!r}"
            if self.vocab_size:
                requested_description += f" (bpe_vocab_size={self.vocab_size})"
            raise TokenizerMismatchError(
                f"data_dir {self.data_dir!r} was prepared with tokenizer {prepared_description}, but tokenizer "
                f"{requested_description} was requested; request tokenizer={prepared_with!r} or prepare the data "
                "again with the requested tokenizer into another folder"
            )

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return int(self.trainer.global_rank), int(self.trainer.world_size)

    def _build_train_loader(self, start_batch: int) -> DataLoader:
        assert self._train_reader is not None, "setup() must run before train_dataloader()"
        rank, world_size = self._rank_and_world_size()
        dataset = TrainWindowDataset(
            self._train_reader, self.seq_len, self.batch_size, self.seed, rank, world_size, start_batch
        )
        return DataLoader(
            dataset,
            batch_size=None,  # the dataset yields whole batches
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> _ResumableTrainLoader:
        self.setup("fit")
        return _ResumableTrainLoader(self)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        assert self._val_reader is not None
        _, world_size = self._rank_and_world_size()
        max_windows = None if self.val_batches is None else self.val_batches * self.batch_size * world_size
        dataset = ValWindowDataset(self._val_reader, self.seq_len, max_windows)
        # Under DDP/FSDP, Lightning wraps this loader in a DistributedSampler that splits the windows by rank.
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # NOTE: Lightning calls this hook instead of a LightningModule's own on_before_batch_transfer (with a
        # warning), so a module that needs that hook must do its work elsewhere or resume is no longer exact.
        if self.trainer is not None and self.trainer.training:
            self._train_batches_consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        _, world_size = self._rank_and_world_size()
        return {
            "train_batches_consumed": self._train_batches_consumed,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.batch_size * world_size,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _, world_size = self._rank_and_world_size()
        current = {"seed": self.seed, "seq_len": self.seq_len, "global_batch_size": self.batch_size * world_size}
        changed = {key: (state_dict.get(key), value) for key, value in current.items() if state_dict.get(key) != value}
        if changed:
            logger.warning(
                "resuming with different data settings %s (checkpoint, now); the training windows will differ "
                "from the uninterrupted run",
                changed,
            )
        self._train_batches_consumed = int(state_dict["train_batches_consumed"])
