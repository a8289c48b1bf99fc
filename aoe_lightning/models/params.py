"""Closed-form parameter and FLOP counts for a ``ModelConfig``, without building the model.

Conventions:

- *Total* counts every parameter. *Active* counts the parameters a token's output depends on: attention,
  norms, the router, and the dense FFN or the selected experts. For ``expert_choice`` the mean number of
  experts per token is ``capacity_factor``; for ``top_p`` it varies per token and ``top_k`` is used as the
  nominal value.
- AoE also multiplies every token by the ``W_down`` of each unselected expert before that expert aborts.
  Those ``(N - K) * d_model * d_low`` parameters per layer are reported separately as the selection
  overhead; they count in ``training_flops_per_token`` but not in *active*.
- The token embedding (V x D) is reported counted once and counted twice (input embedding and output head as
  separate matrices). A tied model owns the matrix once; an untied one owns two. The 732M total / 247M active
  reported for the paper's small MoE (Autonomy-of-Experts Models, Lv et al., 2025) match the total with the
  embedding counted once and the active count with it counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from aoe_lightning.models.config import ModelConfig


@dataclass(frozen=True)
class ParameterCount:
    embedding: int
    """One V x D matrix."""
    non_embedding_total: int
    non_embedding_active: int
    selection_overhead: int
    """AoE: ``W_down`` parameters of the unselected experts that every token still multiplies by."""
    tied: bool

    @property
    def total_embedding_once(self) -> int:
        return self.non_embedding_total + self.embedding

    @property
    def total_embedding_twice(self) -> int:
        return self.non_embedding_total + 2 * self.embedding

    @property
    def active_embedding_once(self) -> int:
        return self.non_embedding_active + self.embedding

    @property
    def active_embedding_twice(self) -> int:
        return self.non_embedding_active + 2 * self.embedding

    @property
    def owned(self) -> int:
        """Parameters the model object holds: ``sum(p.numel() for p in model.parameters())``."""
        return self.total_embedding_once if self.tied else self.total_embedding_twice


def expert_parameters(config: ModelConfig) -> int:
    """Parameters of one expert (or of the dense FFN)."""
    d_model, ffn = config.d_model, config.ffn
    hidden = config.d_expert
    gate = d_model * ffn.d_low + ffn.d_low * hidden if ffn.is_factorized else d_model * hidden
    return gate + 2 * d_model * hidden


def router_parameters(config: ModelConfig) -> int:
    ffn = config.ffn
    if ffn.kind != "moe":
        return 0
    if ffn.router == "linear":
        return config.d_model * ffn.num_experts
    hidden = ffn.num_experts * ffn.d_low
    return config.d_model * hidden + hidden * ffn.num_experts


def experts_per_token(config: ModelConfig) -> float:
    ffn = config.ffn
    if ffn.kind == "dense":
        return 1.0
    if ffn.selection == "expert_choice":
        return ffn.capacity_factor
    return float(ffn.top_k)


def count_parameters(config: ModelConfig) -> ParameterCount:
    d_model, ffn = config.d_model, config.ffn
    attention = 4 * d_model * d_model
    norms = 2 * d_model
    expert = expert_parameters(config)
    router = router_parameters(config)
    if ffn.kind == "dense":
        ffn_total = ffn_active = expert
    else:
        per_token = experts_per_token(config)
        ffn_total = ffn.num_experts * expert + router
        ffn_active = per_token * expert + router
    overhead = 0.0
    if ffn.kind == "aoe":
        overhead = (ffn.num_experts - experts_per_token(config)) * d_model * ffn.d_low
    per_layer_total = attention + norms + ffn_total
    per_layer_active = attention + norms + ffn_active
    final_norm = d_model
    return ParameterCount(
        embedding=config.vocab_size * d_model,
        non_embedding_total=config.n_layers * per_layer_total + final_norm,
        non_embedding_active=round(config.n_layers * per_layer_active) + final_norm,
        selection_overhead=round(config.n_layers * overhead),
        tied=config.tie_embeddings,
    )


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Estimate forward+backward FLOPs per token: ``6 * active matmul parameters`` plus causal attention.

    The matmul parameters are the active non-embedding ones, the AoE selection overhead and the output head
    (the embedding lookup does no multiply). Causal attention adds ``6 * n_layers * seq_len * d_model`` (scores and weighted sum, forward
    and backward, halved for the causal mask). Norms, softmax and routing are ignored.
    """
    counts = count_parameters(config)
    matmul_params = counts.non_embedding_active + counts.selection_overhead + counts.embedding
    return 6.0 * matmul_params + 6.0 * config.n_layers * seq_len * config.d_model


def format_parameter_table(config: ModelConfig) -> str:
    counts = count_parameters(config)
    ffn = config.ffn
    lines = [
        f"ffn: {ffn.kind}"
        + (f", {ffn.num_experts} experts, selection {ffn.selection}, top_k {ffn.top_k}" if ffn.is_sparse else "")
        + (f", d_low {ffn.d_low}, expert width {config.d_expert}" if ffn.is_factorized else f", width {config.d_expert}"),
        f"{'':28}{'total':>16}{'active':>16}",
        f"{'embedding counted once':28}{counts.total_embedding_once:>16,}{counts.active_embedding_once:>16,}",
        f"{'embedding counted twice':28}{counts.total_embedding_twice:>16,}{counts.active_embedding_twice:>16,}",
        f"{'non-embedding':28}{counts.non_embedding_total:>16,}{counts.non_embedding_active:>16,}",
        f"model parameters ({'tied' if counts.tied else 'untied'} embeddings): {counts.owned:,}",
    ]
    if counts.selection_overhead:
        lines.append(f"AoE selection overhead (W_down of unselected experts, per token): {counts.selection_overhead:,}")
    return "\n".join(lines)
