"""brim's serving runtime: planner, engine, models, server, CLI.

`LLM` and `SamplingParams` are imported lazily so that `brim.runtime.planner`,
`brim.runtime.config` and the CLI dispatcher stay importable without torch (the operator
image has none).
"""

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from brim.runtime.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from brim.runtime.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'brim.runtime' has no attribute {name!r}")
