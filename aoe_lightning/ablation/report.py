"""``aoe report SUITE_DIR``: aggregate a (finished or partly finished) sweep into a table and plots.

Writes into the suite directory:

    results.csv   one row per point (seeds averaged): parameters, validation loss/perplexity, tokens/s, each
                  task's metrics, the task average, differences from the baseline, and *_std columns with seeds
    results.md    the same table for reading, plus the eval mode and the list of failed or missing points
    val_loss_curves.png, val_loss_vs_d_low.png, val_loss_vs_top_k.png (when those fields vary),
    expert_load.png, routing_entropy.png

Missing values are written as "n/a" in results.md and left empty in results.csv. A point whose run failed is
marked "failed", with the failed step in results.md ("failed (eval)").
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ACC_METRICS = ("acc", "acc_norm")
PERPLEXITY_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
NA = "n/a"


@dataclass
class RunRecord:
    """Everything the report reads for one run (one seed of one point)."""

    name: str
    group: str
    seed: int | None
    fields: dict[str, Any]
    status: str                                        # done | failed | running | missing
    log: str | None = None
    failed_step: str | None = None                     # fit | export | eval, when status is failed
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[tuple[str, str], float] = field(default_factory=dict)   # (task, metric) -> value
    stderr: dict[tuple[str, str], float] = field(default_factory=dict)    # (task, metric) -> lm-eval's stderr
    expert_load: list[list[float]] | None = None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_suite(suite_dir: Path) -> tuple[dict[str, Any], list[RunRecord]]:
    """Read suite.json and every run's point.json, summary.json, eval results and expert load."""
    suite = read_json(suite_dir / "suite.json")
    if not isinstance(suite, dict):
        raise ValueError(f"{suite_dir / 'suite.json'} is missing or unreadable; {suite_dir} is not a suite "
                         "directory written by `aoe ablate`")
    records = []
    for point in suite.get("points", []):
        run_dir = suite_dir / point["name"]
        state = read_json(run_dir / "point.json") or {}
        record = RunRecord(name=point["name"], group=point["group"], seed=point.get("seed"),
                           fields=point.get("fields", {}), status="missing")
        if state.get("config_hash") not in (None, point.get("config_hash")):
            state = {}          # the run directory contains the run of another config
        if state:
            failed = state.get("failed_step")
            if failed:
                record.status, record.log, record.failed_step = "failed", state.get("log"), failed
            elif state.get("fit") == "done" and state.get("export") == "done" and state.get("eval") in ("done", "skipped"):
                record.status = "done"
            else:
                record.status = "running"
        record.summary = read_json(run_dir / "summary.json") or {}
        results = read_json(run_dir / "eval" / "results.json") or {}
        eval_needed = (suite.get("eval") or {}).get("mode") != "none"
        if record.status == "running" and record.summary and (results or not eval_needed):
            record.status = "done"      # finished outside the local runner, e.g. by a SLURM task
        for task, values in (results.get("results") or {}).items():
            for key, value in values.items():
                metric, _, _ = key.partition(",")
                if metric in ACC_METRICS + PERPLEXITY_METRICS and isinstance(value, (int, float)):
                    record.metrics[(task, metric)] = float(value)
                base_metric = metric.removesuffix("_stderr")
                if metric.endswith("_stderr") and base_metric in ACC_METRICS and isinstance(value, (int, float)):
                    record.stderr[(task, base_metric)] = float(value)
        load = read_json(run_dir / "expert_load.json")
        if isinstance(load, dict) and isinstance(load.get("load_fraction"), list):
            record.expert_load = load["load_fraction"]
        records.append(record)
    return suite, records


