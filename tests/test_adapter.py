"""The lm-eval ``aoe`` model against a naive one-request-at-a-time scorer."""

from __future__ import annotations

import logging
import os
import random
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from lm_eval.api.instance import Instance

from aoe_lightning.data.tokenizer import ByteTokenizer
from aoe_lightning.evaluation.adapter import AoELM
from aoe_lightning.models import ModelConfig, Transformer

WINDOW = 32


class MergeTokenizer:
    """Bytes plus two merged tokens, so a token can span the context/continuation boundary.

    Greedy left-to-right: "ab" -> 257 and " b" -> 258, every other byte is its own id; 259 is EOS.
    """

    merges = {"ab": 257, " b": 258}
    vocab_size = 260
    eos_id = 259
    bos_id = 259

    def encode(self, text: str) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            pair = text[i:i + 2]
            if pair in self.merges:
                ids.append(self.merges[pair])
                i += 2
            else:
                ids.extend(text[i].encode())
                i += 1
        return ids

    def decode(self, ids) -> str:
        inverse = {v: k for k, v in self.merges.items()}
        out = bytearray()
        for i in ids:
            if i in inverse:
                out += inverse[i].encode()
            elif i < 256:
                out += bytes([i])
        return out.decode("utf-8", "replace")


def tiny_model(vocab_size: int, ffn: dict | None = None, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig.from_dict({
        "vocab_size": vocab_size, "n_layers": 2, "n_heads": 2, "d_model": 32, "max_seq_len": WINDOW,
        "ffn": ffn or {"kind": "dense", "d_ffn": 64},
    })
    return Transformer(config).eval()


def naive_loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's rules written out for one request, one unpadded forward pass."""
    if context == "":
        context_ids, continuation_ids = [tok.bos_id], tok.encode(continuation)
    else:
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        whole = tok.encode(stripped + continuation)
        context_ids = tok.encode(stripped)
        continuation_ids = whole[len(context_ids):]
    full = context_ids + continuation_ids
    window = model.config.max_seq_len
    inputs = full[-(window + 1):][:-1]
    with torch.no_grad():
        log_probs = model(torch.tensor([inputs])).logits[0].float().log_softmax(-1)
    total, greedy = 0.0, True
    for k, token in enumerate(continuation_ids[-window:]):
        position = len(inputs) - len(continuation_ids[-window:]) + k
        total += log_probs[position, token].item()
        greedy &= int(log_probs[position].argmax()) == token
    return total, greedy


def make_requests(pairs):
    return [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i, metadata=("t", i, 1))
            for i, pair in enumerate(pairs)]


REQUESTS = [
    ("Question: what colour is the sky?\nAnswer:", " blue"),
    ("Question: what colour is the sky?\nAnswer:", " a deep orange at dusk"),
    ("The answer is ", "b"),                 # trailing space moves into the continuation: " b" is one token
    ("xa", "bc"),                            # "ab" merges across the boundary
    ("", "hello there"),                     # empty context: conditioned on BOS
    ("long context " * 8, " end"),           # 104 characters, longer than the 32-token window
    ("short", " x"),
    ("tab\t", "after"),
    ("ab", "ab ab"),
    ("numbers 1 2 3", " 4 5 6 7 8 9 10"),
]


@pytest.fixture(scope="module")
def merge_model():
    return tiny_model(MergeTokenizer.vocab_size)


