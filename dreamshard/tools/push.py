"""`dreamshard push`: publish a run directory as a Hugging Face Hub dataset (or a personalised model as a
Hub model), or copy what would be published into a local folder.

A dataset push uploads the dataset card (README.md, written first from the committed samples), dreamshard.json
and the committed shards only (a shard still being written, or un-committed, is left out); `manifest.parquet`
and `shards/sizes.json` go too once the run is complete, since they describe every shard. The upload is
`huggingface_hub`'s `upload_folder` restricted to exactly those files: with hf_xet it streams, commits large
folders in several parts and resumes when re-run (committed files skipped, uploaded data deduplicated).
`--dry-run` stops before the network: it writes and checks the card and lists what would go. A target that
is a local path (`./dir`, `/abs/dir`, `file://...`) receives a copy of the same files: a repository's
contents as the Hub would hold them, which `load_dataset(dir)` reads (the tests use it; the Hub itself is not
reachable from them).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from dreamshard.errors import UserError, one_line
from dreamshard.format.card import CARD, dataset_card
from dreamshard.format.layout import MANIFEST, RUN_RECORD, SIZES, shard_tar
from dreamshard.format.reader import committed_rows, committed_shards, manifest_rows
from dreamshard.tools import open_run

MODEL_FILES = ("model_index.json", "dreamshard_lora.json")  # what marks a personalised output (full / LoRA)
MODEL_KEPT_HERE = ("class_images",)  # top-level folders of a personalised output that stay local (and checkpoint-*)


@dataclass
class PushReport:
    source: str
    target: str
    kind: str  # "dataset" or "model"
    files: list[str] = field(default_factory=list)  # paths relative to the source, as in the repository
    bytes: int = 0
    samples: int = 0
    complete: bool = True  # every planned shard committed
    uploaded: bool = False  # False on --dry-run
    url: str = ""


def is_local_target(target: str) -> bool:
    return target.startswith(("/", "./", "../", "~", "file://")) or target in (".", "..")


def push(source: str, target: str, dry_run: bool = False, private: bool = False, revision: str | None = None, token: str | None = None) -> PushReport:
    folder = local_folder(source)
    if any((folder / name).is_file() for name in MODEL_FILES):
        report = model_report(folder, target)
    else:
        report = dataset_report(source, folder, target)
    if dry_run:
        return report
    if is_local_target(target):
        copy_files(folder, report)
    else:
        upload(folder, report, private, revision, token)
    report.uploaded = True
    return report


def local_folder(source: str) -> Path:
    if "://" in source and not source.startswith("file://"):
        raise UserError(f"{source}: push uploads a local directory; copy the run to this machine first (e.g. `aws s3 sync {source} ./run`)")
    folder = Path(source.removeprefix("file://")).expanduser()
    if not folder.is_dir():
        raise UserError(f"{source} is not a directory; pass a run directory written by `dreamshard generate` or an output of `dreamshard personalize`")
    return folder


def dataset_report(source: str, folder: Path, target: str) -> PushReport:
    """Write the card of the committed samples and list the files to publish."""
    store, record = open_run(folder)
    committed = committed_shards(store, record["samples_per_shard"])
    if not committed:
        raise UserError(f"{source} has no committed shards yet; run `dreamshard generate` first")
    try:
        rows = manifest_rows(committed_rows(store, committed))
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise UserError(f"{source}: an index file of a committed shard is unreadable ({one_line(exc)}); run `dreamshard verify {source}`") from None
    repo = None if is_local_target(target) else target
    store.write_bytes(CARD, dataset_card(record, rows, repo).encode())
    check_card(folder / CARD, "dataset")
    complete = len(committed) == record["num_shards"]
    files = [CARD, RUN_RECORD] + [shard_tar(shard) for shard in sorted(committed)]
    files += [name for name in (MANIFEST, SIZES) if complete and store.exists(name)]
    report = PushReport(source, target, "dataset", files, samples=len(rows), complete=complete)
    report.bytes = sum((folder / name).stat().st_size for name in files)
    return report


def model_report(folder: Path, target: str) -> PushReport:
    """A personalised output: its weights, manifests and model card (checkpoints and class images stay)."""
    if not (folder / CARD).is_file():
        raise UserError(f"{folder} has no model card ({CARD}); it is written when `dreamshard personalize` finishes: finish or re-run it first")
    check_card(folder / CARD, "model")
    files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file() and published(path.relative_to(folder)))
    report = PushReport(str(folder), target, "model", files)
    report.bytes = sum((folder / name).stat().st_size for name in files)
    return report


def published(relative: Path) -> bool:
    """A personalised output's file that goes to the Hub: not a checkpoint, class image, lease or partial file."""
    top = relative.parts[0]
    return not (top.startswith("checkpoint-") or top in MODEL_KEPT_HERE or any(part.startswith(".") for part in relative.parts))


def check_card(path: Path, kind: str) -> None:
    """The card parses as huggingface_hub's card (YAML header and all); the Hub's own validation runs at upload."""
    from huggingface_hub import DatasetCard, ModelCard

    try:
        card = (DatasetCard if kind == "dataset" else ModelCard).load(path)
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: the {kind} card does not parse ({one_line(exc)}); delete it and re-run") from None
    if kind == "dataset" and not card.data.to_dict().get("configs"):
        raise UserError(f"{path}: the dataset card has no configs entry; delete it and re-run")


def copy_files(folder: Path, report: PushReport) -> None:
    """The files into a local folder, as a repository would hold them; files already there with the same size
    are kept (a re-run resumes)."""
    destination = Path(report.target.removeprefix("file://")).expanduser()
    if destination.resolve() == folder.resolve():
        raise UserError(f"{report.target} is the source itself; push to another folder or a Hub repository")
    for name in report.files:
        source, target = folder / name, destination / name
        if target.is_file() and target.stat().st_size == source.stat().st_size and name != CARD:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        shutil.copyfile(source, partial)
        partial.replace(target)
    report.url = str(destination)


def upload(folder: Path, report: PushReport, private: bool, revision: str | None, token: str | None) -> None:
    """create_repo, the Hub's card validation, then upload_folder of exactly the listed files."""
    from huggingface_hub import DatasetCard, HfApi, ModelCard
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(report.target, repo_type=report.kind, private=private, exist_ok=True)
        (DatasetCard if report.kind == "dataset" else ModelCard).load(folder / CARD).validate(repo_type=report.kind)
        info = api.upload_folder(
            repo_id=report.target, folder_path=folder, repo_type=report.kind, revision=revision, allow_patterns=report.files,
            commit_message=f"dreamshard push: {report.samples or len(report.files)} {'samples' if report.kind == 'dataset' else 'files'}",
        )  # fmt: skip
    except HfHubHTTPError as exc:
        raise PushFailed(
            f"the Hub refused the push to {report.target} ({one_line(exc, limit=200)}); check the repository id and `hf auth login`, then re-run"
        ) from None
    except Exception as exc:  # the network boundary: httpx's connection errors, the card's validation (ValueError), ...
        raise PushFailed(
            f"push to {report.target} failed ({type(exc).__name__}: {one_line(exc, limit=200)}); check the network and HF_ENDPOINT, then re-run (it resumes)"
        ) from None
    report.url = str(getattr(info, "commit_url", "") or f"https://huggingface.co/{'datasets/' if report.kind == 'dataset' else ''}{report.target}")


class PushFailed(UserError):
    exit_code = 1  # the input was fine; the Hub could not be reached or refused
