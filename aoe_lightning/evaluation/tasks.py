"""Offline lm-eval tasks that read the original public data files from a local folder.

Each builder returns an inline task config (a dict) for ``TaskManager(include_defaults=False)``.
The prompts, choices, gold indices and metrics are those of the lm-evaluation-harness 0.4.x built-in
tasks of the same name without the ``_local`` suffix. Only the data source differs. Data paths are
made absolute when the config is built, so nothing depends on the working directory.

Expected layout of the data folder (``--data_dir`` or the ``AOE_EVAL_DATA`` environment variable)::

    arc/ARC-Easy-Dev.jsonl            AI2's original jsonl (question.stem, question.choices, answerKey)
    arc/ARC-Easy-Train.jsonl          optional: few-shot examples
    arc/ARC-Challenge-Dev.jsonl
    arc/ARC-Challenge-Train.jsonl     optional
    piqa/valid.jsonl                  goal, sol1, sol2
    piqa/valid-labels.lst             one 0/1 per line, aligned with valid.jsonl
    hellaswag/hellaswag_val.jsonl     original rowanz jsonl (ctx_a, ctx_b, activity_label, endings, label)
    hellaswag/hellaswag_val_full.txt.bz2   or: six lines per item (context, gold index, four endings)
    derived_mosaic/winogrande.jsonl   context_options, continuation, gold
    derived_mosaic/boolq.jsonl        query ("Passage: ...\\nQuestion: ...?"), choices, gold
    derived_mosaic/lambada_openai.jsonl    context, continuation

Differences from the built-in tasks, all caused by the data that is available offline:

- ARC is scored on AI2's Dev split (570 Easy / 299 Challenge items) because the original Test jsonl is
  not distributed with the public release used here; lm-eval scores the Test split (2376 / 1172).
- ``hellaswag_text_local`` reads the six-lines-per-item text file, whose context line is
  ``activity_label: ctx`` with ``ctx_b`` not capitalised. lm-eval capitalises the first letter of
  ``ctx_b`` and lower-cases its rest, so a few prompts differ by letter case. ``hellaswag_local`` (the
  original jsonl) matches lm-eval exactly.
- WinoGrande, BoolQ and LAMBADA are rebuilt from the Mosaic-derived jsonl. The prompt templates are
  lm-eval's; the field mapping is documented on each loader.
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "AOE_EVAL_DATA"

_ACC_METRICS = [
    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
]
_ACC_ONLY = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]


def set_offline_defaults() -> None:
    """Default the Hugging Face hub and datasets to offline mode.

    Call this before ``datasets`` is imported: both libraries read these variables at import time.
    Values the user already set are kept.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """Return the local eval data folder from ``data_dir`` or ``$AOE_EVAL_DATA``, or None for neither."""
    value = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if value is None or str(value) == "":
        return None
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"eval data folder {str(path)!r} does not exist; pass an existing folder as "
                                f"--data_dir or in ${DATA_DIR_ENV}")
    return path


# ---------------------------------------------------------------------------------------------
# File readers


def _open_text(path: Path):
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    """Read one JSON object per non-empty line (plain, .gz or .bz2)."""
    records = []
    with _open_text(path) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_number} is not valid JSON: {err}") from err
    return records


def arc_docs(path: Path) -> list[dict]:
    """Convert AI2's ARC jsonl to the record shape of the Hugging Face ``allenai/ai2_arc`` dataset.

    ``question.stem`` becomes ``question`` and ``question.choices`` becomes
    ``choices = {"text": [...], "label": [...]}``, so lm-eval's ARC templates apply unchanged.
    """
    docs = []
    for record in read_jsonl(path):
        choices = record["question"]["choices"]
        docs.append({
            "id": record["id"],
            "question": record["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": record["answerKey"],
        })
    return docs


def piqa_docs(jsonl_path: Path, labels_path: Path) -> list[dict]:
    """Merge PIQA's ``valid.jsonl`` with ``valid-labels.lst``; the label must be an int for lm-eval."""
    docs = read_jsonl(jsonl_path)
    with open(labels_path, encoding="utf-8") as f:
        labels = [line.strip() for line in f if line.strip()]
    if len(labels) != len(docs):
        raise ValueError(f"{labels_path} has {len(labels)} labels but {jsonl_path} has {len(docs)} items; "
                         "the two files must be line-aligned")
    return [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(label)}
            for d, label in zip(docs, labels)]


