"""Exceptions raised by the engine. The HTTP layer maps them to status codes (429, 400/422, 503)."""

from __future__ import annotations


class EngineError(RuntimeError):
    """Base class of every engine error."""


class QueueFull(EngineError):
    """The waiting queue is at its bound: back-pressure, the caller should retry later (HTTP 429)."""


class AdapterError(EngineError, ValueError):
    """An adapter cannot be served by this engine: wrong base model, rank above the slots, unknown target modules,
    missing or misshapen tensors."""


class RequestError(EngineError, ValueError):
    """A request is invalid: empty prompt, bad sampling parameters, prompt + max_tokens beyond the model's context."""


class RequestTooLarge(RequestError):
    """A request whose KV cache (prompt + max_tokens) could never fit the engine's memory budget (HTTP 413)."""


class EngineClosed(EngineError):
    """The engine was closed before or while the request ran."""


class NoFreeSlot(EngineError):
    """Every LoRA slot is pinned by a running request; the scheduler keeps the request waiting."""
