"""``aoe ablate``: train, export and evaluate every point of a sweep spec, then write the report.

    aoe ablate ablations/smoke.yaml [--output-dir DIR] [--dry-run] [--only NAME ...] [--threads N]
               [--eval-data-dir DIR | --eval-online] [--emit-slurm FILE]

Evaluation uses the spec's suite on local data (``--eval-data-dir``, ``eval.data_dir`` or ``$AOE_EVAL_DATA``),
else lm-eval's hub datasets when ``--eval-online`` is given, else perplexity on the held-out validation text
of the training corpus. The choice is printed and recorded in ``results.md``.

Suite directory layout (default ``runs/<spec stem>``)::

    suite.json                 the resolved sweep: points, fields, hashes, eval mode (the report reads it)
    tensorboard/<point>/       one TensorBoard run per point: training scalars and eval/<task>/<metric>
    heldout/<data>.txt         decoded validation text, when evaluation falls back to perplexity
    <point>/point.yaml         the point's full `aoe fit` config
    <point>/point.json         name, fields, config and eval hashes, and the state of each step
    <point>/logs/{fit,export,eval}.log
    <point>/export.pt, <point>/eval/results.json, plus everything `aoe fit` writes
    superseded/                earlier runs of points whose config changed
    results.md, results.csv, *.png   written by `aoe report`

Each step is a subprocess (``python -m aoe_lightning.cli fit|export|eval``). Re-running the command skips
steps whose outputs match the point's hashes, resumes an interrupted fit from its last checkpoint, and moves
the run of a point whose config changed to ``superseded/`` before training it again from scratch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from aoe_lightning.ablation.spec import Point, SpecError, Sweep, config_hash, get_dotted, load_sweep

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

# Evaluation modes, recorded in suite.json and shown in results.md.
EVAL_OFFLINE = "suite-offline"
EVAL_ONLINE = "suite-online"
EVAL_HELDOUT = "heldout-perplexity"
EVAL_NONE = "none"

# An executor runs one command with its output captured to a log file and returns the exit status.
Executor = Callable[[list[str], Path, dict[str, str]], int]


def subprocess_executor(command: list[str], log_path: Path, env: dict[str, str]) -> int:
    """Run ``command`` with stdout and stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log_file:
        log_file.write(f"$ {' '.join(command)}\n")
        log_file.flush()
        completed = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    return completed.returncode


@dataclass(frozen=True)
class EvalPlan:
    """The evaluation that every point of one invocation gets."""

    mode: str                          # EVAL_OFFLINE, EVAL_ONLINE, EVAL_HELDOUT or EVAL_NONE
    suite: str | None
    data_dir: str | None
    limit: int | None
    batch_size: int
    heldout_max_chars: int
    reason: str                        # one line saying why this mode was chosen

    def settings(self) -> dict[str, Any]:
        """Return the settings that the eval hash covers."""
        return {"mode": self.mode, "suite": self.suite, "suite_text": _read_text(self.suite),
                "data_dir": self.data_dir, "limit": self.limit, "batch_size": self.batch_size,
                "heldout_max_chars": self.heldout_max_chars if self.mode == EVAL_HELDOUT else None}


def _read_text(path: str | None) -> str | None:
    return Path(path).read_text(encoding="utf-8") if path and Path(path).is_file() else None


def plan_eval(sweep: Sweep, eval_data_dir: str | None, online: bool, environ: dict[str, str]) -> EvalPlan:
    """Choose how points are scored: local suite data, the hub's tasks (only when asked), or held-out perplexity.

    The local data folder is ``--eval-data-dir``, else the spec's ``eval.data_dir``, else the environment
    variable named by ``eval.data_dir_env`` (``AOE_EVAL_DATA``).
    """
    settings = sweep.eval
    common = dict(limit=settings.limit, batch_size=settings.batch_size, heldout_max_chars=settings.heldout_max_chars)
    if not settings.enabled:
        return EvalPlan(EVAL_NONE, None, None, reason="evaluation disabled in the spec", **common)
    data_dir = eval_data_dir or settings.data_dir or environ.get(settings.data_dir_env) or None
    if data_dir and settings.suite:
        path = Path(data_dir).expanduser().resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"eval data folder {str(path)!r} does not exist; pass an existing folder as "
                                    f"--eval-data-dir or in ${settings.data_dir_env}")
        tasks = _local_suite_tasks(settings.suite, path)
        return EvalPlan(EVAL_OFFLINE, settings.suite, str(path),
                        reason=f"suite {Path(settings.suite).name} on local data in {path} ({tasks})", **common)
    if online and settings.suite:
        return EvalPlan(EVAL_ONLINE, settings.suite, None,
                        reason=f"suite {Path(settings.suite).name} with lm-eval's hub datasets (--eval-online)",
                        **common)
    missing = "no eval suite in the spec" if not settings.suite else (
        f"no local eval data (--eval-data-dir, eval.data_dir or ${settings.data_dir_env}) and no --eval-online")
    return EvalPlan(EVAL_HELDOUT, None, None,
                    reason=f"perplexity on the held-out validation text of the training corpus; {missing}", **common)


