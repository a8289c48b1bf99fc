"""The base training config that the sweep spec, runner and report tests build their micro suites from."""


def tiny_sweep_base(d_model: int = 32, max_steps: int = 5) -> dict:
    """Return a fresh 2-layer router-MoE config dict (expert width ``2 * d_model``) that trains on CPU."""
    return {
        "seed_everything": 7,
        "model": {
            "vocab_size": 264, "n_layers": 2, "n_heads": 4, "d_model": d_model, "max_seq_len": 32,
            "ffn": {"kind": "moe", "d_ffn": 2 * d_model, "num_experts": 4, "top_k": 2, "load_balance_coef": 0.01},
            "optimizer": {"lr": 1.0e-3, "min_lr": 1.0e-4, "warmup_steps": 2},
        },
        "data": {"data_dir": "data/x", "tokenizer": "byte", "seq_len": 32, "batch_size": 2},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": max_steps},
    }
