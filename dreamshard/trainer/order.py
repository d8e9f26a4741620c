"""The order training reads samples in: addressed by position, the same for any number of ranks and workers.

A domain's samples form an endless sequence of epochs. Global position P (samples of this domain consumed by
all ranks together since the run began) lies in epoch P // N at offset P % N, N the samples per epoch. Each
epoch, seeded by (run seed, domain, epoch) only:
  1. the shards in a seeded permutation;
  2. consecutive shards of that order grouped into blocks of at least `shuffle_block` samples;
  3. the samples of each block in a seeded permutation (none with shuffle_block 0).
A folder dataset (random access) is one block: a plain permutation of its items per epoch. This is MosaicML
Streaming's idea (shuffle shards, then samples within blocks of shards) in its simplest form: a reader needs
only the current block's shards.

The batches: an iteration takes the next G positions (the global batch); micro-step m of rank r (of W ranks,
b samples each, so G = grad_accum x W x b) takes positions start + m*W*b + r*b + [0, b). Because the order
depends only on the position, a run resumed at position P with any number of ranks reads exactly what an
uninterrupted run reads from P on: every sample once per epoch.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

ORDER_VERSION = 1  # recorded in checkpoints: a later change to this scheme must not resume an old position silently


def seeded(seed: int, *parts: int) -> np.random.Generator:
    """A generator for (seed, parts...): independent of process, rank and worker."""
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, *parts])


def stream_id(name: str) -> int:
    """A stable number per domain name, so source and target draw different orders from one seed."""
    return zlib.crc32(name.encode())


@dataclass(frozen=True)
class Address:
    """Where the sample at a position is: its shard, its ordinal in that shard, and its block (the
    positions a substitute for an unreadable sample is taken from)."""

    epoch: int
    shard: int
    ordinal: int
    block_start: int  # absolute position of the block's first sample
    block_size: int


class EpochOrder:
    """Position → (shard, ordinal), for shards holding `counts` samples each."""

    def __init__(self, counts: list[int], seed: int, stream: int, shuffle_block: int):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.total = int(self.counts.sum())
        if self.total <= 0:
            raise ValueError("no samples to order")
        self.seed, self.stream, self.shuffle_block = seed, stream, shuffle_block
        self._epoch: int | None = None
        self._blocks: list[tuple[int, np.ndarray]] = []  # per block: (first offset in the epoch, shard ids)
        self._block_starts = np.zeros(0, dtype=np.int64)
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    @property
    def max_block_shards(self) -> int:
        """The most shards any block of the current epoch spans (how many shards a reader keeps)."""
        return max((len(shards) for _, shards in self._blocks), default=1)

    def address(self, position: int) -> Address:
        epoch, offset = divmod(position, self.total)
        self._layout(epoch)
        block = int(np.searchsorted(self._block_starts, offset, side="right")) - 1
        start, shards = self._blocks[block]
        sizes = self.counts[shards]
        size = int(sizes.sum())
        within = offset - start
        if self.shuffle_block > 0:
            within = int(self._permutation(epoch, block, size)[within])
        ends = np.cumsum(sizes)
        index = int(np.searchsorted(ends, within, side="right"))
        ordinal = within - (int(ends[index - 1]) if index else 0)
        return Address(epoch, int(shards[index]), ordinal, epoch * self.total + start, size)

    def _layout(self, epoch: int) -> None:
        if self._epoch == epoch:
            return
        shard_order = seeded(self.seed, self.stream, epoch, 0).permutation(len(self.counts)) if len(self.counts) > 1 else np.arange(1)
        blocks, current, held, offset = [], [], 0, 0
        for shard in shard_order:
            current.append(shard)
            held += int(self.counts[shard])
            if held >= max(self.shuffle_block, 1) and held > 0:
                blocks.append((offset, np.asarray(current)))
                offset, current, held = offset + held, [], 0
        if current:
            if held == 0 and blocks:  # trailing empty shards join the last block
                blocks[-1] = (blocks[-1][0], np.concatenate([blocks[-1][1], current]))
            else:
                blocks.append((offset, np.asarray(current)))
        self._epoch, self._blocks = epoch, blocks
        self._block_starts = np.asarray([start for start, _ in blocks], dtype=np.int64)
        self._permutations.clear()

    def _permutation(self, epoch: int, block: int, size: int) -> np.ndarray:
        key = (epoch, block)
        if key not in self._permutations:
            if len(self._permutations) > 4:
                self._permutations.clear()
            self._permutations[key] = seeded(self.seed, self.stream, epoch, 1, block).permutation(size)
        return self._permutations[key]


@dataclass(frozen=True)
class ReadPlan:
    """Which positions one rank reads: from `start` (global position), micro-batches of `batch_size`, in
    steps of `world` x `batch_size`; `batches` micro-batches in all."""

    batches: int
    batch_size: int
    start: int = 0
    rank: int = 0
    world: int = 1

    def positions(self, batch: int) -> range:
        first = self.start + batch * self.world * self.batch_size + self.rank * self.batch_size
        return range(first, first + self.batch_size)
