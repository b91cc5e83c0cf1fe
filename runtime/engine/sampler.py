"""From logits to tokens: greedy, temperature, top-k, top-p, min-p, seeds, logprobs."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from brim.runtime.engine.request import Request

_FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]  # one per row
    # per row: (chosen token's logprob, its rank, top-k ids, top-k logprobs) when requested
    logprobs: list[tuple[float, int, list[int], list[float]] | None]


def apply_min_tokens(logits: torch.Tensor, requests: list[Request]) -> None:
    """Below min_tokens, EOS and stop tokens cannot be chosen."""
    for row, request in enumerate(requests):
        if request.num_output_tokens < request.params.min_tokens:
            banned = set(request.eos_token_ids) | set(request.params.stop_token_ids)
            if banned:
                logits[row, list(banned)] = float("-inf")


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens outside the support (in place): top_k, then top_p, then min_p.

    logits: [S, V] temperature-scaled; top_k [S] (0 = off), top_p [S], min_p [S].
    """
    vocab = logits.shape[-1]
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        remove = ranks >= k[:, None]
        probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass
        # before it already does. The first token always stays.
        # Rows with top_p = 1 are exempt: float32 cumsum can reach 1.0 before the tail,
        # which would drop tail tokens of a row that asked for no restriction.
        mass_before = probs.cumsum(dim=-1) - probs
        remove |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)
        remove[:, 0] = False
        logits.scatter_(1, order, sorted_logits.masked_fill(remove, float("-inf")))
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        logits.masked_fill_(probs < threshold, float("-inf"))
    return logits


