"""Engine test helpers: tiny adapters, reference generations from plain transformers/peft, an engine per test."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
from peft import PeftModel

from generator.adapter import GeneratedAdapter
from generator.base_model import load_base_model
from generator.config import LoraSettings
from generator.lora_layout import LoraLayout
from service.engine import Engine, EngineConfig, EngineObserver, GenerationResult, kv_cache

PROMPTS = (
    "Input: cat Output:",
    "hello world, the answer is",
    "a",
    "Task: reverse the words of the sentence. Input: red green blue Output:",
)

MakeAdapter = Callable[..., GeneratedAdapter]


@pytest.fixture(autouse=True)
def nan_filled_kv_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The KV cache leaves new buffers uninitialised and writes every position before exposing it; here they start
    as NaN, so that any read of an unwritten position turns the tokens (or scores) of every engine test into NaN."""
    monkeypatch.setattr(kv_cache, "_fresh", lambda like, *shape: like.new_full(shape, float("nan")))


Reference = Callable[[Sequence[int], GeneratedAdapter | None, int], list[int]]


@functools.cache
def tiny_layout(settings: LoraSettings) -> LoraLayout:
    return LoraLayout.from_model(load_base_model("tiny").model, settings)


def make_adapter(seed: int, settings: LoraSettings | None = None, scale: float = 0.5) -> GeneratedAdapter:
    """A random adapter for the tiny model; B is non-zero so it changes the output."""
    settings = settings or LoraSettings()
    layout = tiny_layout(settings)
    vector = torch.randn(layout.dim, generator=torch.Generator().manual_seed(seed)) * scale
    return GeneratedAdapter(layout.unflatten(vector), settings, "tiny:0", f"adapter-{seed}-r{settings.rank}")


@pytest.fixture(scope="session")
def adapter() -> MakeAdapter:
    return make_adapter


@pytest.fixture(scope="session")
def tokenizer():  # type: ignore[no-untyped-def]
    return load_base_model("tiny").tokenizer


@pytest.fixture(scope="session")
def prompt_ids(tokenizer) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """Greedy tokens from ``generate(do_sample=False)`` of a fresh tiny model, wrapped by plain peft when an adapter
    is given: the ground truth the engine must reproduce."""
    models: dict[str | None, torch.nn.Module] = {}
    memo: dict[tuple[tuple[int, ...], str | None, int], list[int]] = {}

    def model_for(adapter: GeneratedAdapter | None) -> torch.nn.Module:
        key = None if adapter is None else adapter.adapter_id
        if key not in models:
            model = load_base_model("tiny").model
            if adapter is not None:
                folder = adapter.save_peft(tmp_path_factory.mktemp("peft") / "adapter")
                model = PeftModel.from_pretrained(model, folder)
            model.eval()
            models[key] = model
        return models[key]

    def generate(ids: Sequence[int], adapter: GeneratedAdapter | None, max_new_tokens: int) -> list[int]:
        key = (tuple(ids), None if adapter is None else adapter.adapter_id, max_new_tokens)
        if key not in memo:
            model = model_for(adapter)
            input_ids = torch.tensor([list(ids)])
            with torch.inference_mode():
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                )
            memo[key] = out[0, len(ids) :].tolist()
        return memo[key]

    return generate


class RecordingObserver(EngineObserver):
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.batch_sizes: list[int] = []

    def on_swap(self, adapter_id: str, slot: int, seconds: float, evicted: str | None) -> None:
        self.events.append(("swap", (adapter_id, slot, evicted)))

    def on_batch(self, size: int) -> None:
        self.batch_sizes.append(size)

    def on_request_done(self, result: GenerationResult) -> None:
        self.events.append(("done", result.request_id))


class StepObserver(RecordingObserver):
    """Records the order of prefill passes (with their token counts) and decode steps."""

    def on_prefill(self, rows: int, tokens: int, seconds: float) -> None:
        self.events.append(("prefill", (rows, tokens)))

    def on_batch(self, size: int) -> None:
        super().on_batch(size)
        self.events.append(("decode", size))


@pytest.fixture
def observer() -> RecordingObserver:
    return RecordingObserver()


@pytest.fixture
def make_engine(observer: RecordingObserver) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def build(**config: object) -> Engine:
        engine = Engine(load_base_model("tiny"), EngineConfig(**config), observer)  # type: ignore[arg-type]
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        engine.close()


@pytest.fixture
def engine(make_engine: Callable[..., Engine]) -> Engine:
    return make_engine(num_slots=4)
