"""Tools on a run directory (local path or fsspec URL): `inspect` (counts, run statistics, quality),
`verify` (the run against the data contract) and `preview` (a contact sheet) only read it; `repair` mends it
and `push` rewrites its dataset card before publishing it. They import the data contract (format/) and
nothing of the engine or the trainer, so they work on any run, however it was made."""

from __future__ import annotations

from pathlib import Path

from dreamshard.errors import UserError
from dreamshard.format.reader import BadRunRecord, checked_run_record
from dreamshard.format.store import Store


def open_run(out: str | Path) -> tuple[Store, dict]:
    """The run directory and its checked record; a problem is one UserError line."""
    store = Store(out)
    try:
        return store, checked_run_record(store)
    except FileNotFoundError:
        raise UserError(f"{out} is not a dreamshard run directory (no dreamshard.json); pass the output of `dreamshard generate`") from None
    except BadRunRecord as exc:
        raise UserError(f"{exc}; `dreamshard repair {out}` restores or rebuilds it") from None
