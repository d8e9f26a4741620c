"""`python -m bench [NAME ...]` (`make bench`): run every `bench/bench_*.py` module's `main()`, or only
those whose name contains one of NAME (e.g. `python -m bench engine`). Each prints its figures; the
results go to docs/benchmarks.md by hand, with the command that reproduced them."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path


def main(names: list[str]) -> None:
    modules = sorted(path.stem for path in Path(__file__).parent.glob("bench_*.py"))
    chosen = [m for m in modules if not names or any(name in m for name in names)]
    if not chosen:
        sys.exit(f"no benchmark matches {names}; available: {', '.join(modules)}")
    for module in chosen:
        print(f"== {module}", flush=True)
        started = time.perf_counter()
        importlib.import_module(f"bench.{module}").main([])
        print(f"== {module} done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