def _local_suite_tasks(suite_path: str, data_dir: Path) -> str:
    """Describe which suite tasks have files in ``data_dir``; raise FileNotFoundError when none has.

    Checked before any training, so that a wrong folder fails in seconds instead of after every fit.
    """
    from aoe_lightning.evaluation.suites import load_suite, resolve_suite
    from aoe_lightning.evaluation.tasks import LOCAL_TASKS

    suite = load_suite(suite_path)
    resolved = resolve_suite(suite, data_dir, skip_unavailable=True)
    if not resolved.specs:
        expected = sorted({f for entry in suite.entries for name in entry.local for f in LOCAL_TASKS[name].eval_files})
        raise FileNotFoundError(
            f"eval data folder {str(data_dir)!r} has no file of any task in {Path(suite_path).name} "
            f"(expected for example {', '.join(expected[:3])}); pass the folder that contains them"
        )
    names = [spec["task"] for spec in resolved.specs]
    skipped = f"; skipped, no local data: {', '.join(resolved.skipped)}" if resolved.skipped else ""
    return f"tasks: {', '.join(names)}{skipped}"


# ---------------------------------------------------------------------------------------------
# Point state


@dataclass
class PointState:
    """Contents of ``RUN/point.json``."""

    name: str
    group: str
    seed: int | None
    fields: dict[str, Any]
    hash: str                          # config + eval settings: a point with this hash and all steps done is finished
    config_hash: str
    eval_hash: str
    fit: str = "pending"               # pending | done | failed
    export: str = "pending"
    eval: str = "pending"
    failed_step: str | None = None
    log: str | None = None             # log of the failed step

    @classmethod
    def read(cls, path: Path) -> PointState | None:
        if not path.is_file():
            return None
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
            return cls(**{key: values[key] for key in cls.__dataclass_fields__ if key in values})
        except (ValueError, TypeError, KeyError):
            log.warning("ignoring unreadable %s", path)
            return None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2, default=str) + "\n", encoding="utf-8")

    @property
    def finished(self) -> bool:
        return self.fit == "done" and self.export == "done" and self.eval in ("done", "skipped")


@dataclass
class PointResult:
    name: str
    status: str                        # done | skipped | failed
    seconds: float
    message: str = ""