def _scaled(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p (filter_logits), on logits in place. Each
    is skipped when no row asks for it: guidellm and the OpenAI clients' defaults (a
    temperature of 1, no filter) then cost nothing here."""
    # Admission bounds every value; these two are clamped to what the tensors can hold:
    # a top_k above the vocabulary keeps it all, a temperature above float32's range
    # (1e300 would be inf, and -inf / inf is NaN) flattens the distribution as inf would.
    temperatures = [min(r.params.temperature or 1.0, _FLOAT32_MAX) for r in requests]
    if any(t != 1.0 for t in temperatures):
        logits.div_(torch.tensor(temperatures, device=logits.device)[:, None])
    if any(r.params.top_k > 0 or r.params.top_p < 1 or r.params.min_p > 0 for r in requests):
        vocab = logits.shape[-1]
        top_k = torch.tensor([min(r.params.top_k, vocab) for r in requests],
                             device=logits.device)
        top_p = torch.tensor([r.params.top_p for r in requests], device=logits.device)
        min_p = torch.tensor([r.params.min_p for r in requests], device=logits.device)
        filter_logits(logits, top_k, top_p, min_p)
    return logits


class Sampler:
    def __init__(self, seed: int) -> None:
        # For unseeded requests; seeded ones carry their own generator.
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """logits: [S, V] for the S requests that sample this step, in order."""
        logits = logits.float()
        # Logprobs are the model's own distribution (vLLM's raw_logprobs): taken before
        # min_tokens masks EOS, so a masked EOS still shows its probability and rank.
        want_logprobs = any(r.params.logprobs is not None for r in requests)
        raw_logprobs = logits.log_softmax(dim=-1) if want_logprobs else None
        apply_min_tokens(logits, requests)

        is_greedy = [r.params.is_greedy for r in requests]
        if all(is_greedy):
            token_ids = logits.argmax(dim=-1)
        elif not any(is_greedy):
            token_ids = self._sample(logits, requests)
        else:
            greedy = torch.tensor(is_greedy, device=logits.device)
            token_ids = torch.where(greedy, logits.argmax(dim=-1), self._sample(logits, requests))
        token_list = token_ids.tolist()

        logprobs: list = [None] * len(requests)
        if raw_logprobs is not None:
            for row, request in enumerate(requests):
                if request.params.logprobs is not None:
                    logprobs[row] = _logprob_entry(raw_logprobs[row], token_list[row],
                                                   request.params.logprobs)
        return SamplerOutput(token_list, logprobs)

    def verify(self, logits: torch.Tensor, request: Request, guesses: list[int],
               draft_probs: torch.Tensor | None = None) -> tuple[list[int], list]:
        """Check k guessed tokens against the target (speculative.py).

        logits: [k + 1, V], the target's at the request's last token and at each guess.
        draft_probs: [k, V], the distribution q_i each guess was drawn from; None when the
        guesses were certain (q_i one-hot: a lookup, or a greedy draft).
        Returns the tokens to emit — the accepted guesses, then one of the target's own —
        and a logprobs entry (or None) per token. Greedy: the longest run of guesses equal
        to the argmax. Sampling: guess i is accepted with probability
        min(1, p_i(guess) / q_i(guess)), else the token is drawn from max(p_i - q_i, 0),
        renormalised; all accepted, the last row gives one more. Each token is distributed
        as the target alone would draw it.
        """
        logits = logits.float()
        params = request.params
        raw_logprobs = logits.log_softmax(dim=-1) if params.logprobs is not None else None
        k = len(guesses)
        num_output = request.num_output_tokens
        if num_output < params.min_tokens:
            banned = list(set(request.eos_token_ids) | set(params.stop_token_ids))
            rows = [j for j in range(k + 1) if num_output + j < params.min_tokens]
            if banned and rows:
                logits[torch.tensor(rows)[:, None], torch.tensor(banned)[None, :]] = float("-inf")
        if params.is_greedy:
            best = logits.argmax(dim=-1).tolist()
            accepted = 0
            while accepted < k and best[accepted] == guesses[accepted]:
                accepted += 1
            tokens = guesses[:accepted] + [best[accepted]]
        else:
            generator = request.generator or self.generator
            probs = self._probs(logits, [request] * (k + 1))
            draws = torch.rand(k, generator=generator).tolist()
            tokens = []
            q = draft_probs.float().to(probs.device) if draft_probs is not None else None
            for row, guess in enumerate(guesses):
                q_guess = 1.0 if q is None else float(q[row, guess])
                # u < p / q, written without dividing (q of a drawn guess is > 0).
                if draws[row] * q_guess < float(probs[row, guess]):
                    tokens.append(guess)
                    continue
                if q is None:
                    residual = probs[row].clone()
                    residual[guess] = 0.0
                else:
                    residual = (probs[row] - q[row]).clamp_(min=0.0)
                if not float(residual.sum()) > 0.0:  # p == q up to rounding: p itself
                    residual = probs[row]
                tokens.append(_draw(residual, generator))
                break
            else:
                tokens.append(_draw(probs[k], generator))
        logprobs = [None] * len(tokens)
        if raw_logprobs is not None:
            logprobs = [_logprob_entry(raw_logprobs[row], token, params.logprobs)
                        for row, token in enumerate(tokens)]
        return tokens, logprobs

    def _probs(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Each row's sampling distribution: temperature, then top-k, top-p, min-p.
        Overwrites logits (every caller hands the sampler its own rows)."""
        return _scaled(logits, requests).softmax(dim=-1)

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        scaled = _scaled(logits, requests)
        uniforms = self._uniforms(requests)
        op = _cpu_sample_op() if scaled.device.type == "cpu" else None
        if op is not None and scaled.dtype == torch.float32 and scaled.stride(-1) == 1:
            return op(scaled, uniforms)  # the inverse CDF below in one call (cpu_sampling.cpp)
        # Unnormalised weights exp(x - max) are all the inverse CDF needs (it scales each
        # uniform by its row's total), computed in place: softmax's pass to divide by the
        # sum, and a vocabulary-sized buffer per row, saved.
        weights = scaled.sub_(scaled.amax(dim=-1, keepdim=True)).exp_()
        return _inverse_cdf(weights, uniforms.to(weights.device))

    def _uniforms(self, requests: list[Request]) -> torch.Tensor:
        """One uniform per sampled row (float64, CPU; greedy rows get 0): from the request's
        own generator when seeded, so a seeded request's tokens do not depend on what else is
        in the batch; the rest in one draw from the sampler's. The generators live on the
        CPU, so the draws are made there on every device."""
        uniforms = torch.zeros(len(requests), dtype=torch.float64)
        shared = []
        for row, request in enumerate(requests):
            if request.params.is_greedy:
                continue
            if request.generator is None:
                shared.append(row)
            else:
                uniforms[row] = float(torch.rand((), dtype=torch.float64,
                                                 generator=request.generator))
        if shared:
            uniforms[shared] = torch.rand(len(shared), dtype=torch.float64,
                                          generator=self.generator)
        return uniforms


