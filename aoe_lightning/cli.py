"""The ``aoe`` console script.

Each subcommand lives in its own module and exposes ``main(argv) -> int``. Modules are imported only when
their subcommand runs, because importing Lightning alone takes several seconds.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "params": ("aoe_lightning.params_cli", "print total and active parameter counts of a config"),
    "data": ("aoe_lightning.data.prepare", "prepare token shards (aoe data prepare --help)"),
    "fit": ("aoe_lightning.training.cli", "train a model (a LightningCLI; aoe fit --help)"),
    "export": ("aoe_lightning.training.export_cli", "write a single-file model from any checkpoint"),
    "eval": ("aoe_lightning.evaluation.cli", "score an exported model with lm-evaluation-harness"),
    "ablate": ("aoe_lightning.ablation.runner", "train, evaluate and compare every point of a sweep spec"),
    "report": ("aoe_lightning.ablation.report", "aggregate a sweep directory into tables and plots"),
}


def usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: aoe COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"aoe: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[command][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
