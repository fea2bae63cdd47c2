"""Self-check and refinement records without HTTP: adapter metadata round trips, store rows old and new, the serving
decision, refined adapter ids."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio

from generator.adapter import GeneratedAdapter
from generator.config import LoraSettings
from generator.refine import RefinePlan, refined_adapter_id
from generator.selfcheck import SelfCheck
from generator.tasks import Example, TaskSpec
from service.refine import RefineOrigin
from service.selfcheck import check_of, choose_adapter, with_check
from service.task_store import (
    RedisTaskStore,
    Refinement,
    SqliteTaskStore,
    StoredSpec,
    TaskRecord,
    TaskStore,
    new_record,
)
from tests.service.conftest import REDIS_URL

SPEC = TaskSpec(description="Label it.", examples=(Example("a", "b"), Example("c", "d")))
FAILED = SelfCheck(base=-2.0, adapter=-3.5, examples=2, held_out=False)
PASSED = SelfCheck(base=-2.0, adapter=-1.0, examples=2, held_out=False)


def _adapter() -> GeneratedAdapter:
    import torch

    tensors = {"base_model.model.layer.q_proj.lora_A.weight": torch.arange(8, dtype=torch.float32).view(2, 4)}
    return GeneratedAdapter(tensors, LoraSettings(rank=2), "tiny:0", "abc123", {"generator_id": "g", "seed": ""})


def test_check_in_metadata_survives_the_cache_bytes_and_keeps_the_id() -> None:
    plain = _adapter()
    checked = with_check(plain, FAILED)
    assert checked.adapter_id == plain.adapter_id and checked.sha256 == plain.sha256
    assert check_of(plain) is None
    back = GeneratedAdapter.from_safetensors_bytes(checked.to_safetensors_bytes(), expected_id="abc123")
    assert check_of(back) == FAILED.to_dict() and back.metadata == checked.metadata
    assert back.to_safetensors_bytes() == checked.to_safetensors_bytes()  # deterministic bytes, ETag unchanged
    assert check_of(GeneratedAdapter(plain.tensors, plain.lora, "tiny:0", "x", {"self_check": "not json"})) is None


def test_task_records_old_and_new() -> None:
    old = json.dumps({"task_id": "t", "spec": SPEC.to_dict(), "seed": None, "created_at": 1.0})
    record = TaskRecord.from_json(old)
    assert record.self_check is None and record.refinement == Refinement()
    refinement = Refinement("done", 8, "r1", None, PASSED.to_dict())
    new = new_record("t", SPEC, 3, FAILED.to_dict(), refinement)
    assert TaskRecord.from_json(new.to_json()) == new
    assert Refinement.from_dict({"status": "bogus"}).status == "failed"


def test_stored_specs_old_and_refined() -> None:
    old = json.dumps({"spec": SPEC.to_dict(), "seed": 5})
    assert StoredSpec.from_json(old) == StoredSpec(SPEC, 5)
    plan = RefinePlan(steps=8, learning_rate=2e-3, batch_size=8)
    refined = StoredSpec(SPEC, None, RefineOrigin("parent", plan))
    assert StoredSpec.from_json(refined.to_json()) == refined


def test_refined_ids_are_content_addresses() -> None:
    plan = RefinePlan(steps=8, learning_rate=2e-3, batch_size=8)
    assert refined_adapter_id("p", plan) == refined_adapter_id("p", RefinePlan(8, 2e-3, 8))
    assert (
        len(
            {
                refined_adapter_id("p", plan),
                refined_adapter_id("q", plan),
                refined_adapter_id("p", RefinePlan(9, 2e-3, 8)),
            }
        )
        == 3
    )
    for steps in (0, 65):
        with pytest.raises(ValueError):
            RefinePlan(steps, 2e-3, 8)


def test_serving_choice() -> None:
    failed, ok = FAILED.to_dict(), PASSED.to_dict()
    none = Refinement()
    assert choose_adapter("fallback", "g", ok, none).use == "generated"
    assert choose_adapter("fallback", "g", None, none).warning is None  # unchecked: nothing to compare against
    base = choose_adapter("fallback", "g", failed, none)
    assert base.use == "base" and base.adapter_id == "g" and base.warning and "-1.500" in base.warning
    kept = choose_adapter("keep", "g", failed, none)
    assert kept.use == "generated" and kept.warning and "policy keep" in kept.warning
    running = choose_adapter("refine", "g", failed, Refinement("running", 8, "r"))
    assert running.use == "base" and running.warning and "refinement (running)" in running.warning
    assert choose_adapter("refine", "g", failed, Refinement("done", 8, "r", None, ok)).use == "refined"
    assert choose_adapter("fallback", "g", ok, Refinement("done", 8, "r", None, failed)).use == "generated"
    both_bad = Refinement("done", 8, "r", None, failed)
    assert choose_adapter("fallback", "g", failed, both_bad).use == "base"
    keep_refined = choose_adapter("keep", "g", failed, both_bad)
    assert keep_refined.use == "refined" and keep_refined.adapter_id == "r" and keep_refined.warning
    assert choose_adapter("fallback", "g", failed, Refinement("failed", 8, "r", "boom")).use == "base"


async def _store_roundtrip(store: TaskStore) -> None:
    record, created = await store.create(new_record("t1", SPEC, None, FAILED.to_dict()))
    assert created
    done = Refinement("done", 4, "r1", None, PASSED.to_dict())
    assert await store.update_refinement(record, done)
    stored = await store.get("t1")
    assert stored is not None and stored.refinement == done and stored.self_check == FAILED.to_dict()
    await store.delete("t1")
    assert not await store.update_refinement(record, Refinement("failed", 4, "r1", "x"))
    again, _ = await store.create(new_record("t1", SPEC, None))
    assert again.created_at != record.created_at
    assert not await store.update_refinement(record, done)  # the old registration's job must not touch the new one
    current = await store.get("t1")
    assert current is not None and current.refinement == Refinement()
    plan = RefinePlan(4, 2e-3, 8)
    await store.put_adapter_spec("r1", StoredSpec(SPEC, None, RefineOrigin("p", plan)))
    assert await store.get_adapter_spec("r1") == StoredSpec(SPEC, None, RefineOrigin("p", plan))
    await store.close()


async def _batch_reads(store: TaskStore) -> None:
    """``get_many`` and ``get_adapter_specs``: only what exists, repeats and absent ids ignored, beyond one SQLite
    query's placeholders (600 ids)."""
    for i in (3, 250, 599):
        await store.create(new_record(f"t{i}", SPEC, i))
        await store.put_adapter_spec(f"a{i}", StoredSpec(SPEC, i))
    asked = [f"t{i}" for i in range(600)] + ["t3", "t599"]
    found = await store.get_many(asked)
    assert sorted(found) == ["t250", "t3", "t599"] and found["t250"].seed == 250
    specs = await store.get_adapter_specs([f"a{i}" for i in range(600)] + ["t3"])
    assert sorted(specs) == ["a250", "a3", "a599"] and specs["a599"] == StoredSpec(SPEC, 599)
    assert await store.get_many([]) == {} and await store.get_adapter_specs([]) == {}
    await store.close()