# ---------------------------------------------------------------------------------------------
# Table


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def build_rows(suite: dict[str, Any], records: list[RunRecord]) -> tuple[list[dict[str, Any]], list[str]]:
    """Return one row per point (seeds averaged) and the ordered list of value columns."""
    tasks_metrics = sorted({key for record in records for key in record.metrics},
                           key=lambda key: (key[0], key[1]))
    metric_names = sorted({metric for _, metric in tasks_metrics},
                          key=lambda m: (ACC_METRICS + PERPLEXITY_METRICS).index(m))
    groups: dict[str, list[RunRecord]] = {}
    for record in records:
        groups.setdefault(record.group, []).append(record)

    value_columns = ["total_params", "active_params", "val_loss", "val_ppl", "tokens_per_s"]
    value_columns += [f"{task}/{metric}" for task, metric in tasks_metrics]
    # An average over one task would only repeat that task's column.
    tasks_per_metric = {metric: [task for task, m in tasks_metrics if m == metric] for metric in metric_names}
    averaged = [metric for metric in metric_names if len(tasks_per_metric[metric]) > 1]
    value_columns += [f"avg/{metric}" for metric in averaged]
    rows = []
    for group, runs in groups.items():
        finished = [run for run in runs if run.summary]
        row: dict[str, Any] = {
            "point": group,
            "differs": ", ".join(f"{k}={v}" for k, v in runs[0].fields.items() if k != "seed_everything"),
            "seeds": len([run for run in runs if run.status == "done"]),
            "status": _group_status(runs),
            "failed_steps": sorted({run.failed_step for run in runs if run.failed_step}),
            "logs": "; ".join(run.log for run in runs if run.log),
        }
        per_run_values: dict[str, list[float]] = {column: [] for column in value_columns}
        for run in finished:
            for column in ("total_params", "active_params", "val_loss", "val_ppl", "tokens_per_s"):
                value = run.summary.get(column)
                if isinstance(value, (int, float)):
                    per_run_values[column].append(float(value))
            for (task, metric), value in run.metrics.items():
                per_run_values[f"{task}/{metric}"].append(value)
            for metric in averaged:
                values = [run.metrics[(task, metric)] for task in tasks_per_metric[metric]
                          if (task, metric) in run.metrics]
                if len(values) == len(tasks_per_metric[metric]):
                    per_run_values[f"avg/{metric}"].append(statistics.fmean(values))
        for column in value_columns:
            row[column], row[f"{column}_std"] = _mean_std(per_run_values[column])
        rows.append(row)

    baseline = next((row for row in rows if row["point"] == suite.get("baseline")), rows[0] if rows else None)
    delta_columns = ["val_loss"] + [
        f"avg/{metric}" if metric in averaged else f"{tasks_per_metric[metric][0]}/{metric}" for metric in metric_names
    ]
    # The Δ columns follow the order of the columns they compare.
    delta_columns.sort(key=value_columns.index)
    for row in rows:
        for column in delta_columns:
            base = baseline.get(column) if baseline else None
            row[f"delta/{column}"] = row[column] - base if row[column] is not None and base is not None else None
    return rows, value_columns + [f"delta/{column}" for column in delta_columns]


def _group_status(runs: list[RunRecord]) -> str:
    statuses = {run.status for run in runs}
    if statuses == {"done"}:
        return "done"
    if "failed" in statuses:
        return "failed"
    if "running" in statuses:
        return "incomplete"
    return "missing" if statuses == {"missing"} else "incomplete"


def display_path(path: str | None) -> str | None:
    """Return ``path`` relative to the working directory when it lies below it, so that reports stay portable."""
    if not path:
        return path
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path


def write_csv(rows: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    header = ["point", "differs", "status", "seeds"]
    for column in columns:
        header += [column] if column.startswith("delta/") else [column, f"{column}_std"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if row.get(col) is None else row.get(col) for col in header])


def _format(value: Any, column: str, std: Any = None) -> str:
    if value is None:
        return NA
    if column.endswith("params"):
        text = f"{value / 1e6:.2f}M"
    elif column == "tokens_per_s":
        text = f"{value:.0f}"
    elif column.startswith("delta/"):
        text = f"{value:+.4f}"
    else:
        text = f"{value:.4f}"
    if std is not None:
        text += f" ± {std:.4f}" if not column.endswith("params") and column != "tokens_per_s" else f" ± {std:.0f}"
    return text


