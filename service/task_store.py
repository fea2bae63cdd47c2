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
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from generator.tasks import TaskSpec

T = TypeVar("T")


class StoreUnavailable(RuntimeError):
    """The backing store cannot be reached (Redis down)."""


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    spec: TaskSpec
    seed: int | None
    created_at: float

    def same_content(self, spec: TaskSpec, seed: int | None) -> bool:
        return self.spec.canonical_json() == spec.canonical_json() and self.seed == seed

    def to_json(self) -> str:
        return json.dumps(
            {"task_id": self.task_id, "spec": self.spec.to_dict(), "seed": self.seed, "created_at": self.created_at}
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> TaskRecord:
        data = json.loads(raw)
        return cls(data["task_id"], TaskSpec.from_dict(data["spec"]), data["seed"], float(data["created_at"]))


class TaskStore(Protocol):
    async def create(self, record: TaskRecord) -> tuple[TaskRecord, bool]:
        """Insert unless the id exists; returns the stored record and whether it was created."""
        ...

    async def get(self, task_id: str) -> TaskRecord | None: ...

    async def delete(self, task_id: str) -> TaskRecord | None: ...

    async def list(self, limit: int, after: str | None) -> list[TaskRecord]:
        """Up to ``limit`` records with ids greater than ``after``, in id order."""
        ...

    async def put_adapter_spec(self, adapter_id: str, spec: TaskSpec, seed: int | None) -> None: ...

    async def get_adapter_spec(self, adapter_id: str) -> tuple[TaskSpec, int | None] | None: ...

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

    async def delete(self, task_id: str) -> TaskRecord | None:
        rows = await self._run("DELETE FROM tasks WHERE task_id = ? RETURNING record", (task_id,))
        return TaskRecord.from_json(str(rows[0][0])) if rows else None

    async def list(self, limit: int, after: str | None) -> list[TaskRecord]:
        rows = await self._run(
            "SELECT record FROM tasks WHERE task_id > ? ORDER BY task_id LIMIT ?", (after or "", limit)
        )
        return [TaskRecord.from_json(str(r[0])) for r in rows]

    async def put_adapter_spec(self, adapter_id: str, spec: TaskSpec, seed: int | None) -> None:
        body = json.dumps({"spec": spec.to_dict(), "seed": seed})
        await self._run("INSERT OR IGNORE INTO adapter_specs (adapter_id, body) VALUES (?, ?)", (adapter_id, body))

    async def get_adapter_spec(self, adapter_id: str) -> tuple[TaskSpec, int | None] | None:
        rows = await self._run("SELECT body FROM adapter_specs WHERE adapter_id = ?", (adapter_id,))
        if not rows:
            return None
        data = json.loads(str(rows[0][0]))
        return TaskSpec.from_dict(data["spec"]), data["seed"]

    async def close(self) -> None:
        async with self._lock:
            self._db.close()


class RedisTaskStore:
    """``{prefix}:task:{id}`` -> record JSON (no TTL) and a sorted set ``{prefix}:tasks`` for ordered listing."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix

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

    async def put_adapter_spec(self, adapter_id: str, spec: TaskSpec, seed: int | None) -> None:
        body = json.dumps({"spec": spec.to_dict(), "seed": seed})
        await self._call(self._redis.set(f"{self._prefix}:adapter-spec:{adapter_id}", body, nx=True))

    async def get_adapter_spec(self, adapter_id: str) -> tuple[TaskSpec, int | None] | None:
        raw = await self._call(self._redis.get(f"{self._prefix}:adapter-spec:{adapter_id}"))
        if raw is None:
            return None
        data = json.loads(raw)
        return TaskSpec.from_dict(data["spec"]), data["seed"]

    async def close(self) -> None:
        return None


def new_record(task_id: str, spec: TaskSpec, seed: int | None) -> TaskRecord:
    return TaskRecord(task_id=task_id, spec=spec, seed=seed, created_at=time.time())
