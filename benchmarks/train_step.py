"""Training-step throughput, MFU and peak memory of the tiny dense, MoE and AoE presets, in one run.

Each preset runs in its own child process (so that peak memory is its own) for ``--warmup`` untimed and
``--steps`` timed steps of forward, backward, gradient clipping and AdamW on random token batches of the
preset's ``data.batch_size`` x ``data.seq_len``. The table gives tokens/s, the ratio to the dense preset
(whose SwiGLU width equals the MoE's ``top_k * d_ffn``, so its active FFN parameters match), MFU, and peak
memory.

The presets run in turn for ``--rounds`` rounds, and each preset's best round is reported: a change in machine
load during one round then affects every preset alike instead of one of them.

- Train FLOP/token: ``training_flops_per_token`` (6 x the matmul parameters a token uses, plus attention). AoE
  adds its selection overhead, the ``W_down`` rows of the experts it does not select.
- MFU = ``training_flops_per_token * tokens/s / peak``, with the peak measured in the same run as the
  FLOP/s of a square matmul (fp32 on CPU, bf16 on CUDA), not taken from a datasheet. Every preset's process
  measures it, and all rows use the median of those measurements.
- On CPU each child raises glibc's malloc thresholds as ``aoe fit`` does (``--default-malloc`` keeps the defaults).
- Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the child's peak resident set size
  (``ru_maxrss``) minus its size after importing torch, so it includes the allocator's slack.

Usage: ``python benchmarks/train_step.py [--configs configs/tiny_dense.yaml ...] [--steps 20] [--device cuda]``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = [REPO / "configs" / f"tiny_{kind}.yaml" for kind in ("dense", "moe", "aoe")]


def load_preset(path: Path):
    import yaml

    from aoe_lightning.params_cli import load_model_config

    document = yaml.safe_load(path.read_text())
    data = document.get("data", {})
    return load_model_config(path), int(data.get("batch_size", 8)), int(data.get("seq_len", 128))


def measure(path: Path, steps: int, warmup: int, device: str, threads: int | None, default_malloc: bool,
            queue) -> None:
    if threads:
        torch.set_num_threads(threads)
    if device == "cpu" and not default_malloc:
        from aoe_lightning.allocator import reuse_freed_memory

        reuse_freed_memory()
    from aoe_lightning.models import Transformer
    from aoe_lightning.models.params import count_parameters, training_flops_per_token
    from aoe_lightning.training.callbacks import measure_matmul_peak
    from aoe_lightning.training.optim import adamw, parameter_groups

    base_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    config, batch_size, seq_len = load_preset(path)
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = Transformer(config).to(dev)
    optimizer = adamw(parameter_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95))
    coef = config.ffn.load_balance_coef
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=generator)
               for _ in range(4)]

    def step(tokens: torch.Tensor) -> None:
        tokens = tokens.to(dev)
        with torch.autocast(device_type=dev.type, dtype=dtype, enabled=dev.type == "cuda"):
            out = model(tokens[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss = loss + coef * out.aux_losses.get("load_balance", loss.new_zeros(()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(batches[i % len(batches)])
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    tokens_per_s = steps * batch_size * seq_len / seconds
    peak = measure_matmul_peak(dev, dtype)
    flops_per_token = training_flops_per_token(config, seq_len)
    if dev.type == "cuda":
        memory_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        memory_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss_kib) / 1024
    counts = count_parameters(config)
    queue.put({
        "preset": path.stem,
        "kind": config.ffn.kind,
        "active": counts.non_embedding_active,
        "flops_per_token": flops_per_token,
        "tokens_per_s": tokens_per_s,
        "peak_tflops": peak / 1e12,
        "memory_mib": memory_mib,
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", type=Path, default=DEFAULT_CONFIGS,
                        help="aoe fit presets; the first is the baseline of the ratio column")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per preset")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over all presets; each preset's fastest round is reported")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default malloc thresholds instead of the ones `aoe fit` sets on CPU")
    args = parser.parse_args()

    context = mp.get_context("spawn")
    best: dict[Path, dict] = {}
    for _ in range(args.rounds):
        for path in args.configs:
            queue = context.Queue()
            child = context.Process(
                target=measure,
                args=(path, args.steps, args.warmup, args.device, args.threads, args.default_malloc, queue),
            )
            child.start()
            row = queue.get()
            child.join()
            if path not in best or row["tokens_per_s"] > best[path]["tokens_per_s"]:
                best[path] = row
    rows = [best[path] for path in args.configs]

    base = rows[0]["tokens_per_s"]
    base_flops = rows[0]["flops_per_token"]
    print(f"device: {args.device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"threads {args.threads or torch.get_num_threads()}, {args.steps} timed steps after {args.warmup} warm-up, "
          f"best of {args.rounds} rounds, malloc {'default' if args.default_malloc else 'as aoe fit sets it'}")
    # One peak for every row: each child measures its own, and their spread would show up as MFU differences.
    peak_tflops = statistics.median(row["peak_tflops"] for row in rows)
    print(f"measured matmul peak (median over the presets' processes): {peak_tflops * 1e3:.1f} GFLOP/s\n")
    first = rows[0]["preset"]
    print(f"| preset | ffn | active non-embedding params | train FLOP/token | vs {first} | tokens/s | vs {first} "
          "| MFU | peak memory (MiB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['preset']} | {row['kind']} | {row['active']:,} | {row['flops_per_token'] / 1e6:.2f}M | "
              f"{row['flops_per_token'] / base_flops:.3f} | {row['tokens_per_s']:,.0f} | "
              f"{row['tokens_per_s'] / base:.2f} | {row['flops_per_token'] * row['tokens_per_s'] / (peak_tflops * 1e12):.1%} | {row['memory_mib']:,.0f} |")


if __name__ == "__main__":
    main()