def markdown_table(rows: list[dict[str, Any]], columns: list[str], baseline: str) -> str:
    header = ["point", "status", "seeds"] + [column.replace("delta/", f"Δ vs {baseline}: ") for column in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * len(columns)]
    for row in rows:
        status = row["status"] if row["status"] != "done" else "ok"
        if row.get("failed_steps"):
            status += f" ({', '.join(row['failed_steps'])})"
        cells = [row["point"], status, str(row["seeds"])]
        for column in columns:
            if row["status"] == "failed" and row.get(column) is None:
                cells.append("failed")
            else:
                cells.append(_format(row.get(column), column, row.get(f"{column}_std")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(suite: dict[str, Any], rows: list[dict[str, Any]], columns: list[str],
                    records: list[RunRecord], images: list[Path]) -> str:
    evaluation = suite.get("eval") or {}
    lines = [f"# Sweep `{suite.get('stem', '')}`", ""]
    if suite.get("description"):
        lines += [suite["description"].strip(), ""]
    lines += [f"- spec: `{display_path(suite.get('spec'))}`", f"- base config: `{display_path(suite.get('base'))}`",
              f"- baseline: `{suite.get('baseline')}`"]
    if suite.get("overrides"):
        lines.append("- overrides for every point: " + ", ".join(f"`{k}={v}`" for k, v in suite["overrides"].items()))
    lines.append(f"- evaluation: **{evaluation.get('mode', NA)}**: {evaluation.get('reason', '')}"
                 + (f"; at most {evaluation['limit']} items per task" if evaluation.get("limit") else ""))
    seeds = {record.seed for record in records if record.seed is not None}
    if len(seeds) > 1:
        lines.append(f"- seeds {sorted(seeds)}: values are mean ± standard deviation over the seeds that finished")
    lines += ["", "## Points", "", "| point | differs from the base in |", "|---|---|"]
    for row in rows:
        lines.append(f"| {row['point']} | {row['differs'] or '(base config)'} |")
    training_columns = [c for c in columns if "/" not in c or c == "delta/val_loss"]
    task_columns = [c for c in columns if c not in training_columns]
    lines += ["", "## Training", "", markdown_table(rows, training_columns, suite.get("baseline", ""))]
    if task_columns:
        lines += ["## Evaluation", "", markdown_table(rows, task_columns, suite.get("baseline", ""))]
    lines.append("val_loss: mean next-token cross-entropy (nats) on the validation windows at the end of training; "
                 "val_ppl = exp(val_loss). Parameters count the embedding once (tied). "
                 "avg/<metric> is the unweighted mean over the tasks that report the metric, when there are several.")
    stderrs = [value for record in records for value in record.stderr.values() if not math.isnan(value)]
    if stderrs:
        lines.append(f"Standard errors of the single-task accuracies (lm-eval, one run): {min(stderrs):.4f} to "
                     f"{max(stderrs):.4f}; differences smaller than about twice that are within sampling noise.")
    problems = [row for row in rows if row["status"] != "done"]
    if problems:
        lines += ["", "## Failed or unfinished points", ""]
        for row in problems:
            lines.append(f"- {row['point']}: {row['status']}" + (f" (log: `{row['logs']}`)" if row["logs"] else ""))
    if images:
        lines += ["", "## Plots", ""] + [f"![{image.stem}]({image.name})" for image in images]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Entry points


def write_report(suite_dir: str | Path, plots: bool = True) -> list[Path]:
    """Write results.csv, results.md and the plots of a suite directory; return the written paths."""
    suite_dir = Path(suite_dir)
    suite, records = read_suite(suite_dir)
    rows, columns = build_rows(suite, records)
    images: list[Path] = []
    if plots:
        from aoe_lightning.ablation.plots import write_plots

        images = write_plots(suite_dir, suite, records)
    csv_path = suite_dir / "results.csv"
    write_csv(rows, columns, csv_path)
    md_path = suite_dir / "results.md"
    md_path.write_text(markdown_report(suite, rows, columns, records, images), encoding="utf-8")
    return [md_path, csv_path] + images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aoe report",
                                     description="Aggregate a sweep directory written by `aoe ablate` into "
                                                 "results.md, results.csv and PNG plots.")
    parser.add_argument("suite_dir", help="suite directory, e.g. runs/smoke")
    parser.add_argument("--no-plots", action="store_true", help="write only the tables")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # The event reader logs every event file it opens at INFO.
    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    try:
        paths = write_report(args.suite_dir, plots=not args.no_plots)
    except (OSError, ValueError) as err:
        print(f"aoe report: {err}", file=sys.stderr)
        return 2
    print("\n".join(f"wrote {path}" for path in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
