"""The run record `generate` would write, rebuilt from a config for `dreamshard repair --config`, once the
committed shards are shown to be that config's."""

from __future__ import annotations

import json

from dreamshard.config import GenerateConfig
from dreamshard.engine.conditioned import conditioner_for
from dreamshard.engine.models import model_identity
from dreamshard.engine.plan import Plan, build_plan
from dreamshard.engine.records import checked_counts, resolved_config, run_identity, run_record
from dreamshard.errors import UserError
from dreamshard.format.reader import committed_shards, read_markers, read_shard, shard_size_of
from dreamshard.format.store import Store
from dreamshard.identity import changes, describe


def record_for(config: GenerateConfig, out: str) -> dict:
    """The run record `generate` would write for `config` at `out` (dreamshard repair --config), once the shards
    there are shown to be this config's: each committed shard's first sample has the plan's prompt and class
    and the weights' hash. The shard size comes from the shards themselves when the config says auto."""
    shard_size = shard_size_of(read_markers(Store(out)))
    given = config.output.samples_per_shard
    if given not in ("auto", shard_size):
        raise UserError(f"{out}: its shards hold {shard_size} samples each, the config {given}; repair with the config the run was made with")
    config = resolved_config(config, out, None)
    config.output.samples_per_shard = shard_size
    counts = checked_counts(config)
    plan = build_plan(config.prompts, config.sampling, config.run.seed)
    conditioner = conditioner_for(config)
    model_info = model_identity(config.model)
    check_made_by(Store(out), plan, model_info, shard_size)
    return run_record(config, plan, counts, run_identity(config, plan, model_info, conditioner), model_info, None)


def check_made_by(store: Store, plan: Plan, model_info: dict, shard_size: int) -> None:
    """UserError unless the first sample of every committed shard matches the plan and the weights."""
    for shard in sorted(committed_shards(store, shard_size, use_snapshot=False)):
        key, fields = next(iter(read_shard(store, shard)))
        meta = json.loads(fields["json"])
        spec = plan.spec(meta["index"])
        if spec.template and ("{classes}" in spec.template or "{least_class}" in spec.template):
            expected = {"template": spec.template, "class_name": spec.class_name}
        else:
            expected = {"prompt": spec.prompt, "class_name": spec.class_name}
        expected["model hash"] = model_info["hash"]
        found = {name: meta.get(name) for name in expected if name != "model hash"} | {"model hash": (meta.get("model") or {}).get("hash")}
        if found != expected:
            raise UserError(f"{store.url}: sample {key} was not made by this config ({describe(changes(found, expected))}); repair with the run's own config")