class SuiteRunner:
    """Runs the points of one sweep into one suite directory."""

    def __init__(self, sweep: Sweep, suite_dir: Path, plan: EvalPlan, executor: Executor = subprocess_executor,
                 python: str = sys.executable, echo: Callable[[str], None] = print, threads: int | None = None) -> None:
        self.sweep = sweep
        self.suite_dir = suite_dir
        self.plan = plan
        self.executor = executor
        self.python = python
        self.echo = echo
        self.threads = threads
        self.eval_hash = config_hash({}, plan.settings())

    @property
    def tensorboard_dir(self) -> Path:
        return self.suite_dir / "tensorboard"

    def run_dir(self, point: Point) -> Path:
        return self.suite_dir / point.name

    def point_state(self, point: Point) -> PointState:
        config_digest = point.config_hash
        return PointState(name=point.name, group=point.group, seed=point.seed, fields=point.fields,
                          hash=config_hash(point.config, self.plan.settings()), config_hash=config_digest,
                          eval_hash=self.eval_hash)

    def write_suite_file(self, points: list[Point]) -> None:
        """Write suite.json, which `aoe report` reads, with every point of the spec (not only the selected ones)."""
        self.suite_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "spec": str(self.sweep.path.resolve()),
            "stem": self.sweep.stem,
            "description": self.sweep.description,
            "base": str(self.sweep.base_path),
            "baseline": self.sweep.baseline,
            "overrides": self.sweep.overrides,
            "eval": asdict(self.plan),
            "points": [{"name": p.name, "group": p.group, "seed": p.seed, "fields": p.fields,
                        "labels": p.labels, "config_hash": p.config_hash} for p in self.sweep.points],
        }
        (self.suite_dir / "suite.json").write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")

    def prepare_point(self, point: Point) -> tuple[Path, PointState]:
        """Write point.yaml and point.json; move aside an earlier run whose config differs."""
        run_dir = self.run_dir(point)
        fresh = self.point_state(point)
        previous = PointState.read(run_dir / "point.json")
        if previous is not None and previous.config_hash != fresh.config_hash:
            self.supersede(point, previous.config_hash)
            previous = None
        elif previous is None and run_dir.exists() and any(run_dir.iterdir()):
            self.supersede(point, "unknown")
        if previous is not None:
            fresh.fit, fresh.export = previous.fit, previous.export
            if previous.eval_hash == fresh.eval_hash:
                fresh.eval = previous.eval
        if fresh.fit == "failed":
            fresh.fit = "pending"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "point.yaml").write_text(yaml.safe_dump(point.config, sort_keys=False), encoding="utf-8")
        fresh.write(run_dir / "point.json")
        return run_dir, fresh

    def supersede(self, point: Point, old_hash: str) -> None:
        """Move an earlier run of ``point`` (run dir and TensorBoard run) to superseded/NAME-<hash>-<time>."""
        target = self.suite_dir / "superseded" / f"{point.name}-{old_hash}-{time.strftime('%Y%m%d-%H%M%S')}"
        target.mkdir(parents=True, exist_ok=True)
        run_dir = self.run_dir(point)
        if run_dir.exists():
            shutil.move(str(run_dir), str(target / "run"))
        events = self.tensorboard_dir / point.name
        if events.exists():
            shutil.move(str(events), str(target / "tensorboard"))
        log.info("point %s: its config changed; moved the earlier run to %s", point.name, target)

    # ----------------------------------------------------------------------------------------- commands

    def fit_command(self, point: Point, run_dir: Path, resume: bool) -> list[str]:
        command = [self.python, "-m", "aoe_lightning.cli", "fit", "--config", str(run_dir / "point.yaml"),
                   "--run_dir", str(run_dir), "--run_name", point.name,
                   "--tensorboard_dir", str(self.tensorboard_dir)]
        return command + (["--ckpt_path", "last"] if resume else ["--overwrite", "true"])

    def export_command(self, run_dir: Path) -> list[str]:
        return [self.python, "-m", "aoe_lightning.cli", "export", str(run_dir / "checkpoints" / "last.ckpt"),
                str(run_dir / "export.pt"), "--overwrite"]

    def eval_command(self, point: Point, run_dir: Path, heldout: Path | None) -> list[str]:
        plan = self.plan
        command = [self.python, "-m", "aoe_lightning.cli", "eval", "--checkpoint", str(run_dir / "export.pt"),
                   "--output_dir", str(run_dir / "eval"), "--batch_size", str(plan.batch_size),
                   "--tensorboard_dir", str(self.tensorboard_dir / point.name)]
        if plan.mode == EVAL_HELDOUT:
            command += ["--text_file", str(heldout)]
        else:
            command += ["--suite", str(plan.suite)]
        if plan.mode == EVAL_OFFLINE:
            # A local folder rarely holds every task of a suite, and the paper suite's SIQA, MNLI, QNLI and
            # SST-2 have no offline reader. Score what is there; the report shows which tasks ran.
            command += ["--data_dir", str(plan.data_dir), "--skip_unavailable"]
        if plan.limit is not None:
            command += ["--limit", str(plan.limit)]
        return command

    def environment(self, step: str) -> dict[str, str]:
        """Return the environment of one step's subprocess.

        Training keeps hub access, because a config may stream a Hugging Face dataset or tokenizer. Evaluation
        runs offline unless ``--eval-online`` requested the hub, so that it never falls back to downloading a task.
        """
        env = dict(os.environ)
        if step == "eval" and self.plan.mode != EVAL_ONLINE:
            env.update(OFFLINE_ENV)
        if self.plan.mode == EVAL_ONLINE:
            # The hub tasks were requested: a local folder from the environment must not switch eval to it.
            env.pop(self.sweep.eval.data_dir_env, None)
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)
        pythonpath = env.get("PYTHONPATH", "")
        if str(REPO_ROOT) not in pythonpath.split(os.pathsep) and (REPO_ROOT / "aoe_lightning").is_dir():
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), pythonpath) if p)
        return env

    # ----------------------------------------------------------------------------------------- running

    def run_point(self, point: Point, index: int, total: int) -> PointResult:
        start = time.perf_counter()
        run_dir, state = self.prepare_point(point)
        prefix = f"[{index}/{total}] {point.name}"
        if state.finished:
            self.echo(f"{prefix}: finished earlier (hash {state.hash}), skipped")
            return PointResult(point.name, "skipped", 0.0)
        logs = run_dir / "logs"
        steps_done = []

        def fail(step: str) -> PointResult:
            setattr(state, step, "failed")
            state.failed_step, state.log = step, str(logs / f"{step}.log")
            state.write(run_dir / "point.json")
            seconds = time.perf_counter() - start
            self.echo(f"{prefix}: FAILED in {step} after {seconds:.0f}s; see {logs / f'{step}.log'}")
            return PointResult(point.name, "failed", seconds, f"{step} failed; see {logs / f'{step}.log'}")

        state.failed_step = state.log = None
        if state.fit != "done":
            resume = (run_dir / "checkpoints" / "last.ckpt").exists()
            if not resume:
                # A fresh start: no events of an earlier attempt may mix into this run's curves.
                shutil.rmtree(self.tensorboard_dir / point.name, ignore_errors=True)
            if self.executor(self.fit_command(point, run_dir, resume), logs / "fit.log", self.environment("fit")) != 0:
                return fail("fit")
            if not (run_dir / "summary.json").is_file():
                with open(logs / "fit.log", "a", encoding="utf-8") as log_file:
                    log_file.write(f"aoe ablate: fit exited 0 but wrote no {run_dir / 'summary.json'}\n")
                return fail("fit")
            state.fit, state.export, state.eval = "done", "pending", "pending"
            state.write(run_dir / "point.json")
            steps_done.append("fit")
        if state.export != "done":
            if self.executor(self.export_command(run_dir), logs / "export.log", self.environment("export")) != 0:
                return fail("export")
            state.export, state.eval = "done", "pending"
            state.write(run_dir / "point.json")
            steps_done.append("export")
        if state.eval != "done":
            if self.plan.mode == EVAL_NONE:
                state.eval = "skipped"
            else:
                heldout = self.heldout_text(point) if self.plan.mode == EVAL_HELDOUT else None
                if heldout is None and self.plan.mode == EVAL_HELDOUT:
                    return fail("eval")
                # Keep the previous results until the new evaluation has succeeded.
                previous = run_dir / "eval.previous"
                shutil.rmtree(previous, ignore_errors=True)
                if (run_dir / "eval").exists():
                    (run_dir / "eval").rename(previous)
                command = self.eval_command(point, run_dir, heldout)
                if self.executor(command, logs / "eval.log", self.environment("eval")) != 0:
                    if previous.exists():
                        shutil.rmtree(run_dir / "eval", ignore_errors=True)
                        previous.rename(run_dir / "eval")
                    return fail("eval")
                shutil.rmtree(previous, ignore_errors=True)
                state.eval = "done"
                steps_done.append("eval")
            state.write(run_dir / "point.json")
        seconds = time.perf_counter() - start
        self.echo(f"{prefix}: done in {seconds:.0f}s ({'+'.join(steps_done) or 'nothing to do'}); "
                  f"{summary_line(run_dir)}")
        return PointResult(point.name, "done", seconds)

    def heldout_text(self, point: Point) -> Path | None:
        """Decode the validation shards of the point's data into suite_dir/heldout/ (once per data folder)."""
        data_dir = Path(str(get_dotted(point.config, "data.data_dir")))
        key = config_hash({"data_dir": str(data_dir.resolve()), "max_chars": self.plan.heldout_max_chars})
        target = self.suite_dir / "heldout" / f"{data_dir.name}-{key}.txt"
        if target.is_file():
            return target
        log_path = self.run_dir(point) / "logs" / "eval.log"
        try:
            write_heldout_text(data_dir, target, self.plan.heldout_max_chars)
        except (OSError, ValueError) as err:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a", encoding="utf-8") as log_file:
                log_file.write(f"aoe ablate: could not write the held-out text of {data_dir}: {err}\n")
            return None
        return target

    def run(self, points: list[Point]) -> list[PointResult]:
        self.write_suite_file(points)
        self.echo(f"suite {self.sweep.stem}: {len(points)} point(s) in {self.suite_dir}; "
                  f"eval: {self.plan.mode} ({self.plan.reason})")
        results = []
        for index, point in enumerate(points, start=1):
            try:
                results.append(self.run_point(point, index, len(points)))
            except OSError as err:
                log.error("point %s failed: %s", point.name, err)
                results.append(PointResult(point.name, "failed", 0.0, str(err)))
        return results


