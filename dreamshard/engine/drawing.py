"""Drawing one shard's samples in full pipeline calls.

Calls are formed across the whole shard from the samples that can share one (same steps and size, guidance
on or off, and in conditioned modes the same strength: `generation.call_key` plus the mode's own key), so a
guidance range or per-domain strengths still fill every call but the last of each group. Within a group,
samples go in plan order.

Quality filters redraw from a pool: a rejected sample's next draw (its seed stream's next seed,
`quality.attempt_seed`) joins the group's redraw queue; a call takes `batch_size` redraws as soon as that
many wait, else the next samples in plan order topped up with waiting redraws. In a group's tail, when no
sample in plan order is left and fewer redraws wait than the call holds, the call is filled with the
following draws of the same samples' seed streams, drawn ahead: each sample keeps the first of its draws,
in seed-stream order, that passes, exactly as if they had been drawn one call after another (the draws
after it are dropped). So redraws ride in full calls, and the calls a shard makes depend only on the shard,
the config and the verdicts: a re-run makes the same calls and the same images. Every image of a call is
scored in one batched forward (engine/quality.py).

Around the calls: the sources of the next samples load on a thread pool while the current call runs; labels
are finished (resized, encoded) on the writer thread; under run.compile a short call is padded to the batch
size, so the compiled shapes never change (the padding images are dropped). Every second of a shard is
counted in `CallStats` (inside pipeline calls, scoring, waiting for sources), which the shard's marker keeps.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

from PIL import Image

from dreamshard.engine.generation import Drawn, SampleStamp, call_key, takes_per_sample_guidance, txt2img
from dreamshard.engine.plan import SampleSpec
from dreamshard.engine.quality import QualityJudge, Verdict, attempt_seed
from dreamshard.format.shards import ShardSample

SOURCE_LOADERS = 4  # threads loading sources (PIL decodes with the GIL released)


class BatchMaker(Protocol):
    """What a mode gives the draw loop: an extra call key, per-sample inputs (loaded off the generating
    thread) and the call itself."""

    def key(self, spec: SampleSpec) -> tuple: ...

    def prepare(self, spec: SampleSpec) -> Any: ...

    def generate(self, pipe, specs: list[SampleSpec], prepared: list[Any], stamp: SampleStamp, **sampler) -> Drawn: ...


class PromptsOnly:
    """txt2img: nothing to prepare, nothing more to match."""

    def key(self, spec: SampleSpec) -> tuple:
        return ()

    def prepare(self, spec: SampleSpec) -> None:
        return None

    def generate(self, pipe, specs: list[SampleSpec], prepared: list[Any], stamp: SampleStamp, **sampler) -> Drawn:
        return txt2img(pipe, specs, stamp, **sampler)


@dataclass
class CallStats:
    """Where one shard's time went (the `generation` entry of its marker)."""

    calls: int = 0  # pipeline calls
    images: int = 0  # images drawn in them (redraws included, padding not)
    padded: int = 0  # padding images (run.compile: every call has batch_size images)
    pipeline_s: float = 0.0  # inside pipeline calls (with stochastic inversion, the inversion's UNet call too)
    scoring_s: float = 0.0  # CLIP score, safety checker, blank test
    waiting_s: float = 0.0  # waiting for sources that were not loaded ahead
    seconds: float = 0.0  # the whole shard, from its first call to its last sample

    def as_dict(self) -> dict:
        return {name: round(value, 4) if isinstance(value, float) else value for name, value in asdict(self).items()}


@dataclass(frozen=True)
class Pending:
    spec: SampleSpec  # the plan's spec
    attempt: int  # 1: its plan seed


