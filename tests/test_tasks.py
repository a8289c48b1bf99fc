"""Offline tasks: prompts and gold against lm-eval's built-in task configs, and end-to-end scoring."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import lm_eval
import pytest
import torch
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from aoe_lightning.data.tokenizer import ByteTokenizer
from aoe_lightning.evaluation import tasks as local_tasks
from aoe_lightning.evaluation.adapter import AoELM
from aoe_lightning.evaluation.suites import load_suite, resolve_suite
from aoe_lightning.models import ModelConfig, Transformer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"
REPO = Path(__file__).resolve().parents[1]
LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"eval data folder {DATA} not found")


def build_task(config: dict):
    (task,) = TaskManager(include_defaults=False).load([config])["tasks"].values()
    return task


def builtin_task(yaml_rel: str, docs: list[dict], name: str, process_docs: bool = True):
    """lm-eval's own task config from its YAML, fed ``docs`` instead of the Hugging Face dataset."""
    config = load_yaml(LM_EVAL_TASKS / yaml_rel, resolve_func=True)
    if not process_docs:
        config.pop("process_docs", None)
    config.update(task=name, custom_dataset=lambda **_: {"validation": datasets.Dataset.from_list(docs)},
                  validation_split="validation", test_split=None, training_split=None)
    config.pop("tag", None)
    return build_task(config)


def rendered(task, limit: int | None = None) -> list[tuple]:
    docs = list(task.eval_docs)[:limit]
    has_choices = task.config.doc_to_choice is not None
    return [(task.doc_to_text(d), task.doc_to_choice(d) if has_choices else None, task.doc_to_target(d))
            for d in docs]


@needs_data
@pytest.mark.parametrize("name, yaml_rel", [("arc_easy_local", "arc/arc_easy.yaml"),
                                            ("arc_challenge_local", "arc/arc_easy.yaml")])
def test_arc_matches_builtin(name, yaml_rel):
    local = build_task(local_tasks.build_local_task(name, DATA))
    path = DATA / local_tasks.LOCAL_TASKS[name].eval_files[0]
    builtin = builtin_task(yaml_rel, local_tasks.arc_docs(path), name + "_builtin")
    assert rendered(local) == rendered(builtin)


@needs_data
def test_arc_easy_first_item():
    local = build_task(local_tasks.build_local_task("arc_easy_local", DATA))
    assert rendered(local, 1)[0] == ("Question: Which technology was developed most recently?\nAnswer:",
                                     ["cellular telephone", "television", "refrigerator", "airplane"], 0)


@needs_data
def test_arc_odd_choice_counts_and_numeric_labels():
    docs = local_tasks.arc_docs(DATA / "arc" / "ARC-Challenge-Dev.jsonl") + \
        local_tasks.arc_docs(DATA / "arc" / "ARC-Easy-Dev.jsonl")
    counts = {len(d["choices"]["text"]) for d in docs}
    assert {3, 4, 5} <= counts
    assert any(d["answerKey"].isdigit() for d in docs)
    raw = [json.loads(line) for path in ("ARC-Challenge-Dev.jsonl", "ARC-Easy-Dev.jsonl")
           for line in open(DATA / "arc" / path)]
    for doc, record in zip(docs, raw):
        labels = [c["label"] for c in record["question"]["choices"]]
        assert doc["choices"]["label"].index(doc["answerKey"]) == labels.index(record["answerKey"])


@needs_data
def test_piqa_matches_builtin():
    local = build_task(local_tasks.build_local_task("piqa_local", DATA))
    docs = local_tasks.piqa_docs(DATA / "piqa" / "valid.jsonl", DATA / "piqa" / "valid-labels.lst")
    builtin = builtin_task("piqa/piqa.yaml", docs, "piqa_builtin")
    assert rendered(local) == rendered(builtin)
    labels = [int(line) for line in open(DATA / "piqa" / "valid-labels.lst")]
    assert [t for _, _, t in rendered(local)] == labels


