"""``aoe eval``: score an export on an eval suite with lm-eval and write JSON, markdown and TensorBoard.

    aoe eval --checkpoint export.pt --suite evals/core.yaml --data_dir /data/eval --output_dir out/
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aoe eval",
        description="Evaluate an `aoe export` file with lm-evaluation-harness.",
        epilog="Local data layout: see aoe_lightning.evaluation.tasks. Without --data_dir (or $AOE_EVAL_DATA) "
               "the suite's built-in lm-eval tasks are used, which download from the Hugging Face hub.",
    )
    parser.add_argument("--checkpoint", required=True, help="file written by `aoe export`")
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--suite", help="suite YAML, e.g. evals/core.yaml")
    selection.add_argument("--tasks", help="comma-separated task names (built-in, or local such as piqa_local)")
    parser.add_argument("--data_dir", default=None,
                        help="local eval data folder (default: $AOE_EVAL_DATA); selects the offline tasks")
    parser.add_argument("--text_file", default=None,
                        help="also report word/byte perplexity and bits per byte on this text or jsonl file")
    parser.add_argument("--skip_unavailable", action="store_true",
                        help="skip suite tasks that have no local data instead of failing")
    parser.add_argument("--num_fewshot", type=int, default=0, help="few-shot examples for --tasks (suites set their own)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N items of each task")
    parser.add_argument("--batch_size", default="8", help="requests per forward pass: an integer or 'auto'")
    parser.add_argument("--max_batch_size", type=int, default=64, help="upper bound for --batch_size auto")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weight dtype (default: as exported)")
    parser.add_argument("--share_prompts", type=str.lower, choices=["true", "false"], default="true",
                        help="run a prompt shared by several requests (the choices of a question) once (default: true)")
    parser.add_argument("--reuse_cpu_memory", type=str.lower, choices=["true", "false"], default="true",
                        help="on CPU with glibc, keep freed tensor memory in the process for the next batch "
                             "(default: true; resident memory stays at its peak)")
    parser.add_argument("--output_dir", required=True, help="folder for results.json and results.md")
    parser.add_argument("--tensorboard_dir", default=None, help="also log eval/<task>/<metric> scalars here")
    parser.add_argument("--step", type=int, default=None,
                        help="TensorBoard step (default: the export's global step, else 0)")
    parser.add_argument("--log_samples", action="store_true", help="write per-item samples_<task>.jsonl")
    parser.add_argument("--bootstrap_iters", type=int, default=1000,
                        help="bootstrap resamples for stderr of non-mean metrics (0 disables)")
    parser.add_argument("--seed", type=int, default=0, help="seed for few-shot sampling and torch")
    return parser


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def metric_rows(results: dict, metrics: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Flatten lm-eval results into rows of task, metric, value, stderr and n (items scored)."""
    rows = []
    for task, values in results["results"].items():
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in values.items():
            metric, comma, filter_name = key.partition(",")
            # Metrics are keyed "metric,filter"; other keys ("alias", "sample_len") describe the task.
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            if metrics and metric not in metrics:
                continue
            stderr = values.get(f"{metric}_stderr,{filter_name}")
            rows.append({"task": task, "metric": metric, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None, "n": n})
    return rows


def format_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| task | metric | value | stderr | n |", "|---|---|---:|---:|---:|"]
    for row in rows:
        stderr = "" if row["stderr"] is None or math.isnan(row["stderr"]) else f"{row['stderr']:.4f}"
        lines.append(f"| {row['task']} | {row['metric']} | {row['value']:.4f} | {stderr} | {row['n'] or ''} |")
    return "\n".join(lines) + "\n"


def write_tensorboard(rows: list[dict[str, Any]], log_dir: str, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=log_dir)
    try:
        for row in rows:
            writer.add_scalar(f"eval/{row['task']}/{row['metric']}", row["value"], global_step=step)
    finally:
        writer.close()


