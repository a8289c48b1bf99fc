"""Transformer LM: causality, padding in routing statistics, activation checkpointing, tied head, RoPE and the
key/value cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from aoe_lightning.models.attention import apply_rope, rope_tables
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


def rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x (..., S, Dh) by angle position * theta^(-2i/Dh), one pair at a time."""
    out = x.double().clone()
    head_dim = x.shape[-1]
    for i in range(head_dim // 2):
        angle = positions.double() * theta ** (-2 * i / head_dim)
        even, odd = x[..., 2 * i].double(), x[..., 2 * i + 1].double()
        out[..., 2 * i] = even * angle.cos() - odd * angle.sin()
        out[..., 2 * i + 1] = even * angle.sin() + odd * angle.cos()
    return out


def test_rope_rotates_interleaved_pairs() -> None:
    cos, sin = rope_tables(head_dim=8, max_seq_len=16, theta=10000.0)
    # A strided (B, H, S, Dh) view, as attention passes it, and positions 0..S-1.
    x = torch.randn(2, 5, 3, 8).transpose(1, 2)
    rotated = apply_rope(x, torch.complex(cos[:5], sin[:5]))
    assert rotated.is_contiguous()
    assert_close(rotated, rope_reference(x, torch.arange(5)).float())
    # Norms are preserved, and bf16 input is rotated in fp32 and rounded once.
    assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    x_bf16 = x.bfloat16()
    expected = rope_reference(x_bf16, torch.arange(5)).bfloat16()
    assert_close(apply_rope(x_bf16, torch.complex(cos[:5], sin[:5])), expected)


def tokens_of_lengths(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Right-padded random ids, their padding mask and the token lists."""
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]
    idx = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    for row, tokens in enumerate(rows):
        idx[row, : len(tokens)] = torch.tensor(tokens)
    return idx, torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None], rows


@pytest.mark.parametrize("kind", ["dense", "moe", "aoe"])
def test_cached_prompts_continue_like_whole_sequences(kind: str) -> None:
    model = make_model(kind).eval()
    prompt_idx, prompt_mask, prompts = tokens_of_lengths([5, 9, 3], seed=2)
    # Continuation rows pick their prompts by index; prompt 0 is continued twice.
    prompt_of = [0, 2, 0, 1]
    tail_idx, tail_mask, tails = tokens_of_lengths([4, 2, 6, 7], seed=3)

    with torch.no_grad():
        first = model(prompt_idx, padding_mask=prompt_mask, use_cache=True)
        second = model(tail_idx, padding_mask=tail_mask, past=first.cache.select(torch.tensor(prompt_of)))
        for row, (prompt, tail) in enumerate(zip((prompts[p] for p in prompt_of), tails)):
            whole = model(torch.tensor([prompt + tail])).logits[0]
            assert_close(first.logits[prompt_of[row], : len(prompt)], whole[: len(prompt)])
            assert_close(second.logits[row, : len(tail)], whole[len(prompt) :])


def test_cache_grows_one_token_at_a_time() -> None:
    model = make_model("aoe").eval()
    idx = random_tokens(1, 10)
    with torch.no_grad():
        whole = model(idx).logits[0]
        out = model(idx[:, :4], use_cache=True)
        steps = [out.logits[0]]
        for position in range(4, 10):
            out = model(idx[:, position : position + 1], past=out.cache, use_cache=True)
            steps.append(out.logits[0])

    assert_close(torch.cat(steps), whole)
    assert out.cache.lengths_B.tolist() == [10]
    assert out.cache.mask_BP.tolist() == [[True] * 10]
    assert [k.shape for k in out.cache.keys] == [torch.Size([1, 4, 10, 8])] * 2


def test_cache_select_drops_shared_padding() -> None:
    model = make_model("dense").eval()
    idx, mask, _ = tokens_of_lengths([3, 9, 5], seed=4)
    with torch.no_grad():
        cache = model(idx, padding_mask=mask, use_cache=True).cache
    selected = cache.select(torch.tensor([2, 0, 2]))
    assert selected.mask_BP.shape == (3, 5)
    assert selected.lengths_B.tolist() == [5, 3, 5]
    assert selected.keys[0].shape[2] == 5


def test_cached_tokens_beyond_window_raise() -> None:
    model = make_model("dense").eval()
    with torch.no_grad():
        cache = model(random_tokens(1, 12), use_cache=True).cache
        model(random_tokens(1, 4), past=cache)  # positions 12..15 fit max_seq_len=16
        with pytest.raises(ValueError, match="max_seq_len=16"):
            model(random_tokens(1, 5), past=cache)


def test_head_false_returns_hidden_states() -> None:
    model = make_model("moe").eval()
    idx = random_tokens(2)
    with torch.no_grad():
        full = model(idx)
        hidden_only = model(idx, head=False)
    assert hidden_only.logits is None
    assert_close(model.lm_head(hidden_only.hidden), full.logits)
