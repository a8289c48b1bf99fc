"""``aoe eval`` and ``python -m aoe_lightning.evaluation`` on a tiny export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from aoe_lightning.data.tokenizer import ByteTokenizer
from aoe_lightning.evaluation.cli import main
from aoe_lightning.export import save_export
from aoe_lightning.models import ModelConfig, Transformer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"
REPO = Path(__file__).resolve().parents[1]
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"eval data folder {DATA} not found")


@pytest.fixture(scope="module")
def export_path(tmp_path_factory):
    torch.manual_seed(0)
    config = ModelConfig.from_dict({"vocab_size": 257, "n_layers": 1, "n_heads": 2, "d_model": 32,
                                    "max_seq_len": 64, "ffn": {"kind": "dense", "d_ffn": 64}})
    path = tmp_path_factory.mktemp("export") / "model.pt"
    return save_export(path, config, Transformer(config).state_dict(), ByteTokenizer().to_dict(),
                       metadata={"global_step": 7})


@needs_data
def test_cli_writes_results(export_path, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, tb = tmp_path / "out", tmp_path / "tb"
    code = main(["--checkpoint", str(export_path), "--suite", str(REPO / "evals" / "core.yaml"),
                 "--data_dir", str(DATA), "--limit", "4", "--batch_size", "4", "--output_dir", str(out),
                 "--tensorboard_dir", str(tb)])
    assert code == 0

    results = json.loads((out / "results.json").read_text())
    tasks = ["arc_easy_local", "arc_challenge_local", "hellaswag_text_local", "piqa_local"]
    assert sorted(results["results"]) == sorted(tasks)
    assert results["lm_eval_version"] == results["aoe_lightning"]["lm_eval_version"] != "unknown"

    table = (out / "results.md").read_text().splitlines()
    assert table[0] == "| task | metric | value | stderr | n |"
    assert len(table) == 2 + 2 * len(tasks)
    acc_row = next(line for line in table if line.startswith("| piqa_local | acc |"))
    assert acc_row.endswith("| 4 |")
    assert f"{results['results']['piqa_local']['acc,none']:.4f}" in acc_row

    events = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    events.Reload()
    assert "eval/piqa_local/acc_norm" in events.Tags()["scalars"]
    (scalar,) = events.Scalars("eval/piqa_local/acc")
    assert scalar.step == 7
    assert scalar.value == pytest.approx(results["results"]["piqa_local"]["acc,none"])
    assert "piqa_local" in capsys.readouterr().out


@needs_data
def test_cli_tasks_report_every_metric(export_path, tmp_path):
    out = tmp_path / "out"
    code = main(["--checkpoint", str(export_path), "--tasks", "lambada_openai_local", "--data_dir", str(DATA),
                 "--limit", "3", "--batch_size", "2", "--share_prompts", "false", "--output_dir", str(out)])
    assert code == 0

    metrics = [line.split(" | ")[1] for line in (out / "results.md").read_text().splitlines()[2:]]
    assert sorted(metrics) == ["acc", "perplexity"]


def test_cli_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    code = main(["--checkpoint", str(missing), "--tasks", "piqa_local", "--output_dir", str(tmp_path)])
    assert code == 2
    assert f"checkpoint '{missing}' does not exist" in capsys.readouterr().err


def test_cli_unknown_task_offline(export_path, tmp_path, capsys):
    code = main(["--checkpoint", str(export_path), "--tasks", "hand", "--output_dir", str(tmp_path),
                 "--data_dir", str(tmp_path)])
    assert code == 2
    assert "hand has no offline equivalent" in capsys.readouterr().err


def test_cli_unreadable_checkpoint(tmp_path, capsys):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a torch file")
    code = main(["--checkpoint", str(broken), "--text_file", str(broken), "--output_dir", str(tmp_path)])
    assert code == 2
    assert f"could not load checkpoint '{broken}'" in capsys.readouterr().err


def test_cli_missing_data_file(export_path, tmp_path, capsys):
    (tmp_path / "arc").mkdir()
    code = main(["--checkpoint", str(export_path), "--tasks", "arc_easy_local", "--data_dir", str(tmp_path),
                 "--output_dir", str(tmp_path / "out")])
    assert code == 2
    assert "arc/ARC-Easy-Dev.jsonl" in capsys.readouterr().err


def test_cli_unknown_local_task_in_suite(export_path, tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks:\n  - task: arc_easy\n    local: arc_typo_local\n")
    code = main(["--checkpoint", str(export_path), "--suite", str(suite), "--data_dir", str(tmp_path),
                 "--output_dir", str(tmp_path / "out")])
    assert code == 2
    assert "arc_typo_local" in capsys.readouterr().err


@needs_data
def test_module_entry_point_runs_lm_eval(export_path, tmp_path):
    # lm-eval's own command line, with the `aoe` model and the local tasks registered.
    command = [sys.executable, "-m", "aoe_lightning.evaluation", "run", "--model", "aoe",
               "--model_args", f"checkpoint={export_path}", "--tasks", "piqa_local,winogrande_local",
               "--data_dir", str(DATA), "--limit", "3", "--batch_size", "2", "--output_path", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "piqa_local" in done.stdout
    assert "winogrande_local" in done.stdout
    assert list(tmp_path.rglob("results_*.json"))
