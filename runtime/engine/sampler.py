"""From logits to tokens: greedy, temperature, top-k, top-p, min-p, seeds, logprobs."""

from __future__ import annotations

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

        greedy = torch.tensor([r.params.is_greedy for r in requests], device=logits.device)
        token_ids = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            token_ids = torch.where(greedy, token_ids, self._sample(logits, requests))
        token_list = token_ids.tolist()

        logprobs: list = [None] * len(requests)
        if raw_logprobs is not None:
            for row, request in enumerate(requests):
                k = request.params.logprobs
                if k is None:
                    continue
                row_lp = raw_logprobs[row]
                chosen = row_lp[token_list[row]]
                rank = int((row_lp > chosen).sum()) + 1
                top = row_lp.topk(k) if k > 0 else None
                logprobs[row] = (
                    float(chosen), rank,
                    top.indices.tolist() if top is not None else [],
                    top.values.tolist() if top is not None else [],
                )
        return SamplerOutput(token_list, logprobs)

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        vocab = logits.shape[-1]
        # Admission bounds every value; these two are clamped to what the tensors can hold:
        # a top_k above the vocabulary keeps it all, a temperature above float32's range
        # (1e300 would be inf, and -inf / inf is NaN) flattens the distribution as inf would.
        temperature = torch.tensor([min(r.params.temperature or 1.0, _FLOAT32_MAX)
                                    for r in requests], device=logits.device)
        top_k = torch.tensor([min(r.params.top_k, vocab) for r in requests],
                             device=logits.device)
        top_p = torch.tensor([r.params.top_p for r in requests], device=logits.device)
        min_p = torch.tensor([r.params.min_p for r in requests], device=logits.device)
        scaled = filter_logits(logits / temperature[:, None], top_k, top_p, min_p)
        probs = scaled.softmax(dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p. Each row's noise
        # comes from its own generator when seeded, so a seeded request's tokens do not
        # depend on what else is in the batch.
        # The generators live on the CPU, so the noise is drawn there on every device.
        noise = torch.ones(probs.shape, dtype=torch.float32)
        for row, request in enumerate(requests):
            if not request.params.is_greedy:
                noise[row].exponential_(generator=request.generator or self.generator)
        return (probs / noise.to(probs.device)).argmax(dim=-1)