def _fail(message: str) -> int:
    print(f"aoe eval: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.suite is None and args.tasks is None and args.text_file is None:
        return _fail("nothing to evaluate; pass --suite, --tasks or --text_file")

    from aoe_lightning.evaluation.tasks import build_perplexity_task, resolve_data_dir, set_offline_defaults

    try:
        data_dir = resolve_data_dir(args.data_dir)
    except FileNotFoundError as err:
        return _fail(str(err))
    if data_dir is not None:
        # Before `datasets` is imported (by the lm-eval and suite imports below).
        set_offline_defaults()

    checkpoint = Path(args.checkpoint).expanduser()
    if not checkpoint.is_file():
        return _fail(f"checkpoint {str(checkpoint)!r} does not exist; pass a file written by `aoe export`")

    from aoe_lightning.evaluation.suites import (
        ResolvedSuite, load_suite, load_tasks, resolve_suite, suite_from_task_names)

    try:
        if args.suite is not None:
            suite = load_suite(args.suite)
        elif args.tasks is not None:
            suite = suite_from_task_names([t for t in args.tasks.split(",") if t], args.num_fewshot)
        else:
            suite = None
        resolved = resolve_suite(suite, data_dir, args.skip_unavailable) if suite else ResolvedSuite()
        for task, reason in resolved.skip_reasons.items():
            logger.warning("skipping %s (%s)", task, reason)
        extra = [build_perplexity_task(args.text_file)] if args.text_file else []
        if not resolved.specs and not extra:
            return _fail("no task left to evaluate (every suite task was skipped)")
        tasks, task_manager = load_tasks(resolved, extra)
    except (FileNotFoundError, KeyError, ValueError) as err:
        return _fail(str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err))
    except OSError as err:
        # Built-in tasks download their datasets; without network access that fails here.
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return _fail(f"could not load the tasks' datasets from the Hugging Face hub ({first_line}); pass --data_dir "
                     "with local copies (see docs/evaluation.md) or check the network connection")

    import lm_eval

    from aoe_lightning.evaluation.adapter import AoELM

    try:
        lm = AoELM(checkpoint=str(checkpoint), batch_size=args.batch_size, max_batch_size=args.max_batch_size,
                   device=args.device, dtype=args.dtype, share_prompts=args.share_prompts == "true")
    except (OSError, RuntimeError, ValueError, KeyError, EOFError) as err:
        return _fail(f"could not load checkpoint {str(checkpoint)!r}: {err}")
    if args.reuse_cpu_memory == "true" and lm.device.type == "cpu":
        from aoe_lightning.allocator import reuse_freed_memory

        reuse_freed_memory()

    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=task_manager, limit=args.limit, log_samples=args.log_samples,
        bootstrap_iters=args.bootstrap_iters, random_seed=args.seed, numpy_random_seed=args.seed,
        torch_random_seed=args.seed, fewshot_random_seed=args.seed,
    )
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", None)
    results["aoe_lightning"] = {
        "checkpoint": str(checkpoint.resolve()),
        "export_metadata": getattr(lm, "metadata", None),
        "suite": str(Path(args.suite).resolve()) if args.suite else None,
        "data_dir": str(data_dir) if data_dir else None,
        "skipped_tasks": resolved.skipped,
        "limit": args.limit,
        "batch_size": lm.batch_size,
        "lm_eval_version": _package_version("lm_eval"),
        "aoe_lightning_version": _package_version("aoe-lightning"),
    }
    results["lm_eval_version"] = results["aoe_lightning"]["lm_eval_version"]

    from lm_eval.utils import handle_non_serializable

    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=handle_non_serializable))
    if samples:
        for task, items in samples.items():
            with open(output_dir / f"samples_{task}.jsonl", "w", encoding="utf-8") as f:
                for item in items:
                    f.write(json.dumps(item, default=handle_non_serializable) + "\n")

    metrics = suite.metrics if suite else None
    extra_metrics = ("word_perplexity", "byte_perplexity", "bits_per_byte") if extra else ()
    rows = metric_rows(results, tuple(metrics) + extra_metrics if metrics else None)
    table = format_markdown(rows)
    (output_dir / "results.md").write_text(table)
    if args.tensorboard_dir:
        step = args.step
        if step is None:
            step = int((getattr(lm, "metadata", None) or {}).get("global_step", 0) or 0)
        write_tensorboard(rows, args.tensorboard_dir, step)
    print(table, end="")
    print(f"wrote {output_dir / 'results.json'} and {output_dir / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
