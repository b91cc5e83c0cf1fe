"""Speculative decoding (n-gram prompt lookup, a draft model): tokens/s off and on, in one run.

Two workloads on the bundled SmolLM2-135M-Instruct, greedy, chat-templated:
- editing: "fix the typos in this passage" over passages of brim's own docs with a few
  letters swapped; the answer copies long spans of the prompt, which a lookup guesses;
- free-form: open questions, where the prompt holds little of the answer.

For each workload the same requests run with speculation off and on (alternating,
--repeats times each, one process, one engine per setting), all submitted at once.
Reported: output tokens/s (median of the kept runs), the ratio, the acceptance rate
(accepted / proposed guesses), tokens emitted per check, and whether the outputs are
identical (greedy must be). Each timed run records other processes' CPU use and is
discarded above --max-outside-load cores.

    .venv/bin/python bench/speculative.py [--k 4] [--repeats 3] [--requests 16]
        [--draft self|layers:N|<checkpoint>]

--draft adds a draft-model setting. No smaller model shares SmolLM2-135M's vocabulary
on this machine, so besides a checkpoint folder it takes "self" (the target as its own
draft: every guess accepted, at twice the compute — the mechanism's ceiling and its cost)
and "layers:N" (the target's first N layers with its final norm and LM head, written once
under the brim cache: an untrained early-exit draft, cheap and often wrong).

Prints a table and writes bench/results/speculative-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

_BENCH = str(Path(__file__).resolve().parent)
if _BENCH not in sys.path:
    sys.path.append(_BENCH)
import _peer_common as common  # noqa: E402

QUESTIONS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain why the sky is blue to a ten-year-old.",
    "What are three good habits for learning a new language?",
    "Describe a busy market in a city you imagine.",
    "Give advice to someone starting their first job.",
    "Write a poem about rain on a tin roof.",
    "Why do cats purr? Give a few possible reasons.",
    "Plan a relaxing weekend in the mountains.",
]


def passages(count: int, rng: random.Random) -> list[str]:
    """Paragraphs of the repository's docs, 300-700 characters, each with a few typos."""
    docs = sorted((common.REPO_ROOT / "docs").glob("*.md"))
    paragraphs = [p.strip() for doc in docs for p in doc.read_text().split("\n\n")
                  if 300 <= len(p.strip()) <= 700 and not p.lstrip().startswith(("|", "```"))]
    chosen = rng.sample(paragraphs, min(count, len(paragraphs)))
    out = []
    for text in chosen:
        chars = list(text)
        for _ in range(4):  # swap neighbouring letters: a typo to fix
            i = rng.randrange(1, len(chars) - 1)
            if chars[i].isalpha() and chars[i + 1].isalpha():
                chars[i], chars[i + 1] = chars[i + 1], chars[i]
        out.append("".join(chars))
    return out


def workloads(num_requests: int) -> dict[str, list[list[dict]]]:
    rng = random.Random(0)
    editing = [[{"role": "user", "content": "Fix the typos in this text and return all of it, "
                 "otherwise unchanged:\n\n" + text}] for text in passages(num_requests, rng)]
    free = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
            for i in range(num_requests)]
    return {"editing": editing, "free-form": free}


