"""PNG plots of a sweep (matplotlib, Agg backend): validation-loss curves, loss vs d_low / top-k, expert load
heat maps, and per-layer load and confidence entropy.

Curves and entropies come from each run's TensorBoard events (``SUITE/tensorboard/<run>``); heat maps from
``<run>/expert_load.json``. A plot whose inputs are all missing is not written.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aoe_lightning.ablation.report import RunRecord

log = logging.getLogger(__name__)

_LAYER_TAG = re.compile(r"^moe/(load_entropy|confidence_entropy)/layer_(\d+)$")


def read_scalars(event_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Return every scalar tag of a TensorBoard run as (step, value) pairs, or {} when there are no events."""
    if not event_dir.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    # The folder contains the event files of `aoe fit` and of `aoe eval`; the accumulator reads all of them.
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags().get("scalars", [])}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(groups: list[str]) -> dict[str, Any]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    return {group: cmap(i % cmap.N) for i, group in enumerate(groups)}


def plot_val_curves(records: list[RunRecord], scalars: dict[str, dict], path: Path) -> Path | None:
    plt = _pyplot()
    groups = list(dict.fromkeys(record.group for record in records))
    colors = _colors(groups)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    labelled: set[str] = set()
    for record in records:
        points = scalars.get(record.name, {}).get("val/loss")
        if not points:
            continue
        steps, values = zip(*sorted(points))
        label = record.group if record.group not in labelled else None
        labelled.add(record.group)
        axis.plot(steps, values, marker="o", markersize=3, color=colors[record.group], label=label)
    if not labelled:
        plt.close(figure)
        return None
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("validation loss (nats/token)")
    axis.set_title("Validation loss")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _final_val_loss(record: RunRecord) -> float | None:
    value = record.summary.get("val_loss")
    return float(value) if isinstance(value, (int, float)) else None


def plot_loss_vs_field(records: list[RunRecord], key: str, xlabel: str, path: Path) -> Path | None:
    """Final validation loss against one swept field; one line per FFN kind and setting of the other fields."""
    plt = _pyplot()
    varying = {record.fields.get(key) for record in records if key in record.fields}
    if len(varying) < 2:
        return None

    series: dict[str, dict[Any, list[float]]] = {}
    flat: dict[str, list[float]] = {}
    for record in records:
        loss = _final_val_loss(record)
        if loss is None:
            continue
        others = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in record.fields.items()
                           if k not in (key, "seed_everything"))
        label = others or record.group
        if key in record.fields:
            series.setdefault(label, {}).setdefault(record.fields[key], []).append(loss)
        else:
            flat.setdefault(label, []).append(loss)
    if not series:
        return None

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, by_x in series.items():
        xs = sorted(by_x)
        means = [sum(by_x[x]) / len(by_x[x]) for x in xs]
        axis.plot(xs, means, marker="o", label=label)
    for number, (label, losses) in enumerate(flat.items()):
        axis.axhline(sum(losses) / len(losses), linestyle="--", color=f"C{(len(series) + number) % 10}",
                     label=f"{label} (no {xlabel})")
    if key.endswith("d_low"):
        axis.set_xscale("log", base=2)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("final validation loss (nats/token)")
    axis.set_title(f"Validation loss vs {xlabel}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_expert_load(records: list[RunRecord], path: Path) -> Path | None:
    """Per-layer x per-expert token share of the last validation, one panel per point (first seed)."""
    import numpy as np

    plt = _pyplot()
    chosen: dict[str, RunRecord] = {}
    for record in records:
        if record.expert_load and record.group not in chosen:
            chosen[record.group] = record
    if not chosen:
        return None
    loads = {group: np.asarray(record.expert_load, dtype=float) for group, record in chosen.items()}
    vmax = max(float(load.max()) for load in loads.values()) or 1.0
    columns = min(4, len(loads))
    rows = -(-len(loads) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.8 * rows), squeeze=False,
                                constrained_layout=True)
    image = None
    for axis, (group, load) in zip(axes.flat, loads.items()):
        image = axis.imshow(load, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        axis.set_title(group, fontsize=8)
        axis.set_xlabel("expert", fontsize=7)
        axis.set_ylabel("layer", fontsize=7)
        axis.tick_params(labelsize=6)
        axis.set_xticks(range(load.shape[1]))
        axis.set_yticks(range(load.shape[0]))
    for axis in list(axes.flat)[len(loads):]:
        axis.axis("off")
    figure.colorbar(image, ax=axes, shrink=0.8, label="share of token assignments")
    figure.suptitle("Expert load per layer (last validation)", fontsize=9)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def last_layer_values(run_scalars: dict[str, list[tuple[int, float]]], metric: str) -> dict[int, float]:
    """Last logged value of ``moe/<metric>/layer_XX`` per layer."""
    values = {}
    for tag, points in run_scalars.items():
        match = _LAYER_TAG.match(tag)
        if match and match.group(1) == metric and points:
            values[int(match.group(2))] = max(points)[1]
    return values


def plot_routing_entropy(records: list[RunRecord], scalars: dict[str, dict], path: Path) -> Path | None:
    plt = _pyplot()
    groups = list(dict.fromkeys(record.group for record in records))
    colors = _colors(groups)
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    drawn = set()
    for record in records:
        if record.group in drawn:
            continue
        run = scalars.get(record.name, {})
        for axis, metric in zip(axes, ("load_entropy", "confidence_entropy")):
            values = last_layer_values(run, metric)
            if values:
                layers = sorted(values)
                axis.plot(layers, [values[layer] for layer in layers], marker="o", color=colors[record.group],
                          label=record.group)
                drawn.add(record.group)
    if not drawn:
        plt.close(figure)
        return None
    num_experts = _num_experts(records)
    for axis, title in zip(axes, ("Load entropy (last validation)", "Confidence entropy (last validation)")):
        if num_experts:
            import math

            axis.axhline(math.log(num_experts), color="grey", linestyle=":", label=f"ln {num_experts} (uniform)")
        axis.set_xlabel("layer")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.set_ylabel("entropy (nats)")
        axis.set_title(title, fontsize=9)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _num_experts(records: list[RunRecord]) -> int | None:
    for record in records:
        ffn = (record.summary.get("model_config") or {}).get("ffn") or {}
        if ffn.get("num_experts"):
            return int(ffn["num_experts"])
    return None


def write_plots(suite_dir: Path, suite: dict[str, Any], records: list[RunRecord]) -> list[Path]:
    """Write every plot whose inputs exist; return the written paths."""
    scalars = {record.name: read_scalars(suite_dir / "tensorboard" / record.name) for record in records}
    written = [
        plot_val_curves(records, scalars, suite_dir / "val_loss_curves.png"),
        plot_loss_vs_field(records, "model.ffn.d_low", "d_low", suite_dir / "val_loss_vs_d_low.png"),
        plot_loss_vs_field(records, "model.ffn.top_k", "top_k", suite_dir / "val_loss_vs_top_k.png"),
        plot_expert_load(records, suite_dir / "expert_load.png"),
        plot_routing_entropy(records, scalars, suite_dir / "routing_entropy.png"),
    ]
    return [path for path in written if path is not None]
