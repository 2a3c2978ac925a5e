"""transformers' causal-mask shortcut, kept while a CUDA graph is being captured.

With SDPA and no padding mask, transformers passes ``attn_mask=None, is_causal=True`` and never
builds a mask. Its check (``masking_utils._ignore_causal_mask_sdpa``) answers "build the mask"
whenever it believes it is tracing, and since 5.x CUDA stream capture counts as tracing, because
with a padding mask the check would read it on the host. A captured step would then build a
[S, S] mask in every layer and run SDPA with it: on one H200 at 4096 tokens cuDNN's attention
took 3x longer (3.05 against 0.95 ms per layer, forward and backward; bench/graph_probe.py),
making the replayed step slower than the eager one.

Without a padding mask the check reads nothing on the host, so capture changes nothing about its
answer. :func:`keep_causal_skip_while_capturing` answers it for that case exactly as the eager
check does; every other case (a padding mask, torch.compile, export) still goes to transformers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _eager_answer_without_padding(
    q_length: int, kv_length: int, q_offset: int, local_attention_size: int | None
) -> bool:
    # transformers 5.17's _ignore_causal_mask_sdpa with padding_mask=None, past its tracing check.
    if local_attention_size is not None and kv_length >= local_attention_size:
        return False
    return q_length == 1 or kv_length == q_length or q_offset == 0


@contextlib.contextmanager
def keep_causal_skip_while_capturing() -> Iterator[None]:
    """Within the block, a capture without a padding mask lets SDPA run ``is_causal=True``."""
    try:
        from transformers import masking_utils
        from transformers.utils.import_utils import is_cuda_stream_capturing
    except ImportError:  # not a transformers model: nothing to keep
        yield
        return
    original = getattr(masking_utils, "_ignore_causal_mask_sdpa", None)
    if original is None:  # another transformers layout: its own answer stands
        yield
        return

    def ignore_causal_mask(
        padding_mask: torch.Tensor | None,
        q_length: int,
        kv_length: int,
        q_offset: int,
        kv_offset: int,
        local_attention_size: int | None = None,
    ) -> bool:
        # The same capture test that makes transformers count a capture as tracing.
        if (
            padding_mask is None
            and is_cuda_stream_capturing()
            and not torch.compiler.is_compiling()
        ):
            return _eager_answer_without_padding(
                q_length, kv_length, q_offset, local_attention_size
            )
        return original(
            padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size
        )

    masking_utils._ignore_causal_mask_sdpa = ignore_causal_mask
    try:
        yield
    finally:
        masking_utils._ignore_causal_mask_sdpa = original
