"""The sweep runner: per-point commands, resume by hash, reruns of changed points, failures, SLURM scripts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aoe_lightning.ablation import runner as runner_module
from aoe_lightning.ablation.runner import (
    EVAL_HELDOUT,
    EVAL_OFFLINE,
    EVAL_ONLINE,
    SuiteRunner,
    main,
    plan_eval,
    write_heldout_text,
)
from aoe_lightning.ablation.slurm import slurm_script
from aoe_lightning.ablation.spec import load_sweep

from sweep_base import tiny_sweep_base

REPO = Path(__file__).resolve().parents[1]

BASE = tiny_sweep_base()


def make_eval_data(folder):
    """Create a local eval folder in which the PIQA task finds its files (the FakeExecutor never reads them)."""
    (folder / "piqa").mkdir(parents=True)
    (folder / "piqa" / "valid.jsonl").write_text("")
    (folder / "piqa" / "valid-labels.lst").write_text("")
    return folder


def option(command, name):
    return command[command.index(name) + 1]


class FakeExecutor:
    """Stands in for the `aoe` subprocesses: records commands and writes the files each step would write."""

    def __init__(self, fail=()):
        self.calls = []               # (step, run name, command)
        self.fail = set(fail)         # (step, run name) pairs that exit 1

    def __call__(self, command, log_path, env):
        step = command[command.index("aoe_lightning.cli") + 1]
        run_dir = Path(log_path).parent.parent
        self.calls.append((step, run_dir.name, command))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(f"{step} log\n")
        if (step, run_dir.name) in self.fail:
            return 1
        if step == "fit":
            config = yaml.safe_load(Path(option(command, "--config")).read_text())
            (run_dir / "checkpoints").mkdir(exist_ok=True)
            (run_dir / "checkpoints" / "last.ckpt").write_text("ckpt")
            summary = {"global_step": config["trainer"]["max_steps"], "val_loss": 2.0, "val_ppl": 7.39,
                       "tokens_per_s": 100.0, "total_params": 1000, "active_params": 500}
            (run_dir / "summary.json").write_text(json.dumps(summary))
        elif step == "export":
            Path(command[-2]).write_text("export")
        elif step == "eval":
            out = Path(option(command, "--output_dir"))
            out.mkdir(parents=True)
            (out / "results.json").write_text(json.dumps({"results": {"task": {"acc,none": 0.5}}}))
        return 0

    def steps(self, name=None):
        return [step for step, run, _ in self.calls if name is None or run == name]


def make_spec(tmp_path, spec, base=BASE):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", **spec}, sort_keys=False))
    return path


TWO_POINTS = {"points": [{"name": "moe"}, {"name": "aoe-dlow{d_low}",
                                           "set": {"model.ffn.kind": "aoe", "model.ffn.d_low": 8}}],
              "eval": {"enabled": False}}


def run_suite(spec_path, suite_dir, executor, *extra):
    return main([str(spec_path), "--output-dir", str(suite_dir), "--no-report", *extra], executor=executor)


def test_runs_every_point_with_its_config(tmp_path):
    spec = make_spec(tmp_path, TWO_POINTS)
    executor = FakeExecutor()
    assert run_suite(spec, tmp_path / "suite", executor) == 0
    assert executor.steps() == ["fit", "export", "fit", "export"]
    for step, name, command in executor.calls:
        if step != "fit":
            continue
        run_dir = tmp_path / "suite" / name
        assert option(command, "--config") == str(run_dir / "point.yaml")
        assert option(command, "--run_dir") == str(run_dir)
        assert option(command, "--run_name") == name
        assert option(command, "--tensorboard_dir") == str(tmp_path / "suite" / "tensorboard")
    point = yaml.safe_load((tmp_path / "suite" / "aoe-dlow8" / "point.yaml").read_text())
    assert point["model"]["ffn"]["kind"] == "aoe"
    assert point["model"]["ffn"]["d_low"] == 8
    state = json.loads((tmp_path / "suite" / "aoe-dlow8" / "point.json").read_text())
    assert (state["fit"], state["export"], state["eval"]) == ("done", "done", "skipped")
    suite = json.loads((tmp_path / "suite" / "suite.json").read_text())
    assert [p["name"] for p in suite["points"]] == ["moe", "aoe-dlow8"]


def test_rerun_skips_finished_points(tmp_path):
    spec = make_spec(tmp_path, TWO_POINTS)
    run_suite(spec, tmp_path / "suite", FakeExecutor())
    again = FakeExecutor()
    assert run_suite(spec, tmp_path / "suite", again) == 0
    assert again.calls == []


def test_changed_point_reruns_from_scratch(tmp_path):
    spec = make_spec(tmp_path, TWO_POINTS)
    run_suite(spec, tmp_path / "suite", FakeExecutor())
    changed = dict(TWO_POINTS, points=[{"name": "moe"}, {"name": "aoe-dlow{d_low}",
                                                          "set": {"model.ffn.kind": "aoe", "model.ffn.d_low": 8,
                                                                  "model.optimizer.lr": 5.0e-4}}])
    make_spec(tmp_path, changed)
    executor = FakeExecutor()
    assert run_suite(spec, tmp_path / "suite", executor) == 0
    assert executor.steps("moe") == []
    assert executor.steps("aoe-dlow8") == ["fit", "export"]
    fit_command = executor.calls[0][2]
    assert option(fit_command, "--overwrite") == "true"
    assert "--ckpt_path" not in fit_command
    superseded = list((tmp_path / "suite" / "superseded").iterdir())
    assert len(superseded) == 1
    assert superseded[0].name.startswith("aoe-dlow8-")
    assert (superseded[0] / "run" / "summary.json").is_file()


def test_interrupted_fit_resumes_from_checkpoint(tmp_path):
    spec = make_spec(tmp_path, TWO_POINTS)
    run_suite(spec, tmp_path / "suite", FakeExecutor(fail={("fit", "moe")}))
    run_dir = tmp_path / "suite" / "moe"
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_text("partial")
    executor = FakeExecutor()
    assert run_suite(spec, tmp_path / "suite", executor) == 0
    assert executor.steps() == ["fit", "export"]
    assert option(executor.calls[0][2], "--ckpt_path") == "last"


def test_failed_point_does_not_stop_suite(tmp_path):
    spec = make_spec(tmp_path, TWO_POINTS)
    executor = FakeExecutor(fail={("fit", "moe")})
    assert run_suite(spec, tmp_path / "suite", executor) == 1
    assert executor.steps("aoe-dlow8") == ["fit", "export"]
    state = json.loads((tmp_path / "suite" / "moe" / "point.json").read_text())
    assert state["fit"] == "failed"
    assert state["log"] == str(tmp_path / "suite" / "moe" / "logs" / "fit.log")


def test_fit_without_summary_counts_as_failed(tmp_path):
    spec = make_spec(tmp_path, TWO_POINTS)

    class NoSummary(FakeExecutor):
        def __call__(self, command, log_path, env):
            code = super().__call__(command, log_path, env)
            (Path(log_path).parent.parent / "summary.json").unlink(missing_ok=True)
            return code

    assert run_suite(spec, tmp_path / "suite", NoSummary(), "--only", "moe") == 1
    assert "wrote no" in (tmp_path / "suite" / "moe" / "logs" / "fit.log").read_text()


def test_threads_option_sets_environment(tmp_path):
    spec = make_spec(tmp_path, TWO_POINTS)
    environments = []

    class Recording(FakeExecutor):
        def __call__(self, command, log_path, env):
            environments.append(env)
            return super().__call__(command, log_path, env)

    assert run_suite(spec, tmp_path / "suite", Recording(), "--threads", "1") == 0
    assert {env["OMP_NUM_THREADS"] for env in environments} == {"1"}


def test_only_eval_runs_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    spec = make_spec(tmp_path, dict(TWO_POINTS, eval={"suite": str(REPO / "evals" / "core.yaml")}))
    environments = {}

    class Recording(FakeExecutor):
        def __call__(self, command, log_path, env):
            environments[command[command.index("aoe_lightning.cli") + 1]] = env
            return super().__call__(command, log_path, env)

    data = make_eval_data(tmp_path / "evaldata")
    assert run_suite(spec, tmp_path / "suite", Recording(), "--eval-data-dir", str(data)) == 0
    assert "HF_DATASETS_OFFLINE" not in environments["fit"]
    assert "HF_HUB_OFFLINE" not in environments["export"]
    assert environments["eval"]["HF_DATASETS_OFFLINE"] == "1"
    assert environments["eval"]["HF_HUB_OFFLINE"] == "1"


def test_only_selects_points(tmp_path):
    spec = make_spec(tmp_path, TWO_POINTS)
    executor = FakeExecutor()
    assert run_suite(spec, tmp_path / "suite", executor, "--only", "aoe-dlow8") == 0
    assert {name for _, name, _ in executor.calls} == {"aoe-dlow8"}


def test_eval_command_and_changed_eval_reruns_only_eval(tmp_path):
    data = make_eval_data(tmp_path / "evaldata")
    spec_values = dict(TWO_POINTS, eval={"suite": str(REPO / "evals" / "core.yaml"), "limit": 5})
    spec = make_spec(tmp_path, spec_values)
    executor = FakeExecutor()
    assert run_suite(spec, tmp_path / "suite", executor, "--eval-data-dir", str(data)) == 0
    eval_command = [c for s, n, c in executor.calls if s == "eval" and n == "moe"][0]
    assert option(eval_command, "--data_dir") == str(data.resolve())
    assert option(eval_command, "--limit") == "5"
    assert "--skip_unavailable" in eval_command
    assert option(eval_command, "--suite") == str(REPO / "evals" / "core.yaml")
    assert option(eval_command, "--tensorboard_dir") == str(tmp_path / "suite" / "tensorboard" / "moe")

    make_spec(tmp_path, dict(spec_values, eval={"suite": str(REPO / "evals" / "core.yaml"), "limit": 7}))
    again = FakeExecutor()
    assert run_suite(spec, tmp_path / "suite", again, "--eval-data-dir", str(data)) == 0
    assert again.steps() == ["eval", "eval"]


def test_plan_eval_modes(tmp_path):
    spec = make_spec(tmp_path, dict(TWO_POINTS, eval={"suite": str(REPO / "evals" / "core.yaml")}))
    sweep = load_sweep(spec)
    data = make_eval_data(tmp_path / "evaldata")
    offline = plan_eval(sweep, str(data), False, {})
    assert offline.mode == EVAL_OFFLINE
    assert "tasks: piqa_local" in offline.reason
    assert "skipped, no local data: arc_easy, arc_challenge, hellaswag" in offline.reason
    from_env = plan_eval(sweep, None, False, {"AOE_EVAL_DATA": str(data)})
    assert (from_env.mode, from_env.data_dir) == (EVAL_OFFLINE, str(data.resolve()))
    assert plan_eval(sweep, None, True, {}).mode == EVAL_ONLINE
    assert plan_eval(sweep, None, False, {}).mode == EVAL_HELDOUT
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plan_eval(sweep, str(tmp_path / "missing"), False, {})


def test_heldout_text_decodes_validation_split(tmp_path):
    from aoe_lightning.data.prepare import prepare_dataset
    from aoe_lightning.data.shards import load_manifest, open_split

    paragraphs = [f"Document number {i} talks about topic {i * 7}.\nIt has a second line." for i in range(60)]
    source = tmp_path / "corpus.txt"
    source.write_text("\n\n".join(paragraphs))
    data_dir = tmp_path / "data"
    prepare_dataset([str(source)], data_dir, tokenizer="byte", val_fraction=0.3, max_document_chars=80)
    target = write_heldout_text(data_dir, tmp_path / "heldout.txt", max_chars=10_000)
    text = target.read_text()
    manifest = load_manifest(data_dir)
    ids = [int(i) for shard in open_split(data_dir, manifest, "val") for i in shard]
    expected = bytes(i for i in ids if i != manifest.eos_id).decode()
    assert text.replace("\n", "") == expected.replace("\n", "")
    assert "Document number" in text


def test_dry_run_prints_points(tmp_path, capsys):
    spec = make_spec(tmp_path, TWO_POINTS)
    executor = FakeExecutor()
    assert main([str(spec), "--dry-run"], executor=executor) == 0
    out = capsys.readouterr().out
    assert "aoe-dlow8" in out
    assert "model.ffn.d_low=8" in out
    assert executor.calls == []


def test_bad_spec_exit_code(tmp_path, capsys):
    spec = make_spec(tmp_path, {"points": [{"name": "x", "set": {"model.ffn.nope": 1}}]})
    assert main([str(spec), "--dry-run"]) == 2
    assert "model.ffn.nope" in capsys.readouterr().err


def test_slurm_script_text(tmp_path):
    base = dict(BASE, trainer={"accelerator": "gpu", "devices": 8, "num_nodes": 4, "max_steps": 5})
    spec = make_spec(tmp_path, {"points": [{"name": "k{top_k}", "grid": {"model.ffn.top_k": [1, 2, 4]}}],
                                "eval": {"suite": str(REPO / "evals" / "core.yaml"), "limit": 10}}, base=base)
    script_path = tmp_path / "sweep.sbatch"
    assert main([str(spec), "--output-dir", str(tmp_path / "suite"), "--emit-slurm", str(script_path),
                 "--eval-data-dir", str(make_eval_data(tmp_path / "evaldata"))]) == 0
    script = script_path.read_text()
    assert "#SBATCH --array=0-2" in script
    assert "#SBATCH --nodes=4" in script
    assert "#SBATCH --ntasks-per-node=8" in script
    assert "#SBATCH --gpus-per-node=8" in script
    assert "NAMES=(k1 k2 k4)" in script
    assert 'srun "$PYTHON" -m aoe_lightning.cli fit --config "$RUN/point.yaml"' in script
    assert 'START=(--ckpt_path last); else START=(--overwrite true)' in script
    assert "--limit 10" in script
    assert f"--data_dir {(tmp_path / 'evaldata').resolve()}" in script
    for name, k in (("k1", 1), ("k2", 2), ("k4", 4)):
        config = yaml.safe_load((tmp_path / "suite" / name / "point.yaml").read_text())
        assert config["model"]["ffn"]["top_k"] == k
    assert "mark fit done" in script
    assert "mark eval done" in script
    assert "trap 'mark \"$STEP\" failed' ERR" in script
    check = subprocess.run(["bash", "-n", str(script_path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_mark_step_updates_point_state(tmp_path):
    spec = make_spec(tmp_path, TWO_POINTS)
    main([str(spec), "--output-dir", str(tmp_path / "suite"), "--emit-slurm", str(tmp_path / "s.sbatch")])
    run_dir = tmp_path / "suite" / "moe"
    runner_module.mark_step(run_dir, "fit", "done")
    runner_module.mark_step(run_dir, "export", "failed")
    state = json.loads((run_dir / "point.json").read_text())
    assert state["fit"] == "done"
    assert state["export"] == "failed"
    assert state["log"] == str(run_dir / "logs" / "export.log")
    runner_module.mark_step(run_dir, "export", "done")
    state = json.loads((run_dir / "point.json").read_text())
    assert state["export"] == "done"
    assert state["failed_step"] is None
    assert state["log"] is None
    with pytest.raises(ValueError, match="status done/failed"):
        runner_module.mark_step(run_dir, "fit", "maybe")


def test_slurm_script_heldout_mode(tmp_path):
    spec = make_spec(tmp_path, dict(TWO_POINTS, eval={"suite": str(REPO / "evals" / "core.yaml")}))
    sweep = load_sweep(spec)
    plan = plan_eval(sweep, None, False, {})
    script = slurm_script(SuiteRunner(sweep, tmp_path / "suite", plan), sweep.points, "job")
    assert "#SBATCH --array=0-1" in script
    assert "#SBATCH --gpus-per-node" not in script
    assert "write_heldout_text" in script
    assert '--text_file "$HELDOUT"' in script


@pytest.mark.slow
def test_tiny_suite_end_to_end(tmp_path, shared_data):
    """Two real points of a few steps each: fit, export, held-out perplexity eval and the report."""
    from aoe_lightning.data.prepare import prepare_dataset

    # Short pieces so that a 60 kB slice still gives both splits text.
    prepare_dataset([str(shared_data / "train" / "tinyshakespeare" / "input.txt")], tmp_path / "data",
                    tokenizer="byte", max_tokens=60_000, max_document_chars=2_000, val_fraction=0.2)
    base = dict(BASE)
    base["model"] = dict(BASE["model"], vocab_size=264)
    base["data"] = {"data_dir": str(tmp_path / "data"), "tokenizer": "byte", "seq_len": 32, "batch_size": 2,
                    "val_batches": 2}
    base["trainer"] = {"accelerator": "cpu", "devices": 1, "max_steps": 4, "val_check_interval": 2,
                       "log_every_n_steps": 1, "enable_progress_bar": False}
    spec = make_spec(tmp_path, dict(TWO_POINTS, eval={"suite": str(REPO / "evals" / "core.yaml"),
                                                      "heldout_max_chars": 2000, "batch_size": 8}), base=base)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("AOE_EVAL_DATA", None)
    completed = subprocess.run([sys.executable, "-m", "aoe_lightning.cli", "ablate", str(spec),
                                "--output-dir", str(tmp_path / "suite")],
                               capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "heldout-perplexity" in completed.stdout
    suite = tmp_path / "suite"
    for name in ("moe", "aoe-dlow8"):
        results = json.loads((suite / name / "eval" / "results.json").read_text())
        assert "bits_per_byte,none" in results["results"]["text_perplexity"]
    assert (suite / "results.md").is_file()
    assert (suite / "val_loss_curves.png").is_file()


def test_eval_folder_without_task_files_fails_early(tmp_path, capsys):
    spec = make_spec(tmp_path, dict(TWO_POINTS, eval={"suite": str(REPO / "evals" / "core.yaml")}))
    (tmp_path / "wrong").mkdir()
    executor = FakeExecutor()

    assert run_suite(spec, tmp_path / "suite", executor, "--eval-data-dir", str(tmp_path / "wrong")) == 2

    assert executor.calls == []
    error = capsys.readouterr().err
    assert "has no file of any task in core.yaml" in error
    assert "pass the folder that contains them" in error


def test_failed_eval_keeps_previous_results(tmp_path):
    data = make_eval_data(tmp_path / "evaldata")
    spec_values = dict(TWO_POINTS, eval={"suite": str(REPO / "evals" / "core.yaml"), "limit": 5})
    spec = make_spec(tmp_path, spec_values)
    assert run_suite(spec, tmp_path / "suite", FakeExecutor(), "--eval-data-dir", str(data)) == 0
    results = tmp_path / "suite" / "moe" / "eval" / "results.json"
    before = results.read_text()

    make_spec(tmp_path, dict(spec_values, eval={"suite": str(REPO / "evals" / "core.yaml"), "limit": 7}))
    assert run_suite(spec, tmp_path / "suite", FakeExecutor(fail={("eval", "moe")}),
                     "--eval-data-dir", str(data)) == 1

    assert results.read_text() == before
    assert not (tmp_path / "suite" / "moe" / "eval.previous").exists()