class ShardDraws:
    """The order of one shard's draws: groups of specs that can share a call, each worked through before the
    next, in calls of `batch_size` (see the module docstring for the redraw rule)."""

    def __init__(self, specs: list[SampleSpec], batch_size: int, key: Callable[[SampleSpec], tuple], max_attempts: int = 1) -> None:
        self.batch_size, self.key, self.max_attempts = batch_size, key, max_attempts
        self.fresh: dict[tuple, deque[Pending]] = {}
        for spec in specs:
            self.fresh.setdefault(key(spec), deque()).append(Pending(spec, 1))
        self.redraws: dict[tuple, deque[Pending]] = {group: deque() for group in self.fresh}
        self.next_attempt: dict[int, int] = {spec.index: 2 for spec in specs}  # the next draw of each seed stream

    def next_call(self) -> list[Pending]:
        """The next call's draws ([] when the shard is done)."""
        for group, fresh in self.fresh.items():
            redraws = self.redraws[group]
            if len(redraws) >= self.batch_size or (redraws and not fresh):
                call = [redraws.popleft() for _ in range(min(self.batch_size, len(redraws)))]
                return call + self._ahead(call, self.batch_size - len(call)) if not fresh else call
            if fresh:
                call = [fresh.popleft() for _ in range(min(self.batch_size, len(fresh)))]
                return call + [redraws.popleft() for _ in range(min(self.batch_size - len(call), len(redraws)))]
        return []

    def redraw(self, pending: Pending) -> None:
        """Queue the next draw of a rejected sample whose later draws are not drawn yet."""
        index = pending.spec.index
        if self.next_attempt[index] == pending.attempt + 1 <= self.max_attempts:
            self.redraws[self.key(pending.spec)].append(Pending(pending.spec, pending.attempt + 1))
            self.next_attempt[index] += 1

    def _ahead(self, call: list[Pending], room: int) -> list[Pending]:
        """The tail: `room` further draws of the call's samples, one sample after another in turn."""
        extra: list[Pending] = []
        specs = [pending.spec for pending in call]
        while room and specs:
            for spec in list(specs):
                attempt = self.next_attempt[spec.index]
                if attempt > self.max_attempts:
                    specs.remove(spec)
                    continue
                extra.append(Pending(spec, attempt))
                self.next_attempt[spec.index], room = attempt + 1, room - 1
                if not room:
                    break
        return extra

    def upcoming(self) -> list[SampleSpec]:
        """The specs of the group's next fresh call (sources to load ahead)."""
        for fresh in self.fresh.values():
            if fresh:
                return [pending.spec for pending in list(fresh)[: self.batch_size]]
        return []


class Sources:
    """Per-sample inputs loaded on a thread pool ahead of their call, kept until the sample is final."""

    def __init__(self, maker: BatchMaker, pool: ThreadPoolExecutor | None) -> None:
        self.maker, self.pool = maker, pool
        self.loads: dict[int, Future] = {}  # sample index -> its inputs

    def request(self, specs: list[SampleSpec]) -> None:
        for spec in specs:
            if spec.index not in self.loads:
                self.loads[spec.index] = self._submit(spec)

    def get(self, specs: list[SampleSpec]) -> list[Any]:
        self.request(specs)
        return [self.loads[spec.index].result() for spec in specs]

    def release(self, spec: SampleSpec) -> None:
        self.loads.pop(spec.index, None)

    def _submit(self, spec: SampleSpec) -> Future:
        if self.pool is None:
            future: Future = Future()
            future.set_result(self.maker.prepare(spec))
            return future
        return self.pool.submit(self.maker.prepare, spec)