def _on_redis(prefix: str, check: Callable[[TaskStore], Awaitable[None]]) -> None:
    async def run() -> None:
        client = redis.asyncio.Redis.from_url(REDIS_URL)
        try:
            await check(RedisTaskStore(client, prefix))
        finally:
            await client.aclose()

    asyncio.run(run())


def test_batch_reads_of_both_stores(tmp_path: Path, redis_prefix: str) -> None:
    asyncio.run(_batch_reads(SqliteTaskStore(tmp_path / "tasks.sqlite3")))
    _on_redis(redis_prefix, _batch_reads)


def test_sqlite_store_records_refinements(tmp_path: Path) -> None:
    asyncio.run(_store_roundtrip(SqliteTaskStore(tmp_path / "tasks.sqlite3")))


def test_sqlite_store_reads_rows_written_before_refinements(tmp_path: Path) -> None:
    path = tmp_path / "tasks.sqlite3"

    async def run() -> None:
        store = SqliteTaskStore(path)
        old = json.dumps({"task_id": "t0", "spec": SPEC.to_dict(), "seed": None, "created_at": 1.0})
        await store._run("INSERT INTO tasks (task_id, record, created_at) VALUES (?, ?, ?)", ("t0", old, 1.0))
        await store._run(
            "INSERT INTO adapter_specs (adapter_id, body) VALUES (?, ?)",
            ("a0", json.dumps({"spec": SPEC.to_dict(), "seed": None})),
        )
        record = await store.get("t0")
        assert record is not None and record.refinement.status == "none"
        assert await store.update_refinement(record, Refinement("queued", 4, "r"))
        assert (await store.get_adapter_spec("a0")) == StoredSpec(SPEC, None)
        await store.close()

    asyncio.run(run())


def test_redis_store_records_refinements(redis_prefix: str) -> None:
    _on_redis(redis_prefix, _store_roundtrip)
