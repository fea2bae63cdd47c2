"""AdapterCache: memory LRU -> Redis -> regenerate, with single-flight generation (in this process, and across
every replica on one Redis: a Redis lock per adapter id, so N replicas asked for one new adapter generate it once).

Redis holds safetensors bytes whose header carries a checksum (see ``generator.adapter``); bytes are verified before
use and a corrupted entry is deleted and regenerated, never served. When Redis stops answering, the cache keeps
serving from memory and regeneration, marks Redis down (``icm_lora_redis_up`` 0) and tries it again after a short
back-off, so it comes back by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Literal

from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError, RedisError

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

    async def existing(self, adapter_ids: Sequence[str]) -> set[str]:
        """Those of ``adapter_ids`` Redis holds, in one round trip (none while Redis is down)."""
        if not adapter_ids or not self.available:
            return set()
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for adapter_id in adapter_ids:
                    pipe.exists(self.key(adapter_id))
                found = await self._call(pipe.execute())
        except (RedisError, OSError):
            return set()
        return {i for i, n in zip(adapter_ids, found, strict=True) if n}

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

    def lock(self, adapter_id: str) -> Lock:
        """The cross-replica generation lock of an adapter id. It expires ``LOCK_TTL_S`` after its last extension,
        so a replica that dies while generating holds the others up for that long at most."""
        return self.redis.lock(f"{self.prefix}:lock:adapter:{adapter_id}", timeout=LOCK_TTL_S, sleep=LOCK_POLL_S)


LOCK_TTL_S = 30.0  # extended every LOCK_TTL_S / 3 while the holder generates
LOCK_POLL_S = 0.05


@contextlib.asynccontextmanager
async def held(lock: Lock) -> AsyncIterator[None]:
    """Keep ``lock`` (acquired) alive while the body runs, then release it."""

    async def keep_alive() -> None:
        while True:
            await asyncio.sleep(LOCK_TTL_S / 3)
            await lock.extend(LOCK_TTL_S, replace_ttl=True)

    extender = asyncio.create_task(keep_alive())
    try:
        yield
    finally:
        extender.cancel()
        with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
            await extender
        with contextlib.suppress(LockError, RedisError, OSError):
            await lock.release()


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

    async def held(self, adapter_ids: Sequence[str]) -> set[str]:
        """Those of ``adapter_ids`` a tier holds (Redis's copies are verified when read, not here)."""
        in_memory = {i for i in adapter_ids if i in self._memory}
        rest = [i for i in adapter_ids if i not in in_memory]
        return in_memory | (await self.redis.existing(rest) if self.redis is not None and rest else set())

    async def lookup(self, adapter_id: str, count: bool = True) -> tuple[GeneratedAdapter, Tier] | None:
        """Memory, then Redis (verified). Never generates. ``count``: record the lookup in the cache metrics (not
        for the polls of a replica waiting for another one's generation)."""
        adapter = self._memory.get(adapter_id)
        if adapter is not None:
            self._memory.move_to_end(adapter_id)
            if count:
                self.metrics.cache.labels("memory", "hit").inc()
            return adapter, "memory"
        if count:
            self.metrics.cache.labels("memory", "miss").inc()
        if self.redis is None:
            return None
        data = await self.redis.get(adapter_id)
        if data is None:
            if count:
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
            adapter, tier = await self._create_once(adapter_id, generate)
            future.set_result(adapter)
            return adapter, tier
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            del self._inflight[adapter_id]

    async def _create_once(self, adapter_id: str, generate: Generate) -> tuple[GeneratedAdapter, Tier]:
        """Generate under the adapter's Redis lock; while another replica holds it, wait for its result in Redis.
        Without Redis (or while it is down) this process generates on its own."""
        redis = self.redis
        lock = redis.lock(adapter_id) if redis is not None and redis.available else None
        while lock is not None and redis is not None:
            try:
                if await lock.acquire(blocking=False):
                    break
            except (RedisError, OSError) as exc:
                log.warning("generation lock unavailable, generating here: %s", exc)
                lock = None
                break
            await asyncio.sleep(LOCK_POLL_S)  # another replica is generating it: its result lands in Redis
            found = await self.lookup(adapter_id, count=False)
            if found is not None:
                return found
        if lock is None:
            return await self._generate_and_store(adapter_id, generate), "generated"
        async with held(lock):
            found = await self.lookup(adapter_id, count=False)  # finished by another replica just before the lock
            if found is not None:
                return found
            return await self._generate_and_store(adapter_id, generate), "generated"

    async def _generate_and_store(self, adapter_id: str, generate: Generate) -> GeneratedAdapter:
        adapter = await generate()
        if adapter.adapter_id != adapter_id:
            raise RuntimeError("generated adapter id does not match the requested id")
        self._remember(adapter)
        if self.redis is not None:
            await self.redis.put(adapter_id, adapter.to_safetensors_bytes())
        return adapter

    def forget(self, adapter_id: str) -> None:
        """Drop the memory tier's copy only (another replica deleted it)."""
        self._memory.pop(adapter_id, None)

    async def drop(self, adapter_id: str) -> bool:
        """Remove the adapter from every tier; True when one of them held it."""
        held = self._memory.pop(adapter_id, None) is not None
        if self.redis is not None:
            held = await self.redis.delete(adapter_id) or held
        return held


class Invalidations:
    """Adapter ids dropped on one replica are dropped on every replica on the same Redis: ``publish`` sends them on
    ``{prefix}:invalidate``, and ``run`` (a task on each replica) hands each message's ids to ``on_drop`` (drop the
    memory copy, free the engine slot). A replica that misses messages while Redis is down only keeps a memory copy
    of an adapter whose task is already gone from the shared registry (no task id resolves to it any more)."""

    def __init__(self, redis_url: str, prefix: str, on_drop: Callable[[list[str]], None]) -> None:
        self.channel = f"{prefix}:invalidate"
        self.on_drop = on_drop
        # its own connection, without the socket timeout of the cache's: a subscriber mostly waits
        self._redis: Redis = Redis.from_url(redis_url, socket_connect_timeout=0.5, socket_timeout=5.0)
        self.ready = asyncio.Event()  # subscribed (tests wait for it)

    async def publish(self, adapter_ids: list[str]) -> None:
        if not adapter_ids:
            return
        try:
            await self._redis.publish(self.channel, json.dumps(adapter_ids))
        except (RedisError, OSError) as exc:
            log.warning("could not publish the invalidation of %s: %s", adapter_ids, exc)

    async def run(self) -> None:
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    self.ready.set()
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if message is not None:
                            self._handle(message.get("data"))
            except (RedisError, OSError) as exc:
                self.ready.clear()
                log.warning("invalidation channel lost, resubscribing: %s", exc)
                await asyncio.sleep(1.0)

    def _handle(self, data: object) -> None:
        try:
            ids = json.loads(data) if isinstance(data, bytes | str) else None
        except ValueError:
            ids = None
        if isinstance(ids, list) and all(isinstance(i, str) for i in ids):
            self.on_drop(ids)
        else:
            log.warning("ignoring a malformed invalidation message")

    async def close(self) -> None:
        await self._redis.aclose()
