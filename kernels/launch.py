"""A kernel launch planned on the host, kept apart from running it.

Planning separately lets `tests/kernels/compile_variants.py` compile for sm_80/sm_90
exactly the arguments and constexprs a GPU would be launched with, from meta tensors.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Launch:
    """`kernel[grid](**kwargs)`."""

    kernel: object  # a triton.jit function
    grid: tuple[int, ...]
    kwargs: dict  # arguments by name, constexprs, num_warps and num_stages

    def run(self) -> None:
        self.kernel[self.grid](**self.kwargs)
