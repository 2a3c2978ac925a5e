"""keep_causal_skip_while_capturing: under (simulated) CUDA stream capture, transformers' SDPA
mask checks give their eager answers where they read nothing on the host (no padding mask; no
position ids given, so nothing is packed); with a padding mask, given position ids, outside the
block, or outside a capture, transformers answers by itself."""

from __future__ import annotations

import pytest
import torch
from transformers import masking_utils

from turbomoe.hf.capture import keep_causal_skip_while_capturing


@pytest.fixture
def capturing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def _check(padding: torch.Tensor | None, local: int | None = None) -> bool:
    return masking_utils._ignore_causal_mask_sdpa(padding, 8, 8, 0, 0, local)


def test_outside_a_capture_transformers_answers() -> None:
    original = masking_utils._ignore_causal_mask_sdpa
    with keep_causal_skip_while_capturing(positions_generated=True):
        assert _check(None) is True
        assert _check(torch.tensor([[True] * 6 + [False] * 2])) is False
    assert masking_utils._ignore_causal_mask_sdpa is original


@pytest.mark.usefixtures("capturing")
def test_a_capture_without_padding_keeps_is_causal() -> None:
    assert _check(None) is False  # transformers alone: capture counts as tracing
    with keep_causal_skip_while_capturing(positions_generated=True):
        assert _check(None) is True
        assert masking_utils._ignore_causal_mask_sdpa(None, 4, 8, 4, 0) is False  # offset query
        assert _check(None, local=4) is False  # sliding window: the mask is needed
        # A padding mask would be read on the host: transformers' own (tracing) answer stands.
        assert _check(torch.ones(1, 8, dtype=torch.bool)) is False
    assert _check(None) is False


@pytest.mark.usefixtures("capturing")
def test_packed_sequences_are_looked_for_only_in_given_position_ids() -> None:
    restarting = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    plain = torch.arange(8)[None]
    # transformers alone under capture: a mask tensor for any position ids (it cannot look).
    assert masking_utils.find_packed_sequence_indices(plain) is not None
    with keep_causal_skip_while_capturing(positions_generated=True):
        assert masking_utils.find_packed_sequence_indices(plain) is None
    with keep_causal_skip_while_capturing(positions_generated=False):
        packed = masking_utils.find_packed_sequence_indices(restarting)
        assert packed is not None and packed.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]
