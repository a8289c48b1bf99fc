"""Loglikelihood requests per second of the ``aoe`` lm-eval model at several batch sizes.

Scores the first N HellaSwag requests (context + " " + ending, four per item) with a tiny randomly
initialised model and prints one row per batch size with its speed-up over batch size 1. When
``transformers`` is installed, lm-eval's own ``hf`` model on a GPT-2 of the same width, depth and
window (built from a config, no download) is timed on the same requests for comparison.

    python benchmarks/eval_throughput.py --data_dir /data/eval [--requests 2000] [--batch_sizes 1,8,32]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from lm_eval.api.instance import Instance

from aoe_lightning.data.tokenizer import ByteTokenizer
from aoe_lightning.evaluation.adapter import AoELM
from aoe_lightning.evaluation.tasks import hellaswag_text_docs, resolve_data_dir
from aoe_lightning.models import ModelConfig, Transformer


def hellaswag_requests(data_dir, count: int) -> list[Instance]:
    docs = hellaswag_text_docs(data_dir / "hellaswag" / "hellaswag_val_full.txt.bz2")
    pairs = [(doc["query"], " " + choice) for doc in docs for choice in doc["choices"]][:count]
    return [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i, metadata=("hellaswag", i, 1))
            for i, pair in enumerate(pairs)]


def time_requests(lm, requests) -> float:
    lm.loglikelihood(requests[:16])  # warm-up: first-call allocations and kernel selection
    start = time.perf_counter()
    lm.loglikelihood(requests)
    return len(requests) / (time.perf_counter() - start)


def hf_row(args, requests) -> str:
    if importlib.util.find_spec("transformers") is None:
        return "| hf (GPT-2, same size) | - | - | skipped: `transformers` is not installed |"
    import transformers
    from lm_eval.models.huggingface import HFLM

    config = transformers.GPT2Config(vocab_size=257, n_positions=args.max_seq_len, n_embd=args.d_model,
                                     n_layer=args.n_layers, n_head=args.n_heads)
    model = transformers.GPT2LMHeadModel(config).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained("gpt2")  # from the local cache only (offline)
    batch = max(args.batch_sizes)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch, max_length=args.max_seq_len, device="cpu")
    return f"| hf (GPT-2, same size) | {batch} | {time_requests(lm, requests):.1f} | GPT-2 BPE tokens |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None, help="eval data folder (default: $AOE_EVAL_DATA)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--batch_sizes", default="1,8,32")
    parser.add_argument("--d_model", type=int, default=64)
    parser.add_argument("--n_layers", type=int, default=2)
    parser.add_argument("--n_heads", type=int, default=4)
    parser.add_argument("--max_seq_len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    data_dir = resolve_data_dir(args.data_dir)
    if data_dir is None:
        parser.error("pass --data_dir or set AOE_EVAL_DATA to a folder with hellaswag/hellaswag_val_full.txt.bz2")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = ModelConfig.from_dict({"vocab_size": 257, "n_layers": args.n_layers, "n_heads": args.n_heads,
                                    "d_model": args.d_model, "max_seq_len": args.max_seq_len,
                                    "ffn": {"kind": "dense", "d_ffn": 4 * args.d_model}})
    model = Transformer(config).eval()
    requests = hellaswag_requests(data_dir, args.requests)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{len(requests)} HellaSwag loglikelihood requests, byte tokenizer, dense model d_model={args.d_model} "
          f"n_layers={args.n_layers} max_seq_len={args.max_seq_len} ({n_params / 1e6:.2f}M params), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print()
    print("| model | batch size | requests/s | vs batch 1 |")
    print("|---|---:|---:|---:|")
    baseline = None
    for batch_size in args.batch_sizes:
        lm = AoELM(model=model, tokenizer=ByteTokenizer(), batch_size=batch_size, device="cpu")
        rate = time_requests(lm, requests)
        baseline = baseline or rate
        print(f"| aoe | {batch_size} | {rate:.1f} | {rate / baseline:.2f}x |", flush=True)
    print(hf_row(args, requests))


if __name__ == "__main__":
    main()
