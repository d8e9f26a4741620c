"""Resume cost on an object store next to the local disk: a run of 1,000 shards with 90% committed, then
`generate` resumes it. Reports the seconds to find the committed shards (`committed_shards`: two listings
and one batched read of the markers) and from calling `generate` to its first new image, local vs S3.

S3 is moto's server on 127.0.0.1 (a real S3 API over HTTP on loopback; a cloud bucket adds network latency
per request, which the batched marker read overlaps). The run is made once with the tiny model (1 sample per
shard, 1 step), copied to the bucket, and the last 10% of the markers removed from both copies.

Each scan is timed twice: with the marker snapshot the driver keeps (`index/markers.json`, one read) and
without it (every marker read, what a run made before the snapshot existed costs). `--scan-shards N` adds a
scan-only measurement on a synthetic run of N shards (marker, tar and index objects of consistent sizes;
uploading them takes minutes on moto, so it is off by default).

    python -m bench.bench_object_store [--shards 1000] [--scan-shards 10000]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from bench.bench_engine import TINY, build_model


def start_moto() -> object:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    return server


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--scan-shards", type=int, default=0, help="also time the scan of a synthetic run of this many shards on S3")
    args = parser.parse_args(argv)
    server = start_moto()  # before Ray starts, so its workers inherit the endpoint
    import fsspec
    import ray

    from bench.bench_engine import make_config
    from dreamshard.cluster import init_local_ray
    from dreamshard.engine.run import generate
    from dreamshard.format.store import Store

    root = Path(tempfile.mkdtemp(prefix="bench-store-"))
    init_local_ray(num_cpus=2)
    result = {}
    try:
        config = make_config(build_model(TINY, "tiny"), 64, 1, 1, args.shards, 1, workers=1)
        local = root / "run"
        started = time.perf_counter()
        assert generate(config, out=str(local), show_progress=False).ok
        print(f"made {args.shards} shards in {time.perf_counter() - started:.0f} s", flush=True)
        fs = fsspec.filesystem("s3", use_listings_cache=False)
        fs.mkdir("bench")
        fs.put(str(local), "bench/run", recursive=True)
        keep = int(args.shards * 0.9)
        urls = {"local": str(local), "s3": "s3://bench/run"}
        for name, url in urls.items():
            store = Store(url)
            for shard in range(keep, args.shards):
                store.remove(f"index/{shard:06d}.commit.json")
            scan_full = timed_scan(store, keep, use_snapshot=False)
            scan = timed_scan(store, keep, use_snapshot=True)
            summary = generate(config, out=url, show_progress=False)
            assert summary.ok and summary.shards_skipped == keep
            result[name] = {"scan_s": scan, "scan_full_s": scan_full, "first_image_s": summary.first_image_seconds, "wall_s": summary.wall_seconds}
            print(f"{name}: committed-shard scan {scan:.2f} s with the marker snapshot, {scan_full:.2f} s reading every marker; first new image after {summary.first_image_seconds:.1f} s, "
                  f"resume of {args.shards - keep} shards {summary.wall_seconds:.1f} s", flush=True)  # fmt: skip
        if args.scan_shards:
            result["synthetic"] = synthetic_scan(args.scan_shards)
    finally:
        ray.shutdown()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    local, s3 = result["local"], result["s3"]
    print(f"resume with {keep} of {args.shards} shards committed: first new image local {local['first_image_s']:.1f} s, "
          f"s3 {s3['first_image_s']:.1f} s (ratio {s3['first_image_s'] / local['first_image_s']:.2f}); committed-shard scan "
          f"local {local['scan_s']:.2f} s, s3 {s3['scan_s']:.2f} s (reading every marker: local {local['scan_full_s']:.2f} s, "
          f"s3 {s3['scan_full_s']:.2f} s)")  # fmt: skip
    return result


def timed_scan(store, expected: int, use_snapshot: bool) -> float:
    from dreamshard.format.reader import committed_shards

    started = time.perf_counter()
    found = committed_shards(store, 1, use_snapshot=use_snapshot)
    assert len(found) == expected, (store.url, len(found), expected)
    return time.perf_counter() - started


def synthetic_scan(shards: int) -> dict:
    """A run of `shards` one-sample shards on S3 whose files have the sizes their markers name (the scan
    reads sizes from listings, never the tars), 90% committed; the scan timed with and without snapshot."""
    import fsspec

    from dreamshard.format.layout import shard_marker, shard_parquet, shard_tar
    from dreamshard.format.rundir import RunDir
    from dreamshard.format.store import Store, json_bytes

    fs = fsspec.filesystem("s3", use_listings_cache=False)
    fs.mkdir("synthetic")
    store = Store("s3://synthetic/run")
    markers = {k: {"shard": k, "count": 1, "first_index": k, "last_index": k, "tar_bytes": 1024, "parquet_bytes": 512} for k in range(shards)}
    keep = int(shards * 0.9)
    started = time.perf_counter()
    files = {}
    for k, marker in markers.items():
        files[store.path(shard_tar(k))] = b"\0" * 1024
        files[store.path(shard_parquet(k))] = b"\0" * 512
        if k < keep:
            files[store.path(shard_marker(k))] = json_bytes(marker)
    fs.pipe(files)
    RunDir(store).write_snapshot(markers)
    print(f"synthetic: uploaded {len(files)} objects in {time.perf_counter() - started:.0f} s", flush=True)
    figures = {"shards": shards, "scan_s": timed_scan(store, keep, True), "scan_full_s": timed_scan(store, keep, False)}
    print(f"synthetic {shards} shards, {keep} committed, on S3: scan {figures['scan_s']:.2f} s with the marker snapshot, "
          f"{figures['scan_full_s']:.2f} s reading every marker", flush=True)  # fmt: skip
    return figures


if __name__ == "__main__":
    main()