def hellaswag_preprocess(text: str) -> str:
    """Clean a HellaSwag string the way lm-eval's hellaswag task does.

    Strip, turn " [title]" into ". ", delete WikiHow bracket tags such as "[header]", then replace each
    double space with one space (a single pass, as lm-eval does).
    """
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_jsonl_docs(path: Path) -> list[dict]:
    """Read the original HellaSwag jsonl and add lm-eval's ``query``, ``choices`` and ``gold`` fields."""
    docs = []
    for record in read_jsonl(path):
        context = record["ctx_a"] + " " + record["ctx_b"].capitalize()
        docs.append({
            "ind": record.get("ind"),
            "activity_label": record["activity_label"],
            "query": hellaswag_preprocess(record["activity_label"] + ": " + context),
            "choices": [hellaswag_preprocess(ending) for ending in record["endings"]],
            "gold": int(record["label"]),
            "label": int(record["label"]),
        })
    return docs


def hellaswag_text_docs(path: Path) -> list[dict]:
    """Read the six-lines-per-item HellaSwag text file (.txt or .txt.bz2).

    Line 1 is ``activity_label: ctx``, line 2 the gold index, lines 3-6 the four endings. The same
    cleaning as lm-eval's is applied to every string.
    """
    with _open_text(path) as f:
        lines = [line.rstrip("\n") for line in f]
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path} has {len(lines)} lines, which is not a multiple of 6 "
                         "(context, gold index, four endings per item)")
    docs = []
    for start in range(0, len(lines), 6):
        context, gold, *endings = lines[start:start + 6]
        if gold.strip() not in {"0", "1", "2", "3"}:
            raise ValueError(f"{path}:{start + 2} has gold index {gold!r}; expected 0, 1, 2 or 3")
        docs.append({
            "query": hellaswag_preprocess(context),
            "choices": [hellaswag_preprocess(ending) for ending in endings],
            "gold": int(gold),
            "label": int(gold),
        })
    return docs


def winogrande_docs(path: Path) -> list[dict]:
    """Read the Mosaic-derived WinoGrande jsonl.

    ``context_options`` is lm-eval's ``doc_to_choice`` (the sentence up to the blank, plus each
    option), ``continuation`` its ``doc_to_target`` (the text after the blank, stripped) and ``gold``
    the 0-based answer.
    """
    return [{"context_options": list(r["context_options"]), "continuation": r["continuation"],
             "gold": int(r["gold"])} for r in read_jsonl(path)]


def boolq_docs(path: Path) -> list[dict]:
    """Read the Mosaic-derived BoolQ jsonl back into ``passage``, ``question`` and ``label``.

    Its ``query`` is "Passage: {passage}\\nQuestion: {question}?" and ``gold`` indexes ["no", "yes"].
    """
    docs = []
    for line_number, record in enumerate(read_jsonl(path), start=1):
        query = record["query"]
        body = query.removeprefix("Passage: ")
        passage, separator, question = body.rpartition("\nQuestion: ")
        if not separator:
            raise ValueError(f"{path}:{line_number} query has no '\\nQuestion: ' line")
        docs.append({"passage": passage, "question": question.removesuffix("?"), "label": int(record["gold"])})
    return docs


def lambada_docs(path: Path) -> list[dict]:
    """Read the Mosaic-derived LAMBADA jsonl back into lm-eval's ``text`` field (context, space, last word)."""
    return [{"text": r["context"] + " " + r["continuation"]} for r in read_jsonl(path)]


def text_documents(path: Path) -> list[dict]:
    """Read documents for the perplexity task.

    A ``.jsonl`` file gives one document per line from its ``text`` field. Any other file (plain,
    .gz or .bz2) is split into documents at blank lines.
    """
    name = path.name.removesuffix(".gz").removesuffix(".bz2")
    if name.endswith(".jsonl"):
        records = read_jsonl(path)
        missing = [i for i, r in enumerate(records, start=1) if "text" not in r]
        if missing:
            raise ValueError(f"{path} line {missing[0]} has no 'text' field; the perplexity task reads "
                             "one document per line from 'text'")
        docs = [{"text": r["text"]} for r in records if r["text"].strip()]
    else:
        with _open_text(path) as f:
            blocks = re.split(r"\n\s*\n", f.read())
        docs = [{"text": block.strip("\n")} for block in blocks if block.strip()]
    if not docs:
        raise ValueError(f"{path} contains no text documents")
    return docs


