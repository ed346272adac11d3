"""`GET /metrics`: Prometheus text format through prometheus-client.

Gauges are read at scrape time by a custom collector from the async engine's latest status snapshot (the
ledger, the block pool, the scheduler and the totals, taken together on the engine thread after its last
step, so one scrape is consistent and never races a step); the time-to-first-token and
time-per-output-token histograms are observed by the engine thread as tokens are delivered. Each server
has its own registry (tests run several in one process).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fitllm.engine.async_engine import AsyncEngine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class EngineCollector(Collector):
    def __init__(self, engine: AsyncEngine) -> None:
        self.async_engine = engine

    def collect(self) -> Iterator:
        ae = self.async_engine
        yield GaugeMetricFamily(
            "fitllm_ready", "1 once the model is loaded and serving", value=1.0 if ae.ready else 0.0
        )
        snapshot = ae.status()
        if snapshot is None:
            return
        status, c = snapshot.engine, snapshot.counters
        snap = status.ledger
        for name, doc, value in (
            ("fitllm_memory_budget_bytes", "the --memory-budget in bytes", snap.budget),
            ("fitllm_memory_total_bytes", "bytes held on the compute device, all tags", snap.total),
            ("fitllm_memory_peak_total_bytes", "peak of the total", snap.peak_total),
            ("fitllm_kv_slabs", "live KV slabs", status.slabs),
            (
                "fitllm_offloaded_layers",
                "decoder layers streamed in before each use",
                status.offloaded_layers,
            ),
            (
                "fitllm_offloaded_bytes",
                "weight bytes kept off the device (file or host)",
                status.offloaded_bytes,
            ),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        for name, doc, label, values in (
            ("fitllm_memory_bytes", "bytes held on the compute device, by ledger tag", "tag", snap.current),
            (
                "fitllm_memory_peak_bytes",
                "peak bytes held, by ledger tag",
                "tag",
                {tag: snap.peak.get(tag, 0) for tag in snap.current},
            ),
            ("fitllm_kv_blocks", "KV blocks of the live slabs, by state", "state", status.kv_blocks),
            ("fitllm_requests", "requests by state", "state", status.requests),
        ):
            yield _labelled(GaugeMetricFamily(name, doc, labels=[label]), values)
        if status.devices:  # --layer-split: every device's own ledger
            per_device = GaugeMetricFamily(
                "fitllm_device_memory_bytes",
                "bytes held on each --layer-split device, by ledger tag (device: stage index:name)",
                labels=["device", "tag"],
            )
            budgets = GaugeMetricFamily(
                "fitllm_device_memory_budget_bytes", "each --layer-split device's budget", labels=["device"]
            )
            for device, ledger in status.devices:
                budgets.add_metric([device], ledger.budget)
                for tag, value in ledger.current.items():
                    per_device.add_metric([device, tag], value)
            yield per_device
            yield budgets
        for name, doc, value in (
            ("fitllm_preemptions", "requests preempted", status.preemptions),
            ("fitllm_prompt_tokens", "prompt tokens admitted", c.prompt_tokens),
            ("fitllm_generation_tokens", "tokens generated", c.generation_tokens),
            ("fitllm_engine_steps", "engine steps run", c.steps),
            ("fitllm_spec_decode_draft_tokens", "tokens proposed by speculation", status.spec_draft_tokens),
            (
                "fitllm_spec_decode_accepted_tokens",
                "proposed tokens accepted (over draft tokens: the acceptance rate)",
                status.spec_accepted_tokens,
            ),
            (
                "fitllm_offload_streamed_bytes",
                "weight bytes copied into staging (rate() gives bytes streamed per second)",
                status.bytes_streamed,
            ),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        finished = CounterMetricFamily(
            "fitllm_requests_finished", "finished requests by reason", labels=["reason"]
        )
        yield _labelled(finished, dict(c.requests_finished))
        reuse = CounterMetricFamily(
            "fitllm_prompt_tokens_by_source",
            "prompt tokens of finished requests by where their K/V came from: cached (prefix cache), shifted "
            "(context shift), from_host (host cache tier), prefilled (computed)",
            labels=["source"],
        )
        yield _labelled(reuse, dict(c.prompt_reuse))
        yield CounterMetricFamily(
            "fitllm_context_shift_unsupported_requests",
            "requests that wanted a context shift the model cannot do (trimmed in large steps instead)",
            value=c.context_shift_unsupported,
        )


def _labelled(family, values: dict):
    """`family` with one sample per (label value, number) of `values`."""
    for key, value in values.items():
        family.add_metric([key], value)
    return family


class ServerMetrics:
    """The registry of one server: engine gauges plus latency histograms."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        self.ttft = Histogram(
            "fitllm_time_to_first_token_seconds",
            "arrival to first token",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "fitllm_time_per_output_token_seconds",
            "time between output tokens",
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        engine.on_token_timing = self.observe

    def observe(self, kind: str, seconds: float) -> None:
        (self.ttft if kind == "ttft" else self.tpot).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
