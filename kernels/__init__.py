"""Triton kernels for paged attention, each beside its torch reference."""