# ---------------------------------------------------------------------------------------------
# Task configs


class SplitLoader:
    """Callable for lm-eval's ``custom_dataset``: builds ``{split: datasets.Dataset}`` from local files.

    lm-eval calls it with the task metadata and dataset kwargs as keyword arguments; they are ignored.
    """

    def __init__(self, read: Callable[..., list[dict]], splits: dict[str, tuple[Path, ...]]):
        self.read = read
        self.splits = splits

    def __call__(self, **_ignored: Any):
        import datasets

        return {name: datasets.Dataset.from_list(self.read(*paths)) for name, paths in self.splits.items()}

    def __repr__(self) -> str:
        files = {name: [str(p) for p in paths] for name, paths in self.splits.items()}
        return f"SplitLoader({self.read.__name__}, {files})"


def _winogrande_text(doc: dict) -> int:
    # lm-eval's WinoGrande scores the continuation under each context, so doc_to_text is the gold index.
    return doc["gold"]


def _winogrande_choices(doc: dict) -> list[str]:
    return doc["context_options"]


def _winogrande_target(doc: dict) -> str:
    return doc["continuation"]


@dataclass(frozen=True)
class LocalTask:
    """A local task: the files it needs (relative to the data folder) and how to build its config."""

    name: str
    builtin: str                         # lm-eval's built-in task with the same prompts and metrics
    eval_files: tuple[str, ...]          # every file must exist
    build: Callable[["LocalTask", Path, int], dict]
    fewshot_files: tuple[str, ...] = ()  # optional; needed only when num_fewshot > 0


def _split_loader(task: LocalTask, data_dir: Path, num_fewshot: int, read: Callable) -> tuple[SplitLoader, dict]:
    splits = {"validation": tuple(data_dir / f for f in task.eval_files)}
    split_keys: dict[str, Any] = {"validation_split": "validation", "test_split": None}
    if num_fewshot > 0:
        fewshot_paths = tuple(data_dir / f for f in task.fewshot_files)
        if not fewshot_paths:
            raise ValueError(f"task {task.name} has no local few-shot data, so num_fewshot={num_fewshot} is "
                             "not possible; use num_fewshot=0")
        _require_files(task.name, fewshot_paths)
        splits["train"] = fewshot_paths
        split_keys.update(training_split="train", fewshot_split="train")
    return SplitLoader(read, splits), split_keys


def _require_files(task_name: str, paths: tuple[Path, ...]) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"task {task_name} needs {', '.join(missing)}, which does not exist; "
                                f"see the data layout in {__name__}")


def _base_config(task: LocalTask, loader: SplitLoader, split_keys: dict, num_fewshot: int) -> dict:
    return {
        "task": task.name,
        "custom_dataset": loader,
        "output_type": "multiple_choice",
        **split_keys,
        "num_fewshot": num_fewshot,
        "metric_list": _ACC_METRICS,
        "metadata": {"version": 1.0, "builtin_task": task.builtin},
    }


def _build_arc(task: LocalTask, data_dir: Path, num_fewshot: int) -> dict:
    loader, split_keys = _split_loader(task, data_dir, num_fewshot, arc_docs)
    return _base_config(task, loader, split_keys, num_fewshot) | {
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{choices.label.index(answerKey)}}",
        "doc_to_choice": "{{choices.text}}",
        "should_decontaminate": True,
        "doc_to_decontamination_query": "Question: {{question}}\nAnswer:",
    }


def _build_piqa(task: LocalTask, data_dir: Path, num_fewshot: int) -> dict:
    loader, split_keys = _split_loader(task, data_dir, num_fewshot, piqa_docs)
    return _base_config(task, loader, split_keys, num_fewshot) | {
        "doc_to_text": "Question: {{goal}}\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": "{{[sol1, sol2]}}",
        "should_decontaminate": True,
        "doc_to_decontamination_query": "goal",
    }


def _build_hellaswag(read: Callable) -> Callable[[LocalTask, Path, int], dict]:
    def build(task: LocalTask, data_dir: Path, num_fewshot: int) -> dict:
        loader, split_keys = _split_loader(task, data_dir, num_fewshot, read)
        return _base_config(task, loader, split_keys, num_fewshot) | {
            "doc_to_text": "{{query}}",
            "doc_to_target": "{{label}}",
            "doc_to_choice": "choices",
        }

    return build