@pytest.mark.parametrize("share_prompts", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_matches_naive(merge_model, batch_size, share_prompts):
    tok = MergeTokenizer()
    lm = AoELM(model=merge_model, tokenizer=tok, batch_size=batch_size, device="cpu", share_prompts=share_prompts)
    order = list(range(len(REQUESTS)))
    random.Random(batch_size).shuffle(order)
    pairs = [REQUESTS[i] for i in order]

    got = lm.loglikelihood(make_requests(pairs))

    for pair, (score, greedy) in zip(pairs, got):
        expected_score, expected_greedy = naive_loglikelihood(merge_model, tok, *pair)
        torch.testing.assert_close(score, expected_score, rtol=1e-5, atol=1e-4)
        assert greedy == expected_greedy, pair


# Multiple-choice questions: every choice of a question shares the prompt. " b" is one token, so the
# prompt alone predicts that continuation. The third question is longer than the window, so truncation
# gives its choices different prompts. The empty context is conditioned on BOS.
QUESTIONS = [
    ("Question: which is largest?\nAnswer:", [" one", " two hundred", " b", " eleven"]),
    ("The cat sat on the", [" mat", " b", " sofa by the window"]),
    ("long context " * 4, [" end", " the very end"]),
    ("", ["x", "yz"]),
]
CHOICE_REQUESTS = [(context, choice) for context, choices in QUESTIONS for choice in choices]


@pytest.mark.parametrize("kind", ["dense", "aoe"])
@pytest.mark.parametrize("batch_size", [2, 3, 5])
def test_shared_prompts_match_naive(kind, batch_size):
    tok = MergeTokenizer()
    ffn = {"kind": "aoe", "d_ffn": 64, "num_experts": 4, "top_k": 2, "d_low": 8} if kind == "aoe" else None
    model = tiny_model(tok.vocab_size, ffn=ffn)
    lm = AoELM(model=model, tokenizer=tok, batch_size=batch_size)
    assert lm.share_prompts
    pairs = CHOICE_REQUESTS[:]
    random.Random(batch_size).shuffle(pairs)

    for pair, (score, greedy) in zip(pairs, lm.loglikelihood(make_requests(pairs))):
        expected_score, expected_greedy = naive_loglikelihood(model, tok, *pair)
        torch.testing.assert_close(score, expected_score, rtol=1e-5, atol=1e-4)
        assert greedy == expected_greedy, pair


def count_fed_tokens(model) -> list[int]:
    """Record the number of real tokens in every forward pass of ``model``."""
    counts = []

    def hook(module, args, kwargs):
        mask = kwargs.get("padding_mask")
        counts.append(int(mask.sum()) if mask is not None else args[0].numel())

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return counts


@pytest.mark.parametrize("share_prompts, expected", [
    # Prompts once (13 + 6 bytes), then each continuation but its last byte (1 + 2 + 3 per question).
    (True, 13 + 6 + 2 * (1 + 2 + 3)),
    # Whole sequences: the prompt again for every choice.
    (False, 3 * 13 + (1 + 2 + 3) + 3 * 6 + (1 + 2 + 3)),
])
@pytest.mark.parametrize("batch_size", [2, 4])
def test_each_prompt_runs_once(share_prompts, expected, batch_size):
    tok = ByteTokenizer()
    model = tiny_model(tok.vocab_size)
    counts = count_fed_tokens(model)
    lm = AoELM(model=model, tokenizer=tok, batch_size=batch_size, share_prompts=share_prompts)
    pairs = [(context, choice) for context in ("Question one?", "Second") for choice in (" a", " bb", " ccc")]

    lm.loglikelihood(make_requests(pairs))

    assert sum(counts) == expected


def test_distinct_prompts_run_in_one_pass():
    tok = ByteTokenizer()
    model = tiny_model(tok.vocab_size)
    counts = count_fed_tokens(model)
    lm = AoELM(model=model, tokenizer=tok, batch_size=4)
    lm.loglikelihood(make_requests([("First", " a"), ("Second", " bb"), ("Third", " ccc")]))
    assert counts == [(5 + 1) + (6 + 2) + (5 + 3)]


def test_batch_size_one_runs_whole_sequences():
    tok = ByteTokenizer()
    model = tiny_model(tok.vocab_size)
    counts = count_fed_tokens(model)
    lm = AoELM(model=model, tokenizer=tok, batch_size=1)
    lm.loglikelihood(make_requests([("Question one?", " a"), ("Question one?", " bb")]))
    assert sorted(counts) == [13 + 1, 13 + 2]


def test_share_prompts_option(merge_model):
    assert not AoELM(model=merge_model, tokenizer=MergeTokenizer(), share_prompts="False").share_prompts
    assert AoELM(model=merge_model, tokenizer=MergeTokenizer(), share_prompts="true").share_prompts
    assert not AoELM(model=merge_model, tokenizer=MergeTokenizer(), share_prompts=0).share_prompts
    # Only the package's Transformer can continue from cached keys and values.
    assert not AoELM(model=NextByteModel(), tokenizer=ByteTokenizer()).share_prompts
    with pytest.raises(ValueError, match="share_prompts='yes'"):
        AoELM(model=merge_model, tokenizer=MergeTokenizer(), share_prompts="yes")


def test_boundary_token_split():
    tok = MergeTokenizer()
    lm = AoELM(model=tiny_model(tok.vocab_size), tokenizer=tok)
    assert lm._encode_pair("xa", "bc") == ([ord("x"), ord("a")], [ord("c")])
    assert lm._encode_pair("The answer is ", "b") == (tok.encode("The answer is"), [258])


def test_long_context_truncated_and_counted(merge_model, caplog):
    tok = MergeTokenizer()
    lm = AoELM(model=merge_model, tokenizer=tok, batch_size=4)
    pairs = [("long context " * 8, " end"), ("short", " x"), ("y" * 40, " z")]
    with caplog.at_level(logging.WARNING, logger="aoe_lightning.evaluation.adapter"):
        lm.loglikelihood(make_requests(pairs))
    assert lm.truncated_count == 2
    assert "2 of 3 requests were longer than the 32-token window" in caplog.text


def test_long_continuation_scores_last_window(merge_model):
    tok = MergeTokenizer()
    lm = AoELM(model=merge_model, tokenizer=tok)
    pair = ("q", " " + "w" * 40)
    (score, _), = lm.loglikelihood(make_requests([pair]))
    expected, _ = naive_loglikelihood(merge_model, tok, *pair)
    torch.testing.assert_close(score, expected, rtol=1e-5, atol=1e-4)
    assert lm.partial_continuation_count == 1


def test_empty_context_uses_bos(merge_model):
    tok = MergeTokenizer()
    lm = AoELM(model=merge_model, tokenizer=tok)
    (score, _), = lm.loglikelihood(make_requests([("", "hi")]))
    with torch.no_grad():
        log_probs = merge_model(torch.tensor([[tok.bos_id, ord("h")]])).logits[0].log_softmax(-1)
    expected = log_probs[0, ord("h")].item() + log_probs[1, ord("i")].item()
    torch.testing.assert_close(score, expected, rtol=1e-5, atol=1e-4)


def test_routed_model_batching(caplog):
    # Token-choice AoE routing is per token, so batching and padding must not change any score.
    tok = MergeTokenizer()
    model = tiny_model(tok.vocab_size, ffn={"kind": "aoe", "d_ffn": 64, "num_experts": 4, "top_k": 2, "d_low": 8})
    lm = AoELM(model=model, tokenizer=tok, batch_size=8)
    for (score, _), pair in zip(lm.loglikelihood(make_requests(REQUESTS)), REQUESTS):
        torch.testing.assert_close(score, naive_loglikelihood(model, tok, *pair)[0], rtol=1e-5, atol=1e-4)


def naive_rolling(model, tokens: list[int], bos: int) -> tuple[float, int]:
    """Score every token once: blocks of WINDOW predictions, the last block with a full window of context."""
    padded = [bos] + tokens
    n = len(tokens)
    total, scored = 0.0, 0
    for j in range(n):
        start = (j // WINDOW) * WINDOW
        if start + WINDOW > n and n > WINDOW:
            start = n - WINDOW
        inputs = padded[start:start + WINDOW]
        with torch.no_grad():
            log_probs = model(torch.tensor([inputs])).logits[0].log_softmax(-1)
        total += log_probs[j - start, tokens[j]].item()
        scored += 1
    return total, scored


@pytest.mark.parametrize("length", [5, 32, 33, 100])
def test_rolling_scores_each_token_once(length):
    tok = ByteTokenizer()
    model = tiny_model(tok.vocab_size)
    lm = AoELM(model=model, tokenizer=tok, batch_size=3)
    text = ("rolling window text " * 10)[:length]
    scored_tokens = []
    original = lm._loglikelihood_tokens

    def spy(requests, **kwargs):
        scored_tokens.extend(len(r[2]) for r in requests)
        return original(requests, **kwargs)

    lm._loglikelihood_tokens = spy
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0, metadata=("t", 0, 1))
    (total,) = lm.loglikelihood_rolling([request])

    expected, count = naive_rolling(model, tok.encode(text), tok.bos_id)
    assert sum(scored_tokens) == count == length
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-3)


