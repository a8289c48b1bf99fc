"""SLURM array scripts for a sweep: one array task per point, each a multi-GPU ``srun aoe fit`` then export and eval.

Lightning's SLURM support reads the task layout from ``srun``, so each task requests ``--nodes`` =
``trainer.num_nodes`` and ``--ntasks-per-node`` = ``trainer.devices`` (one process per device). All points of
one script share the largest layout among them. Export and eval run once per task, on the first node.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from aoe_lightning.ablation.spec import Point, get_dotted

if TYPE_CHECKING:
    from aoe_lightning.ablation.runner import SuiteRunner


def _trainer_int(point: Point, key: str, default: int) -> int:
    try:
        value = get_dotted(point.config, f"trainer.{key}")
    except KeyError:
        return default
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def task_layout(points: list[Point]) -> tuple[int, int, bool]:
    """Return (nodes, tasks per node, uses GPUs) covering every point."""
    nodes = max(_trainer_int(point, "num_nodes", 1) for point in points)
    devices = max(_trainer_int(point, "devices", 1) for point in points)
    gpu = any(str(point.config.get("trainer", {}).get("accelerator", "")) in ("gpu", "cuda") for point in points)
    return nodes, devices, gpu


def slurm_script(runner: SuiteRunner, points: list[Point], job_name: str) -> str:
    """Build the text of an array script whose task i trains, exports and evaluates ``points[i]``."""
    from aoe_lightning.ablation.runner import EVAL_HELDOUT, EVAL_NONE

    nodes, devices, gpu = task_layout(points)
    suite_dir = runner.suite_dir.resolve()
    logs = suite_dir / "slurm"
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --array=0-{len(points) - 1}",
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={devices}",
    ]
    if gpu:
        lines.append(f"#SBATCH --gpus-per-node={devices}")
    lines += [
        f"#SBATCH --output={logs}/%A_%a.out",
        "# Add partition, account and time limits for your cluster above this line.",
        "",
        "set -euo pipefail",
        f"PYTHON={shlex.quote(runner.python)}",
        f"SUITE={shlex.quote(str(suite_dir))}",
        "NAMES=(" + " ".join(shlex.quote(point.name) for point in points) + ")",
        'NAME="${NAMES[$SLURM_ARRAY_TASK_ID]}"',
        'RUN="$SUITE/$NAME"',
        'mkdir -p "$RUN/logs"',
    ]
    if runner.threads is not None:
        lines.append(f"export OMP_NUM_THREADS={runner.threads}")
    lines += [
        "# Each step's outcome goes to $RUN/point.json, which `aoe report` reads.",
        'mark() { "$PYTHON" -c "import sys; from aoe_lightning.ablation.runner import mark_step; '
        'mark_step(*sys.argv[1:])" "$RUN" "$1" "$2"; }',
        "trap 'mark \"$STEP\" failed' ERR",
        "",
        "# Training: one process per device. A requeued or resubmitted task resumes from its last checkpoint;",
        "# without one it starts again, replacing what an attempt that failed before its first checkpoint left.",
        "STEP=fit",
        'if [ -e "$RUN/checkpoints/last.ckpt" ]; then START=(--ckpt_path last); else START=(--overwrite true); fi',
        'srun "$PYTHON" -m aoe_lightning.cli fit --config "$RUN/point.yaml" --run_dir "$RUN" --run_name "$NAME" \\',
        '    --tensorboard_dir "$SUITE/tensorboard" "${START[@]}" 2>&1 | tee -a "$RUN/logs/fit.log"',
        "mark fit done",
        "STEP=export",
        '"$PYTHON" -m aoe_lightning.cli export "$RUN/checkpoints/last.ckpt" "$RUN/export.pt" --overwrite \\',
        '    2>&1 | tee -a "$RUN/logs/export.log"',
        "mark export done",
    ]
    plan = runner.plan
    if plan.mode != EVAL_NONE:
        eval_args = ['--checkpoint "$RUN/export.pt"', '--output_dir "$RUN/eval"', f"--batch_size {plan.batch_size}",
                     '--tensorboard_dir "$SUITE/tensorboard/$NAME"']
        lines.append("STEP=eval")
        if plan.mode == EVAL_HELDOUT:
            lines += [
                'DATA_DIR=$("$PYTHON" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))[\'data\'][\'data_dir\'])" "$RUN/point.yaml")',
                'HELDOUT="$SUITE/heldout/$(basename "$DATA_DIR")-$SLURM_ARRAY_TASK_ID.txt"',
                '"$PYTHON" -c "import sys; from aoe_lightning.ablation.runner import write_heldout_text; '
                f'write_heldout_text(sys.argv[1], sys.argv[2], {plan.heldout_max_chars})" "$DATA_DIR" "$HELDOUT"',
            ]
            eval_args.append('--text_file "$HELDOUT"')
        else:
            eval_args.append(f"--suite {shlex.quote(str(plan.suite))}")
            if plan.data_dir:
                eval_args.append(f"--data_dir {shlex.quote(str(plan.data_dir))}")
        if plan.limit is not None:
            eval_args.append(f"--limit {plan.limit}")
        offline = "" if plan.mode == "suite-online" else "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "
        lines += [f'{offline}"$PYTHON" -m aoe_lightning.cli eval ' + " ".join(eval_args) + ' \\',
                  '    2>&1 | tee -a "$RUN/logs/eval.log"',
                  "mark eval done"]
    lines += ["", 'echo "point $NAME finished; run: aoe report $SUITE"', ""]
    return "\n".join(lines)


def write_slurm_script(runner: SuiteRunner, points: list[Point], path: Path) -> Path:
    """Write every point's point.yaml and point.json, suite.json and the array script; return the script path."""
    runner.write_suite_file(points)
    for point in points:
        runner.prepare_point(point)
    (runner.suite_dir / "slurm").mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(slurm_script(runner, points, job_name=f"aoe-{runner.sweep.stem}"), encoding="utf-8")
    return path
