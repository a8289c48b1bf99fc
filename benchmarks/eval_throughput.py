"""Loglikelihood requests per second of the ``aoe`` lm-eval model at several batch sizes.

Scores the first N HellaSwag requests (context + " " + ending, four per item) with a tiny randomly
initialised dense model. Each row is one batch size, with the rate and the speed-up over the first batch
size for each configuration: the adapter's default (each shared prompt runs once, ``share_prompts``), the
adapter scoring whole sequences as lm-eval's own models do, and, when ``transformers`` is installed (the
``hf`` extra), lm-eval's own ``hf`` model. That model is a Llama (RMSNorm, RoPE, SwiGLU, untied head) of the
same width, depth, FFN width and window, built from a config. Its tokenizer is built in memory and gives the
same ids as the ``aoe`` one (``--tokenizer byte``: UTF-8 bytes; ``bpe``: a BPE trained on the package's
built-in corpus), so all configurations score identical token sequences and nothing is downloaded. Every
configuration is timed ``--rounds`` times, interleaved, and the table shows the medians.

    python benchmarks/eval_throughput.py --data_dir /data/eval [--requests 2000] [--batch_sizes 1,8,32]
    python benchmarks/eval_throughput.py --data_dir /data/eval --tokenizer bpe [--rounds 3]

It runs on CUDA when available (``--device``). As ``aoe eval`` does on CPU, glibc's malloc keeps freed memory
for the next batch there (``--default-malloc`` turns this off).

NOTE: the CUDA path has not been run; the published numbers are from a 2-vCPU CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from lm_eval.api.instance import Instance

from aoe_lightning.allocator import reuse_freed_memory
from aoe_lightning.data.default_corpus import default_documents
from aoe_lightning.data.tokenizer import ByteTokenizer, train_bpe_tokenizer
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


def byte_level_hf_tokenizer():
    """Build a ``transformers`` tokenizer whose ids are UTF-8 byte values, with 256 as end of text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's reversible byte-to-character table: printable bytes map to themselves, the others to
    # characters from 256 upward, so that every byte is one vocabulary entry.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    characters = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    vocab = {characters[b]: b for b in range(256)} | {"<|endoftext|>": 256}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def bpe_tokenizers(vocab_size: int):
    """Train a byte-level BPE on the package's built-in corpus.

    Returns it and the same tokenizer wrapped for lm-eval's ``hf`` model, or None without ``transformers``.
    """
    tokenizer = train_bpe_tokenizer(default_documents(), vocab_size)
    if importlib.util.find_spec("transformers") is None:
        return tokenizer, None
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    saved = tokenizer.to_dict()
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(saved["tokenizer_json"]),
                                           eos_token=saved["eos_token"])
    return tokenizer, hf_tokenizer


