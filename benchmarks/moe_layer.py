"""Forward+backward throughput and peak memory of the dense, router-MoE and AoE feed-forward layers.

Rows: a dense SwiGLU of width ``top_k * d_ffn`` (the dense layer with the same active FFN FLOPs), the router
MoE, AoE at each ``--d-lows`` value, and MoE vs AoE again at each ``--many-experts`` count. Every layer runs on
the same random tokens, with an upstream gradient on its output and a 0.01-weighted load-balancing loss, as
in training.

Timing: one step is the forward and backward pass of one layer on ``--tokens`` tokens (CUDA steps are
synchronised before the clock is read). Gradients are reset to None between steps, so each step allocates
them afresh, as training does. Layers that are compared with each other (dense, MoE and AoE at
``--experts``; MoE and AoE at each ``--many-experts``) are built together and timed in ``--rounds`` rounds;
in each round every layer runs ``--warmup`` untimed steps and then ``--repeats`` timed steps back to back.
The reported time is the median of a layer's timed steps over all rounds. Training also runs one
layer's steps back to back, so each step finds the memory allocator as the previous step of the same layer
left it, not as a layer of other shapes left it. The rounds spread a change in machine load over all layers alike.

Memory allocator: on CPU the script raises glibc's malloc thresholds as ``aoe fit`` does
(``aoe_lightning.allocator``), so that steps reuse freed memory instead of faulting in fresh pages;
``--default-malloc`` measures with glibc's defaults.

Peak memory: the bytes of the parameters and the input, plus the peak of the tensor bytes allocated during
one extra step. On CUDA that peak is ``torch.cuda.max_memory_allocated`` minus the allocation before the
step. On CPU the step runs under a ``TorchDispatchMode`` that intercepts every tensor an operator returns,
keeps a weak reference to each new storage and records the maximum of the bytes still alive. Both methods
count tensor bytes only: allocator caching and fragmentation are excluded. The same step runs under
``FlopCounterMode``, which counts the matmul FLOPs actually executed, as a check on the FLOP counts computed
from the shapes.

FLOP counts from the shapes, forward only (the backward pass costs twice the forward for every matmul here):
- dense: ``2 T * 3 D (K F)``;
- MoE: router ``2 T D N`` plus the selected experts ``2 T K * 3 D F``;
- AoE: every expert's ``W_down`` ``2 T N D L``, plus the selected experts' ``W_up``, ``W_p`` and ``W_o``,
  ``2 T K (L W + 2 D W)``.
The ideal AoE/MoE throughput ratio is ``MoE FLOPs / AoE FLOPs``: what AoE reaches if the run time is
proportional to matmul FLOPs. The ``measured / ideal`` column shows how close the implementation comes.

Example: ``python benchmarks/moe_layer.py --tokens 4096 --rounds 2 --repeats 3``
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from aoe_lightning.models.config import FFNConfig, aoe_d_wide
from aoe_lightning.models.moe import build_sparse_ffn
from aoe_lightning.models.transformer import SwiGLU
from aoe_lightning.allocator import reuse_freed_memory

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LayerSpec:
    kind: str
    """``dense``, ``moe`` or ``aoe``."""
    num_experts: int
    d_low: int | None = None


@dataclass
class Result:
    spec: LayerSpec
    width: int
    """Hidden width of one expert (or of the dense layer)."""
    flops: float
    """Forward+backward matmul FLOPs of one step, from the shapes."""
    counted_flops: float
    """Forward+backward matmul FLOPs of one step, as counted by FlopCounterMode."""
    tokens_per_s: float
    peak_bytes: int


class PeakTensorMemory(TorchDispatchMode):
    """Record the peak of the bytes held by tensors that operators return while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                key = storage._cdata
                if key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        # Drop storages that were freed; a freed key may be reused by a new storage, which is then re-added.
        self.live = {key: entry for key, entry in self.live.items() if not entry[0].expired()}
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
        return out


def matmul_flops(spec: LayerSpec, args: argparse.Namespace, width: int) -> float:
    """Forward+backward matmul FLOPs of one step, from the layer shapes."""
    tokens, d_model, top_k = args.tokens, args.d_model, args.top_k
    if spec.kind == "dense":
        forward = 2 * tokens * 3 * d_model * width
    elif spec.kind == "moe":
        forward = 2 * tokens * d_model * spec.num_experts + 2 * tokens * top_k * 3 * d_model * width
    else:
        d_low = spec.d_low
        forward = 2 * tokens * spec.num_experts * d_model * d_low + 2 * tokens * top_k * (d_low * width + 2 * d_model * width)
    return 3.0 * forward