HELLASWAG_RAW = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
     "ctx_b": "then", "ctx": "", "endings": [" , the man continues removing the snow.", "gets into the car.",
                                            "  drives away.", "hands it to the woman [header] Sit."],
     "label": 3, "source_id": "x", "split": "val", "split_type": "indomain"},
    {"ind": 9, "activity_label": "Home and Garden", "ctx_a": "[header] How to clean a grill [title] Scrub it.",
     "ctx_b": "THE brush [step] should be wire.", "ctx": "", "endings": ["a [title] b", "c", "d  e", "f"],
     "label": 0, "source_id": "y", "split": "val", "split_type": "zeroshot"},
]


def test_hellaswag_jsonl_matches_builtin(tmp_path):
    from lm_eval.tasks.hellaswag.utils import process_docs

    (tmp_path / "hellaswag").mkdir()
    with open(tmp_path / "hellaswag" / "hellaswag_val.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in HELLASWAG_RAW)
    local = build_task(local_tasks.build_local_task("hellaswag_local", tmp_path))
    reference = process_docs(datasets.Dataset.from_list(HELLASWAG_RAW))
    builtin = builtin_task("hellaswag/hellaswag.yaml", list(reference), "hellaswag_builtin")
    assert rendered(local) == rendered(builtin)
    assert rendered(local)[1][0] == "Home and Garden: How to clean a grill. Scrub it. The brush should be wire."


@needs_data
def test_hellaswag_text_format():
    path = DATA / "hellaswag" / "hellaswag_val_full.txt.bz2"
    docs = local_tasks.hellaswag_text_docs(path)
    assert len(docs) == 10042
    assert docs[0] == {"query": "Roof shingle removal: A man is sitting on a roof. he",
                       "choices": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                   "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
                       "gold": 3, "label": 3}
    local = build_task(local_tasks.build_local_task("hellaswag_text_local", DATA))
    builtin = builtin_task("hellaswag/hellaswag.yaml", docs[:50], "hellaswag_text_builtin",
                           process_docs=False)
    assert rendered(local, 50) == rendered(builtin)


@needs_data
def test_winogrande_matches_builtin():
    # The builtin task reads sentence/option1/option2/answer; rebuild them for items whose options
    # differ at their first character, where the split point is unambiguous.
    docs = local_tasks.winogrande_docs(DATA / "derived_mosaic" / "winogrande.jsonl")
    hf_docs, kept = [], []
    for doc in docs:
        first, second = doc["context_options"]
        prefix = os.path.commonprefix([first, second])
        if not prefix.endswith(" "):
            continue
        sentence = prefix + "_ " + doc["continuation"]
        hf_docs.append({"sentence": sentence, "option1": first[len(prefix):], "option2": second[len(prefix):],
                        "answer": str(doc["gold"] + 1)})
        kept.append(doc)
        if len(kept) == 40:
            break
    local_config = local_tasks.build_local_task("winogrande_local", DATA)
    local = build_task(local_config)
    builtin = builtin_task("winogrande/default.yaml", hf_docs, "winogrande_builtin")
    local_rendered = [(local.doc_to_text(d), local.doc_to_choice(d), local.doc_to_target(d)) for d in kept]
    assert local_rendered == rendered(builtin)


@needs_data
def test_boolq_and_lambada_match_builtin():
    path = DATA / "derived_mosaic"
    boolq = build_task(local_tasks.build_local_task("boolq_local", DATA))
    builtin = builtin_task("super_glue/boolq/default.yaml", local_tasks.boolq_docs(path / "boolq.jsonl"), "bq")
    assert rendered(boolq, 100) == rendered(builtin, 100)
    first = json.loads(open(path / "boolq.jsonl").readline())
    assert rendered(boolq, 1)[0][0] == first["query"].removeprefix("Passage: ") + "\nAnswer:"

    lambada = build_task(local_tasks.build_local_task("lambada_openai_local", DATA))
    builtin = builtin_task("lambada/lambada_openai.yaml", local_tasks.lambada_docs(path / "lambada_openai.jsonl"),
                           "lam")
    assert rendered(lambada, 100) == rendered(builtin, 100)
    first = json.loads(open(path / "lambada_openai.jsonl").readline())
    assert rendered(lambada, 1)[0][0] == first["context"]
    assert rendered(lambada, 1)[0][2] == " " + first["continuation"]


def test_missing_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="piqa/valid-labels.lst"):
        (tmp_path / "piqa").mkdir()
        (tmp_path / "piqa" / "valid.jsonl").write_text("{}\n")
        local_tasks.build_local_task("piqa_local", tmp_path)


