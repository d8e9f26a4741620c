"""How a shard's samples are drawn in pipeline calls, without a pipeline: the call groups, pooled redraws,
per-sample guidance, the auto shard size and what a plan says of the workers."""

from __future__ import annotations

import pytest
import torch

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

    calls = drain(ShardDraws(shard, 4, lambda spec: ()), reject)
    assert calls == drain(ShardDraws(shard, 4, lambda spec: ()), reject)  # the same calls every time
    assert [len(call) for call in calls] == [4, 4, 4, 4, 1]  # redraws ride in full calls; only the tail is short
    assert calls[2] == [(1, 2), (2, 2), (5, 2), (6, 2)]  # as soon as four redraws wait, they fill a call
    assert calls[3] == [(8, 1), (9, 1), (10, 1), (11, 1)] and calls[4] == [(9, 2)]
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
