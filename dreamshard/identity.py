"""Run identity: is this output the same run, and what changed? One answer for every stage that writes an
output (`generate`, `train`, `personalize`, `study`).

Settings are JSON values. `digest` is their short content address (sha256 of the canonical JSON); `flatten`
spells nested settings as dotted keys; `changes` names every key whose value differs, as
"key: OLD then, NEW now"; `describe` joins the first few of those into one message part.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SHOWN_CHANGES = 4  # differences spelled out in one message; the rest are counted


def digest(value: Any) -> str:
    """16 hex digits of the sha256 of `value` as canonical JSON (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as {"a.b.c": leaf}; an empty mapping and every non-mapping value is a leaf."""
    if isinstance(value, Mapping) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """'key: OLD then, NEW now' for each key whose value differs (a missing key reads as None): the keys of
    `new` in their order, then those only `old` has."""
    keys = list(new) + [key for key in old if key not in new]
    return [f"{key}: {old.get(key)!r} then, {new.get(key)!r} now" for key in keys if old.get(key) != new.get(key)]


def describe(changed: list[str], limit: int = SHOWN_CHANGES) -> str:
    """The first `limit` changes joined by '; ', and how many more there are."""
    more = f" (+{len(changed) - limit} more)" if len(changed) > limit else ""
    return "; ".join(changed[:limit]) + more


def settings_changes(old: Any, new: Any) -> list[str]:
    """`changes` between two nested settings, key by dotted key."""
    return changes(flatten(old), flatten(new))


@dataclass(frozen=True)
class Identity:
    """What must match for an output to be continued: named parts, each a JSON value. String parts are kept
    as they are (a fingerprint already); other parts are digested, and kept whole in records so that a
    refusal can name the keys that changed."""

    parts: dict[str, Any]

    @property
    def digests(self) -> dict[str, str]:
        return {name: value if isinstance(value, str) else digest(value) for name, value in self.parts.items()}

    @property
    def digest(self) -> str:
        return digest(self.digests)

    def changes_from(self, stored_digests: Mapping[str, Any], stored_parts: Mapping[str, Any]) -> list[str]:
        """One entry per part whose digest differs from the stored one: `name (key: OLD then, NEW now; ...)`
        when both sides keep the part whole, else `name (fingerprint OLD vs NEW)`."""
        differs = []
        for name, value in self.digests.items():
            if stored_digests.get(name) == value:
                continue
            old, new = stored_parts.get(name), self.parts.get(name)
            if isinstance(old, Mapping) and isinstance(new, Mapping):
                differs.append(f"{name} ({describe(changes(old, new), limit=len(new) + len(old))})")
            else:
                differs.append(f"{name} (fingerprint {stored_digests.get(name)} vs {value})")
        return differs
