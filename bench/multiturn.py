"""Multi-turn chat: time to first token per turn, prefix caching on and off, in one run.

N conversations (clients) talk to the engine for T turns. Every turn each client resends
its whole history (system prompt, every earlier question and answer, the new question),
as an OpenAI chat client does; the N requests of a turn arrive together. Without prefix
caching every turn prefills the whole, growing history; with it only the new tokens
(the last answer and the new question) are computed.

TTFT: from add_request to the step that returns the request's first token, stepping
`llm.engine` directly. Greedy, ignore_eos, max_tokens answers, so both runs do the same
work and their answers can be compared token for token.

    python bench/multiturn.py [--conversations 4] [--turns 10] [--max-tokens 16]
                              [--model PATH] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path

WORDS = (
    "tool paint drill ladder garden hose pipe valve wire switch lamp timber saw hammer nail "
    "screw bolt glue brush roller tile grout sink tap shelf hinge lock key fence gate soil "
    "seed pot rake spade mower battery charger cable socket plug fuse bulb filter pump"
).split()

SYSTEM = (
    "You are a careful assistant for a hardware store. You answer questions about tools, "
    "paint, plumbing, garden supplies and electrical parts. Keep answers short and factual, "
    "mention safety precautions when power tools or chemicals are involved, and never invent "
    "product names or prices. If a customer asks about something the store does not sell, say "
    "so politely and suggest where they might look instead. Opening hours are 8am to 6pm on "
    "weekdays and 9am to 4pm on Saturdays; the store is closed on Sundays and public holidays. "
    "Returns are accepted within thirty days with a receipt. Deliveries within ten miles are "
    "free for orders above fifty dollars. Staff can cut keys, mix paint, and cut timber to size."
)


def question(rng: random.Random, num_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(num_words)]
    return "Tell me about the " + " and the ".join(" ".join(words[i:i + 3])
                                                   for i in range(0, num_words, 3)) + "?"


def run(llm, args, label: str) -> dict:
    from brim.runtime import SamplingParams

    engine = llm.engine
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    # Warm-up on an unrelated prompt (first-call costs stay out of turn 1).
    llm.generate([list(range(200, 260))], SamplingParams(max_tokens=4, ignore_eos=True),
                 use_tqdm=False)
    stats0 = engine.get_stats()
    rngs = [random.Random(args.seed * 1000 + c) for c in range(args.conversations)]
    histories = [[{"role": "system", "content": SYSTEM}] for _ in range(args.conversations)]
    turns, answers = [], []
    total_prompt_tokens = total_output_tokens = 0
    start = time.perf_counter()
    for turn in range(args.turns):
        added, first, prompt_lens, cached = {}, {}, [], []
        turn_start = time.perf_counter()
        for c, history in enumerate(histories):
            history.append({"role": "user", "content": question(rngs[c], args.question_words)})
            text = tokenizer.apply_chat_template(history, tokenize=False,
                                                 add_generation_prompt=True)
            token_ids = tokenizer.encode(text, add_special_tokens=False)
            req_id = f"{label}-c{c}-t{turn}"
            engine.add_request(req_id, token_ids, params, prompt=text)
            added[req_id] = time.perf_counter()
            prompt_lens.append(len(token_ids))
        finals = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                now = time.perf_counter()
                if out.req_id not in first and out.outputs[0].token_ids:
                    first[out.req_id] = now
                if out.finished:
                    finals[out.req_id] = out
        turn_answers = []
        for c, history in enumerate(histories):
            out = finals[f"{label}-c{c}-t{turn}"]
            history.append({"role": "assistant", "content": out.outputs[0].text})
            turn_answers.append(list(out.outputs[0].token_ids))
            cached.append(out.num_cached_tokens)
            total_output_tokens += len(out.outputs[0].token_ids)
        answers.append(turn_answers)
        total_prompt_tokens += sum(prompt_lens)
        ttfts = [first[r] - added[r] for r in added]
        turns.append({
            "turn": turn + 1,
            "mean_prompt_tokens": statistics.mean(prompt_lens),
            "mean_cached_tokens": statistics.mean(cached),
            "ttft_mean_s": statistics.mean(ttfts),
            "ttft_max_s": max(ttfts),
            "turn_seconds": time.perf_counter() - turn_start,
        })
    elapsed = time.perf_counter() - start
    stats = engine.get_stats()
    return {
        "enable_prefix_caching": engine.config.cache.enable_prefix_caching,
        "seconds": elapsed,
        "prompt_tokens": total_prompt_tokens,
        "output_tokens": total_output_tokens,
        "output_tokens_per_s": total_output_tokens / elapsed,
        "prompt_tokens_per_s": total_prompt_tokens / elapsed,
        "prefix_cache_queries": stats.prefix_cache_queries - stats0.prefix_cache_queries,
        "prefix_cache_hits": stats.prefix_cache_hits - stats0.prefix_cache_hits,
        "turns": turns,
        "answers": answers,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--question-words", type=int, default=18, help="~30 tokens a question")
    ap.add_argument("--model", default=None, help="default: the bundled SmolLM2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="bench/results/multiturn.json")
    args = ap.parse_args()

    from brim.runtime import LLM

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None
    results = {}
    for enable in (False, True):
        llm = LLM(args.model, dtype=args.dtype, device=args.device,
                  enable_prefix_caching=enable, max_model_len=2048)
        system_tokens = len(llm.get_tokenizer().encode(SYSTEM))
        label = "on" if enable else "off"
        results[label] = run(llm, args, label)
        del llm

    off, on = results["off"], results["on"]
    print(f"{args.conversations} conversations x {args.turns} turns, max_tokens "
          f"{args.max_tokens}, system prompt {system_tokens} tokens, device {args.device}")
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT off (s)':>13} {'TTFT on (s)':>12} "
          f"{'on/off':>7}")
    for t_off, t_on in zip(off["turns"], on["turns"]):
        ratio = t_on["ttft_mean_s"] / t_off["ttft_mean_s"]
        print(f"{t_off['turn']:>4} {t_off['mean_prompt_tokens']:>7.0f} "
              f"{t_on['mean_cached_tokens']:>7.0f} {t_off['ttft_mean_s']:>13.3f} "
              f"{t_on['ttft_mean_s']:>12.3f} {ratio:>7.2f}")
    for label, r in results.items():
        print(f"caching {label:>3}: {r['seconds']:.1f} s, {r['output_tokens_per_s']:.1f} output "
              f"tok/s, {r['prompt_tokens_per_s']:.0f} prompt tok/s, prefix-cache hits "
              f"{r['prefix_cache_hits']}/{r['prefix_cache_queries']} tokens")
    same = off["answers"] == on["answers"]
    print(f"greedy answers identical with and without caching: {same}")
    last_ratio = on["turns"][-1]["ttft_mean_s"] / off["turns"][-1]["ttft_mean_s"]
    print(f"TTFT at turn {args.turns}: on/off = {last_ratio:.2f}")

    report = {
        "benchmark": "multiturn",
        "commit": commit,
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "args": vars(args),
        "system_prompt_tokens": system_tokens,
        "answers_identical": same,
        "ttft_last_turn_ratio": last_ratio,
        "results": {k: {kk: vv for kk, vv in v.items() if kk != "answers"}
                    for k, v in results.items()},
    }
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
