"""Training: loss goes down on real text for every FFN kind, TensorBoard tags, exact resume, run-dir safety,
the optimizer schedule and the single-file export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from aoe_lightning.export import ExportError, load_export
from aoe_lightning.training.cli import RunDirectoryError, run_fit
from aoe_lightning.training.export_cli import export_checkpoint
from aoe_lightning.training.export_cli import main as export_main
from aoe_lightning.training.optim import OptimizerConfig, adamw, parameter_groups, warmup_cosine_factor

FFN_ARGS = {
    "dense": ["--model.ffn.kind", "dense", "--model.ffn.d_ffn", "64"],
    "moe": ["--model.ffn.kind", "moe", "--model.ffn.d_ffn", "32", "--model.ffn.num_experts", "4",
            "--model.ffn.top_k", "2"],
    "aoe": ["--model.ffn.kind", "aoe", "--model.ffn.d_ffn", "32", "--model.ffn.num_experts", "4",
            "--model.ffn.top_k", "2", "--model.ffn.d_low", "8"],
}


def fit_args(run_dir: Path, data_dir: Path, steps: int, kind: str = "aoe", extra: list[str] | None = None) -> list[str]:
    """Arguments of a tiny byte-level run (d_model 32, 2 layers, 32-token windows)."""
    return [
        "--seed_everything", "7",
        "--run_dir", str(run_dir),
        "--model.vocab_size", "264", "--model.n_layers", "2", "--model.n_heads", "2", "--model.d_model", "32",
        "--model.max_seq_len", "32",
        *FFN_ARGS[kind],
        "--model.optimizer.lr", "3e-3", "--model.optimizer.min_lr", "3e-4",
        "--model.optimizer.warmup_steps", "2", "--model.optimizer.decay_steps", "40",
        "--data.data_dir", str(data_dir), "--data.seq_len", "32", "--data.batch_size", "8",
        "--data.val_batches", "2",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps), "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--checkpoint_every_n_steps", str(max(1, steps // 2)),
        *(extra or []),
    ]


@pytest.fixture(scope="module")
def shakespeare_data(tmp_path_factory, shared_data) -> Path:
    """Byte-level shards of tinyshakespeare, prepared once for the module."""
    from aoe_lightning.data.prepare import main as prepare_main

    out = tmp_path_factory.mktemp("shakespeare")
    code = prepare_main([
        "prepare", "--source", str(shared_data / "train" / "tinyshakespeare" / "input.txt"),
        "--out", str(out), "--tokenizer", "byte",
    ])
    assert code == 0
    return out


def scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def tags(log_dir: Path) -> set[str]:
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"]) | set(accumulator.Tags()["images"])


@pytest.mark.parametrize("kind", ["dense", "moe", "aoe"])
def test_loss_decreases_on_real_text(kind, tmp_path, shakespeare_data):
    run_dir = tmp_path / kind
    run_fit(fit_args(run_dir, shakespeare_data, steps=30, kind=kind))

    losses = [value for _, value in scalars(run_dir / "tensorboard" / kind, "train/loss")]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, f"{kind}: mean loss went from {first:.3f} to {last:.3f}"
    assert first == pytest.approx(math.log(256), rel=0.1)  # an untrained byte model is near uniform

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 30
    assert summary["val_loss"] < first
    assert summary["tokens_seen"] == 30 * 8 * 32


def test_tensorboard_tags(tmp_path, shakespeare_data):
    run_dir = tmp_path / "run"
    run_fit(fit_args(run_dir, shakespeare_data, steps=10, kind="aoe"))
    found = tags(run_dir / "tensorboard" / "run")

    expected = {
        "train/loss", "train/ppl", "train/loss_total", "train/aux/load_balance", "train/lr", "train/grad_norm",
        "train/tokens_seen", "perf/tokens_per_s", "perf/mfu", "val/loss", "val/ppl",
        "moe/load_entropy/layer_00", "moe/confidence_entropy/layer_01", "moe/max_load/layer_00",
        "moe/dead_expert_fraction/layer_01", "aoe/mean_norm/layer_00/expert_03", "moe/expert_load_heatmap",
    }
    assert expected <= found, f"missing tags: {sorted(expected - found)}"
    load = json.loads((run_dir / "expert_load.json").read_text())
    assert len(load["load_fraction"]) == 2
    assert sum(load["load_fraction"][0]) == pytest.approx(1.0)
    saved = (run_dir / "config.yaml").read_text()
    assert "d_low: 8" in saved


def test_resume_matches_uninterrupted(tmp_path, shakespeare_data):
    steps = 12
    straight = tmp_path / "straight"
    run_fit(fit_args(straight, shakespeare_data, steps=steps, kind="moe"))

    resumed = tmp_path / "resumed"
    run_fit(fit_args(resumed, shakespeare_data, steps=steps // 2, kind="moe"))
    assert (resumed / "checkpoints" / "last.ckpt").is_file()
    run_fit(fit_args(resumed, shakespeare_data, steps=steps, kind="moe", extra=["--ckpt_path", "last"]))

    expected = scalars(straight / "tensorboard" / "straight", "train/loss")
    got = dict(scalars(resumed / "tensorboard" / "resumed", "train/loss"))
    assert [step for step, _ in expected] == sorted(got)
    for step, value in expected:
        assert got[step] == value, f"step {step}: resumed loss {got[step]} != uninterrupted {value}"
    straight_lr = scalars(straight / "tensorboard" / "straight", "train/lr")
    resumed_lr = dict(scalars(resumed / "tensorboard" / "resumed", "train/lr"))
    assert all(resumed_lr[step] == value for step, value in straight_lr)


def test_existing_run_dir_is_not_overwritten(tmp_path, shakespeare_data):
    run_dir = tmp_path / "run"
    run_fit(fit_args(run_dir, shakespeare_data, steps=2, kind="dense"))
    before = (run_dir / "checkpoints" / "last.ckpt").read_bytes()

    with pytest.raises(RunDirectoryError, match="already contains a run"):
        run_fit(fit_args(run_dir, shakespeare_data, steps=2, kind="dense"))
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == before

    run_fit(fit_args(run_dir, shakespeare_data, steps=3, kind="dense", extra=["--overwrite", "true"]))
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 3


def test_vocab_larger_than_embedding_rejected(tmp_path, shakespeare_data):
    args = fit_args(tmp_path / "run", shakespeare_data, steps=2, kind="dense")
    args[args.index("--model.vocab_size") + 1] = "200"
    with pytest.raises(ValueError, match="vocab"):
        run_fit(args)


def test_seq_len_longer_than_model_rejected(tmp_path, shakespeare_data):
    args = fit_args(tmp_path / "run", shakespeare_data, steps=2, kind="dense")
    args[args.index("--data.seq_len") + 1] = "64"
    with pytest.raises(ValueError, match="max_seq_len"):
        run_fit(args)


def test_export_round_trip_logits(tmp_path, shakespeare_data):
    run_dir = tmp_path / "run"
    cli = run_fit(fit_args(run_dir, shakespeare_data, steps=4, kind="aoe"))
    model = cli.model.model.eval()
    probe = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(probe).logits

    out = tmp_path / "model.pt"
    export_checkpoint(run_dir / "checkpoints" / "last.ckpt", out)
    loaded = load_export(out)
    with torch.no_grad():
        got = loaded.model(probe).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert loaded.tokenizer.encode("hi") == [104, 105]
    assert loaded.metadata["global_step"] == 4

    assert export_main([str(run_dir / "checkpoints" / "last.ckpt"), str(out)]) == 2  # exists, no --overwrite
    assert export_main([str(run_dir / "checkpoints" / "last.ckpt"), str(out), "--overwrite"]) == 0


def test_export_rejects_bad_checkpoints(tmp_path):
    with pytest.raises(ExportError, match="not found"):
        export_checkpoint(tmp_path / "missing.ckpt", tmp_path / "out.pt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match="could not be read"):
        export_checkpoint(garbage, tmp_path / "out.pt")
    with pytest.raises(ExportError, match="not found"):
        load_export(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ExportError, match="not an aoe-lightning export"):
        load_export(tmp_path / "foreign.pt")
    assert not (tmp_path / "out.pt").exists()


def test_warmup_cosine_schedule():
    factors = [warmup_cosine_factor(step, 4, 12, lr=1.0, min_lr=0.1) for step in range(16)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0)
    assert factors[8] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert factors[12:] == [0.1] * 4
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))


def test_no_weight_decay_on_norms():
    from aoe_lightning.models import FFNConfig, ModelConfig, Transformer

    model = Transformer(ModelConfig(vocab_size=64, n_layers=1, n_heads=2, d_model=16, max_seq_len=8,
                                    ffn=FFNConfig(kind="aoe", d_ffn=16, num_experts=2, top_k=1, d_low=4)))
    decayed, undecayed = parameter_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in undecayed["params"]} == {
        "blocks.0.attn_norm.weight", "blocks.0.ffn_norm.weight", "norm.weight"
    }
    assert decayed["weight_decay"] == 0.1
    assert undecayed["weight_decay"] == 0.0
    assert OptimizerConfig(lr=1e-3, min_lr=1e-2).validation_errors() == ["optimizer.min_lr=0.01 must be in [0, lr=0.001]"]


def test_fused_adamw_matches_reference():
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(6, 5, generator=generator)
    grads = [torch.randn(6, 5, generator=generator) for _ in range(3)]
    fused_param = torch.nn.Parameter(start.clone())
    reference_param = torch.nn.Parameter(start.clone())
    settings = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8}
    fused = adamw([{"params": [fused_param], "weight_decay": 0.1}], **settings)
    reference = torch.optim.AdamW([{"params": [reference_param], "weight_decay": 0.1}], foreach=False, **settings)

    for grad in grads:
        for param, optimizer in ((fused_param, fused), (reference_param, reference)):
            param.grad = grad.clone()
            optimizer.step()

    assert fused.defaults["fused"] is True
    torch.testing.assert_close(fused_param, reference_param)
    torch.testing.assert_close(fused.state[fused_param]["exp_avg_sq"], reference.state[reference_param]["exp_avg_sq"])


def test_bf16_and_activation_checkpointing(tmp_path, shakespeare_data):
    run_dir = tmp_path / "run"
    extra = ["--trainer.precision", "bf16-mixed", "--model.activation_checkpointing", "true"]
    cli = run_fit(fit_args(run_dir, shakespeare_data, steps=4, kind="aoe", extra=extra))
    assert cli.model.model.activation_checkpointing
    losses = [value for _, value in scalars(run_dir / "tensorboard" / "run", "train/loss")]
    assert len(losses) == 4
    assert all(math.isfinite(value) for value in losses)
    assert cli.model.model.blocks[0].ffn.experts.w_down.dtype == torch.float32  # master weights stay fp32


def test_print_config_lists_ffn_switches(capsys):
    from aoe_lightning.training.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(Path(__file__).resolve().parents[1] / "configs" / "tiny_aoe.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for line in ("kind: aoe", "d_low: 32", "selection: top_k", "gate_norm: softmax_selected", "score_norm: l2"):
        assert line in printed


def test_throughput_state_survives_checkpoint() -> None:
    from aoe_lightning.training.callbacks import ThroughputMonitor

    monitor = ThroughputMonitor()
    monitor.tokens_seen = 4096
    monitor._run_tokens, monitor._run_seconds = 4000, 2.0
    restored = ThroughputMonitor()

    restored.load_state_dict(monitor.state_dict())

    assert restored.tokens_seen == 4096
    assert restored.mean_tokens_per_s == 2000.0
