"""Shared helpers of the benchmark scripts: the ``bench`` preset, an own local Ray cluster, timing
statistics, the printed table and the JSON file.

Every script is run from the repository root as ``.venv/bin/python bench/NAME.py [--quick] [--out FILE]``.
Ratios are always measured side by side in the same run (the machine may be shared and noisy) with the
same torch thread count on both sides: Ray gives a replica with fractional ``num_cpus`` one thread
(``OMP_NUM_THREADS=1``), so the in-process side calls ``torch.set_num_threads(1)`` as well.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/NAME.py` puts bench/ first on the path, not the repo root
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Loading weights" bars between table rows
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from polymodal.config import DecoderDefaults, PresetConfig  # noqa: E402
from polymodal.modality import Modality  # noqa: E402
from polymodal.presets import get_preset  # noqa: E402

BENCH_PROMPT = "draw a red fox in the snow"
BENCH_STEPS = 24  # denoising steps of the bench preset: one text+image request takes about 0.5 s on one CPU thread


def bench_preset(
    *, num_inference_steps: int = BENCH_STEPS, size_px: int = 32, max_new_tokens: int = 16, name: str = "bench"
) -> PresetConfig:
    """``tiny`` with more denoising steps (24 instead of 2) so that one image request takes about 0.5 s on one
    CPU thread: the serving overhead is then measured against work of a realistic share, not against a
    few milliseconds. Every decoder gets the same steps and size; answers are capped at
    ``max_new_tokens``."""
    base = get_preset("tiny")
    decoders = {
        m: d.model_copy(update={"defaults": d.defaults.model_copy(
            update={"num_inference_steps": num_inference_steps, "height_px": size_px, "width_px": size_px})})
        for m, d in base.decoders.items()
    }
    # Q set explicitly: a YAML round trip (how Serve replicas get the preset) marks every field as set, and an
    # output projector's unset num_queries (1) would then disagree with the decoder's Q.
    out_proj = {m: c.model_copy(update={"num_queries": decoders[m].cond_tokens})
                for m, c in base.output_projectors.items() if m in decoders}
    return base.model_copy(update={
        "name": name,
        "output_projectors": {**base.output_projectors, **out_proj},
        "description": f"tiny with {num_inference_steps} denoising steps at {size_px}px (benchmarks)",
        "decoders": decoders,
        "generation": base.generation.model_copy(update={"max_new_tokens": max_new_tokens}),
    })


def write_preset(preset: PresetConfig, directory: str | Path) -> Path:
    """Write ``preset`` as YAML (what ``AppArgs.preset`` / ``serve_main`` accept) -> the file path."""
    path = Path(directory) / f"{preset.name}.yaml"
    path.write_text(preset.to_yaml())
    return path


def one_thread() -> None:
    """The in-process side runs with one torch thread, as a fractional-CPU Ray replica does."""
    import torch

    torch.set_num_threads(1)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a few iterations only (smoke test, figures are rough)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p


def stats_s(samples: Sequence[float]) -> dict[str, float]:
    """p50 / p95 / mean / min of latencies in seconds (nearest-rank p95; ``n`` samples)."""
    xs = sorted(samples)
    if not xs:
        raise ValueError("no samples")
    p95 = xs[max(0, math.ceil(0.95 * len(xs)) - 1)]
    return {"n": len(xs), "p50_s": statistics.median(xs), "p95_s": p95, "mean_s": statistics.fmean(xs),
            "min_s": xs[0]}


def ratio(a: float, b: float) -> float:
    return float("nan") if b == 0 else a / b


def machine() -> dict[str, Any]:
    """Context of the figures: CPU count, load average, versions."""
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    info: dict[str, Any] = {
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu_count": os.cpu_count(),
        "loadavg_1_5_15": [round(x, 2) for x in load],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def fmt(x: Any) -> str:
    if isinstance(x, float):
        if x != x:
            return "nan"
        return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"
    return str(x)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], file=None) -> None:
    """A plain aligned text table."""
    file = file or sys.stdout
    cells = [list(map(str, headers))] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    print(f"\n{title}", file=file)
    for k, r in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if k and i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))),
              file=file)
        if k == 0:
            print("  " + "  ".join("-" * w for w in widths), file=file)
    file.flush()


def finish(results: dict[str, Any], out: Path | None) -> None:
    """Print the JSON path (if any) and write the results there."""
    results.setdefault("machine", machine())
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str))
        print(f"\nwrote {out}")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (:func:`services.run.free_port`)."""
    from services.run import free_port as free

    return free("127.0.0.1")


_DIRECT_PORT: int | None = None  # the port the ingress replica serves itself (direct ingress), inside ray_cluster


