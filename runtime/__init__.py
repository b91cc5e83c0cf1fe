"""brim's serving runtime: engine, models, server, sizing.

`LLM` and `SamplingParams` are imported lazily so that `brim.runtime.sizing` and
`brim.runtime.config` stay importable without torch (the operator image has none).
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