def mark_step(run_dir: str | Path, step: str, status: str) -> None:
    """Record the outcome of one step in ``run_dir/point.json`` (used by the SLURM array script)."""
    if step not in ("fit", "export", "eval") or status not in ("done", "failed"):
        raise ValueError(f"mark_step({step!r}, {status!r}): step must be fit/export/eval and status done/failed")
    path = Path(run_dir) / "point.json"
    state = PointState.read(path)
    if state is None:
        raise FileNotFoundError(f"{path} does not exist; write the SLURM script with `aoe ablate --emit-slurm` first")
    setattr(state, step, status)
    if status == "failed":
        state.failed_step, state.log = step, str(Path(run_dir) / "logs" / f"{step}.log")
    elif state.failed_step == step:
        # A resubmitted task finished the step that failed before.
        state.failed_step = state.log = None
    state.write(path)


def write_heldout_text(data_dir: str | Path, target: str | Path, max_chars: int) -> Path:
    """Decode the validation split of prepared data to a text file, documents separated by blank lines.

    Documents are the runs of tokens between end-of-text ids; text stops after about ``max_chars`` characters.
    """
    from aoe_lightning.data.shards import load_manifest, load_manifest_tokenizer, open_split

    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    tokenizer = load_manifest_tokenizer(data_dir, manifest)
    split = "val" if "val" in manifest.splits else "validation"
    if split not in manifest.splits:
        raise ValueError(f"{data_dir} has no validation split (splits: {sorted(manifest.splits)})")
    documents: list[str] = []
    size = 0
    for shard in open_split(data_dir, manifest, split):
        ids = shard.tolist()
        start = 0
        while start < len(ids) and size < max_chars:
            try:
                end = ids.index(manifest.eos_id, start)
            except ValueError:
                end = len(ids)
            # Blank lines separate documents in the perplexity task, so a document must not contain one.
            text = "\n".join(line for line in tokenizer.decode(ids[start:end]).splitlines() if line.strip())
            if text.strip():
                documents.append(text[: max_chars - size])
                size += len(documents[-1])
            start = end + 1
    if not documents:
        raise ValueError(f"the validation split of {data_dir} contains no text")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return target


