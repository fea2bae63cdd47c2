"""Every Prometheus metric of the service, defined once, in a registry per app (so tests can run several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # no *_created series: they double the output and no dashboard reads them

PREFIX = "icm_lora_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServiceMetrics:
    """``redis_up`` exists only when Redis is configured, so a dashboard never shows a Redis that is not used."""

    def __init__(self, redis_configured: bool = False) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}requests", "HTTP requests", ["route", "status"], registry=r)
        self.request_seconds = Histogram(
            f"{PREFIX}request_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.generation_seconds = Histogram(
            f"{PREFIX}adapter_generation_seconds",
            "Adapter generation time by stage (encode, decode, total)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache = Counter(f"{PREFIX}adapter_cache", "Adapter cache lookups", ["tier", "result"], registry=r)
        self.self_checks = Counter(
            f"{PREFIX}adapter_self_checks",
            "Self-checks of generated adapters by outcome (passed, fallback, kept, refined, unchecked)",
            ["outcome"],
            registry=r,
        )
        self.refinements = Counter(
            f"{PREFIX}adapter_refinements",
            "Adapter refinements by result (done, failed, rejected)",
            ["result"],
            registry=r,
        )
        for outcome in ("passed", "fallback", "kept", "refined", "unchecked"):  # every series exists from the start
            self.self_checks.labels(outcome)
        for result in ("done", "failed", "rejected"):
            self.refinements.labels(result)
        self.swaps = Counter(f"{PREFIX}adapter_swaps", "Adapters copied into an engine slot", registry=r)
        self.swap_seconds = Histogram(
            f"{PREFIX}adapter_swap_seconds",
            "Time to copy an adapter into a slot",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1),
            registry=r,
        )
        self.preparations = Counter(
            f"{PREFIX}adapter_preparations",
            "Adapters checked and laid out for the engine's slots (once per adapter id while the engine keeps it)",
            registry=r,
        )
        self.prefix_cache = Counter(
            f"{PREFIX}prefix_cache",
            "Chat prompts that start with the chat template's opening: read after its cached keys and values (hit) "
            "or in full (miss)",
            ["result"],
            registry=r,
        )
        for result in ("hit", "miss"):
            self.prefix_cache.labels(result)
        self.prefill_chunks = Counter(
            f"{PREFIX}prefill_chunks",
            "Chunks of long prompts read between decode steps: in a decode step's forward pass (fused=true) or in a"
            " pass of their own",
            ["fused"],
            registry=r,
        )
        for fused in ("true", "false"):
            self.prefill_chunks.labels(fused)
        self.spec_writes = Counter(
            f"{PREFIX}adapter_spec_writes", "Adapter specs written to the task store", registry=r
        )
        self.download_builds = Counter(
            f"{PREFIX}adapter_download_builds",
            "Download bodies built (zip or safetensors); each adapter's is built once and then served from memory",
            ["format"],
            registry=r,
        )
        for fmt in ("zip", "safetensors"):  # both series exist from the start
            self.download_builds.labels(fmt)
        self.adapters_resident = Gauge(f"{PREFIX}adapters_resident", "Adapters resident in engine slots", registry=r)
        self.tokens_generated = Counter(f"{PREFIX}tokens_generated", "Completion tokens generated", registry=r)
        self.time_to_first_token = Histogram(
            f"{PREFIX}time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            f"{PREFIX}batch_size", "Rows per decode step", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.queue_depth = Gauge(f"{PREFIX}queue_depth", "Requests waiting for the engine", registry=r)
        self.queue_capacity = Gauge(f"{PREFIX}queue_capacity", "Engine queue size (max_queue)", registry=r)
        self.slots = Gauge(f"{PREFIX}slots", "LoRA slots in the resident model (num_slots)", registry=r)
        self.packed_weights_bytes = Gauge(
            f"{PREFIX}packed_weights_bytes",
            "Memory of the oneDNN-packed copies of the Linear weights (0: generation on the plain weights)",
            registry=r,
        )
        self.redis_up = Gauge(
            f"{PREFIX}redis_up", "1 when Redis answers, 0 when not", registry=r if redis_configured else None
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