@contextlib.contextmanager
def ray_cluster(num_cpus: int | None = None, *, one_app: bool = True) -> Iterator[None]:
    """Our own local Ray cluster (own temp dir, no dashboard), shut down on exit; never ``ray stop``. Serve runs as
    under ``polymodal serve``: throughput-optimised, and the (one) ingress replica answers HTTP itself on a free
    port (:func:`services.run.own_cluster_serve_env`; ``RAY_SERVE_ENABLE_DIRECT_INGRESS=0``: through the proxy).
    ``one_app=False`` for benches that run several applications side by side (each application's ingress would
    claim a port of its own): Serve's proxy, as ``polymodal serve`` with several ingress replicas."""
    import ray

    global _DIRECT_PORT
    temp_dir = tempfile.mkdtemp(prefix="pm-bench-", dir="/tmp" if os.path.isdir("/tmp") else None)
    os.environ.pop("RAY_ADDRESS", None)
    from services.run import own_cluster_serve_env, scoped_env

    port = free_port()
    direct, env = own_cluster_serve_env(port, one_ingress=one_app)
    with scoped_env(env):
        ray.init(address="local", num_cpus=num_cpus or max(2, os.cpu_count() or 2), _temp_dir=temp_dir,
                 include_dashboard=False, namespace="polymodal-bench", logging_level="warning",
                 log_to_driver=os.environ.get("POLYMODAL_BENCH_RAY_LOGS") == "1")
    _DIRECT_PORT = port if direct else None
    try:
        yield
    finally:
        _DIRECT_PORT = None
        try:
            from ray import serve

            serve.shutdown()
        except Exception as e:  # noqa: BLE001 - best effort on the way out
            print(f"bench: serve shutdown: {e}", file=sys.stderr)
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def serve_http(port: int) -> str:
    """Start Serve's HTTP proxy on ``127.0.0.1:port`` (:func:`services.run.start_serve`) -> base URL."""
    from services.run import start_serve

    start_serve("127.0.0.1", port)
    return f"http://127.0.0.1:{port}"


def deploy(app_args, what: str, timeout_s: float = 600.0) -> tuple[str, float]:
    """Inside :func:`ray_cluster`: start Serve (its HTTP proxy on a free port), deploy the whole graph of
    ``services.app:app_builder(app_args)`` and wait for ``/ready`` -> (base URL: the ingress replica's own port
    with direct ingress, else the proxy's; seconds until ready).

    Raises:
        TimeoutError: not ready in ``timeout_s``.
    """
    from ray import serve

    from services.app import app_builder

    t = time.perf_counter()
    url = serve_http(free_port())  # with direct ingress: Serve's head-node proxy, beside the ingress replica's port
    if _DIRECT_PORT is not None:
        url = f"http://127.0.0.1:{_DIRECT_PORT}"
    print(f"Ray Serve graph: deploying {what} ...", flush=True)
    serve.run(app_builder(app_args), name="polymodal", route_prefix="/", blocking=False)
    wait_ready(url, timeout_s=timeout_s)
    ready_s = time.perf_counter() - t
    print(f"ready after {ready_s:.1f} s", flush=True)
    return url, ready_s


def wait_ready(url: str, timeout_s: float = 600.0) -> None:
    """Poll ``GET /ready`` until 200.

    Raises:
        TimeoutError: not ready in time.
    """
    import httpx

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/ready", timeout=30)
            if r.status_code == 200:
                return
            last = r.text[:300]
        except httpx.HTTPError as e:
            last = str(e)
        time.sleep(1.0)
    raise TimeoutError(f"the service at {url} was not ready after {timeout_s:.0f} s: {last}")


def chat_body(model: str, *, seed: int, modalities: Sequence[str] = ("image",), max_tokens: int = 16,
              prompt: str = BENCH_PROMPT) -> dict[str, Any]:
    """The OpenAI chat body of the benchmark request (the in-process side makes the same request)."""
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "modalities": list(modalities),
            "seed": seed, "max_tokens": max_tokens}


# ---- reading answers (the shape of services/ingress/__init__.py: "The answer's shape") ----------------------
ANSWER_FIELD = {"image": "images", "audio": "audios", "video": "videos", "object3d": "objects3d"}
"""The message array that holds each modality's media (``[{"type": "image_url", "image_url": {"url"}}]``; the spec's
``answer_field``)."""


def as_dict(message: Any) -> dict[str, Any]:
    """A chat answer's ``message`` as a dict: the JSON body's dict, or the OpenAI client's object (its extra fields
    such as ``images``, ``parts`` and ``boxes`` kept: ``model_dump`` includes them)."""
    if isinstance(message, dict):
        return message
    if hasattr(message, "model_dump"):
        return message.model_dump(warnings=False)
    raise TypeError(f"not a chat message: {type(message).__name__}")


def answer_text(message: Any) -> str:
    """The answer's words: the text parts of ``message.parts`` joined by spaces (``content`` without its media
    references), or ``content`` when there are no parts."""
    msg = as_dict(message)
    parts = msg.get("parts")
    if isinstance(parts, list):
        return " ".join(p.get("text", "") for p in parts if isinstance(p, dict) and p.get("type") == "text").strip()
    return (msg.get("content") or "").strip()


def answer_media(message: Any, modality: str) -> list[str]:
    """The URLs (data URLs with the default ``media_format``) of the answer's media of one modality, in order."""
    key = f"{modality}_url"
    return [item[key]["url"] for item in as_dict(message).get(ANSWER_FIELD[modality]) or []]


__all__ = [
    "ANSWER_FIELD", "BENCH_PROMPT", "DecoderDefaults", "Modality", "ROOT", "answer_media", "answer_text", "as_dict",
    "base_parser", "bench_preset", "chat_body",
    "finish", "free_port", "machine", "one_thread", "print_table", "ratio", "ray_cluster", "serve_http",
    "stats_s", "wait_ready", "write_preset",
]
