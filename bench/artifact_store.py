"""Artifact store: what one request pays for the store's size (``FileStore.reserve``, ``fulfil``, ``lookup``).

Run from the repository root::

    .venv/bin/python bench/artifact_store.py [--quick] [--sizes 0,100,1000,3000] [--out store.json]

Every generated medium is reserved in the store when its signal group closes and written when its render ends, on
the ingress's event loop (small files) or a thread (large ones). Until issue #30's profile, each reservation also
swept the store by reading every record: 75.6 ms per request with 3,000 stored artifacts (an hour at ~1 request/s
with the default TTL), 15.8 ms with 1,000, growing linearly. The sweep now runs in a background thread at most every
``sweep_every_s``; this bench prints the per-call latency at several store sizes, so the flat line stays flat.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default="0,100,1000,3000", help="comma-separated numbers of stored artifacts")
    p.add_argument("--calls", type=int, default=50, help="timed calls per operation and size (--quick: 10)")
    args = p.parse_args(argv)
    try:
        sizes = [int(x) for x in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes: comma-separated integers, got {args.sizes!r}")
    if any(n < 0 for n in sizes):
        p.error("--sizes: numbers of artifacts are >= 0")
    calls = 10 if args.quick else args.calls

    from services.store import FileStore

    png = b"\x89PNG" + bytes(2000)  # a 32 px PNG's size
    rows, results = [], {"benchmark": "artifact_store", "calls": calls, "sizes": []}
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="pm-bench-store-") as d:
            store = FileStore(d, ttl_s=3600)
            for _ in range(n):
                store.put(png, "image/png", "png")
            timed: dict[str, list[float]] = {"reserve": [], "fulfil": [], "lookup": []}
            for _ in range(calls):
                t = time.perf_counter()
                art = store.reserve("image/png", "png")
                timed["reserve"].append(time.perf_counter() - t)
                t = time.perf_counter()
                store.fulfil(art, png, "image/png", "png")
                timed["fulfil"].append(time.perf_counter() - t)
                t = time.perf_counter()
                store.lookup(art.id)
                timed["lookup"].append(time.perf_counter() - t)
            st = {k: C.stats_s(v) for k, v in timed.items()}
            results["sizes"].append({"stored": n, "latency": st})
            rows.append([n] + [1000 * st[k]["p50_s"] for k in timed] + [1000 * st["reserve"]["p95_s"]])
    C.print_table(f"Artifact store, ms per call (p50 of {calls}; a 2 KB file)",
                  ["stored artifacts", "reserve", "fulfil", "lookup", "reserve p95"], rows)
    C.finish(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
