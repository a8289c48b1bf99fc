"""Two-process DDP and FSDP2 training on CPU (gloo), launched as subprocesses, and their exports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aoe_lightning.export import load_export
from aoe_lightning.training.export_cli import export_checkpoint

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from distributed_fit import probe_batch  # noqa: E402


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory, shared_data) -> Path:
    from aoe_lightning.data.prepare import main as prepare_main

    out = tmp_path_factory.mktemp("hamlet")
    source = shared_data / "train" / "gutenberg_nltk2006" / "shakespeare-hamlet.txt"
    assert prepare_main(["prepare", "--source", str(source), "--out", str(out), "--tokenizer", "byte"]) == 0
    return out


def launch(tmp_path: Path, data_dir: Path, strategy_args: list[str]) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    probe_out = tmp_path / "probe_logits.pt"
    args = [
        sys.executable, str(HERE / "distributed_fit.py"), str(probe_out),
        "--seed_everything", "3", "--run_dir", str(run_dir),
        "--model.vocab_size", "264", "--model.n_layers", "2", "--model.n_heads", "2", "--model.d_model", "32",
        "--model.max_seq_len", "32", "--model.ffn.kind", "aoe", "--model.ffn.d_ffn", "32",
        "--model.ffn.num_experts", "4", "--model.ffn.top_k", "1", "--model.ffn.d_low", "8",
        "--model.optimizer.warmup_steps", "1", "--model.optimizer.lr", "1e-3",
        "--data.data_dir", str(data_dir), "--data.seq_len", "32", "--data.batch_size", "4", "--data.val_batches", "1",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_steps", "6",
        "--trainer.val_check_interval", "6", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--checkpoint_every_n_steps", "6",
        *strategy_args,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, f"distributed run failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return run_dir, probe_out


def check_export_matches(tmp_path: Path, checkpoint: Path, probe_out: Path) -> None:
    export = export_checkpoint(checkpoint, tmp_path / "model.pt")
    loaded = load_export(export)
    # The ranks ran with one thread each; the same thread count gives the same matmul blocking, so the
    # logits must match bit for bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            logits = loaded.model(probe_batch(256, loaded.config.max_seq_len)).logits
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(logits, torch.load(probe_out), rtol=0, atol=0)
    assert loaded.metadata["global_step"] == 6


@pytest.mark.slow
def test_fsdp_two_processes_export(tmp_path, byte_data):
    run_dir, probe_out = launch(tmp_path, byte_data, ["--fsdp", "true"])
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir(), "FSDP saves a sharded checkpoint folder by default"
    assert {p.name for p in checkpoint.iterdir()} >= {".metadata", "meta.pt"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tokens_seen"] == 6 * 2 * 4 * 32
    check_export_matches(tmp_path, checkpoint, probe_out)


@pytest.mark.slow
def test_ddp_two_processes_export(tmp_path, byte_data):
    run_dir, probe_out = launch(tmp_path, byte_data, ["--trainer.strategy", "ddp"])
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    check_export_matches(tmp_path, checkpoint, probe_out)
