"""Model configuration dataclasses.

Both dataclasses validate themselves on construction and raise one ``ValueError`` that lists every invalid
field with its value and the allowed range. Derived sizes (the AoE up-projection width ``d_wide``, the attention
head size) are properties, never stored fields, so a config read back from YAML cannot disagree with itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

FFNKind = Literal["dense", "moe", "aoe"]
Selection = Literal["top_k", "top_p", "expert_choice"]
GateNorm = Literal["softmax_selected", "softmax_all"]
ScoreNorm = Literal["l2", "l1", "linf"]
RouterKind = Literal["linear", "large"]

FFN_KINDS = ("dense", "moe", "aoe")
SELECTIONS = ("top_k", "top_p", "expert_choice")
GATE_NORMS = ("softmax_selected", "softmax_all")
SCORE_NORMS = ("l2", "l1", "linf")
ROUTER_KINDS = ("linear", "large")


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def aoe_d_wide(d_model: int, d_ffn: int, d_low: int, multiple: int = 1) -> int:
    """Return the AoE up-projection width that matches one SwiGLU expert's parameter count.

    Autonomy-of-Experts Models (Lv et al., 2025), Eq. 5:
    ``d_wide = (3 d_model d_ffn - d_low d_model) / (d_low + 2 d_model)``.

    Rounding rule: the exact quotient is rounded up to the next integer, then up to a multiple of
    ``multiple``. Rounding up reproduces the paper's 6470 for (1280, 5120, 400), where the quotient is 6469.19,
    and never gives an AoE expert fewer parameters than the SwiGLU expert it replaces. Integer arithmetic
    keeps exact quotients (3840 for (768, 3072, 256)) exact.
    """
    numerator = 3 * d_model * d_ffn - d_low * d_model
    denominator = d_low + 2 * d_model
    if numerator <= 0:
        raise ValueError(
            f"d_low={d_low} is too large for d_model={d_model}, d_ffn={d_ffn}: Eq. 5 gives no positive d_wide"
        )
    width = _ceil_div(numerator, denominator)
    return _ceil_div(width, multiple) * multiple


@dataclass(frozen=True)
class FFNConfig:
    """Feed-forward block of every transformer layer: dense SwiGLU, router MoE or Autonomy-of-Experts."""

    kind: FFNKind = "dense"
    """``dense`` (one SwiGLU), ``moe`` (router + SwiGLU experts) or ``aoe`` (router-free, norm-ranked experts)."""
    d_ffn: int = 3072
    """Hidden width of one SwiGLU expert (or of the dense FFN)."""
    num_experts: int = 8
    """Experts per layer (ignored by ``dense``)."""
    top_k: int = 2
    """Experts per token for ``top_k`` selection (``expert_choice`` sets its mean through ``capacity_factor``)."""
    d_low: int = 256
    """Rank of the factorized gate projection W_g = W_down W_up (AoE, and MoE with ``factorized_gate``)."""
    d_wide: int | None = None
    """Explicit width of W_up / W_p / W_o for factorized experts; ``None`` derives it from Eq. 5."""
    d_wide_multiple: int = 1
    """Round the derived ``d_wide`` up to a multiple of this (e.g. 64 for tensor-core friendly shapes)."""
    selection: Selection = "top_k"
    """Expert selection strategy: ``top_k`` (token choice), ``top_p`` (cumulative probability) or ``expert_choice``."""
    top_p: float = 0.6
    """Cumulative probability threshold for ``top_p`` selection, in (0, 1]."""
    capacity_factor: float = 2.0
    """Expert-choice capacity: each expert takes ``capacity_factor / num_experts`` of the batch's real tokens."""
    gate_norm: GateNorm = "softmax_selected"
    """``softmax_selected``: softmax over the selected scores (sums to 1; the paper's Algorithm 1 and 2).
    ``softmax_all``: softmax over all experts, selected probabilities kept without renormalising."""
    score_norm: ScoreNorm = "l2"
    """AoE: the norm of ``x W_down`` that ranks experts (``l2``, ``l1`` or ``linf``)."""
    router: RouterKind = "linear"
    """MoE router: ``linear`` (d_model -> n) or ``large`` (d_model -> n*d_low -> SiLU -> n, the parameter
    budget AoE spends on selection)."""
    factorized_gate: bool = False
    """MoE only: factorize each expert's W_g into W_down W_up as AoE does, but keep the router."""
    load_balance_coef: float = 0.01
    """Weight of the load-balancing loss (Switch-Transformer form); 0 disables it."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss (MoE only; the paper uses none)."""
    entropy_coef: float = 1e-4
    """Weight of the confidence-entropy regulariser used with ``top_p`` selection."""

    def __post_init__(self) -> None:
        errors = self.validation_errors(d_model=None)
        if errors:
            raise ValueError("invalid FFN config: " + "; ".join(errors))

    @property
    def is_sparse(self) -> bool:
        return self.kind != "dense"

    @property
    def is_factorized(self) -> bool:
        """Whether experts use the low-rank gate projection W_down W_up."""
        return self.kind == "aoe" or (self.kind == "moe" and self.factorized_gate)

    def expert_width(self, d_model: int) -> int:
        """Hidden width of one expert: ``d_ffn`` for SwiGLU experts, ``d_wide`` for factorized ones."""
        if not self.is_factorized:
            return self.d_ffn
        if self.d_wide is not None:
            return self.d_wide
        return aoe_d_wide(d_model, self.d_ffn, self.d_low, self.d_wide_multiple)

    def validation_errors(self, d_model: int | None) -> list[str]:
        """List every invalid field; checks that need ``d_model`` run only when it is given."""
        errors = _type_errors(self, "")
        if errors:
            return errors
        if self.kind not in FFN_KINDS:
            errors.append(f"kind={self.kind!r} must be one of {FFN_KINDS}")
        if self.d_ffn < 1:
            errors.append(f"d_ffn={self.d_ffn} must be >= 1")
        if self.num_experts < 1:
            errors.append(f"num_experts={self.num_experts} must be >= 1")
        if not 1 <= self.top_k <= max(self.num_experts, 1):
            errors.append(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.d_low < 1:
            errors.append(f"d_low={self.d_low} must be >= 1")
        if d_model is not None and self.is_factorized and self.d_low >= d_model:
            errors.append(f"d_low={self.d_low} must be < d_model={d_model} (the gate projection is low-rank)")
        if self.d_wide is not None and self.d_wide < 1:
            errors.append(f"d_wide={self.d_wide} must be >= 1, or null to derive it from Eq. 5")
        if self.d_wide_multiple < 1:
            errors.append(f"d_wide_multiple={self.d_wide_multiple} must be >= 1")
        if self.selection not in SELECTIONS:
            errors.append(f"selection={self.selection!r} must be one of {SELECTIONS}")
        if not 0.0 < self.top_p <= 1.0:
            errors.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.capacity_factor <= 0.0:
            errors.append(f"capacity_factor={self.capacity_factor} must be > 0")
        elif self.selection == "expert_choice" and self.capacity_factor > self.num_experts:
            errors.append(f"capacity_factor={self.capacity_factor} must be in (0, num_experts={self.num_experts}]")
        if self.gate_norm not in GATE_NORMS:
            errors.append(f"gate_norm={self.gate_norm!r} must be one of {GATE_NORMS}")
        if self.score_norm not in SCORE_NORMS:
            errors.append(f"score_norm={self.score_norm!r} must be one of {SCORE_NORMS}")
        if self.router not in ROUTER_KINDS:
            errors.append(f"router={self.router!r} must be one of {ROUTER_KINDS}")
        if self.kind == "aoe" and self.router != "linear":
            errors.append(f"router={self.router!r} is a router-MoE option; AoE has no router (use kind='moe')")
        if self.kind != "moe" and self.factorized_gate:
            errors.append("factorized_gate=True is a router-MoE option (AoE gates are always factorized)")
        for name in ("load_balance_coef", "z_loss_coef", "entropy_coef"):
            if getattr(self, name) < 0:
                errors.append(f"{name}={getattr(self, name)} must be >= 0")
        if self.kind == "aoe" and self.z_loss_coef > 0:
            errors.append(f"z_loss_coef={self.z_loss_coef} needs router logits; AoE has none (set it to 0)")
        return errors


@dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer LM: pre-RMSNorm blocks, causal attention with RoPE, configurable FFN."""

    vocab_size: int = 32000
    """Rows of the token embedding; must be >= the tokenizer's vocabulary."""
    n_layers: int = 12
    n_heads: int = 12
    d_model: int = 768
    max_seq_len: int = 1024
    """Maximum sequence length in tokens (the size of the RoPE tables)."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head."""
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    """Standard deviation of the normal init; residual output projections get ``init_std / sqrt(2 n_layers)``."""
    ffn: FFNConfig = field(default_factory=FFNConfig)

    def __post_init__(self) -> None:
        if isinstance(self.ffn, dict):
            object.__setattr__(self, "ffn", FFNConfig(**self.ffn))
        errors = self.validation_errors()
        if errors:
            raise ValueError("invalid model config: " + "; ".join(errors))

    def validation_errors(self) -> list[str]:
        """List every invalid field of the model and of its FFN."""
        errors = _type_errors(self, "")
        if errors:
            if isinstance(self.ffn, FFNConfig):
                errors += [f"ffn.{error}" for error in self.ffn.validation_errors(d_model=None)]
            return errors
        for name in ("vocab_size", "n_layers", "n_heads", "d_model", "max_seq_len"):
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.n_heads >= 1 and self.d_model % self.n_heads:
            errors.append(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        elif self.n_heads >= 1 and (self.d_model // self.n_heads) % 2:
            errors.append(f"head size d_model/n_heads={self.d_model // self.n_heads} must be even for RoPE")
        if self.rope_theta <= 0:
            errors.append(f"rope_theta={self.rope_theta} must be > 0")
        if self.norm_eps <= 0:
            errors.append(f"norm_eps={self.norm_eps} must be > 0")
        if self.init_std <= 0:
            errors.append(f"init_std={self.init_std} must be > 0")
        errors += [f"ffn.{error}" for error in self.ffn.validation_errors(d_model=self.d_model)]
        return errors

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_expert(self) -> int:
        """Hidden width of one expert (``d_ffn``, or ``d_wide`` for factorized gates)."""
        return self.ffn.expert_width(self.d_model)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build a config from a plain dict (e.g. parsed YAML).

        Unknown keys are named rather than ignored, and every invalid value of the model and of its FFN is
        reported in one ``ValueError``.
        """
        values = dict(values)
        ffn_values = values.pop("ffn", None) or {}
        if isinstance(ffn_values, FFNConfig):
            ffn_values = dataclasses.asdict(ffn_values)
        if not isinstance(ffn_values, dict):
            raise ValueError(f"invalid model config: ffn={ffn_values!r} must be a mapping of FFN fields (kind, d_ffn, ...)")
        errors = _unknown_key_errors(cls, values, "") + _unknown_key_errors(FFNConfig, ffn_values, "ffn.")
        if errors:
            raise ValueError("invalid model config: " + "; ".join(errors))
        draft = _unvalidated(cls, {**values, "ffn": _unvalidated(FFNConfig, ffn_values)})
        errors = draft.validation_errors()
        if errors:
            raise ValueError("invalid model config: " + "; ".join(errors))
        return cls(**values, ffn=FFNConfig(**ffn_values))


def _unknown_key_errors(cls: type, values: dict[str, Any], prefix: str) -> list[str]:
    known = {f.name for f in dataclasses.fields(cls)}
    return [f"unknown key {prefix + name!r} (valid keys: {', '.join(sorted(known))})" for name in sorted(set(values) - known)]


def _unvalidated(cls: type, values: dict[str, Any]) -> Any:
    """Build a frozen dataclass without running ``__post_init__``, so that all its errors can be listed at once."""
    instance = object.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.name in values:
            value = values[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            value = f.default_factory()
        object.__setattr__(instance, f.name, value)
    return instance


def _type_errors(config: Any, prefix: str) -> list[str]:
    """Check each field against the type of its default value (int, float, bool or str)."""
    errors = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        default = f.default
        if default is dataclasses.MISSING or (default is None and value is None):
            continue
        expected: tuple[type, ...]
        if isinstance(default, bool):
            expected = (bool,)
        elif isinstance(default, int) or default is None:
            expected = (int,)
        elif isinstance(default, float):
            expected = (int, float)
        else:
            expected = (type(default),)
        if not isinstance(value, expected) or (bool not in expected and isinstance(value, bool)):
            names = " or ".join(t.__name__ for t in expected)
            errors.append(f"{prefix}{f.name}={value!r} must be of type {names}")
    return errors
