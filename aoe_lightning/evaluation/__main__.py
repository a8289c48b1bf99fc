"""``python -m aoe_lightning.evaluation``: lm-eval's command line with the ``aoe`` model registered.

Takes lm-eval's usual flags, for example::

    python -m aoe_lightning.evaluation run --model aoe --model_args checkpoint=export.pt \\
        --tasks arc_easy_local,piqa_local --data_dir /data/eval --batch_size 8 --output_path out/

One flag is added: ``--data_dir DIR`` (default ``$AOE_EVAL_DATA``) writes the local tasks found in DIR
(``arc_easy_local``, ``piqa_local``, ...) as task YAMLs into a temporary folder, passes it to
``--include_path`` and switches the Hugging Face libraries to offline mode.

Without CUDA, glibc's malloc is set to keep freed memory for the next batch
(``aoe_lightning.allocator.reuse_freed_memory``); malloc tunables in the environment take precedence.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path


def _pop_option(argv: list[str], name: str) -> str | None:
    """Remove ``name VALUE`` or ``name=VALUE`` from argv and return VALUE."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if arg.startswith(name + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)

    from aoe_lightning.evaluation.tasks import resolve_data_dir, set_offline_defaults

    data_dir = resolve_data_dir(_pop_option(argv, "--data_dir"))
    with tempfile.TemporaryDirectory(prefix="aoe_tasks_") as include_dir:
        if data_dir is not None:
            set_offline_defaults()
            from aoe_lightning.evaluation.include import write_local_task_yamls

            write_local_task_yamls(data_dir, Path(include_dir))
            argv += ["--include_path", include_dir]

        import torch
        from lm_eval.__main__ import cli_evaluate

        import aoe_lightning.evaluation.adapter  # noqa: F401  (registers the "aoe" model)
        from aoe_lightning.allocator import reuse_freed_memory

        if not torch.cuda.is_available():
            reuse_freed_memory()

        # lm-eval's parser reads sys.argv itself.
        sys.argv = ["python -m aoe_lightning.evaluation", *argv]
        cli_evaluate()


if __name__ == "__main__":
    main()