def draft_checkpoint(spec: str, target: Path) -> str:
    """A draft folder for --draft: a path as is, "self" the target, "layers:N" its first N
    layers (written once beside the bundled model)."""
    if spec == "self":
        return str(target)
    if not spec.startswith("layers:"):
        return spec
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    num_layers = int(spec.split(":", 1)[1])
    folder = target.parent / f"{target.name}-first-{num_layers}-layers"
    if (folder / "model.safetensors").exists():
        return str(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for item in target.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name != "config.json":
            shutil.copy(item, folder / item.name)
    config = json.loads((target / "config.json").read_text())
    if not 1 <= num_layers < config["num_hidden_layers"]:
        raise SystemExit(f"--draft layers:N needs 1 <= N < {config['num_hidden_layers']}")
    config["num_hidden_layers"] = num_layers
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {}
    for file in sorted(target.glob("*.safetensors")):
        for name, tensor in load_file(str(file)).items():
            parts = name.split(".")
            if "layers" in parts and int(parts[parts.index("layers") + 1]) >= num_layers:
                continue
            tensors[name] = tensor
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return str(folder)


def run(llm, conversations, params) -> tuple[float, list, dict]:
    engine = llm.engine
    before = (engine.num_spec_draft_tokens, engine.num_spec_accepted_tokens,
              engine.num_spec_drafts, engine.num_spec_emitted_tokens)
    engine.kv_cache.pool.reset_prefix_cache()
    with common.CpuWindow() as window:
        start = time.perf_counter()
        outputs = llm.chat(conversations, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    after = (engine.num_spec_draft_tokens, engine.num_spec_accepted_tokens,
             engine.num_spec_drafts, engine.num_spec_emitted_tokens)
    proposed, accepted, checks, emitted = (a - b for a, b in zip(after, before))
    tokens = [o.outputs[0].token_ids for o in outputs]
    return seconds, tokens, {"proposed": proposed, "accepted": accepted, "checks": checks,
                             "emitted": emitted, "load": common.load_dict(window.load)}


def main() -> int:
    from brim.runtime import LLM
    from brim.runtime.sampling_params import SamplingParams

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--lookup-max", type=int, default=3, help="prompt_lookup_max")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-outside-load", type=float, default=0.15)
    parser.add_argument("--wait-for-quiet", type=float, default=30)
    parser.add_argument("--draft", default=None,
                        help='a draft model setting too: "self", "layers:N" or a checkpoint')
    parser.add_argument("--no-ngram", action="store_true", help="skip the n-gram setting")
    args = parser.parse_args()

    from brim.runtime.models.bundled import bundled_model_path

    target = bundled_model_path(None)
    spec = {"method": "ngram", "num_speculative_tokens": args.k,
            "prompt_lookup_max": args.lookup_max}
    engines = {"off": LLM(str(target), dtype=args.dtype, device="cpu")}
    if not args.no_ngram:
        engines["ngram"] = LLM(str(target), dtype=args.dtype, device="cpu",
                               speculative_config=spec)
    if args.draft:
        draft = {"model": draft_checkpoint(args.draft, target),
                 "num_speculative_tokens": args.k}
        engines["draft"] = LLM(str(target), dtype=args.dtype, device="cpu",
                               speculative_config=draft)
    settings = [s for s in engines if s != "off"]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    results = {}
    for name, conversations in workloads(args.requests).items():
        for llm in engines.values():  # warm-up, outside the timed runs
            llm.chat(conversations[:2], SamplingParams(temperature=0, max_tokens=8),
                     use_tqdm=False)
        runs = {setting: [] for setting in engines}
        outputs = {}
        for _ in range(args.repeats):
            for setting, llm in engines.items():
                common.wait_for_quiet(args.max_outside_load, args.wait_for_quiet)
                seconds, tokens, stats = run(llm, conversations, params)
                num_tokens = sum(len(t) for t in tokens)
                discarded = stats["load"]["outside_cores"] > args.max_outside_load
                runs[setting].append({"seconds": seconds, "output_tokens": num_tokens,
                                      "tok_s": num_tokens / seconds, "discarded": discarded,
                                      **stats})
                outputs[setting] = tokens
                print(f"[{name} {setting}] {num_tokens / seconds:.1f} tok/s"
                      + (f", accepted {stats['accepted']}/{stats['proposed']}"
                         if stats["proposed"] else "")
                      + (f" (discarded: outside load {stats['load']['outside_cores']:.2f})"
                         if discarded else ""), flush=True)
        kept = {s: [r for r in rs if not r["discarded"]] for s, rs in runs.items()}
        results[name] = {"runs": runs,
                         "tok_s": {s: statistics.median(r["tok_s"] for r in k) if k else None
                                   for s, k in kept.items()}}
        for setting in settings:
            last = runs[setting][-1]
            results[name][setting] = {
                "acceptance_rate": last["accepted"] / last["proposed"] if last["proposed"]
                else 0.0,
                "emitted_per_check": last["emitted"] / last["checks"] if last["checks"] else 0.0,
                "identical": outputs["off"] == outputs[setting],
            }
    print(f"\nk={args.k}, prompt_lookup_max={args.lookup_max}, draft {args.draft}, "
          f"{args.requests} requests, max_tokens {args.max_tokens}, {args.dtype}")
    print(f"{'workload':>10} {'setting':>8} {'off tok/s':>10} {'on tok/s':>9} {'ratio':>6} "
          f"{'accepted':>9} {'per check':>10} {'identical':>10}")
    for name, r in results.items():
        for setting in settings:
            off, on = r["tok_s"]["off"], r["tok_s"][setting]
            ratio = f"{on / off:.2f}x" if off and on else "n/a"
            s = r[setting]
            print(f"{name:>10} {setting:>8} {off or 0:>10.1f} {on or 0:>9.1f} {ratio:>6} "
                  f"{s['acceptance_rate']:>9.0%} {s['emitted_per_check']:>10.2f} "
                  f"{str(s['identical']):>10}")
    record = {"utc": common.utc_stamp(), "commit": common.git_commit(),
              "machine": common.machine_info(), "args": vars(args), "results": results}
    print(f"wrote {common.write_results('speculative', record)}")
    return 0 if all(r[s]["identical"] for r in results.values() for s in settings) else 1


if __name__ == "__main__":
    sys.exit(main())
