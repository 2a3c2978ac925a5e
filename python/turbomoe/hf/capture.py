"""transformers' causal-mask shortcuts, kept while a CUDA graph is being captured.

With SDPA, no padding mask and no packed sequences, transformers passes ``attn_mask=None,
is_causal=True`` and never builds a mask. Two of its checks answer "build the mask" whenever they
believe they are tracing, and since 5.x CUDA stream capture counts as tracing, because eagerly
they read a tensor on the host:

* ``find_packed_sequence_indices`` looks for position ids that restart (packed sequences);
* ``_ignore_causal_mask_sdpa`` looks for padding in the attention mask.

A captured step would then build an [S, S] mask in every forward and run SDPA with it: on one
H200 at 4096 tokens cuDNN's attention took 3x longer (3.05 against 0.95 ms per layer, forward
and backward; bench/graph_probe.py), making the replayed step slower than the eager one.

Inside :func:`keep_causal_skip_while_capturing`, during a capture:

* without a padding mask the second check reads nothing, so it gets its eager answer;
* when the caller says the model generates its own position ids (none in the batch: HF causal
  LMs then use 0..S-1, which never restart), there are no packed sequences to find.

Everything else (a padding mask, position ids given, torch.compile, export) still goes to
transformers, which then builds the mask on the device at every replay.
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
def keep_causal_skip_while_capturing(positions_generated: bool) -> Iterator[None]:
    """Within the block, a capture without a padding mask lets SDPA run ``is_causal=True``;
    ``positions_generated``: the batch has no position ids, so nothing can be packed."""
    try:
        from transformers import masking_utils
        from transformers.utils.import_utils import is_cuda_stream_capturing
    except ImportError:  # not a transformers model: nothing to keep
        yield
        return
    ignore_original = getattr(masking_utils, "_ignore_causal_mask_sdpa", None)
    packed_original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if ignore_original is None or packed_original is None:  # another layout: its answers stand
        yield
        return

    def capturing() -> bool:
        # The same capture test that makes transformers count a capture as tracing.
        return is_cuda_stream_capturing() and not torch.compiler.is_compiling()

    def ignore_causal_mask(
        padding_mask: torch.Tensor | None,
        q_length: int,
        kv_length: int,
        q_offset: int,
        kv_offset: int,
        local_attention_size: int | None = None,
    ) -> bool:
        if padding_mask is None and capturing():
            return _eager_answer_without_padding(
                q_length, kv_length, q_offset, local_attention_size
            )
        return ignore_original(
            padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size
        )

    def find_packed(position_ids: torch.Tensor) -> torch.Tensor | None:
        if positions_generated and capturing():
            return None
        return packed_original(position_ids)

    masking_utils._ignore_causal_mask_sdpa = ignore_causal_mask
    masking_utils.find_packed_sequence_indices = find_packed
    try:
        yield
    finally:
        masking_utils._ignore_causal_mask_sdpa = ignore_original
        masking_utils.find_packed_sequence_indices = packed_original
