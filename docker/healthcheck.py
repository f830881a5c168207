#!/usr/bin/env python3
"""Container health probe: exit 0 when ``GET URL`` answers 2xx, else 1 (stdlib only).

``polymodal-healthcheck`` probes ``http://127.0.0.1:PORT/health`` with PORT the one the entrypoint served
(``$TMPDIR/polymodal.port``), else ``$POLYMODAL_PORT``, else 8000. ``polymodal-healthcheck URL`` probes that
URL [URL ...]`` probes those URLs instead, each must answer 2xx (the Kubernetes probes of
``deploy/rayservice.yaml`` use it for Ray's own health endpoints).
"""

import os
import sys
import urllib.error
import urllib.request


def default_url() -> str:
    port = os.environ.get("POLYMODAL_PORT", "8000")
    try:
        with open(os.path.join(os.environ.get("TMPDIR", "/tmp"), "polymodal.port")) as f:
            port = f.read().strip() or port
    except OSError:
        pass
    return f"http://127.0.0.1:{port}/health"


def probe(url: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 - a local probe URL
            print(f"{url}: {r.status}")
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError) as e:
        print(f"{url}: {e}", file=sys.stderr)
        return False


def main() -> int:
    urls = sys.argv[1:] or [default_url()]
    timeout_s = float(os.environ.get("POLYMODAL_HEALTH_TIMEOUT_S", "5"))
    return 0 if all(probe(u, timeout_s) for u in urls) else 1


if __name__ == "__main__":
    sys.exit(main())