@functools.lru_cache(maxsize=None)
def _cpu_sample_op():
    """kernels/cpu_sampling.cpp's op, or None where the CPU library is not built (or on a
    machine without a compiler; the torch path below is the same draw)."""
    from brim.kernels.cpu_decode import sample_op

    return sample_op()


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """For each row of probs [S, V] (unnormalised, >= 0) and u in [0, 1): the first token
    whose cumulative mass exceeds u times the row's total, which is a draw from the row's
    distribution. One uniform per row: an exponential race (argmax p / E, E ~ Exp(1)) needs
    one per token, and torch draws exponentials at ~14 ns each on CPU, 0.7 ms for a
    49k-token vocabulary, per row and step (9 ms of a 26 ms batch-8 decode step).

    In two levels: the block of _BLOCK tokens the target falls in, from the blocks' sums
    (float32 sums, a vectorized pass, accumulated in float64), then the token within the
    block from a float64 running sum of its values. A float64 running sum over the whole row
    is a scalar loop after a float64 copy: 0.65 ms for 8 rows of SmolLM2's vocabulary, 2.7
    ms for 32. What the blocks' float32 sums round away (~1e-7 of a block's mass) moves
    between neighbouring blocks' ends, far below what sampling could ever show; a zero-
    probability token is never picked (where rounding would land on one, at a block's very
    end, the row is drawn again from a whole-row float64 sum)."""
    num_rows, vocab = probs.shape
    target_fraction = uniforms.double()[:, None]
    if vocab < 4 * _BLOCK:
        return _inverse_cdf_flat(probs, target_fraction)
    pad = -vocab % _BLOCK
    padded = torch.nn.functional.pad(probs, (0, pad)) if pad else probs
    blocks = padded.view(num_rows, -1, _BLOCK)
    block_cdf = blocks.sum(dim=-1).double().cumsum(dim=-1)  # [S, C]
    target = target_fraction * block_cdf[:, -1:]
    block = torch.searchsorted(block_cdf, target, right=True).clamp_(max=blocks.shape[1] - 1)
    rows = torch.arange(num_rows, device=probs.device)
    before = torch.nn.functional.pad(block_cdf[:, :-1], (1, 0)).gather(1, block)
    within = blocks[rows, block[:, 0]].double().cumsum(dim=-1) + before
    offset = torch.searchsorted(within, target, right=True).clamp_(max=_BLOCK - 1)
    tokens = (block * _BLOCK + offset)[:, 0].clamp_(max=vocab - 1)
    bad = probs[rows, tokens] <= 0
    if bool(bad.any()):
        tokens[bad] = _inverse_cdf_flat(probs[bad], target_fraction[bad])
    return tokens


_BLOCK = 256


def _inverse_cdf_flat(probs: torch.Tensor, target_fraction: torch.Tensor) -> torch.Tensor:
    """_inverse_cdf with one float64 running sum over each whole row: target_fraction [S, 1]."""
    cdf = probs.double().cumsum(dim=-1)
    target = target_fraction * cdf[:, -1:]
    # A u within rounding of 1 can put the target at the total, past every token: it then
    # takes the last token of positive probability (where the cdf first reaches the total).
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous())
    return torch.minimum(torch.searchsorted(cdf, target, right=True), last)[:, 0]


def _logprob_entry(row_logprobs: torch.Tensor, token: int, k: int) -> tuple:
    """(the token's logprob, its rank, the top-k ids, their logprobs) from one row."""
    chosen = row_logprobs[token]
    rank = int((row_logprobs > chosen).sum()) + 1
    top = row_logprobs.topk(k) if k > 0 else None
    return (float(chosen), rank, top.indices.tolist() if top is not None else [],
            top.values.tolist() if top is not None else [])


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from a (possibly unnormalised) distribution over the vocabulary, by the
    same inverse CDF as Sampler._sample."""
    u = torch.rand((1,), dtype=torch.float64, generator=generator)
    return int(_inverse_cdf(probs.float().cpu()[None, :], u)[0])