class NextByteModel(torch.nn.Module):
    """Predicts byte + 1 after every byte and EOS (256) after "z"."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(max_seq_len=16, vocab_size=257)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, idx, padding_mask=None):
        next_ids = torch.where(idx == ord("z"), 256, (idx + 1).clamp(max=255))
        return SimpleNamespace(logits=torch.nn.functional.one_hot(next_ids, 257).float() + self.dummy)


@pytest.mark.parametrize("gen_kwargs, expected", [
    ({"until": ["e"], "max_gen_toks": 10}, "bcd"),
    ({"until": "de", "max_gen_toks": 10}, "bc"),
    ({"until": [], "max_gen_toks": 3}, "bcd"),
    ({"until": ["nothing"], "max_gen_toks": 40}, "bcdefghijklmnopqrstuvwxyz"),   # stops at EOS after "z"
])
def test_generate_until_stops(gen_kwargs, expected):
    lm = AoELM(model=NextByteModel(), tokenizer=ByteTokenizer())
    request = Instance(request_type="generate_until", doc={}, arguments=("xya", gen_kwargs), idx=0,
                       metadata=("t", 0, 1))
    assert lm.generate_until([request]) == [expected]


@pytest.mark.parametrize("value, expected", [(4, 4), ("4", 4), (" 16 ", 16)])
def test_batch_size_parsing(merge_model, value, expected):
    lm = AoELM(model=merge_model, tokenizer=MergeTokenizer(), batch_size=value)
    assert lm.batch_size == expected


def test_batch_size_auto(merge_model):
    lm = AoELM(model=merge_model, tokenizer=MergeTokenizer(), batch_size="auto", max_batch_size=16)
    assert 1 <= lm.batch_size <= 16


@pytest.mark.parametrize("value", [0, "-2", "big"])
def test_batch_size_invalid(merge_model, value):
    with pytest.raises(ValueError, match="batch_size"):
        AoELM(model=merge_model, tokenizer=MergeTokenizer(), batch_size=value)


def test_cuda_device_falls_back(merge_model, caplog):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available, so cuda:0 is used as requested")
    with caplog.at_level(logging.WARNING, logger="aoe_lightning.evaluation.adapter"):
        lm = AoELM(model=merge_model, tokenizer=MergeTokenizer(), device="cuda:0")
    assert lm.device == torch.device("cpu")
    assert "CUDA is not available" in caplog.text


def test_bfloat16_close_to_float32():
    tok = MergeTokenizer()
    pairs = REQUESTS[:4]
    fp32 = AoELM(model=tiny_model(tok.vocab_size), tokenizer=tok).loglikelihood(make_requests(pairs))
    bf16 = AoELM(model=tiny_model(tok.vocab_size), tokenizer=tok, dtype="bfloat16").loglikelihood(make_requests(pairs))
    for (a, _), (b, _) in zip(fp32, bf16):
        # bfloat16 keeps 8 mantissa bits; summed log-probs of ~10 tokens drift by well under 1 nat.
        assert abs(a - b) < 1.0


def naive_greedy(model, tokens: list[int], max_new: int, eos: int) -> list[int]:
    """Greedy decoding with a full forward pass over the last window for every new token."""
    generated = []
    for _ in range(max_new):
        window = (tokens + generated)[-WINDOW:]
        with torch.no_grad():
            next_id = int(model(torch.tensor([window])).logits[0, -1].argmax())
        if next_id == eos:
            break
        generated.append(next_id)
    return generated


def test_generation_from_cache_matches_full_passes():
    tok = ByteTokenizer()
    model = tiny_model(tok.vocab_size, seed=5)
    context = "generate from here"
    expected = naive_greedy(model, tok.encode(context), 30, tok.eos_id)
    # The sequence outgrows the 32-token window, so both the cached steps and the sliding window run.
    assert len(context) + len(expected) > WINDOW
    counts = count_fed_tokens(model)
    lm = AoELM(model=model, tokenizer=tok)
    request = Instance(request_type="generate_until", doc={}, arguments=(context, {"until": [], "max_gen_toks": 30}),
                       idx=0, metadata=("t", 0, 1))

    assert lm.generate_until([request]) == [tok.decode(expected)]
    # One token per step while the sequence fits the window, then a whole window per step.
    assert counts[0] == len(context)
    assert counts[1:WINDOW - len(context) + 1] == [1] * (WINDOW - len(context))
    assert set(counts[WINDOW - len(context) + 1:]) == {WINDOW}
