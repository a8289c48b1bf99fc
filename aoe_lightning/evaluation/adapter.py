"""lm-evaluation-harness model ``aoe``: scores an aoe-lightning Transformer export.

Follows the request rules of lm-eval's own causal-LM model (``HFLM``, lm-eval 0.4.x). Trailing
context whitespace moves to the continuation, and context and continuation are encoded together and
split. An empty context is conditioned on the BOS token. Requests are sorted longest first for
batching and returned in the original order. Sequences longer than the model's window are
left-truncated, and log-softmax runs in fp32.

    lm_eval.simple_evaluate(model="aoe", model_args="checkpoint=export.pt,dtype=bfloat16", tasks=[...])
    AoELM(model=model, tokenizer=tokenizer, batch_size=8)   # in-process, for tests and callbacks
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from aoe_lightning.models import KVCache, Transformer

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Memory budget of the CPU heuristic for batch_size="auto", in bytes.
_AUTO_BATCH_CPU_BUDGET = 2 * 1024**3

# (token ids of context, token ids of continuation) as TemplateLM passes them, with the original text.
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        # lm-eval's CLI passes device="cuda:0" unless --device is given.
        logger.warning("device %s requested but CUDA is not available; evaluating on the CPU", device)
        return torch.device("cpu")
    return device


def _parse_batch_size(batch_size: int | str) -> int | str:
    """Return an int >= 1 or "auto"; lm-eval's CLI passes strings such as "8", "auto" or "auto:4"."""
    if isinstance(batch_size, str):
        text = batch_size.strip().lower()
        if text.startswith("auto"):
            # With "auto:N", HFLM re-measures N times during the run. One measurement is enough here.
            return "auto"
        try:
            batch_size = int(text)
        except ValueError:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer or 'auto'") from None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer or 'auto'")
    return batch_size


