"""Eval suites: YAML files that list lm-eval tasks, their offline equivalents and few-shot counts.

A suite file (see ``evals/core.yaml``)::

    name: core
    metrics: [acc, acc_norm]          # metrics shown in results.md (results.json keeps all)
    tasks:
      - task: hellaswag               # lm-eval built-in task, used with hub access
        local: [hellaswag_local, hellaswag_text_local]   # offline equivalents, first available wins
        num_fewshot: 0

With a local data folder every entry resolves to its first available ``local`` task; without one, to
the built-in ``task``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aoe_lightning.evaluation.tasks import LOCAL_TASKS, build_local_task, local_task_available


@dataclass(frozen=True)
class SuiteEntry:
    """One task of a suite."""

    task: str                              # lm-eval built-in task name
    local: tuple[str, ...] = ()            # offline equivalents in LOCAL_TASKS, in order of preference
    num_fewshot: int = 0


@dataclass(frozen=True)
class Suite:
    """A named list of tasks and the metrics to report."""

    name: str
    entries: tuple[SuiteEntry, ...]
    metrics: tuple[str, ...] = ("acc", "acc_norm")


@dataclass
class ResolvedSuite:
    """Task specs ready for ``TaskManager.load``: inline configs (offline) or built-in names."""

    specs: list[str | dict] = field(default_factory=list)
    num_fewshot: dict[str, int] = field(default_factory=dict)   # task name -> few-shot count
    skipped: list[str] = field(default_factory=list)           # entries with no local data
    skip_reasons: dict[str, str] = field(default_factory=dict)  # skipped entry -> why it has no local data


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite YAML; ValueError lists every problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"suite file {str(path)!r} does not exist; see evals/core.yaml for the format")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    problems = []
    entries = []
    for n, item in enumerate(raw.get("tasks") or []):
        if not isinstance(item, dict) or not isinstance(item.get("task"), str):
            problems.append(f"tasks[{n}] must be a mapping with a string 'task' key, got {item!r}")
            continue
        local = item.get("local") or ()
        local = (local,) if isinstance(local, str) else tuple(local)
        unknown = [name for name in local if name not in LOCAL_TASKS]
        if unknown:
            problems.append(f"tasks[{n}].local names unknown local tasks {unknown}; known: {sorted(LOCAL_TASKS)}")
        num_fewshot = item.get("num_fewshot", 0)
        if not isinstance(num_fewshot, int) or num_fewshot < 0:
            problems.append(f"tasks[{n}].num_fewshot={num_fewshot!r} must be an integer >= 0")
        entries.append(SuiteEntry(item["task"], local, num_fewshot if isinstance(num_fewshot, int) else 0))
    if not entries and not problems:
        problems.append("'tasks' is empty")
    if problems:
        raise ValueError(f"invalid suite {path}: " + "; ".join(problems))
    metrics = tuple(raw.get("metrics") or ("acc", "acc_norm"))
    return Suite(name=str(raw.get("name", path.stem)), entries=tuple(entries), metrics=metrics)


def suite_from_task_names(names: list[str], num_fewshot: int = 0) -> Suite:
    """Build an ad-hoc suite from task names; names in LOCAL_TASKS are local, others built-in.

    It reports every metric the tasks compute (perplexity for LAMBADA, for example), not only acc and acc_norm.
    """
    entries = []
    for name in names:
        if name in LOCAL_TASKS:
            entries.append(SuiteEntry(LOCAL_TASKS[name].builtin, (name,), num_fewshot))
        else:
            entries.append(SuiteEntry(name, (), num_fewshot))
    return Suite(name="tasks", entries=tuple(entries), metrics=())


def resolve_suite(suite: Suite, data_dir: Path | None, skip_unavailable: bool = False) -> ResolvedSuite:
    """Turn suite entries into task specs.

    With ``data_dir`` each entry becomes the inline config of its first local task whose files exist.
    An entry with none raises FileNotFoundError (naming the files), or is listed in ``skipped`` (with its
    reason in ``skip_reasons``) when ``skip_unavailable`` is set. Without ``data_dir`` every entry is its
    built-in lm-eval task.
    """
    resolved = ResolvedSuite()
    for entry in suite.entries:
        if data_dir is None:
            resolved.specs.append(entry.task)
            resolved.num_fewshot[entry.task] = entry.num_fewshot
            continue
        available = [name for name in entry.local if local_task_available(name, data_dir)]
        if not available:
            expected_files = [f for name in entry.local for f in LOCAL_TASKS[name].eval_files]
            if expected_files:
                reason = f"no local data for {entry.task}: none of {expected_files} exists under {data_dir}"
            else:
                reason = f"{entry.task} has no offline equivalent"
            if skip_unavailable:
                resolved.skipped.append(entry.task)
                resolved.skip_reasons[entry.task] = reason
                continue
            raise FileNotFoundError(f"{reason}; add the files, drop the task, or pass --skip_unavailable")
        config = build_local_task(available[0], data_dir, num_fewshot=entry.num_fewshot)
        resolved.specs.append(config)
        resolved.num_fewshot[config["task"]] = entry.num_fewshot
    return resolved


def load_tasks(resolved: ResolvedSuite, extra_specs: list[dict] | None = None) -> tuple[list[Any], Any]:
    """Build lm-eval Task objects with each task's few-shot count set; return (tasks, task_manager).

    The built-in task index (about 15 s to build) is read only when a built-in task is requested.
    """
    from lm_eval.tasks import TaskManager

    specs = list(resolved.specs) + list(extra_specs or [])
    needs_builtin = any(isinstance(spec, str) for spec in specs)
    task_manager = TaskManager(include_defaults=needs_builtin)
    unknown = [spec for spec in specs if isinstance(spec, str) and spec not in task_manager.all_tasks]
    if unknown:
        raise KeyError(f"unknown lm-eval task(s) {unknown}; list them with `lm_eval ls tasks`, "
                       f"or use a local task: {sorted(LOCAL_TASKS)}")
    loaded = task_manager.load(specs)
    tasks = list(loaded["tasks"].values())
    for task in tasks:
        name = task.config.task
        if name in resolved.num_fewshot:
            task.set_config(key="num_fewshot", value=resolved.num_fewshot[name])
    return tasks, task_manager
