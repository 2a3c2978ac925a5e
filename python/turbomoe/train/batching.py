"""Shuffled batches over as many epochs as the run needs, padded or packed, with a position that
a checkpoint records so a resumed run continues with exactly the batch it would have seen."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from turbomoe.train.encode import IGNORE_INDEX, Encoded


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, L] int64, right-padded
    attention_mask: torch.Tensor | None  # [B, L] int64, 0 on padding; None for packed rows
    labels: torch.Tensor  # [B, L] int64, IGNORE_INDEX on padding and unsupervised tokens
    tokens: int  # real (non-padding) tokens
    supervised: int  # tokens that carry loss
    epoch: int
    # Packed rows: positions restart at 0 for every document. transformers (5.x masking_utils,
    # find_packed_sequence_indices) turns restarts into a block-diagonal causal mask when no
    # attention_mask is given, for sdpa/eager/flex alike, and flash-attention uses them as varlen.
    position_ids: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            self.input_ids.to(device, non_blocking=True),
            move(self.attention_mask),
            self.labels.to(device, non_blocking=True),
            self.tokens,
            self.supervised,
            self.epoch,
            move(self.position_ids),
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids, "labels": self.labels}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        return inputs


def padded_width(longest: int, multiple: int = 1, limit: int = 0) -> int:
    """``longest`` rounded up to a multiple of ``multiple``, but not past ``limit`` (0: none).

    Every distinct row length is a new shape for the GPU kernels (cuDNN attention builds an
    execution plan per shape), so batches of similar lengths share one padded width."""
    width = -(-longest // multiple) * multiple
    if limit > 0:
        width = min(width, max(limit, longest))
    return width


def collate(
    examples: list[Encoded], pad_id: int, epoch: int = 0, multiple: int = 1, limit: int = 0
) -> Batch:
    """Pads to the longest example of the batch (not to max_length), so short data stays cheap;
    the width is rounded up as :func:`padded_width` says."""
    width = padded_width(max(len(e.input_ids) for e in examples), multiple, limit)
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


def collate_packed(
    rows: list[list[Encoded]],
    pad_id: int,
    epoch: int = 0,
    multiple: int = 1,
    limit: int = 0,
    shape: tuple[int, int] | None = None,
) -> Batch:
    """Each row holds several documents back to back. A document's first label is masked: HF
    shifts labels inside the loss, so that label would be predicted from the previous document's
    last token. (Unpacked, the first token is never a target either, so losses match exactly.)
    Padding at the row end gets positions 0, 1, ... of its own: a separate 'document'.

    ``shape`` (rows, width): pad to exactly that, with rows of padding only (no loss) after the
    real ones, so that every batch has one shape (a replayed CUDA graph needs it)."""
    longest = max(sum(len(e.input_ids) for e in row) for row in rows)
    width = padded_width(longest, multiple, limit)
    count = len(rows)
    if shape is not None:
        count, width = shape
        if len(rows) > count or longest > width:
            raise ValueError(f"{len(rows)} rows of up to {longest} tokens exceed shape {shape}")
    input_ids = torch.full((count, width), pad_id, dtype=torch.long)
    labels = torch.full((count, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(width).repeat(count, 1)  # padding rows: one 'document' each
    tokens = 0
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.input_ids)
            input_ids[r, at : at + n] = torch.tensor(e.input_ids, dtype=torch.long)
            labels[r, at : at + n] = torch.tensor(e.labels, dtype=torch.long)
            labels[r, at] = IGNORE_INDEX
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(width - at)
        tokens += at
    supervised = int((labels != IGNORE_INDEX).sum())
    return Batch(input_ids, None, labels, tokens, supervised, epoch, position_ids)


def pack(examples: list[Encoded], order: list[int], max_length: int) -> list[list[int]]:
    """Greedy packing in the given order: a row is closed when the next document does not fit.
    Keeping the shuffled order (no bin-packing sort) keeps batches as random as unpacked ones."""
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order:
        n = len(examples[i].input_ids)
        if current and used + n > max_length:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    return rows


class BatchStream:
    """Batches forever (or for max_epochs), reshuffled each epoch from (seed, epoch) so any
    position can be rebuilt without replaying the stream; the last batch of an epoch may be
    smaller (unless ``fixed_shape``).

    With shard=(rank, world), the batches of all epochs form one sequence and rank r takes every
    world-th of it, so each step's world batches are consecutive even across an epoch boundary,
    and a rank gets batches however few an epoch has. Ranks always take the same number of
    batches (a collective forward, e.g. expert parallelism, needs every rank): when a bounded
    stream ends inside a round, the ranks left without a batch get a filler that carries no loss
    (the round's first batch with every label ignored)."""

    def __init__(
        self,
        examples: list[Encoded],
        batch_size: int,
        pad_id: int,
        seed: int,
        *,
        packing: bool = False,
        max_length: int = 0,
        max_epochs: int | None = None,
        shard: tuple[int, int] = (0, 1),
        shuffle: bool = True,
        pad_to_multiple_of: int = 1,
        fixed_shape: bool = False,
    ) -> None:
        if fixed_shape and not (packing and max_length > 0):
            raise ValueError("fixed_shape needs packing and a max_length")
        self.examples = examples
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.packing = packing
        self.max_length = max_length
        self.max_epochs = max_epochs
        self.rank, self.world = shard
        self.shuffle = shuffle
        self.pad_to_multiple_of = pad_to_multiple_of
        # Every batch [batch_size, max_length] (packing only): one shape for a CUDA graph.
        self.fixed_shape = fixed_shape
        self.epoch = 0
        self.index = 0  # next batch of this epoch, counted over all ranks
        self.position = 0  # next batch of the whole stream, counted over all ranks
        self._units: list[list[int]] | None = None
        # The current round's first rows and their epoch: a filler is built from them.
        self._round_first: tuple[list[list[int]], int] | None = None

    def units(self, epoch: int) -> list[list[int]]:
        """The epoch's rows: one example each, or several when packing."""
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        if self.packing:
            return pack(self.examples, order, self.max_length)
        return [[i] for i in order]

    def batches_per_epoch(self) -> int:
        n = len(self.units(0)) if self.packing else len(self.examples)
        return -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        while True:
            if self.max_epochs is not None and self.epoch >= self.max_epochs:
                return self._filler_or_stop()
            if self._units is None:
                self._units = self.units(self.epoch)
            start = self.index * self.batch_size
            if start >= len(self._units):
                self.epoch, self.index, self._units = self.epoch + 1, 0, None
                continue
            position = self.position
            self.index += 1
            self.position += 1
            at_round_start = position % self.world == 0
            if not at_round_start and position % self.world != self.rank:
                continue
            chunk = self._units[start : start + self.batch_size]
            if at_round_start:
                self._round_first = (chunk, self.epoch)
                if self.rank != 0:
                    continue
            return self._collate(chunk, self.epoch)

    def _collate(self, chunk: list[list[int]], epoch: int) -> Batch:
        shape = (self.pad_to_multiple_of, self.max_length)
        if self.packing:
            rows = [[self.examples[i] for i in row] for row in chunk]
            fixed = (self.batch_size, self.max_length) if self.fixed_shape else None
            return collate_packed(rows, self.pad_id, epoch, *shape, shape=fixed)
        singles = [self.examples[row[0]] for row in chunk]
        return collate(singles, self.pad_id, epoch, *shape)

    def _filler_or_stop(self) -> Batch:
        """The stream has ended at ``position``: this rank's next batch would be ``wanted``. A
        filler when its round had begun (the other ranks got batches of it), else the end."""
        wanted = self.position + (self.rank - self.position) % self.world
        round_start = wanted - self.rank
        if round_start >= self.position or self._round_first is None:
            raise StopIteration
        self.position = wanted + 1
        first = self._collate(*self._round_first)
        return replace(first, labels=torch.full_like(first.labels, IGNORE_INDEX), supervised=0)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index, self._units = int(state["epoch"]), int(state["index"]), None
        # Checkpoints from before the stream-wide position restarted the rank cycle each epoch;
        # the epoch's index is where that cycle stood.
        self.position = int(state.get("position", self.index))
        self._round_first = None


def epoch_batches(
    examples: list[Encoded], batch_size: int, pad_id: int, seed: int, max_epochs: int | None = None
) -> Iterator[Batch]:
    """Padded batches for max_epochs (or forever), in the order a run would see them."""
    return BatchStream(examples, batch_size, pad_id, seed, max_epochs=max_epochs)
