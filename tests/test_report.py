"""`aoe report` on a micro suite built by the runner with a fake executor: rows, columns, seeds, images."""

import csv
import json
import statistics
from pathlib import Path

import yaml

from aoe_lightning.ablation.report import main as report_main
from aoe_lightning.ablation.report import read_suite, write_report
from aoe_lightning.ablation.runner import main as ablate_main
from aoe_lightning.ablation.plots import last_layer_values, read_scalars

from sweep_base import tiny_sweep_base

REPO = Path(__file__).resolve().parents[1]

BASE = tiny_sweep_base(max_steps=4)


def fake_val_loss(config):
    """A deterministic loss per config, so that expected means and deltas can be computed here."""
    ffn = config["model"]["ffn"]
    return 3.0 - 0.01 * ffn.get("d_low", 0) * (ffn["kind"] == "aoe") + 0.1 * config["seed_everything"]


def fake_acc(config, task):
    return 0.25 + 0.01 * config["seed_everything"] + (0.05 if task == "piqa_local" else 0.0)


class ScalarExecutor:
    """Writes summary.json, expert_load.json, TensorBoard scalars and eval results like the real steps."""

    def __init__(self, fail=()):
        self.fail = set(fail)

    def __call__(self, command, log_path, env):
        from torch.utils.tensorboard import SummaryWriter

        step = command[command.index("aoe_lightning.cli") + 1]
        run_dir = Path(log_path).parent.parent
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("log\n")
        if (step, run_dir.name) in self.fail:
            return 1
        config = yaml.safe_load((run_dir / "point.yaml").read_text())
        if step == "fit":
            loss = fake_val_loss(config)
            (run_dir / "checkpoints").mkdir(exist_ok=True)
            (run_dir / "checkpoints" / "last.ckpt").write_text("ckpt")
            (run_dir / "summary.json").write_text(json.dumps({
                "val_loss": loss, "val_ppl": 2.718281828 ** loss, "tokens_per_s": 1000.0,
                "total_params": 2_000_000, "active_params": 1_000_000, "model_config": config["model"]}))
            load = [[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]]
            (run_dir / "expert_load.json").write_text(json.dumps({"global_step": 4, "load_fraction": load}))
            tensorboard = Path(command[command.index("--tensorboard_dir") + 1]) / run_dir.name
            writer = SummaryWriter(str(tensorboard))
            for step_number, value in ((2, loss + 0.5), (4, loss)):
                writer.add_scalar("val/loss", value, step_number)
                writer.add_scalar("moe/load_entropy/layer_00", 1.2, step_number)
                writer.add_scalar("moe/load_entropy/layer_01", 1.3 + step_number / 100, step_number)
                writer.add_scalar("moe/confidence_entropy/layer_00", 0.9, step_number)
                writer.add_scalar("moe/confidence_entropy/layer_01", 1.0, step_number)
            writer.close()
        elif step == "export":
            Path(command[-2]).write_text("export")
        elif step == "eval":
            out = Path(command[command.index("--output_dir") + 1])
            out.mkdir(parents=True)
            results = {task: {"alias": task, "acc,none": fake_acc(config, task), "acc_stderr,none": 0.01,
                              "acc_norm,none": fake_acc(config, task) + 0.02}
                       for task in ("arc_easy_local", "piqa_local")}
            (out / "results.json").write_text(json.dumps({"results": results}))
        return 0