def test_unknown_local_task(tmp_path):
    with pytest.raises(KeyError, match="unknown local task"):
        local_tasks.build_local_task("arc_hard_local", tmp_path)


@needs_data
def test_suites_resolve_offline():
    core = resolve_suite(load_suite(REPO / "evals" / "core.yaml"), DATA)
    assert [c["task"] for c in core.specs] == ["arc_easy_local", "arc_challenge_local", "hellaswag_text_local",
                                               "piqa_local"]
    paper = resolve_suite(load_suite(REPO / "evals" / "paper.yaml"), DATA, skip_unavailable=True)
    assert [c["task"] for c in paper.specs] == ["arc_easy_local", "piqa_local", "winogrande_local",
                                                "hellaswag_text_local"]
    assert paper.skipped == ["social_iqa", "mnli", "qnli", "sst2"]
    assert paper.num_fewshot == {name: 0 for name in ["arc_easy_local", "piqa_local", "winogrande_local",
                                                      "hellaswag_text_local"]}
    with pytest.raises(FileNotFoundError, match="social_iqa has no offline equivalent"):
        resolve_suite(load_suite(REPO / "evals" / "paper.yaml"), DATA)


def test_suites_resolve_builtin_names():
    paper = resolve_suite(load_suite(REPO / "evals" / "paper.yaml"), None)
    assert paper.specs == ["arc_easy", "piqa", "social_iqa", "winogrande", "hellaswag", "mnli", "qnli", "sst2"]
    assert paper.num_fewshot["mnli"] == paper.num_fewshot["qnli"] == paper.num_fewshot["sst2"] == 3
    assert paper.num_fewshot["arc_easy"] == 0


