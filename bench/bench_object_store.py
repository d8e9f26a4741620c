"""Resume cost on an object store next to the local disk: a run of 1,000 shards with 90% committed, then
`generate` resumes it. Reports the seconds to find the committed shards (`committed_shards`: two listings
and one batched read of the markers) and from calling `generate` to its first new image, local vs S3.

S3 is moto's server on 127.0.0.1 (a real S3 API over HTTP on loopback; a cloud bucket adds network latency
per request, which the batched marker read overlaps). The run is made once with the tiny model (1 sample per
shard, 1 step), copied to the bucket, and the last 10% of the markers removed from both copies.

    python -m bench.bench_object_store [--shards 1000]
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
    args = parser.parse_args(argv)
    server = start_moto()  # before Ray starts, so its workers inherit the endpoint
    import fsspec
    import ray

    from bench.bench_engine import make_config
    from dreamshard.cluster import init_local_ray
    from dreamshard.engine.run import generate
    from dreamshard.format.reader import committed_shards
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
            started = time.perf_counter()
            found = committed_shards(store, 1)
            scan = time.perf_counter() - started
            assert len(found) == keep, (name, len(found))
            summary = generate(config, out=url, show_progress=False)
            assert summary.ok and summary.shards_skipped == keep
            result[name] = {"scan_s": scan, "first_image_s": summary.first_image_seconds, "wall_s": summary.wall_seconds}
            print(f"{name}: committed-shard scan {scan:.2f} s, first new image after {summary.first_image_seconds:.1f} s, "
                  f"resume of {args.shards - keep} shards {summary.wall_seconds:.1f} s", flush=True)  # fmt: skip
    finally:
        ray.shutdown()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    local, s3 = result["local"], result["s3"]
    print(f"resume with {keep} of {args.shards} shards committed: first new image local {local['first_image_s']:.1f} s, "
          f"s3 {s3['first_image_s']:.1f} s (ratio {s3['first_image_s'] / local['first_image_s']:.2f}); committed-shard scan "
          f"local {local['scan_s']:.2f} s, s3 {s3['scan_s']:.2f} s")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