def _build_winogrande(task: LocalTask, data_dir: Path, num_fewshot: int) -> dict:
    loader, split_keys = _split_loader(task, data_dir, num_fewshot, winogrande_docs)
    return _base_config(task, loader, split_keys, num_fewshot) | {
        "doc_to_text": _winogrande_text,
        "doc_to_target": _winogrande_target,
        "doc_to_choice": _winogrande_choices,
        "metric_list": _ACC_ONLY,
    }


def _build_boolq(task: LocalTask, data_dir: Path, num_fewshot: int) -> dict:
    loader, split_keys = _split_loader(task, data_dir, num_fewshot, boolq_docs)
    return _base_config(task, loader, split_keys, num_fewshot) | {
        "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": ["no", "yes"],
        "metric_list": _ACC_ONLY,
        "metadata": {"version": 2.0, "builtin_task": task.builtin},
    }


def _build_lambada(task: LocalTask, data_dir: Path, num_fewshot: int) -> dict:
    loader, split_keys = _split_loader(task, data_dir, num_fewshot, lambada_docs)
    return _base_config(task, loader, split_keys, num_fewshot) | {
        "output_type": "loglikelihood",
        "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
        "doc_to_target": "{{' '+text.split(' ')[-1]}}",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
    }


LOCAL_TASKS: dict[str, LocalTask] = {
    task.name: task for task in [
        LocalTask("arc_easy_local", "arc_easy", ("arc/ARC-Easy-Dev.jsonl",), _build_arc,
                  fewshot_files=("arc/ARC-Easy-Train.jsonl",)),
        LocalTask("arc_challenge_local", "arc_challenge", ("arc/ARC-Challenge-Dev.jsonl",), _build_arc,
                  fewshot_files=("arc/ARC-Challenge-Train.jsonl",)),
        LocalTask("piqa_local", "piqa", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), _build_piqa),
        LocalTask("hellaswag_local", "hellaswag", ("hellaswag/hellaswag_val.jsonl",),
                  _build_hellaswag(hellaswag_jsonl_docs)),
        LocalTask("hellaswag_text_local", "hellaswag", ("hellaswag/hellaswag_val_full.txt.bz2",),
                  _build_hellaswag(hellaswag_text_docs)),
        LocalTask("winogrande_local", "winogrande", ("derived_mosaic/winogrande.jsonl",), _build_winogrande),
        LocalTask("boolq_local", "boolq", ("derived_mosaic/boolq.jsonl",), _build_boolq),
        LocalTask("lambada_openai_local", "lambada_openai", ("derived_mosaic/lambada_openai.jsonl",),
                  _build_lambada),
    ]
}


def local_task_available(name: str, data_dir: Path) -> bool:
    """Return whether every eval file of local task ``name`` exists under ``data_dir``."""
    return all((data_dir / f).is_file() for f in LOCAL_TASKS[name].eval_files)


def build_local_task(name: str, data_dir: str | os.PathLike, num_fewshot: int = 0) -> dict:
    """Build the inline lm-eval config of local task ``name`` over the files in ``data_dir``."""
    if name not in LOCAL_TASKS:
        raise KeyError(f"unknown local task {name!r}; known: {', '.join(sorted(LOCAL_TASKS))}")
    task = LOCAL_TASKS[name]
    data_dir = Path(data_dir).expanduser().resolve()
    _require_files(name, tuple(data_dir / f for f in task.eval_files))
    return task.build(task, data_dir, num_fewshot)


def build_perplexity_task(path: str | os.PathLike, name: str = "text_perplexity") -> dict:
    """Build a rolling-loglikelihood task (word_perplexity, byte_perplexity, bits_per_byte) over a text file.

    See ``text_documents`` for how the file is split into documents.
    """
    path = Path(path).expanduser().resolve()
    _require_files(name, (path,))
    return {
        "task": name,
        "custom_dataset": SplitLoader(text_documents, {"test": (path,)}),
        "output_type": "loglikelihood_rolling",
        "test_split": "test",
        "doc_to_text": "",
        "doc_to_target": "text",
        "num_fewshot": 0,
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
        "metadata": {"version": 1.0, "source_file": str(path)},
    }