class UniformModel(torch.nn.Module):
    """Every next token equally likely, so a continuation's log-likelihood is -n_tokens * log(vocab)."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(max_seq_len=64, vocab_size=257)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, idx, padding_mask=None):
        return SimpleNamespace(logits=torch.zeros(*idx.shape, 257) + self.dummy)


def test_acc_and_acc_norm_hand_made():
    # Uniform model: loglik(" " + choice) = -(len + 1) log 257, so acc picks the shortest choice and
    # acc_norm (loglik / len) the longest. Gold: item 1 shortest only, items 2 and 3 longest only.
    docs = [{"q": "one", "choices": ["a", "bbb", "cc"], "gold": 0},
            {"q": "two", "choices": ["dddd", "ee"], "gold": 0},
            {"q": "three", "choices": ["ff", "g", "hhh"], "gold": 2}]
    config = {"task": "hand_made", "output_type": "multiple_choice", "test_split": "test",
              "custom_dataset": lambda **_: {"test": datasets.Dataset.from_list(docs)},
              "doc_to_text": "{{q}}", "doc_to_choice": "choices", "doc_to_target": "gold",
              "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    lm = AoELM(model=UniformModel(), tokenizer=ByteTokenizer(), batch_size=2)
    results = lm_eval.simple_evaluate(model=lm, tasks=[config], task_manager=TaskManager(include_defaults=False),
                                      bootstrap_iters=0)
    assert results["results"]["hand_made"]["acc,none"] == pytest.approx(1 / 3)
    assert results["results"]["hand_made"]["acc_norm,none"] == pytest.approx(2 / 3)


# (task, number of items in the scored split, chance accuracy or None where a class prior dominates)
REAL_TASKS = [
    ("arc_easy_local", 570, 0.25),
    ("arc_challenge_local", 299, 0.25),
    ("piqa_local", 1838, 0.5),
    ("hellaswag_text_local", 10042, 0.25),
    ("winogrande_local", 1267, 0.5),
    # BoolQ's choices are always ["no", "yes"]: an untrained model picks the same word for every
    # item, so its accuracy is the class share of the 20 items rather than a binomial draw.
    ("boolq_local", 3270, None),
]


@needs_data
def test_simple_evaluate_real_items():
    torch.manual_seed(0)
    config = ModelConfig.from_dict({"vocab_size": 257, "n_layers": 2, "n_heads": 2, "d_model": 32,
                                    "max_seq_len": 64, "ffn": {"kind": "dense", "d_ffn": 64}})
    lm = AoELM(model=Transformer(config), tokenizer=ByteTokenizer(), batch_size=16)
    specs = [local_tasks.build_local_task(name, DATA) for name, _, _ in REAL_TASKS]
    specs.append(local_tasks.build_local_task("lambada_openai_local", DATA))
    results = lm_eval.simple_evaluate(model=lm, tasks=specs, limit=20, bootstrap_iters=0,
                                      task_manager=TaskManager(include_defaults=False))
    for name, total, chance in REAL_TASKS:
        assert results["n-samples"][name] == {"original": total, "effective": 20}, name
        acc = results["results"][name]["acc,none"]
        if chance is not None:
            # 20 Bernoulli(chance) draws: 4 standard deviations either side.
            band = 4 * math.sqrt(chance * (1 - chance) / 20)
            assert chance - band <= acc <= chance + band, (name, acc)
    assert results["n-samples"]["lambada_openai_local"] == {"original": 5153, "effective": 20}
    assert results["results"]["lambada_openai_local"]["perplexity,none"] > 257 ** 0.5


@needs_data
def test_simple_evaluate_by_model_name(tmp_path):
    from aoe_lightning.export import save_export

    torch.manual_seed(0)
    config = ModelConfig.from_dict({"vocab_size": 257, "n_layers": 1, "n_heads": 2, "d_model": 32,
                                    "max_seq_len": 64, "ffn": {"kind": "dense", "d_ffn": 64}})
    path = save_export(tmp_path / "model.pt", config, Transformer(config).state_dict(), ByteTokenizer().to_dict())
    results = lm_eval.simple_evaluate(model="aoe", model_args=f"checkpoint={path},dtype=float32",
                                      tasks=[local_tasks.build_local_task("piqa_local", DATA)], limit=5,
                                      batch_size="4", device="cuda:0", bootstrap_iters=0,
                                      task_manager=TaskManager(include_defaults=False))
    assert results["n-samples"]["piqa_local"]["effective"] == 5


def test_perplexity_task(tmp_path):
    text_file = tmp_path / "held_out.txt"
    text_file.write_text("first document here.\n\nsecond one,\nwith two lines.\n\n\n")
    lm = AoELM(model=UniformModel(), tokenizer=ByteTokenizer(), batch_size=2)
    results = lm_eval.simple_evaluate(model=lm, tasks=[local_tasks.build_perplexity_task(text_file)],
                                      task_manager=TaskManager(include_defaults=False), bootstrap_iters=0)
    scores = results["results"]["text_perplexity"]
    # Uniform over 257 ids, one id per byte: log2(257) bits per byte, perplexity 257 per byte.
    assert scores["bits_per_byte,none"] == pytest.approx(math.log2(257), rel=1e-5)
    assert scores["byte_perplexity,none"] == pytest.approx(257, rel=1e-4)
    n_bytes, n_words = len("first document here.second one,\nwith two lines."), 3 + 5
    assert scores["word_perplexity,none"] == pytest.approx(257 ** (n_bytes / n_words), rel=1e-3)
