"""The durable task registry (task id -> spec) and the specs behind adapter ids.

Adapter ids are content addresses, and every cache tier is disposable, so what must survive restarts and cache
flushes is the spec behind each id: with it, any adapter is regenerated bit-identically. Two backends: a SQLite file
(embedded default) and Redis (keys without TTL).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, get_args

from redis.asyncio import Redis
from redis.exceptions import RedisError, WatchError

from generator.tasks import TaskSpec
from service.refine import RefineOrigin

T = TypeVar("T")
_SQLITE_IN_CHUNK = 500  # placeholders per query: under SQLite's variable limit on every build
CheckResult = dict[str, float | int | bool]
"""``generator.selfcheck.SelfCheck.to_dict()``: base_loglik, adapter_loglik, delta, examples, held_out, passed."""
RefineStatus = Literal["none", "queued", "running", "done", "failed"]


class StoreUnavailable(RuntimeError):
    """The backing store cannot be reached (Redis down)."""


@dataclass(frozen=True)
class Refinement:
    """A task's refinement: ``adapter_id`` is the refined adapter's content address (known once queued), ``error``
    why it failed, ``self_check`` the refined adapter's check."""

    status: RefineStatus = "none"
    steps: int = 0
    adapter_id: str | None = None
    error: str | None = None
    self_check: CheckResult | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "steps": self.steps,
            "adapter_id": self.adapter_id,
            "error": self.error,
            "self_check": self.self_check,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Refinement:
        if not data:
            return cls()
        status = data.get("status", "none")
        if status not in get_args(RefineStatus):
            status = "failed"
        return cls(status, int(data.get("steps", 0)), data.get("adapter_id"), data.get("error"), data.get("self_check"))