def hf_model(args, vocab_size: int, eos_id: int):
    """Build a randomly initialised Llama of the benchmark's size for lm-eval's ``hf`` model, or return None."""
    if importlib.util.find_spec("transformers") is None:
        return None
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.d_model, intermediate_size=4 * args.d_model,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=False, bos_token_id=eos_id, eos_token_id=eos_id,
    )
    return transformers.LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None, help="eval data folder (default: $AOE_EVAL_DATA)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--batch_sizes", default="1,8,32")
    parser.add_argument("--d_model", type=int, default=64)
    parser.add_argument("--n_layers", type=int, default=2)
    parser.add_argument("--n_heads", type=int, default=4)
    parser.add_argument("--max_seq_len", type=int, default=512,
                        help="model window in tokens; requests whose continuation has this many bytes or more are "
                             "dropped")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--tokenizer", choices=["byte", "bpe"], default="byte",
                        help="byte: UTF-8 bytes (about 194 tokens per request); bpe: a byte-level BPE trained on "
                             "the built-in corpus (about 73 tokens per request)")
    parser.add_argument("--bpe_vocab_size", type=int, default=4096)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--rounds", type=int, default=3, help="timings per configuration; the table shows the median")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default malloc thresholds instead of reusing freed memory")
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    # Per-request truncation warnings of lm-eval's hf model would bury the table.
    for name in ("lm_eval", "lm-eval", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    data_dir = resolve_data_dir(args.data_dir)
    if data_dir is None:
        parser.error("pass --data_dir or set AOE_EVAL_DATA to a folder with hellaswag/hellaswag_val_full.txt.bz2")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reused = device.type == "cpu" and not args.default_malloc and reuse_freed_memory()

    if args.tokenizer == "byte":
        tokenizer = ByteTokenizer()
        hf_tokenizer = byte_level_hf_tokenizer() if importlib.util.find_spec("transformers") else None
    else:
        tokenizer, hf_tokenizer = bpe_tokenizers(args.bpe_vocab_size)
    torch.manual_seed(0)
    config = ModelConfig.from_dict({"vocab_size": tokenizer.vocab_size, "n_layers": args.n_layers,
                                    "n_heads": args.n_heads, "d_model": args.d_model, "max_seq_len": args.max_seq_len,
                                    "ffn": {"kind": "dense", "d_ffn": 4 * args.d_model}})
    model = Transformer(config).to(device).eval()
    requests = hellaswag_requests(data_dir, args.requests)
    # lm-eval's hf model rejects a continuation longer than its window, so neither model is timed on one.
    requests = [r for r in requests if len(r.arguments[1].encode("utf-8")) < args.max_seq_len]
    n_params = sum(p.numel() for p in model.parameters())
    if device.type == "cpu":
        device_text = f"{torch.get_num_threads()} threads, CPU, {'freed memory reused' if reused else 'default malloc'}"
    else:
        device_text = torch.cuda.get_device_name(device)
    tokens = sum(len(tokenizer.encode(context + continuation)) for context, continuation in (r.args for r in requests))
    print(f"{len(requests)} HellaSwag loglikelihood requests, {tokens / len(requests):.0f} tokens per request, "
          f"{tokenizer!r}, dense model d_model={args.d_model} "
          f"n_layers={args.n_layers} max_seq_len={args.max_seq_len} ({n_params / 1e6:.2f}M params), "
          f"torch {torch.__version__}, {device_text}")
    print()
    hf = hf_model(args, tokenizer.vocab_size, tokenizer.eos_id)
    if hf is not None:
        # HFLM (lm-eval 0.4.13) runs a model instance on the device the instance is already on.
        hf = hf.to(device)
    if hf is None:
        print("lm-eval's hf model is skipped: `transformers` is not installed (pip install -e '.[hf]')\n")
    else:
        print(f"hf: LlamaForCausalLM with the same shape ({sum(p.numel() for p in hf.parameters()) / 1e6:.2f}M "
              f"params), transformers {importlib.import_module('transformers').__version__}\n")
    models = {}
    for batch_size in args.batch_sizes:
        for name, share in (("aoe", True), ("whole", False)):
            models[name, batch_size] = AoELM(model=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
                                             share_prompts=share)
        if hf is not None:
            from lm_eval.models.huggingface import HFLM

            models["hf", batch_size] = HFLM(pretrained=hf, tokenizer=hf_tokenizer, batch_size=batch_size,
                                            max_length=args.max_seq_len, device=str(device))
    # Rounds over every configuration, so a slow phase of a shared machine hits all of them alike.
    samples: dict[tuple[str, int], list[float]] = {key: [] for key in models}
    for _ in range(args.rounds):
        for key, lm in models.items():
            samples[key].append(time_requests(lm, requests))
    rates = {key: statistics.median(values) for key, values in samples.items()}

    print(f"median of {args.rounds} rounds\n")
    first = args.batch_sizes[0]
    header = f"| batch size | aoe requests/s | aoe vs batch {first} | aoe whole sequences | whole vs batch {first} |"
    if hf is not None:
        header += f" hf requests/s | hf vs batch {first} | aoe / hf |"
    print(header)
    print("|" + "---:|" * (header.count("|") - 1))
    for batch_size in args.batch_sizes:
        row = f"| {batch_size} |"
        for name in ("aoe", "whole") + (("hf",) if hf is not None else ()):
            row += f" {rates[name, batch_size]:.1f} | {rates[name, batch_size] / rates[name, first]:.2f}x |"
        if hf is not None:
            row += f" {rates['aoe', batch_size] / rates['hf', batch_size]:.2f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