def build_layer(spec: LayerSpec, args: argparse.Namespace) -> tuple[torch.nn.Module, int]:
    if spec.kind == "dense":
        width = args.top_k * args.d_ffn
        layer = SwiGLU(args.d_model, width)
        for linear in (layer.w_gate, layer.w_proj, layer.w_out):
            torch.nn.init.normal_(linear.weight, std=0.02)
        return layer, width
    config = FFNConfig(
        kind=spec.kind,
        d_ffn=args.d_ffn,
        num_experts=spec.num_experts,
        top_k=args.top_k,
        d_low=spec.d_low if spec.d_low is not None else 256,
        d_wide_multiple=args.d_wide_multiple,
    )
    layer = build_sparse_ffn(args.d_model, config)
    layer.experts.reset_parameters(std=0.02, out_std=0.02)
    if spec.kind == "moe":
        torch.nn.init.normal_(layer.router.weight, std=0.02)
    return layer, config.expert_width(args.d_model)


def train_step(layer: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor, autocast_dtype) -> None:
    for param in layer.parameters():
        param.grad = None
    x.grad = None
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        result = layer(x)
    if isinstance(result, tuple):
        out, aux, _ = result
        torch.autograd.backward([out, aux["load_balance"]], [grad_out.to(out.dtype), torch.tensor(0.01)])
    else:
        result.backward(grad_out.to(result.dtype))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_group(specs: list[LayerSpec], args: argparse.Namespace, device: torch.device, autocast_dtype) -> list[Result]:
    """Time the layers of one group in turn, so that a change in machine load affects them all alike."""
    torch.manual_seed(0)
    x = torch.randn(1, args.tokens, args.d_model, device=device, requires_grad=True)
    grad_out = torch.randn(1, args.tokens, args.d_model, device=device)
    layers = []
    widths = []
    for spec in specs:
        layer, width = build_layer(spec, args)
        layers.append(layer.to(device))
        widths.append(width)

    times: list[list[float]] = [[] for _ in layers]
    for _ in range(args.rounds):
        for layer, layer_times in zip(layers, times):
            for _ in range(args.warmup):
                train_step(layer, x, grad_out, autocast_dtype)
            for _ in range(args.repeats):
                synchronize(device)
                start = time.perf_counter()
                train_step(layer, x, grad_out, autocast_dtype)
                synchronize(device)
                layer_times.append(time.perf_counter() - start)

    results = []
    for spec, layer, width, layer_times in zip(specs, layers, widths, times):
        flops_counted, peak = count_flops_and_peak_memory(layer, x, grad_out, autocast_dtype)
        result = Result(
            spec=spec,
            width=width,
            flops=matmul_flops(spec, args, width),
            counted_flops=flops_counted,
            tokens_per_s=args.tokens / statistics.median(layer_times),
            peak_bytes=peak,
        )
        logger.info("%s: %.0f tokens/s, peak %.0f MiB", describe(spec), result.tokens_per_s, peak / 2**20)
        results.append(result)
    return results


def count_flops_and_peak_memory(layer: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor, autocast_dtype) -> tuple[float, int]:
    """Run one step; return its matmul FLOPs and its peak tensor memory, parameters and input included."""
    for param in layer.parameters():
        param.grad = None
    x.grad = None
    resident = sum(p.numel() * p.element_size() for p in layer.parameters()) + 2 * x.numel() * x.element_size()
    flop_counter = FlopCounterMode(display=False)
    if x.device.type == "cuda":
        synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        before = torch.cuda.memory_allocated(x.device)
        with flop_counter:
            train_step(layer, x, grad_out, autocast_dtype)
        synchronize(x.device)
        step_peak = torch.cuda.max_memory_allocated(x.device) - before
    else:
        tracker = PeakTensorMemory()
        with flop_counter, tracker:
            train_step(layer, x, grad_out, autocast_dtype)
        step_peak = tracker.peak
    for param in layer.parameters():
        param.grad = None
    return float(flop_counter.get_total_flops()), resident + step_peak


def describe(spec: LayerSpec) -> str:
    if spec.kind == "dense":
        return "dense SwiGLU"
    if spec.kind == "moe":
        return f"MoE n={spec.num_experts}"
    return f"AoE n={spec.num_experts} d_low={spec.d_low}"


