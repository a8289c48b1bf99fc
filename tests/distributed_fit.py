"""Run ``aoe fit`` under a multi-process strategy and save the trained model's logits on a probe batch.

Used by test_distributed.py as a subprocess: Lightning relaunches this script once per extra rank, so it
must not run inside pytest. Usage: ``python distributed_fit.py PROBE_OUT [aoe fit arguments...]``.
"""

import sys

import lightning as L
import torch

from aoe_lightning.training.cli import run_fit

PROBE_SEED = 0


def probe_batch(vocab: int, seq_len: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(PROBE_SEED))


class SaveProbeLogits(L.Callback):
    """After fitting, every rank runs the probe batch (FSDP needs all ranks in each forward); rank 0 saves."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer, pl_module) -> None:
        config = pl_module.model_config
        probe = probe_batch(256, config.max_seq_len).to(pl_module.device)
        pl_module.model.eval()
        with torch.no_grad():
            logits = pl_module.model(probe).logits
        if trainer.is_global_zero:
            torch.save(logits.cpu(), self.path)


if __name__ == "__main__":
    torch.set_num_threads(1)  # two ranks share two cores
    run_fit(sys.argv[2:], trainer_defaults={"callbacks": [SaveProbeLogits(sys.argv[1])]})
