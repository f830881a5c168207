"""The serving costs of issue #30, without Ray: the decoder's timer-free batching, the decoder counters sent at a
low fixed rate, and the ingress's event loop kept free while answers carrying large media are built."""

from __future__ import annotations

import asyncio
import time

import pytest

from polymodal.modality import Modality
from services.deployments import DecoderServer
from services.protocol import RenderRequest
from services.workers import AdaptiveBatcher, check_batch_policy
from tests.serve_fakes import FakeDecoderStage, fake_stages

IMAGE = Modality.IMAGE


def test_adaptive_batcher_lone_call_starts_at_once_and_busy_time_forms_the_next_batch():
    calls: list[list[int]] = []

    async def run(items):
        calls.append(list(items))
        await asyncio.sleep(0.05)
        return [i * 10 for i in items]

    async def go():
        b = AdaptiveBatcher(run, max_batch_size=4)
        t = time.perf_counter()
        first = await b.submit(1)
        lone_s = time.perf_counter() - t
        # one call starts alone; six arrive while it runs: the next call takes 4, the one after the other 2
        results = await asyncio.gather(b.submit(2), *[_later(b, i) for i in range(3, 9)])
        return first, lone_s, results, b.batch_sizes

    first, lone_s, results, sizes = asyncio.run(go())
    assert first == 10 and lone_s < 0.05 + 0.04  # no timer: the run's own 50 ms and nothing like a batch wait
    assert results == [i * 10 for i in range(2, 9)]
    assert calls[0] == [1] and calls[1] == [2] and sizes == [1, 1, 4, 2]


async def _later(b: AdaptiveBatcher, i: int):
    await asyncio.sleep(0.01)  # arrives while the batch of item 2 runs
    return await b.submit(i)


def test_adaptive_batcher_drops_a_cancelled_queued_call_and_passes_errors_to_its_batch():
    seen: list[list[str]] = []

    async def run(items):
        seen.append(list(items))
        await asyncio.sleep(0.03)
        if "bad" in items:
            raise RuntimeError("boom")
        return items

    async def go():
        b = AdaptiveBatcher(run, max_batch_size=8)
        busy = asyncio.ensure_future(b.submit("busy"))
        await asyncio.sleep(0.005)
        gone = asyncio.ensure_future(b.submit("gone"))
        bad = asyncio.ensure_future(b.submit("bad"))
        await asyncio.sleep(0.005)
        gone.cancel()
        assert await busy == "busy"
        with pytest.raises(RuntimeError, match="boom"):
            await bad
        return await b.submit("after")

    assert asyncio.run(go()) == "after"
    assert seen == [["busy"], ["bad"], ["after"]]


def test_batch_policy_registry_lists_choices():
    assert check_batch_policy("adaptive") == "adaptive"
    with pytest.raises(ValueError, match="adaptive, timeout"):
        check_batch_policy("eager")
    preset, _, decoders = fake_stages((IMAGE,))
    with pytest.raises(ValueError, match="unknown batch policy"):
        DecoderServer(preset, "image", stage=decoders[IMAGE], batch_policy="eager")


class _Recorder:
    """Stands for the stats deployment's handle: ``report.remote(replica, modality, counters)``."""

    def __init__(self):
        self.reports: list[dict] = []
        self.report = self

    async def remote(self, replica, modality, counters):
        self.reports.append(dict(counters))


def test_decoder_counters_go_to_the_stats_deployment_at_a_low_fixed_rate_not_per_step():
    """40 denoising steps over ~0.4 s: with a 0.25 s period at most 2-3 reports (the old loop sent one per 0.2 s
    while steps ran, and one per batch), and the last report carries every step."""
    preset, _, _ = fake_stages((IMAGE,))
    stage = FakeDecoderStage(IMAGE, preset.decoders[IMAGE].defaults.model_copy(update={"num_inference_steps": 40}),
                             step_s=0.01)
    stats = _Recorder()
    server = DecoderServer(preset, "image", stage=stage, stats=stats, stats_period_s=0.25)

    async def go():
        from tests.serve_fakes import D_LLM
        import numpy as np

        from polymodal.types import SignalGroup

        g = SignalGroup(IMAGE, np.zeros((4, D_LLM), np.float32), np.zeros((4, D_LLM), np.float32), index=0,
                        text_offset=0)
        t = time.perf_counter()
        medium = await server.render(RenderRequest("r1", g, 7, stage.defaults))
        render_s = time.perf_counter() - t
        await asyncio.sleep(0.6)  # the next period sends the final counters
        return medium, render_s

    medium, render_s = asyncio.run(go())
    assert medium.seed == 7 and stage.steps == 40
    assert stats.reports and stats.reports[-1]["steps"] == 40 and stats.reports[-1]["batches"] == 1
    assert len(stats.reports) <= (render_s + 0.6) / 0.25 + 1
    assert len({r["steps"] for r in stats.reports}) == len(stats.reports)  # only sent when something changed