def format_table(results: list[Result], args: argparse.Namespace) -> str:
    moe_by_experts = {r.spec.num_experts: r for r in results if r.spec.kind == "moe"}
    lines = [
        "| layer | experts | d_low | width | GFLOP/step (shapes) | GFLOP/step (counted) | tokens/s | peak MiB "
        "| FLOP ratio AoE/MoE | ideal tput ratio | measured tput ratio | measured / ideal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratios = ["", "", "", ""]
        moe = moe_by_experts.get(r.spec.num_experts)
        if r.spec.kind == "aoe" and moe is not None:
            flop_ratio = r.flops / moe.flops
            measured = r.tokens_per_s / moe.tokens_per_s
            ratios = [f"{flop_ratio:.3f}", f"{1 / flop_ratio:.3f}", f"{measured:.3f}", f"{measured * flop_ratio:.3f}"]
        name = {"dense": f"dense SwiGLU (width {args.top_k}x{args.d_ffn})", "moe": "MoE", "aoe": "AoE"}[r.spec.kind]
        experts = "" if r.spec.kind == "dense" else str(r.spec.num_experts)
        d_low = "" if r.spec.d_low is None else str(r.spec.d_low)
        lines.append(
            f"| {name} | {experts} | {d_low} | {r.width} | {r.flops / 1e9:.1f} | {r.counted_flops / 1e9:.1f} "
            f"| {r.tokens_per_s:,.0f} | {r.peak_bytes / 2**20:,.0f} | " + " | ".join(ratios) + " |"
        )
    return "\n".join(lines)


def format_summary(results: list[Result]) -> str:
    dense = next(r for r in results if r.spec.kind == "dense")
    moe_by_experts = {r.spec.num_experts: r for r in results if r.spec.kind == "moe"}
    base_moe = moe_by_experts[min(moe_by_experts)]
    moe_vs_dense = base_moe.tokens_per_s / dense.tokens_per_s
    lines = [
        f"MoE (n={base_moe.spec.num_experts}) / dense throughput: {moe_vs_dense:.3f} (target >= 0.8: "
        f"{'met' if moe_vs_dense >= 0.8 else 'missed'})"
    ]
    for r in results:
        if r.spec.kind != "aoe":
            continue
        moe = moe_by_experts[r.spec.num_experts]
        quotient = (r.tokens_per_s / moe.tokens_per_s) * (r.flops / moe.flops)
        lines.append(
            f"AoE n={r.spec.num_experts} d_low={r.spec.d_low}: measured / ideal {quotient:.3f} "
            f"(target >= 0.95: {'met' if quotient >= 0.95 else 'missed'})"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (one sequence of this length)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds in which each layer of a group runs in turn")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per layer and round; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per layer and round before its timed steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None,
        help="compute dtype (bfloat16 runs under autocast with fp32 weights); default bfloat16 on CUDA, float32 on CPU",
    )
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-ffn", type=int, default=3072, help="hidden width of one SwiGLU expert")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--d-lows", type=int, nargs="+", default=[64, 128, 256, 512], help="AoE d_low values")
    parser.add_argument(
        "--many-experts", type=int, nargs="*", default=[32, 64],
        help="expert counts at which MoE and AoE (d_low --many-experts-d-low) are compared again",
    )
    parser.add_argument("--many-experts-d-low", type=int, default=256)
    parser.add_argument(
        "--d-wide-multiple", type=int, default=1,
        help="round the AoE width from Eq. 5 up to a multiple of this (1 keeps the exact rounded-up width)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument(
        "--default-malloc", action="store_true",
        help="keep glibc's default malloc thresholds instead of the ones `aoe fit` sets on CPU",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    autocast_dtype = None if dtype_name == "float32" else DTYPES[dtype_name]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # As `aoe fit` does on CPU: without it, every step faults in its freed activations and gradients again.
    reused = device.type == "cpu" and not args.default_malloc and reuse_freed_memory()

    groups = [[LayerSpec("dense", 1), LayerSpec("moe", args.experts)]]
    groups[0] += [LayerSpec("aoe", args.experts, d_low) for d_low in args.d_lows]
    for num_experts in args.many_experts:
        groups.append([LayerSpec("moe", num_experts), LayerSpec("aoe", num_experts, args.many_experts_d_low)])
    for d_low in {spec.d_low for group in groups for spec in group if spec.d_low is not None}:
        aoe_d_wide(args.d_model, args.d_ffn, d_low, args.d_wide_multiple)  # fail early on a d_low that Eq. 5 cannot match

    results = []
    for group in groups:
        results += measure_group(group, args, device, autocast_dtype)

    print(
        f"d_model={args.d_model}, d_ffn={args.d_ffn}, top_k={args.top_k}, tokens={args.tokens}, "
        f"d_wide_multiple={args.d_wide_multiple}, dtype={dtype_name}, device={device}, threads={torch.get_num_threads()}, "
        f"malloc={'reuse' if reused else 'default'}, "
        f"median of {args.rounds} rounds x {args.repeats} steps, each round after {args.warmup} warm-up"
    )
    print()
    print(format_table(results, args))
    print()
    print(format_summary(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
