"""AdapterCache: memory LRU -> Redis -> regenerate, with single-flight generation.

Redis holds safetensors bytes whose header carries a checksum (see ``generator.adapter``); bytes are verified before
use and a corrupted entry is deleted and regenerated, never served. When Redis stops answering, the cache keeps
serving from memory and regeneration, marks Redis down (``icm_lora_redis_up`` 0) and tries it again after a short
back-off, so it comes back by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError

from generator.adapter import AdapterIntegrityError, GeneratedAdapter
from service.metrics import ServiceMetrics

log = logging.getLogger(__name__)

Tier = Literal["memory", "redis", "generated"]
Generate = Callable[[], Awaitable[GeneratedAdapter]]


class RedisTier:
    """Adapter bytes in Redis, tolerant of outages: every failure marks Redis down for ``retry_after_s``."""

    def __init__(
        self, redis: Redis, prefix: str, ttl_s: int, metrics: ServiceMetrics, retry_after_s: float = 1.0
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.metrics = metrics
        self.retry_after_s = retry_after_s
        self._down_until = 0.0
        self.up = True
        metrics.redis_up.set(1)

    def key(self, adapter_id: str) -> str:
        return f"{self.prefix}:adapter:{adapter_id}"

    def _mark(self, up: bool, error: BaseException | None = None) -> None:
        if up != self.up:
            log.warning("redis is %s%s", "back" if up else "down", f": {error}" if error else "")
        self.up = up
        self.metrics.redis_up.set(1 if up else 0)
        if not up:
            self._down_until = time.monotonic() + self.retry_after_s

    @property
    def available(self) -> bool:
        return self.up or time.monotonic() >= self._down_until

    async def _call(self, awaitable: Awaitable[Any]) -> Any:
        try:
            result = await awaitable
        except (RedisError, OSError) as exc:
            self._mark(False, exc)
            raise
        self._mark(True)
        return result

    async def ping(self) -> bool:
        try:
            await self._call(self.redis.ping())
            return True
        except (RedisError, OSError):
            return False

    async def get(self, adapter_id: str) -> bytes | None:
        if not self.available:
            return None
        try:
            return await self._call(self.redis.get(self.key(adapter_id)))
        except (RedisError, OSError):
            return None

    async def put(self, adapter_id: str, data: bytes) -> None:
        if not self.available:
            return
        with contextlib.suppress(RedisError, OSError):
            await self._call(self.redis.set(self.key(adapter_id), data, ex=self.ttl_s))

    async def delete(self, adapter_id: str) -> bool:
        """True when Redis held the adapter (False also when Redis is down)."""
        if not self.available:
            return False
        with contextlib.suppress(RedisError, OSError):
            return bool(await self._call(self.redis.delete(self.key(adapter_id))))
        return False


class AdapterCache:
    def __init__(self, memory_size: int, metrics: ServiceMetrics, redis: RedisTier | None = None) -> None:
        self.memory_size = memory_size
        self.metrics = metrics
        self.redis = redis
        self._memory: OrderedDict[str, GeneratedAdapter] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[GeneratedAdapter]] = {}

    def _remember(self, adapter: GeneratedAdapter) -> None:
        self._memory[adapter.adapter_id] = adapter
        self._memory.move_to_end(adapter.adapter_id)
        while len(self._memory) > self.memory_size:
            self._memory.popitem(last=False)

    def in_memory(self, adapter_id: str) -> bool:
        """Whether the memory tier holds the adapter (not counted as a lookup)."""
        return adapter_id in self._memory

    async def lookup(self, adapter_id: str) -> tuple[GeneratedAdapter, Tier] | None:
        """Memory, then Redis (verified). Never generates."""
        adapter = self._memory.get(adapter_id)
        if adapter is not None:
            self._memory.move_to_end(adapter_id)
            self.metrics.cache.labels("memory", "hit").inc()
            return adapter, "memory"
        self.metrics.cache.labels("memory", "miss").inc()
        if self.redis is None:
            return None
        data = await self.redis.get(adapter_id)
        if data is None:
            self.metrics.cache.labels("redis", "miss" if self.redis.up else "error").inc()
            return None
        try:
            adapter = GeneratedAdapter.from_safetensors_bytes(data, expected_id=adapter_id)
        except AdapterIntegrityError as exc:
            log.warning("dropping corrupted cache entry %s: %s", adapter_id, exc)
            self.metrics.cache.labels("redis", "corrupt").inc()
            await self.redis.delete(adapter_id)
            return None
        self.metrics.cache.labels("redis", "hit").inc()
        self._remember(adapter)
        return adapter, "redis"

    async def get_or_create(self, adapter_id: str, generate: Generate) -> tuple[GeneratedAdapter, Tier]:
        """The adapter from the first tier that has it, else generated once however many callers ask at once."""
        found = await self.lookup(adapter_id)
        if found is not None:
            return found
        pending = self._inflight.get(adapter_id)
        if pending is not None:
            return await asyncio.shield(pending), "generated"
        future: asyncio.Future[GeneratedAdapter] = asyncio.get_running_loop().create_future()
        self._inflight[adapter_id] = future
        try:
            adapter = await generate()
            if adapter.adapter_id != adapter_id:
                raise RuntimeError("generated adapter id does not match the requested id")
            self._remember(adapter)
            if self.redis is not None:
                await self.redis.put(adapter_id, adapter.to_safetensors_bytes())
            future.set_result(adapter)
            return adapter, "generated"
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            del self._inflight[adapter_id]

    async def drop(self, adapter_id: str) -> bool:
        """Remove the adapter from every tier; True when one of them held it."""
        held = self._memory.pop(adapter_id, None) is not None
        if self.redis is not None:
            held = await self.redis.delete(adapter_id) or held
        return held