class ShardDrawer:
    """Draws shards with one pipeline and one mode (a worker keeps one): `draw(specs)` yields each sample once
    it is final (not in plan order: the shard writer puts them back in order)."""

    def __init__(self, pipe, maker: BatchMaker, stamp: SampleStamp, batch_size: int, judge: QualityJudge | None, pad: bool, sampler: dict) -> None:
        self.pipe, self.maker, self.stamp, self.batch_size = pipe, maker, stamp, batch_size
        self.judge, self.pad, self.sampler = judge, pad, sampler
        self.per_sample_guidance = takes_per_sample_guidance(pipe)
        self.max_attempts = judge.max_attempts if judge is not None else 1
        self.pool = None if isinstance(maker, PromptsOnly) else ThreadPoolExecutor(SOURCE_LOADERS, thread_name_prefix="source-loader")

    def key(self, spec: SampleSpec) -> tuple:
        return (*call_key(spec, self.per_sample_guidance), *self.maker.key(spec))

    def draw(self, specs: list[SampleSpec], stats: CallStats, tally: Counter) -> Iterator[ShardSample]:
        started = time.perf_counter()
        draws, sources = ShardDraws(specs, self.batch_size, self.key, self.max_attempts), Sources(self.maker, self.pool)
        kept: dict[int, tuple[ShardSample, Verdict | None]] = {}
        final: set[int] = set()
        while call := draws.next_call():
            waited = time.perf_counter()
            prepared = sources.get([pending.spec for pending in call])
            sources.request(draws.upcoming())  # the next call's sources load while this one runs
            stats.waiting_s += time.perf_counter() - waited
            samples, verdicts = self._call(call, prepared, stats)
            tally["draws"] += len(samples)
            # Each sample's draws in seed-stream order (a call may hold several of one sample in the tail).
            for pending, sample, verdict in sorted(zip(call, samples, verdicts), key=lambda drawn: (drawn[0].spec.index, drawn[0].attempt)):
                index = pending.spec.index
                if index in final:
                    tally["dropped"] += 1  # drawn ahead, after the draw the sample keeps
                    continue
                if index not in kept or _better(verdict, kept[index][1]):
                    kept[index] = (sample, verdict)
                if verdict is not None and verdict.reasons:
                    tally.update(verdict.reasons)
                    if pending.attempt < self.max_attempts:
                        draws.redraw(pending)
                        continue
                    tally["exhausted"] += 1
                final.add(index)
                sources.release(pending.spec)
                yield self._final(*kept.pop(index), attempts=pending.attempt)
        stats.seconds += time.perf_counter() - started

    def _call(self, call: list[Pending], prepared: list[Any], stats: CallStats) -> tuple[list[ShardSample], list[Verdict | None]]:
        """One pipeline call (padded under compile) and the verdicts on its images."""
        specs = [replace(pending.spec, seed=attempt_seed(pending.spec.seed, pending.attempt)) for pending in call]
        padding = self.batch_size - len(specs) if self.pad else 0
        started = time.perf_counter()
        drawn = self.maker.generate(self.pipe, specs + [specs[-1]] * padding, prepared + [prepared[-1]] * padding, self.stamp, **self.sampler)
        scored = time.perf_counter()
        stats.calls, stats.images, stats.padded = stats.calls + 1, stats.images + len(specs), stats.padded + padding
        stats.pipeline_s += scored - started
        samples, pixels = drawn.samples[: len(specs)], drawn.pixels[: len(specs)]
        for sample in samples:  # a run fact (index Parquet only): the call's seconds per image
            sample.metadata["seconds"] = round((scored - started) / len(specs), 4)
        if self.judge is None:
            return samples, [None] * len(samples)
        verdicts: list[Verdict | None] = list(self.judge.judge_batch(pixels, [sample.metadata["prompt"] for sample in samples]))
        stats.scoring_s += time.perf_counter() - scored
        return samples, verdicts

    def _final(self, sample: ShardSample, verdict: Verdict | None, attempts: int) -> ShardSample:
        """The kept draw with its quality fields (a flagged image that is kept becomes a black frame, as the
        pipeline's own checker makes it)."""
        if verdict is None:
            return sample
        sample.metadata.update(nsfw=verdict.nsfw, clip_score=verdict.clip_score, attempts=attempts)
        if verdict.nsfw:
            sample.image = Image.new("RGB", sample.image.size)
        return sample


def _better(verdict: Verdict | None, kept: Verdict | None) -> bool:
    """Whether a later draw replaces the kept one (ties keep the earlier)."""
    return verdict is not None and kept is not None and verdict.rank() > kept.rank()