def summary_line(run_dir: Path) -> str:
    """One-line result of a finished point: validation loss and the eval's first metrics."""
    parts = []
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        if summary.get("val_loss") is not None:
            parts.append(f"val_loss {summary['val_loss']:.4f}")
        if summary.get("tokens_per_s"):
            parts.append(f"{summary['tokens_per_s']:.0f} tok/s")
    except (OSError, ValueError):
        pass
    try:
        results = json.loads((run_dir / "eval" / "results.json").read_text())["results"]
        for task, values in results.items():
            for metric in ("acc_norm,none", "acc,none", "bits_per_byte,none"):
                if isinstance(values.get(metric), (int, float)):
                    parts.append(f"{task} {metric.split(',')[0]} {values[metric]:.3f}")
                    break
    except (OSError, ValueError, KeyError):
        pass
    return ", ".join(parts) or "no metrics"


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aoe ablate",
        description="Train, export and evaluate every point of a sweep spec, then write the suite report.",
        epilog="Re-running the same command resumes: finished points are skipped, interrupted ones resume from "
               "their last checkpoint, and points whose config changed are trained again from scratch.",
    )
    parser.add_argument("spec", help="sweep spec YAML, e.g. ablations/smoke.yaml")
    # Underscore spellings are accepted too, because `aoe fit` and `aoe eval` spell their options that way.
    parser.add_argument("--output-dir", "--output_dir", default=None,
                        help="suite directory (default: runs/<spec stem>)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved points and exit")
    parser.add_argument("--emit-slurm", metavar="FILE", default=None,
                        help="write a SLURM array script with one task per point instead of running locally")
    parser.add_argument("--only", nargs="+", metavar="NAME", default=None,
                        help="run only these points (run names or point names without the seed suffix)")
    parser.add_argument("--eval-data-dir", "--eval_data_dir", default=None,
                        help="local eval data folder for the spec's suite (default: eval.data_dir or $AOE_EVAL_DATA)")
    parser.add_argument("--eval-online", action="store_true",
                        help="without local eval data, score the suite's lm-eval tasks from the Hugging Face hub")
    parser.add_argument("--threads", type=int, default=None,
                        help="set OMP_NUM_THREADS for every step (default: inherit); 1 is faster on a CPU "
                             "shared with other jobs, because idle OpenMP threads spin while they wait")
    parser.add_argument("--no-report", action="store_true", help="do not run `aoe report` at the end")
    return parser