def _prompt(inputs: list[int], continuation: list[int]) -> tuple[int, ...]:
    """Return the part of a request's input before its continuation, up to and including the position that
    predicts the continuation's first token."""
    return tuple(inputs[:len(inputs) - len(continuation) + 1])


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@register_model("aoe")
class AoELM(TemplateLM):
    """lm-eval model over an aoe-lightning ``Transformer`` and its tokenizer.

    Args:
        checkpoint: path of a file written by ``aoe export`` (loaded with ``aoe_lightning.export.load_export``).
        model, tokenizer: an in-memory model and tokenizer, instead of ``checkpoint``. The model must
            return an object with ``.logits`` of shape (B, T, vocab_size) and have ``.config.max_seq_len``.
        batch_size: requests per forward pass: an int, a string of an int, or "auto" (see ``_auto_batch_size``).
        max_batch_size: upper bound for "auto".
        device: torch device; "cuda..." falls back to the CPU (with a warning) when CUDA is unavailable.
        dtype: "float32" (default), "bfloat16" or "float16" for the weights. Log-softmax is always fp32.
        max_length: context window in tokens; at most, and by default, the model's ``max_seq_len``.
        max_gen_toks: default number of new tokens for ``generate_until``.
        share_prompts: at batch sizes above 1, run a prompt shared by several requests (the choices of a
            multiple-choice question) once and score the continuations from its cached keys and values.
            Needs a ``Transformer``; scores equal those of whole-sequence scoring up to float rounding.

    NOTE: with ``selection="expert_choice"`` each expert picks tokens from the whole batch, so a
    request's score depends on the other requests in its batch and on ``batch_size``. Token-choice
    routing (top-k, top-p) is per token, and batched scores equal unbatched ones.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        batch_size: int | str = 1,
        max_batch_size: int | str = 64,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        share_prompts: bool | str = True,
    ) -> None:
        super().__init__()
        if (checkpoint is None) == (model is None):
            raise ValueError("pass exactly one of checkpoint=PATH (an `aoe export` file) or model=...")
        self.metadata: dict = {}
        if checkpoint is not None:
            model, tokenizer, self.metadata = self._load_checkpoint(checkpoint)
        elif tokenizer is None:
            raise ValueError("an in-memory model also needs tokenizer=...")

        self._device = _resolve_device(device)
        self.model = model.to(self._device).eval()
        if dtype is not None and str(dtype) != "auto":
            torch_dtype = _DTYPES.get(str(dtype).removeprefix("torch.")) if not isinstance(dtype, torch.dtype) else dtype
            if torch_dtype is None:
                raise ValueError(f"dtype={dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
            self.model = self.model.to(torch_dtype)
        self.tokenizer = tokenizer

        model_window = int(model.config.max_seq_len)
        if max_length is not None and not 1 <= int(max_length) <= model_window:
            raise ValueError(f"max_length={max_length} must be in [1, model max_seq_len={model_window}]")
        self._max_length = int(max_length) if max_length is not None else model_window
        self.vocab_size = int(model.config.vocab_size)
        self.max_gen_toks = int(max_gen_toks)
        # lm-eval passes model_args as text, or as int and bool where the text parses as one.
        flag = str(share_prompts).strip().lower()
        if flag not in ("true", "false", "1", "0"):
            raise ValueError(f"share_prompts={share_prompts!r} must be true or false (or 1 or 0)")
        self.share_prompts = flag in ("true", "1") and isinstance(self.model, Transformer)

        self.max_batch_size = int(max_batch_size)
        requested = _parse_batch_size(batch_size)
        self.batch_size = self._auto_batch_size() if requested == "auto" else requested
        self.batch_sizes = {"loglikelihood": self.batch_size}
        # Requests whose context + continuation did not fit the window in the last call, and those of
        # them whose continuation alone did not fit.
        self.truncated_count = 0
        self.partial_continuation_count = 0

    # ---------------------------------------------------------------------------------- setup

    @staticmethod
    def _load_checkpoint(checkpoint: str):
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; pass a file written by `aoe export`")
        from aoe_lightning.export import load_export

        loaded = load_export(path, device="cpu")
        logger.info("loaded %s (%s)", path, loaded.metadata)
        return loaded.model, loaded.tokenizer, dict(loaded.metadata or {})

    def _auto_batch_size(self) -> int:
        """Pick a batch size for batch_size="auto".

        On CUDA, try full-window batches from ``max_batch_size`` down, halving on out-of-memory. On the
        CPU, a failed allocation can kill the process instead of raising, so a heuristic is used. It
        picks the largest power of two for which twice the fp32 logits (2 * batch * window * vocab * 4
        bytes) fit in 2 GiB, capped at ``max_batch_size``. The factor 2 is a rough allowance for the
        model's activations, an estimate rather than a measurement.
        """
        if self._device.type == "cuda":
            size = self.max_batch_size
            while size > 1:
                try:
                    idx = torch.zeros(size, self._max_length, dtype=torch.long, device=self._device)
                    with torch.no_grad():
                        self.model(idx).logits.float().log_softmax(-1)
                    break
                except torch.cuda.OutOfMemoryError:
                    size //= 2
                finally:
                    torch.cuda.empty_cache()
        else:
            bytes_per_sequence = 2 * self._max_length * self.vocab_size * 4
            fit = max(1, _AUTO_BATCH_CPU_BUDGET // bytes_per_sequence)
            size = min(self.max_batch_size, 2 ** int(math.log2(fit)))
        logger.info("batch_size auto -> %d", size)
        return max(1, size)

    # ------------------------------------------------------------------------ TemplateLM API

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # The project's tokenizers add no special tokens, so add_special_tokens has nothing to switch.
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    # ---------------------------------------------------------------------------- scoring

    def _padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad token lists into ids (B, T) and a padding mask that is True at real tokens."""
        width = max(len(x) for x in rows)
        idx = torch.zeros(len(rows), width, dtype=torch.long)
        padding_mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for row, tokens in enumerate(rows):
            idx[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            padding_mask[row, :len(tokens)] = True
        return idx.to(self._device), padding_mask.to(self._device)

    def _forward_logits(self, inputs: list[list[int]]) -> torch.Tensor:
        """Run one right-padded batch and return the logits (B, T, V); pads never precede real tokens."""
        idx, padding_mask = self._padded(inputs)
        with torch.inference_mode():
            return self.model(idx, padding_mask=padding_mask).logits

    def _positions(self, starts: list[int], lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and position indices of ``lengths[r]`` consecutive positions from ``starts[r]`` in each row r."""
        rows = torch.cat([torch.full((n,), row) for row, n in enumerate(lengths)])
        positions = torch.cat([torch.arange(start, start + n) for start, n in zip(starts, lengths)])
        return rows.to(self._device), positions.to(self._device)

    def _predicting_logits(self, inputs: list[list[int]], continuations: list[list[int]]) -> torch.Tensor:
        """Logits (sum of continuation lengths, V) at the positions that predict each continuation token.

        Position t predicts token t + 1, so a continuation is predicted by its row's last len(continuation)
        inputs. A ``Transformer`` projects only those positions onto the vocabulary.
        """
        rows, positions = self._positions([len(x) - len(c) for x, c in zip(inputs, continuations)],
                                          [len(c) for c in continuations])
        idx, padding_mask = self._padded(inputs)
        with torch.inference_mode():
            if not isinstance(self.model, Transformer):
                return self.model(idx, padding_mask=padding_mask).logits[rows, positions]
            hidden_BTD = self.model(idx, padding_mask=padding_mask, head=False).hidden
            return self.model.lm_head(hidden_BTD[rows, positions])

    @staticmethod
    def _record_scores(logits_NV: torch.Tensor, batch: Sequence[int], targets: list[list[int]],
                       scores: list[list[float]], greedy: list[list[bool]]) -> None:
        """Append each target token's fp32 log-probability and arg-max flag to ``scores[i]`` and ``greedy[i]``.

        ``targets`` has one token list per request ``i`` of ``batch``, in the row order of ``logits_NV``.
        """
        targets_N = torch.tensor([t for tokens in targets for t in tokens], device=logits_NV.device)
        logits_NV = logits_NV.float()
        # log_softmax at the target only: logit - logsumexp, without writing out the (N, V) log-probabilities.
        token_scores = (logits_NV.gather(-1, targets_N[:, None]).squeeze(-1) - logits_NV.logsumexp(dim=-1)).tolist()
        token_greedy = (logits_NV.argmax(dim=-1) == targets_N).tolist()
        start = 0
        for i, tokens in zip(batch, targets):
            scores[i] += token_scores[start:start + len(tokens)]
            greedy[i] += token_greedy[start:start + len(tokens)]
            start += len(tokens)

    def _score_batch(self, prepared: list[tuple[list[int], list[int]]], batch: Sequence[int],
                     scores: list[list[float]], greedy: list[list[bool]]) -> None:
        """Score one batch of whole sequences into ``scores`` and ``greedy``."""
        inputs = [prepared[i][0] for i in batch]
        continuations = [prepared[i][1] for i in batch]
        self._record_scores(self._predicting_logits(inputs, continuations), batch, continuations, scores, greedy)

    def _score_shared_prompts(self, prepared: list[tuple[list[int], list[int]]], block: Sequence[int],
                              scores: list[list[float]], greedy: list[list[bool]]) -> None:
        """Score a block of requests that have at most ``batch_size`` distinct prompts.

        The prompts run once, in one pass that keeps their keys and values. The prompt's last position
        predicts each continuation's first token. The rest of every continuation then runs on top of its
        prompt's cache, in batches sorted by length so that little padding is computed.
        """
        prompt_rows: dict[tuple[int, ...], int] = {}
        row_of = {}
        for i in block:
            row_of[i] = prompt_rows.setdefault(_prompt(*prepared[i]), len(prompt_rows))
        prompts = list(prompt_rows)
        idx, padding_mask = self._padded([list(prompt) for prompt in prompts])
        with torch.inference_mode():
            first = self.model(idx, padding_mask=padding_mask, use_cache=True, head=False)
            last_positions = torch.tensor([len(prompt) - 1 for prompt in prompts], device=self._device)
            last_hidden_PD = first.hidden[torch.arange(len(prompts), device=self._device), last_positions]
            # First continuation tokens, batch_size requests at a time to bound the (requests, V) logits.
            for batch in _chunks(block, self.batch_size):
                batch_rows = torch.tensor([row_of[i] for i in batch], device=self._device)
                logits_NV = self.model.lm_head(last_hidden_PD.index_select(0, batch_rows))
                self._record_scores(logits_NV, batch, [prepared[i][1][:1] for i in batch], scores, greedy)

            rest = sorted((i for i in block if len(prepared[i][1]) > 1), key=lambda i: -len(prepared[i][1]))
            for batch in _chunks(rest, self.batch_size):
                # The fed tail of a continuation: all of its tokens but the last, which is only predicted.
                tails = [prepared[i][0][len(prompts[row_of[i]]):] for i in batch]
                tail_idx, tail_mask = self._padded(tails)
                past = first.cache.select(torch.tensor([row_of[i] for i in batch], device=self._device))
                hidden_BTD = self.model(tail_idx, padding_mask=tail_mask, past=past, head=False).hidden
                rows, positions = self._positions([0] * len(tails), [len(t) for t in tails])
                logits_NV = self.model.lm_head(hidden_BTD[rows, positions])
                self._record_scores(logits_NV, batch, [prepared[i][1][1:] for i in batch], scores, greedy)

    def _prompt_blocks(self, prepared: list[tuple[list[int], list[int]]]) -> Iterator[tuple[list[int], bool]]:
        """Split the requests into blocks of at most ``batch_size`` distinct prompts, longest prompt group first.

        Requests with the same prompt sit in the same block (the choices of one question), and groups come
        in order of their longest request, as lm-eval's longest-first batching would order them. Yields each
        block and whether any of its prompts is shared.
        """
        prompt_of = [_prompt(x, c) for x, c in prepared]
        longest: dict[tuple[int, ...], int] = {}
        first_seen: dict[tuple[int, ...], int] = {}
        for i, prompt in enumerate(prompt_of):
            longest[prompt] = max(longest.get(prompt, 0), len(prepared[i][0]))
            first_seen.setdefault(prompt, i)
        order = sorted(range(len(prepared)), key=lambda i: (-longest[prompt_of[i]], first_seen[prompt_of[i]]))
        block: list[int] = []
        distinct: set[tuple[int, ...]] = set()
        for i in order:
            if prompt_of[i] not in distinct and len(distinct) == self.batch_size:
                yield block, len(distinct) < len(block)
                block, distinct = [], set()
            distinct.add(prompt_of[i])
            block.append(i)
        if block:
            yield block, len(distinct) < len(block)

    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """Score ``(context_ids, continuation_ids)`` pairs; return (sum log-prob, is_greedy) per pair."""
        window = self._max_length
        prepared = []
        truncated = 0
        # NOTE: a continuation longer than the window is scored on its last `window` tokens only, with
        # the earlier ones as context. HFLM rejects such requests; this keeps small-window models usable.
        partial = 0
        for context, context_ids, continuation_ids in requests:
            if not continuation_ids:
                raise ValueError(f"continuation of request {context!r} encodes to no tokens; "
                                 "lm-eval continuations must be non-empty")
            full = context_ids + continuation_ids
            if len(full) > window + 1:
                truncated += 1
            if len(continuation_ids) > window:
                partial += 1
            # The last token is only predicted, never fed, so keep the window's worth before it.
            prepared.append((full[-(window + 1):][:-1], continuation_ids[-window:]))

        scores: list[list[float]] = [[] for _ in requests]
        greedy: list[list[bool]] = [[] for _ in requests]
        # At batch size 1 a shared prompt would cost one more forward pass per question, which outweighs the
        # saved tokens wherever the pass count, not the token count, sets the time (a GPU, short requests).
        if self.share_prompts and self.batch_size > 1:
            for block, shared in self._prompt_blocks(prepared):
                if shared:
                    self._score_shared_prompts(prepared, block, scores, greedy)
                else:
                    # No prompt repeats in this block (rolling windows, single-choice tasks), so one pass suffices.
                    self._score_batch(prepared, block, scores, greedy)
        else:
            # Longest first, so each batch is padded to its first row and out-of-memory shows up at once.
            order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
            for batch in _chunks(order, self.batch_size):
                self._score_batch(prepared, batch, scores, greedy)

        results = []
        for request, request_scores, request_greedy in zip(requests, scores, greedy):
            results.append((math.fsum(request_scores), all(request_greedy)))
            if request[0] is not None and self.cache_hook is not None:
                self.cache_hook.add_partial("loglikelihood", request[0], results[-1])

        self.truncated_count = truncated
        self.partial_continuation_count = partial
        if truncated:
            logger.warning("%d of %d requests were longer than the %d-token window and were left-truncated",
                           truncated, len(requests), window)
        if partial:
            logger.warning("%d of %d continuations were longer than the %d-token window; only their last "
                           "%d tokens were scored", partial, len(requests), window, window)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Return the total log-likelihood of each text, every token scored exactly once.

        Texts longer than the window are split into disjoint windows (``get_rolling_token_windows``
        with a context of 1 token); the first window is conditioned on the BOS token.
        """
        windows: list[TokenRequest] = []
        owners: list[int] = []
        for n, request in enumerate(requests):
            (text,) = request.args
            tokens = self.tok_encode(text)
            for context_ids, target_ids in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self._max_length,
                    context_len=1)):
                windows.append((None, list(context_ids), list(target_ids)))
                owners.append(n)

        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += score
        for request, total in zip(requests, totals):
            if self.cache_hook is not None:
                self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding until a stop sequence, the EOS token or ``max_gen_toks`` new tokens.

        The output is cut before the first stop sequence. Requests run one at a time. While the sequence fits
        the window, a ``Transformer`` runs each new token on top of the cached keys and values. Beyond the
        window, and for other models, every token takes a forward pass over the last window.
        """
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            outputs.append(self._generate_one(context, dict(gen_kwargs or {})))
            if self.cache_hook is not None:
                self.cache_hook.add_partial("generate_until", request.args, outputs[-1])
        return outputs

    def _greedy_next(self, tokens: list[int], cache: KVCache | None) -> tuple[int, KVCache | None]:
        """Return the arg-max next token after ``tokens`` and the cache to pass with the following call.

        ``cache`` contains every token but the last when the previous call's sequence fit the window.
        """
        window = self._max_length
        if not isinstance(self.model, Transformer):
            return int(self._forward_logits([tokens[-window:]])[0, -1].argmax()), None
        with torch.inference_mode():
            if cache is not None and len(tokens) <= window:
                idx = torch.tensor([tokens[-1:]], device=self._device)
                out = self.model(idx, past=cache, use_cache=True, head=False)
            else:
                # Once the sequence outgrows the window, the window slides and every position shifts, so start over.
                idx = torch.tensor([tokens[-window:]], device=self._device)
                out = self.model(idx, use_cache=True, head=False)
            next_id = int(self.model.lm_head(out.hidden[0, -1]).argmax())
        return next_id, out.cache if len(tokens) < window else None

    def _generate_one(self, context: str, gen_kwargs: dict) -> str:
        until = gen_kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        max_gen_toks = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        if gen_kwargs.pop("do_sample", False):
            raise ValueError("generate_until with do_sample=True is not supported; the aoe model decodes greedily")
        temperature = gen_kwargs.pop("temperature", 0.0)
        if temperature not in (0, 0.0, None):
            logger.warning("temperature=%s ignored: the aoe model decodes greedily", temperature)
        if gen_kwargs:
            logger.warning("generation arguments %s are ignored", sorted(gen_kwargs))

        tokens = self.tok_encode(context) or [self.prefix_token_id]
        generated: list[int] = []
        text = ""
        cache = None
        for _ in range(max_gen_toks):
            next_id, cache = self._greedy_next(tokens + generated, cache)
            if next_id == self.eot_token_id:
                break
            generated.append(next_id)
            text = self.tok_decode(generated)
            if any(stop in text for stop in until if stop):
                break
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text
