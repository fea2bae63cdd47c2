"""Multi-LoRA serving engine: one resident base model, LoRA slots, mixed-adapter batches, hot swap, streaming.

Imports no HTTP, Redis or Prometheus code; the service wraps it (``EngineObserver`` hooks, ``Engine.stats``).
"""

from service.engine.config import EngineConfig
from service.engine.engine import Arrival, Engine
from service.engine.errors import (
    AdapterError,
    EngineClosed,
    EngineError,
    NoFreeSlot,
    QueueFull,
    RequestError,
    RequestTooLarge,
)
from service.engine.hidden import EngineHiddenStateReader
from service.engine.lora_layers import LoraBank, PreparedAdapter, SlottedLoraLinear
from service.engine.observer import EngineObserver, EngineStats
from service.engine.requests import GenerationResult, RequestHandle, StreamDelta
from service.engine.sampling import SamplingParams
from service.engine.slots import SlotLease, SlotTable

__all__ = [
    "AdapterError",
    "Arrival",
    "Engine",
    "EngineClosed",
    "EngineConfig",
    "EngineError",
    "EngineHiddenStateReader",
    "EngineObserver",
    "EngineStats",
    "GenerationResult",
    "LoraBank",
    "NoFreeSlot",
    "PreparedAdapter",
    "QueueFull",
    "RequestError",
    "RequestHandle",
    "RequestTooLarge",
    "SamplingParams",
    "SlotLease",
    "SlotTable",
    "SlottedLoraLinear",
    "StreamDelta",
]
