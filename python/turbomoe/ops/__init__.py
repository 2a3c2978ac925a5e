"""turbomoe's torch custom ops (``torch.ops.turbomoe.*``), each with autograd and a fake
implementation so they appear by name in the profiler and trace under ``torch.compile``."""

from turbomoe.ops.activation import clamped_swiglu, silu_mul, swiglu

__all__ = ["clamped_swiglu", "silu_mul", "swiglu"]
