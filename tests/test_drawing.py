"""How a shard's samples are drawn in pipeline calls, without a pipeline: the call groups, pooled redraws,
per-sample guidance, the auto shard size and what a plan says of the workers."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from dreamshard.config import GenerateConfig
from dreamshard.engine.drawing import Pending, ShardDraws
from dreamshard.engine.dryrun import worker_load
from dreamshard.engine.generation import PerSampleGuidance, call_key, guidance_argument
from dreamshard.engine.plan import build_plan
from dreamshard.engine.records import auto_shard_size, call_groups


def specs(n: int, guidance=(3.0, 9.0), steps=4):
    config = GenerateConfig.model_validate({"sampling": {"width": 64, "height": 64, "steps": steps, "guidance_scale": guidance}})
    return build_plan(config.prompts, config.sampling, 0).specs(0, n)


def drain(draws: ShardDraws, reject=lambda pending: False) -> list[list[tuple[int, int]]]:
    """Every call of a shard as [(index, attempt), ...], rejecting what `reject` says."""
    calls = []
    while call := draws.next_call():
        calls.append([(pending.spec.index, pending.attempt) for pending in call])
        for pending in call:
            if reject(pending):
                draws.redraw(pending)
    return calls


def test_a_guidance_range_fills_every_call_in_plan_order():
    shard = specs(10)
    assert len({spec.guidance_scale for spec in shard}) == 10  # a range: every sample has its own scale
    calls = drain(ShardDraws(shard, 4, lambda spec: call_key(spec, per_sample_guidance=True)))
    assert [len(call) for call in calls] == [4, 4, 2] and [index for call in calls for index, _ in call] == list(range(10))
    by_value = drain(ShardDraws(shard, 4, lambda spec: call_key(spec, per_sample_guidance=False)))  # a pipeline that needs one scale
    assert [len(call) for call in by_value] == [1] * 10


def test_groups_are_called_separately_and_guidance_on_and_off_never_mix():
    shard = specs(12, guidance=(0.0, 4.0))
    sides = {spec.index: spec.guidance_scale > 1 for spec in shard}
    calls = drain(ShardDraws(shard, 4, lambda spec: call_key(spec, per_sample_guidance=True)))
    assert all(len({sides[index] for index, _ in call}) == 1 for call in calls)
    assert sorted(index for call in calls for index, _ in call) == list(range(12))
    strengths = {spec.index: 0.9 if spec.index % 3 == 0 else 0.6 for spec in shard}  # a conditioned mode's own key
    calls = drain(ShardDraws(shard, 4, lambda spec: (spec.steps, strengths[spec.index])))
    assert [len(call) for call in calls] == [4, 4, 4] or sorted(len(call) for call in calls) == [4, 4, 4]
    assert all(len({strengths[index] for index, _ in call}) == 1 for call in calls)


def test_redraws_are_pooled_into_full_calls_deterministically():
    shard = specs(12, guidance=5.0)
    rejected = {1, 2, 5, 6, 9}  # rejected at their first draw, accepted at the second

    def reject(pending: Pending) -> bool:
        return pending.attempt == 1 and pending.spec.index in rejected

    calls = drain(ShardDraws(shard, 4, lambda spec: (), max_attempts=5), reject)
    assert calls == drain(ShardDraws(shard, 4, lambda spec: (), max_attempts=5), reject)  # the same calls every time
    assert [len(call) for call in calls] == [4, 4, 4, 4, 4]  # redraws ride in full calls, the tail too
    assert calls[2] == [(1, 2), (2, 2), (5, 2), (6, 2)]  # as soon as four redraws wait, they fill a call
    assert calls[3] == [(8, 1), (9, 1), (10, 1), (11, 1)]
    assert calls[4] == [(9, 2), (9, 3), (9, 4), (9, 5)]  # the tail: sample 9's next draws, ahead of its verdicts
    assert sorted(index for call in calls for index, attempt in call if attempt == 2) == sorted(rejected)


def test_per_sample_guidance_scales_each_sample_and_one_scale_stays_a_float():
    assert guidance_argument(specs(3, guidance=7.5)) == 7.5 and type(guidance_argument(specs(3, guidance=7.5))) is float
    guidance = guidance_argument(specs(3))
    assert isinstance(guidance, PerSampleGuidance) and guidance > 1 and float(guidance) == max(guidance.scales)
    difference = torch.ones(3, 4, 2, 2, dtype=torch.float16)
    scaled = guidance * difference
    assert scaled.dtype == torch.float16 and [float(scaled[i, 0, 0, 0]) for i in range(3)] == pytest.approx(guidance.scales, abs=1e-2)
    one = PerSampleGuidance([7.5, 7.5])
    assert torch.equal(one * difference[:2].float(), 7.5 * difference[:2].float())  # what the plain float computes
    assert guidance * 2 == 2 * float(guidance)  # not a per-sample tensor: a float


def test_auto_shard_size_gives_a_large_cluster_work_and_calls_stay_full():
    datum = GenerateConfig.model_validate({"run": {"num_samples": 2975, "batch_size": 8}})
    assert auto_shard_size(datum) == 16 and -(-2975 // 16) >= 64  # 186 shards: work for 64 GPUs
    big = GenerateConfig.model_validate({"run": {"num_samples": 1_000_000, "batch_size": 8}})
    assert auto_shard_size(big) == 1000
    zodi = GenerateConfig.model_validate({
        "mode": "controlnet_seg", "run": {"num_samples": 14875, "batch_size": 4},
        "condition": {"strength_by_style": {"a": 0.9, "b": 0.65, "c": 0.65, "d": 0.6}},
    })  # fmt: skip
    assert call_groups(zodi) == 4 and auto_shard_size(zodi) == 59  # strengths 0.9 / 0.65 / 0.6 (+ none)
    ranges = GenerateConfig.model_validate({"sampling": {"steps": [20, 24], "guidance_scale": [0.5, 3]}, "run": {"num_samples": 100, "batch_size": 2}})
    assert call_groups(ranges) == 10 and auto_shard_size(ranges) == 40
    assert auto_shard_size(GenerateConfig.model_validate({"run": {"num_samples": 5}})) == 5


def test_what_a_plan_says_of_the_workers():
    assert "every worker has work (186 shards in 3 round(s); the last round keeps 58 of 64 busy" in worker_load(186, 64)
    assert "only 6 have a shard to make, 58 take backup copies" in worker_load(6, 64)


class FakeMaker:
    """A mode whose images are one grey value per draw: the seed's last digit x 20."""

    def key(self, spec):
        return ()

    def prepare(self, spec):
        return None

    def generate(self, pipe, specs, prepared, stamp, **sampler):
        from dreamshard.engine.generation import Drawn
        from dreamshard.format.shards import ShardSample

        values = [20 * (spec.seed % 10) for spec in specs]
        pixels = torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 4, 4, 3).contiguous()
        samples = [
            ShardSample({"index": spec.index, "seed": spec.seed, "prompt": spec.prompt}, Image.new("RGB", (4, 4), (value,) * 3))
            for spec, value in zip(specs, values)
        ]
        return Drawn(samples, pixels)