def build_suite(tmp_path, seeds=None, fail=()):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    spec = {"base": "base.yaml", "baseline": "moe",
            "points": [{"name": "moe"}, {"name": "aoe-dlow{d_low}",
                                         "set": {"model.ffn.kind": "aoe", "model.ffn.d_low": 8}}],
            "eval": {"suite": str(REPO / "evals" / "core.yaml"), "limit": 3}}
    if seeds:
        spec["seeds"] = seeds
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (tmp_path / "evaldata" / "piqa").mkdir(parents=True, exist_ok=True)
    for name in ("valid.jsonl", "valid-labels.lst"):
        (tmp_path / "evaldata" / "piqa" / name).write_text("")
    code = ablate_main([str(tmp_path / "sweep.yaml"), "--output-dir", str(tmp_path / "suite"), "--no-report",
                        "--eval-data-dir", str(tmp_path / "evaldata")], executor=ScalarExecutor(fail))
    return tmp_path / "suite", code


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_rows_columns_and_images(tmp_path):
    suite_dir, code = build_suite(tmp_path)
    assert code == 0
    written = write_report(suite_dir)
    names = {path.name for path in written}
    assert {"results.md", "results.csv", "val_loss_curves.png", "expert_load.png", "routing_entropy.png"} <= names
    for path in written:
        assert path.stat().st_size > 0
    rows = read_rows(suite_dir / "results.csv")
    assert [row["point"] for row in rows] == ["moe", "aoe-dlow8"]
    for column in ("total_params", "active_params", "val_loss", "val_ppl", "tokens_per_s",
                   "arc_easy_local/acc", "arc_easy_local/acc_norm", "piqa_local/acc", "piqa_local/acc_norm",
                   "avg/acc", "avg/acc_norm", "delta/val_loss", "delta/avg/acc"):
        assert column in rows[0], column
    moe_loss, aoe_loss = 3.0 + 0.7, 3.0 - 0.08 + 0.7
    assert float(rows[0]["val_loss"]) == moe_loss
    assert abs(float(rows[1]["val_loss"]) - aoe_loss) < 1e-12
    assert abs(float(rows[1]["delta/val_loss"]) - (aoe_loss - moe_loss)) < 1e-12
    assert float(rows[0]["delta/val_loss"]) == 0.0
    expected_avg = statistics.fmean([0.25 + 0.07, 0.25 + 0.07 + 0.05])
    assert abs(float(rows[0]["avg/acc"]) - expected_avg) < 1e-12
    markdown = (suite_dir / "results.md").read_text()
    assert "suite-offline" in markdown
    assert "| aoe-dlow8 | model.ffn.kind=aoe, model.ffn.d_low=8 |" in markdown
    assert "![val_loss_curves](val_loss_curves.png)" in markdown


def test_report_seeds_mean_and_std(tmp_path):
    suite_dir, code = build_suite(tmp_path, seeds=[1, 2, 3])
    assert code == 0
    write_report(suite_dir, plots=False)
    rows = read_rows(suite_dir / "results.csv")
    assert [row["point"] for row in rows] == ["moe", "aoe-dlow8"]
    losses = [3.0 + 0.1 * seed for seed in (1, 2, 3)]
    assert abs(float(rows[0]["val_loss"]) - statistics.fmean(losses)) < 1e-12
    assert abs(float(rows[0]["val_loss_std"]) - statistics.stdev(losses)) < 1e-12
    assert rows[0]["seeds"] == "3"
    assert "±" in (suite_dir / "results.md").read_text()


def test_report_marks_failed_and_missing(tmp_path):
    suite_dir, code = build_suite(tmp_path, fail={("fit", "aoe-dlow8")})
    assert code == 1
    write_report(suite_dir)
    rows = read_rows(suite_dir / "results.csv")
    assert rows[1]["status"] == "failed"
    assert rows[1]["val_loss"] == ""
    assert rows[1]["delta/val_loss"] == ""
    markdown = (suite_dir / "results.md").read_text()
    failed_line = next(line for line in markdown.splitlines() if line.startswith("| aoe-dlow8 | failed (fit)"))
    assert "failed" in failed_line.split("|")[4]
    assert str(suite_dir / "aoe-dlow8" / "logs" / "fit.log") in markdown


def test_report_on_unstarted_points(tmp_path):
    suite_dir, _ = build_suite(tmp_path)
    suite = json.loads((suite_dir / "suite.json").read_text())
    suite["points"].append({"name": "later", "group": "later", "seed": None, "fields": {}, "config_hash": "x"})
    (suite_dir / "suite.json").write_text(json.dumps(suite))
    write_report(suite_dir, plots=False)
    markdown = (suite_dir / "results.md").read_text()
    line = next(line for line in markdown.splitlines() if line.startswith("| later | missing"))
    assert "n/a" in line


def test_last_layer_values_from_events(tmp_path):
    suite_dir, _ = build_suite(tmp_path)
    scalars = read_scalars(suite_dir / "tensorboard" / "moe")
    assert [step for step, _ in scalars["val/loss"]] == [2, 4]
    values = last_layer_values(scalars, "load_entropy")
    # TensorBoard stores scalars as float32.
    assert abs(values[0] - 1.2) < 1e-6
    assert abs(values[1] - 1.34) < 1e-6


def test_report_cli_errors_on_non_suite(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    assert "suite.json" in capsys.readouterr().err


def test_read_suite_ignores_other_config_runs(tmp_path):
    suite_dir, _ = build_suite(tmp_path)
    state = json.loads((suite_dir / "moe" / "point.json").read_text())
    state["config_hash"] = "something-else"
    (suite_dir / "moe" / "point.json").write_text(json.dumps(state))
    _, records = read_suite(suite_dir)
    assert records[0].status == "missing"
