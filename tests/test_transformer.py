"""Transformer LM: causality, padding in routing statistics, activation checkpointing, tied head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from aoe_lightning.models.config import FFNConfig, ModelConfig
from aoe_lightning.models.transformer import Transformer

VOCAB, SEQ = 40, 12

FFNS = {
    "dense": FFNConfig(kind="dense", d_ffn=48),
    "moe": FFNConfig(kind="moe", d_ffn=24, num_experts=4, top_k=2),
    "aoe": FFNConfig(kind="aoe", d_ffn=24, num_experts=4, top_k=2, d_low=8),
}


def make_model(kind: str, tie_embeddings: bool = True, **ffn_overrides) -> Transformer:
    torch.manual_seed(0)
    ffn = FFNConfig(**{**FFNS[kind].__dict__, **ffn_overrides})
    config = ModelConfig(
        vocab_size=VOCAB, n_layers=2, n_heads=4, d_model=32, max_seq_len=16, tie_embeddings=tie_embeddings, ffn=ffn
    )
    return Transformer(config)


def random_tokens(batch: int, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["dense", "moe", "aoe"])
def test_logits_are_causal(kind: str) -> None:
    model = make_model(kind).eval()
    idx = random_tokens(2)
    position = 6
    changed = idx.clone()
    changed[:, position + 1] = (changed[:, position + 1] + 1) % VOCAB

    with torch.no_grad():
        logits = model(idx).logits
        changed_logits = model(changed).logits

    assert logits.shape == (2, SEQ, VOCAB)
    assert_close(changed_logits[:, : position + 1], logits[:, : position + 1])
    assert not torch.allclose(changed_logits[:, position + 1], logits[:, position + 1])


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_padding_excluded_from_routing_stats(kind: str) -> None:
    model = make_model(kind).eval()
    idx = random_tokens(2)
    lengths = [SEQ, 7]
    padding_mask = torch.arange(SEQ)[None, :] < torch.tensor(lengths)[:, None]

    with torch.no_grad():
        padded_stats = model(idx, padding_mask=padding_mask).layer_stats
        # Right padding and causal attention leave real tokens untouched, so each row alone routes the same.
        row_stats = [model(idx[row : row + 1, :length]).layer_stats for row, length in enumerate(lengths)]

    for layer, stats in enumerate(padded_stats):
        expected = sum(rows[layer].expert_counts for rows in row_stats)
        assert stats.expert_counts.tolist() == expected.tolist(), f"layer {layer}"
        assert stats.expert_counts.sum().item() == 2 * sum(lengths)


def loss_and_gradients(model: Transformer, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(idx[:, :-1])
    loss = F.cross_entropy(out.logits.reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
    for value in out.aux_losses.values():
        loss = loss + 0.01 * value
    loss.backward()
    return loss.detach(), {name: param.grad.clone() for name, param in model.named_parameters()}


@pytest.mark.parametrize("kind", ["dense", "moe", "aoe"])
def test_activation_checkpointing_same_loss_and_gradients(kind: str) -> None:
    model = make_model(kind).train()
    idx = random_tokens(2, SEQ + 1)

    loss, grads = loss_and_gradients(model, idx)
    model.activation_checkpointing = True
    checkpointed_loss, checkpointed_grads = loss_and_gradients(model, idx)

    assert_close(checkpointed_loss, loss)
    assert checkpointed_grads.keys() == grads.keys()
    for name in grads:
        assert_close(checkpointed_grads[name], grads[name], msg=lambda m, name=name: f"gradient of {name}: {m}")


def test_tied_head_shares_embedding() -> None:
    model = make_model("moe", tie_embeddings=True)
    assert model.lm_head.weight is model.embed.weight

    idx = random_tokens(1)
    out = model(idx)
    hidden = None

    def capture(module, args, output):
        nonlocal hidden
        hidden = output

    model.norm.register_forward_hook(capture)
    out = model(idx)
    assert_close(out.logits, hidden @ model.embed.weight.t())


def test_untied_head_is_separate() -> None:
    model = make_model("moe", tie_embeddings=False)
    assert model.lm_head.weight is not model.embed.weight
    names = {name for name, _ in model.named_parameters()}
    assert {"embed.weight", "lm_head.weight"} <= names

    idx = random_tokens(1)
    before = model(idx).logits.detach()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    assert torch.count_nonzero(model(idx).logits).item() == 0
    assert torch.count_nonzero(model.embed.weight).item() > 0
    assert torch.count_nonzero(before).item() > 0


def test_sequence_longer_than_max_seq_len_raises() -> None:
    model = make_model("dense")
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(random_tokens(1, 17))


@pytest.mark.parametrize("kind", ["moe", "aoe"])
def test_aux_losses_are_layer_means(kind: str) -> None:
    model = make_model(kind)
    per_layer = []
    for block in model.blocks:
        block.ffn.register_forward_hook(lambda module, args, output: per_layer.append(output[1]))

    out = model(random_tokens(2))

    assert len(per_layer) == 2
    for name, value in out.aux_losses.items():
        assert_close(value, (per_layer[0][name] + per_layer[1][name]) / 2)
    expected_names = {"load_balance", "z_loss"} if kind == "moe" else {"load_balance"}
    assert set(out.aux_losses) == expected_names


def test_dense_model_has_no_routing() -> None:
    out = make_model("dense")(random_tokens(1))
    assert out.aux_losses == {}
    assert out.layer_stats == [None, None]


def test_residual_output_init_is_scaled() -> None:
    model = make_model("moe")
    config = model.config
    out_std = config.init_std / (2 * config.n_layers) ** 0.5
    # Each matrix has hundreds of draws, so the sample std is within 20% of its target.
    assert model.blocks[0].attn.out.weight.std().item() == pytest.approx(out_std, rel=0.2)
    assert model.blocks[0].ffn.experts.w_out.std().item() == pytest.approx(out_std, rel=0.2)
    assert model.blocks[0].ffn.experts.w_proj.std().item() == pytest.approx(config.init_std, rel=0.2)