class DarkJudge:
    """Rejects images darker than 100 (a stand-in for a CLIP threshold)."""

    max_attempts = 6

    def judge_batch(self, pixels, prompts):
        from dreamshard.engine.quality import Verdict

        return [Verdict(None, float(p.float().mean()), False, ("clip_score",) if p.float().mean() < 100 else ()) for p in pixels]


def test_draws_made_ahead_keep_what_one_call_after_another_keeps():
    """The shard's samples under a filter: each keeps the first draw of its seed stream that passes (the
    sequential rule), whatever the calls held; the calls stay full to the end."""
    from collections import Counter

    from dreamshard.engine.drawing import CallStats, ShardDrawer
    from dreamshard.engine.quality import attempt_seed

    shard = specs(10, guidance=5.0)
    drawer = ShardDrawer(None, FakeMaker(), stamp=None, batch_size=4, judge=DarkJudge(), pad=False, sampler={})
    drawer.per_sample_guidance = True
    stats, tally = CallStats(), Counter()
    kept = {sample.metadata["index"]: sample.metadata for sample in drawer.draw(shard, stats, tally)}
    assert sorted(kept) == list(range(10))
    for spec in shard:
        stream = [attempt_seed(spec.seed, attempt) for attempt in range(1, 7)]
        passing = [attempt for attempt, seed in enumerate(stream, start=1) if 20 * (seed % 10) >= 100]
        expected = passing[0] if passing else 6  # exhausted: the best (brightest) draw, counted as 6 attempts
        assert kept[spec.index]["attempts"] == expected, spec.index
        if passing:
            assert kept[spec.index]["seed"] == stream[expected - 1]
    assert stats.images == tally["draws"] and stats.images / stats.calls > 0.9 * 4  # full calls, the tail too
