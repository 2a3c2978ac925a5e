"""Shuffled, padded batches over as many epochs as the run needs."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from turbomoe.train.encode import IGNORE_INDEX, Encoded


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, L] int64, right-padded
    attention_mask: torch.Tensor  # [B, L] int64, 0 on padding
    labels: torch.Tensor  # [B, L] int64, IGNORE_INDEX on padding and unsupervised tokens
    tokens: int  # real (non-padding) tokens
    supervised: int  # tokens that carry loss
    epoch: int

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device, non_blocking=True),
            self.attention_mask.to(device, non_blocking=True),
            self.labels.to(device, non_blocking=True),
            self.tokens,
            self.supervised,
            self.epoch,
        )


def collate(examples: list[Encoded], pad_id: int, epoch: int = 0) -> Batch:
    """Pads to the longest example of the batch (not to max_length), so short data stays cheap."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    tokens = int(attention_mask.sum())
    supervised = int((labels != IGNORE_INDEX).sum())
    return Batch(input_ids, attention_mask, labels, tokens, supervised, epoch)


def epoch_batches(
    examples: list[Encoded], batch_size: int, pad_id: int, seed: int, max_epochs: int | None = None
) -> Iterator[Batch]:
    """Batches forever (or for max_epochs), reshuffled each epoch from seed so runs repeat exactly.
    The last batch of an epoch may be smaller."""
    rng = random.Random(seed)
    epoch = 0
    while max_epochs is None or epoch < max_epochs:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield collate([examples[j] for j in order[i : i + batch_size]], pad_id, epoch)
        epoch += 1