@dataclass(frozen=True)
class TaskRecord:
    """``self_check``: the generated adapter's check, recorded at creation (None: no examples, or a record from
    before checks existed). Records without the newer fields read as no check and no refinement."""

    task_id: str
    spec: TaskSpec
    seed: int | None
    created_at: float
    self_check: CheckResult | None = None
    refinement: Refinement = field(default_factory=Refinement)
    metadata: dict[str, str] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    """Generation settings (max_tokens, temperature, top_p, stop, seed) for requests that omit them."""

    def same_content(self, spec: TaskSpec, seed: int | None) -> bool:
        return self.spec.canonical_json() == spec.canonical_json() and self.seed == seed

    def same_task(self, other: TaskRecord) -> bool:
        """The same registration (not a deleted and re-created task of the same id)."""
        return self.task_id == other.task_id and self.created_at == other.created_at

    def to_json(self) -> str:
        return json.dumps(
            {
                "task_id": self.task_id,
                "spec": self.spec.to_dict(),
                "seed": self.seed,
                "created_at": self.created_at,
                "self_check": self.self_check,
                "refinement": self.refinement.to_dict(),
                "metadata": self.metadata,
                "defaults": self.defaults,
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> TaskRecord:
        data = json.loads(raw)
        return cls(
            data["task_id"],
            TaskSpec.from_dict(data["spec"]),
            data["seed"],
            float(data["created_at"]),
            data.get("self_check"),
            Refinement.from_dict(data.get("refinement")),
            dict(data.get("metadata") or {}),
            dict(data.get("defaults") or {}),
        )


@dataclass(frozen=True)
class StoredSpec:
    """The durable spec behind an adapter id; ``refine`` for a refined adapter (records without it: generated)."""

    spec: TaskSpec
    seed: int | None
    refine: RefineOrigin | None = None

    def to_json(self) -> str:
        body: dict[str, Any] = {"spec": self.spec.to_dict(), "seed": self.seed}
        if self.refine is not None:
            body["refine"] = self.refine.to_dict()
        return json.dumps(body)

    @classmethod
    def from_json(cls, raw: str | bytes) -> StoredSpec:
        data = json.loads(raw)
        refine = RefineOrigin.from_dict(data["refine"]) if data.get("refine") else None
        return cls(TaskSpec.from_dict(data["spec"]), data["seed"], refine)


SpecPage = list[tuple[str, StoredSpec]]
"""(adapter id, spec) pairs in id order."""


class TaskStore(Protocol):
    async def create(self, record: TaskRecord) -> tuple[TaskRecord, bool]:
        """Insert unless the id exists; returns the stored record and whether it was created."""
        ...

    async def get(self, task_id: str) -> TaskRecord | None: ...

    async def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskRecord]:
        """The records of those of ``task_ids`` that are registered, in one query."""
        ...

    async def delete(self, task_id: str) -> TaskRecord | None: ...

    async def list(self, limit: int, after: str | None) -> list[TaskRecord]:
        """Up to ``limit`` records with ids greater than ``after``, in id order."""
        ...

    async def update_refinement(self, record: TaskRecord, refinement: Refinement) -> bool:
        """Set the refinement of ``record``'s task if it is still the same registration; False when it is gone."""
        ...

    async def update_settings(
        self, task_id: str, metadata: dict[str, str], defaults: dict[str, Any]
    ) -> TaskRecord | None:
        """Replace a task's metadata and generation defaults (never its spec); the updated record, None when gone."""
        ...

    async def put_adapter_spec(self, adapter_id: str, stored: StoredSpec) -> None:
        """Store the spec behind an adapter id (kept if there is one); a bounded store renews its lifetime."""
        ...

    async def get_adapter_spec(self, adapter_id: str) -> StoredSpec | None: ...

    async def get_adapter_specs(self, adapter_ids: Sequence[str]) -> dict[str, StoredSpec]:
        """The specs of those of ``adapter_ids`` that have one, in one query (a bounded store renews them, as
        ``get_adapter_spec`` does)."""
        ...

    async def pin_adapter_specs(self, adapter_ids: Sequence[str], pinned: bool) -> None:
        """Keep these specs while a registered task uses them (``pinned``), or let them expire again."""
        ...

    async def list_adapter_specs(self, limit: int, after: str | None) -> SpecPage:
        """Up to ``limit`` (adapter id, spec) pairs with ids greater than ``after``, in id order."""
        ...

    async def delete_adapter_spec(self, adapter_id: str) -> bool:
        """Forget an adapter's spec; False when there was none."""
        ...

    async def close(self) -> None: ...


class SqliteTaskStore:
    """One SQLite file; calls run in a worker thread, serialised by a lock (SQLite allows one writer anyway)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS tasks"
            " (task_id TEXT PRIMARY KEY, record TEXT NOT NULL, created_at REAL NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS adapter_specs (adapter_id TEXT PRIMARY KEY, body TEXT NOT NULL)")
        self._lock = asyncio.Lock()

    async def _run(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        async with self._lock:
            return await asyncio.to_thread(lambda: self._db.execute(sql, args).fetchall())

    async def _run_in(self, sql: str, keys: Sequence[str]) -> list[tuple[object, ...]]:
        """``sql`` with ``IN ({})`` filled with one placeholder per distinct key, in chunks under SQLite's
        variable limit."""
        distinct = list(dict.fromkeys(keys))
        rows: list[tuple[object, ...]] = []
        for start in range(0, len(distinct), _SQLITE_IN_CHUNK):
            chunk = tuple(distinct[start : start + _SQLITE_IN_CHUNK])
            rows += await self._run(sql.format(", ".join("?" * len(chunk))), chunk)
        return rows

    async def create(self, record: TaskRecord) -> tuple[TaskRecord, bool]:
        async with self._lock:

            def insert() -> tuple[TaskRecord, bool]:
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO tasks (task_id, record, created_at) VALUES (?, ?, ?)",
                    (record.task_id, record.to_json(), record.created_at),
                )
                if cursor.rowcount == 1:
                    return record, True
                row = self._db.execute("SELECT record FROM tasks WHERE task_id = ?", (record.task_id,)).fetchone()
                return TaskRecord.from_json(row[0]), False

            return await asyncio.to_thread(insert)

    async def get(self, task_id: str) -> TaskRecord | None:
        rows = await self._run("SELECT record FROM tasks WHERE task_id = ?", (task_id,))
        return TaskRecord.from_json(str(rows[0][0])) if rows else None

    async def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskRecord]:
        rows = await self._run_in("SELECT task_id, record FROM tasks WHERE task_id IN ({})", task_ids)
        return {str(r[0]): TaskRecord.from_json(str(r[1])) for r in rows}

    async def delete(self, task_id: str) -> TaskRecord | None:
        rows = await self._run("DELETE FROM tasks WHERE task_id = ? RETURNING record", (task_id,))
        return TaskRecord.from_json(str(rows[0][0])) if rows else None

    async def list(self, limit: int, after: str | None) -> list[TaskRecord]:
        rows = await self._run(
            "SELECT record FROM tasks WHERE task_id > ? ORDER BY task_id LIMIT ?", (after or "", limit)
        )
        return [TaskRecord.from_json(str(r[0])) for r in rows]

    async def update_refinement(self, record: TaskRecord, refinement: Refinement) -> bool:
        async with self._lock:

            def update() -> bool:
                row = self._db.execute("SELECT record FROM tasks WHERE task_id = ?", (record.task_id,)).fetchone()
                if row is None:
                    return False
                current = TaskRecord.from_json(row[0])
                if not current.same_task(record):
                    return False
                updated = replace(current, refinement=refinement)
                self._db.execute("UPDATE tasks SET record = ? WHERE task_id = ?", (updated.to_json(), record.task_id))
                return True

            return await asyncio.to_thread(update)

    async def update_settings(
        self, task_id: str, metadata: dict[str, str], defaults: dict[str, Any]
    ) -> TaskRecord | None:
        async with self._lock:

            def update() -> TaskRecord | None:
                row = self._db.execute("SELECT record FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
                if row is None:
                    return None
                updated = replace(TaskRecord.from_json(row[0]), metadata=metadata, defaults=defaults)
                self._db.execute("UPDATE tasks SET record = ? WHERE task_id = ?", (updated.to_json(), task_id))
                return updated

            return await asyncio.to_thread(update)

    async def put_adapter_spec(self, adapter_id: str, stored: StoredSpec) -> None:
        await self._run(
            "INSERT OR IGNORE INTO adapter_specs (adapter_id, body) VALUES (?, ?)", (adapter_id, stored.to_json())
        )

    async def get_adapter_spec(self, adapter_id: str) -> StoredSpec | None:
        rows = await self._run("SELECT body FROM adapter_specs WHERE adapter_id = ?", (adapter_id,))
        return StoredSpec.from_json(str(rows[0][0])) if rows else None

    async def get_adapter_specs(self, adapter_ids: Sequence[str]) -> dict[str, StoredSpec]:
        rows = await self._run_in("SELECT adapter_id, body FROM adapter_specs WHERE adapter_id IN ({})", adapter_ids)
        return {str(r[0]): StoredSpec.from_json(str(r[1])) for r in rows}

    async def pin_adapter_specs(self, adapter_ids: Sequence[str], pinned: bool) -> None:
        return None  # the embedded store keeps every spec (one process; see README)

    async def list_adapter_specs(self, limit: int, after: str | None) -> SpecPage:
        rows = await self._run(
            "SELECT adapter_id, body FROM adapter_specs WHERE adapter_id > ? ORDER BY adapter_id LIMIT ?",
            (after or "", limit),
        )
        return [(str(r[0]), StoredSpec.from_json(str(r[1]))) for r in rows]

    async def delete_adapter_spec(self, adapter_id: str) -> bool:
        rows = await self._run("DELETE FROM adapter_specs WHERE adapter_id = ? RETURNING adapter_id", (adapter_id,))
        return bool(rows)

    async def close(self) -> None:
        async with self._lock:
            self._db.close()


class RedisTaskStore:
    """``{prefix}:task:{id}`` -> record JSON (no TTL) and a sorted set ``{prefix}:tasks`` for ordered listing.

    ``{prefix}:adapter-spec:{id}`` records are bounded: each expires ``spec_ttl_s`` after its last use (every
    generation or lookup through the service renews it), except while a registered task uses it (pinned: no TTL;
    deleting the task lets it expire again)."""

    def __init__(self, redis: Redis, prefix: str, spec_ttl_s: int = 30 * 24 * 3600) -> None:
        self._redis = redis
        self._prefix = prefix
        self._spec_ttl_s = spec_ttl_s

    def _task_key(self, task_id: str) -> str:
        return f"{self._prefix}:task:{task_id}"

    @property
    def _index_key(self) -> str:
        return f"{self._prefix}:tasks"

    async def _call(self, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"task registry (Redis) unavailable: {exc}") from None

    async def create(self, record: TaskRecord) -> tuple[TaskRecord, bool]:
        created = await self._call(self._redis.set(self._task_key(record.task_id), record.to_json(), nx=True))
        if created:
            await self._call(self._redis.zadd(self._index_key, {record.task_id: 0}))
            return record, True
        existing = await self.get(record.task_id)
        if existing is None:  # deleted in between: try once more
            return await self.create(record)
        await self._call(self._redis.zadd(self._index_key, {record.task_id: 0}))  # repair a missed index write
        return existing, False

    async def get(self, task_id: str) -> TaskRecord | None:
        raw = await self._call(self._redis.get(self._task_key(task_id)))
        return TaskRecord.from_json(raw) if raw is not None else None

    async def get_many(self, task_ids: Sequence[str]) -> dict[str, TaskRecord]:
        ids = list(dict.fromkeys(task_ids))
        if not ids:
            return {}
        raws = await self._call(self._redis.mget([self._task_key(i) for i in ids]))
        return {i: TaskRecord.from_json(raw) for i, raw in zip(ids, raws, strict=True) if raw is not None}

    async def delete(self, task_id: str) -> TaskRecord | None:
        raw = await self._call(self._redis.getdel(self._task_key(task_id)))
        await self._call(self._redis.zrem(self._index_key, task_id))
        return TaskRecord.from_json(raw) if raw is not None else None

    async def list(self, limit: int, after: str | None) -> list[TaskRecord]:
        start = f"({after}" if after else "-"
        ids = await self._call(self._redis.zrangebylex(self._index_key, start, "+", start=0, num=limit))
        if not ids:
            return []
        raws = await self._call(
            self._redis.mget([self._task_key(i.decode() if isinstance(i, bytes) else i) for i in ids])
        )
        return [TaskRecord.from_json(r) for r in raws if r is not None]

    async def update_refinement(self, record: TaskRecord, refinement: Refinement) -> bool:
        def change(current: TaskRecord) -> TaskRecord | None:
            return replace(current, refinement=refinement) if current.same_task(record) else None

        return await self._update(record.task_id, change, "refinement") is not None

    async def update_settings(
        self, task_id: str, metadata: dict[str, str], defaults: dict[str, Any]
    ) -> TaskRecord | None:
        return await self._update(task_id, lambda c: replace(c, metadata=metadata, defaults=defaults), "settings")

    async def _update(
        self, task_id: str, change: Callable[[TaskRecord], TaskRecord | None], what: str
    ) -> TaskRecord | None:
        """Optimistic read-modify-write: WATCH the key, read, write ``change(record)`` in a transaction; retried on a
        race. None when the task is gone or ``change`` declines (returns None)."""
        key = self._task_key(task_id)
        for _ in range(10):
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    updated = None if raw is None else change(TaskRecord.from_json(raw))
                    if updated is None:
                        return None
                    pipe.multi()
                    pipe.set(key, updated.to_json(), xx=True)
                    await pipe.execute()
                    return updated
            except WatchError:
                continue
            except (RedisError, OSError) as exc:
                raise StoreUnavailable(f"task registry (Redis) unavailable: {exc}") from None
        raise StoreUnavailable(f"task {task_id!r} kept changing while its {what} was recorded")

    def _spec_key(self, adapter_id: str) -> str:
        return f"{self._prefix}:adapter-spec:{adapter_id}"

    @property
    def _spec_index_key(self) -> str:
        return f"{self._prefix}:adapter-specs"

    async def put_adapter_spec(self, adapter_id: str, stored: StoredSpec) -> None:
        """The spec (kept when there is one already; its lifetime renewed, a pinned one stays) and its index entry,
        in one round trip (every adapter request passes here)."""
        key = self._spec_key(adapter_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(key, stored.to_json(), nx=True, ex=self._spec_ttl_s)
        pipe.expire(key, self._spec_ttl_s, gt=True)  # renew; a key without a TTL (pinned) counts as infinite
        pipe.zadd(self._spec_index_key, {adapter_id: 0})
        await self._call(pipe.execute())

    async def get_adapter_spec(self, adapter_id: str) -> StoredSpec | None:
        key = self._spec_key(adapter_id)
        raw = await self._call(self._redis.get(key))
        if raw is None:
            return None
        await self._call(self._redis.expire(key, self._spec_ttl_s, gt=True))
        return StoredSpec.from_json(raw)

    async def get_adapter_specs(self, adapter_ids: Sequence[str]) -> dict[str, StoredSpec]:
        ids = list(dict.fromkeys(adapter_ids))
        if not ids:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.mget([self._spec_key(i) for i in ids])
            for adapter_id in ids:
                pipe.expire(self._spec_key(adapter_id), self._spec_ttl_s, gt=True)
            replies = await self._call(pipe.execute())
        return {i: StoredSpec.from_json(raw) for i, raw in zip(ids, replies[0], strict=True) if raw is not None}

    async def pin_adapter_specs(self, adapter_ids: Sequence[str], pinned: bool) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for adapter_id in adapter_ids:
                if pinned:
                    pipe.persist(self._spec_key(adapter_id))
                else:
                    pipe.expire(self._spec_key(adapter_id), self._spec_ttl_s)
            await self._call(pipe.execute())

    async def list_adapter_specs(self, limit: int, after: str | None) -> SpecPage:
        """From the index ``{prefix}:adapter-specs`` (specs stored before the index existed are not listed)."""
        start = f"({after}" if after else "-"
        raw_ids = await self._call(self._redis.zrangebylex(self._spec_index_key, start, "+", start=0, num=limit))
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in raw_ids]
        if not ids:
            return []
        raws = await self._call(self._redis.mget([self._spec_key(i) for i in ids]))
        expired = [i for i, r in zip(ids, raws, strict=True) if r is None]
        if expired:  # the index outlives specs that expired (bounded store): pruned as they are met
            await self._call(self._redis.zrem(self._spec_index_key, *expired))
        return [(i, StoredSpec.from_json(r)) for i, r in zip(ids, raws, strict=True) if r is not None]

    async def delete_adapter_spec(self, adapter_id: str) -> bool:
        deleted = await self._call(self._redis.delete(self._spec_key(adapter_id)))
        await self._call(self._redis.zrem(self._spec_index_key, adapter_id))
        return bool(deleted)

    async def close(self) -> None:
        return None


def new_record(
    task_id: str,
    spec: TaskSpec,
    seed: int | None,
    self_check: CheckResult | None = None,
    refinement: Refinement | None = None,
) -> TaskRecord:
    return TaskRecord(task_id, spec, seed, time.time(), self_check, refinement or Refinement())