def dry_run_lines(sweep: Sweep, points: list[Point], plan: EvalPlan) -> list[str]:
    lines = [f"spec {sweep.path} (base {sweep.base_path}); baseline {sweep.baseline}; eval: {plan.mode} ({plan.reason})"]
    if sweep.overrides:
        lines.append("overrides: " + ", ".join(f"{k}={v}" for k, v in sweep.overrides.items()))
    width = max(len(point.name) for point in points)
    for point in points:
        differs = ", ".join(f"{key}={value}" for key, value in point.fields.items()) or "(base config)"
        lines.append(f"{point.name:<{width}}  {point.config_hash}  {differs}")
    return lines


def main(argv: list[str] | None = None, executor: Executor = subprocess_executor) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        sweep = load_sweep(args.spec, repo_root=REPO_ROOT)
        points = sweep.select(args.only) if args.only else sweep.points
        plan = plan_eval(sweep, args.eval_data_dir, args.eval_online, dict(os.environ))
    except (SpecError, FileNotFoundError, ValueError) as err:
        print(f"aoe ablate: {err}", file=sys.stderr)
        return 2
    suite_dir = Path(args.output_dir) if args.output_dir else Path("runs") / sweep.stem

    if args.threads is not None and args.threads < 1:
        print(f"aoe ablate: --threads {args.threads} is invalid; pass a thread count >= 1", file=sys.stderr)
        return 2
    if args.dry_run:
        print("\n".join(dry_run_lines(sweep, points, plan)))
        return 0
    runner = SuiteRunner(sweep, suite_dir, plan, executor=executor, threads=args.threads)
    if args.emit_slurm:
        from aoe_lightning.ablation.slurm import write_slurm_script

        path = write_slurm_script(runner, points, Path(args.emit_slurm))
        print(f"wrote {path} ({len(points)} array task(s)); submit it with `sbatch {path}`, then run "
              f"`aoe report {suite_dir}` when every task has finished")
        return 0

    start = time.perf_counter()
    results = runner.run(points)
    failed = [result for result in results if result.status == "failed"]
    minutes = (time.perf_counter() - start) / 60
    print(f"suite {sweep.stem}: {len(results) - len(failed)}/{len(results)} point(s) succeeded in {minutes:.1f} min")
    for result in failed:
        print(f"  failed: {result.name}: {result.message}")
    if not args.no_report:
        from aoe_lightning.ablation.report import write_report

        logging.getLogger("tensorboard").setLevel(logging.WARNING)
        try:
            outputs = write_report(suite_dir)
            print(f"report: {', '.join(str(path) for path in outputs)}")
        except (OSError, ValueError) as err:
            print(f"aoe ablate: the report failed: {err}", file=sys.stderr)
            return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
