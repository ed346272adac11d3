"""Offload in `/metrics`, through real HTTP: the offloaded layers and bytes, and the streamed-bytes counter
(whose `rate()` is the issue's "bytes streamed per second") agreeing with the streamer's own count."""

from __future__ import annotations

import httpx
from conftest import make_random_checkpoint
from live_server import sample, scrape, serve

from fitllm.config import EngineConfig
from fitllm.engine.async_engine import AsyncEngine

LAYERS = 4


def test_offload_metrics_count_what_the_streamer_streamed(tmp_path):
    folder = make_random_checkpoint(tmp_path, family="llama", num_hidden_layers=LAYERS)
    # Every layer offloaded at prefetch 1: more offloaded layers than staging buffers, so every step
    # streams every layer again (with a buffer per layer nothing would move after the first pass).
    config = EngineConfig(
        model=str(folder),
        dtype="float32",
        max_model_len=128,
        profile_workspace=False,
        cpu_offload_gb=1.0,
        offload_prefetch=1,
    )
    engine = AsyncEngine(config)
    with serve(engine, "tiny") as s:
        eng = engine.engine
        assert len(eng.placement.offloaded) == LAYERS and eng.streamer is not None
        body = {"prompt": "t5 t6 t7", "max_tokens": 4, "ignore_eos": True, "temperature": 0}
        assert httpx.post(f"{s.url}/v1/completions", json=body, timeout=60).status_code == 200
        first = scrape(s.url)
        streamed = sample(first, "fitllm_offload_streamed_bytes_total")
        # The request has finished and nothing else runs, so the streamer's count is still the scraped one.
        assert streamed > 0
        assert streamed == eng.streamer.stats.bytes_streamed
        assert streamed % eng.placement.layer_bytes == 0
        assert sample(first, "fitllm_offloaded_layers") == LAYERS
        assert sample(first, "fitllm_offloaded_bytes") == eng.placement.offloaded_bytes > 0
        assert sample(first, "fitllm_memory_bytes", tag="staging") == eng.placement.layer_bytes

        assert httpx.post(f"{s.url}/v1/completions", json=body, timeout=60).status_code == 200
        second = sample(scrape(s.url), "fitllm_offload_streamed_bytes_total")
        # Four more tokens: at least four passes, each streaming every offloaded layer.
        assert second - streamed >= 4 * eng.placement.offloaded_bytes
        assert second == eng.streamer.stats.bytes_streamed
