"""Bad bytes in the Redis adapter tier: truncated, empty, bit-flipped, another adapter's bytes, a forged header,
a pickle and a ``torch.save`` payload. Each is detected, dropped, regenerated and repaired; never served, never
unpickled. (A single bit flip after a restart: tests/service/test_tasks_and_stores.py.)"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import redis
import torch

from generator.adapter import GeneratedAdapter
from tests.reliability.conftest import REDIS_URL, metric_value, serve

PROMPT = "Input: kiwi pear lime\nOutput:"


class _Trap:
    """Unpickling this creates a file: the test would see it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def _forged_header(original: bytes) -> bytes:
    """Valid safetensors whose header claims the right id and checksum, with other tensor values."""
    adapter = GeneratedAdapter.from_safetensors_bytes(original)
    tampered = {k: v + 0.5 for k, v in adapter.tensors.items()}
    forged = GeneratedAdapter(tampered, adapter.lora, adapter.base_model, adapter.adapter_id, adapter.metadata)
    data = bytearray(forged.to_safetensors_bytes())
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"]["sha256"] = adapter.sha256  # lie about the checksum
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + bytes(data[8 + length :])


def test_corrupted_cache_entries_are_never_served(settings_for, redis_prefix: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(redis_url=REDIS_URL, redis_prefix=redis_prefix, task_store="sqlite")
    raw = redis.Redis.from_url(REDIS_URL)
    marker = tmp_path / "unpickled"
    with serve(settings) as service, service.client() as client:
        state = service.app.state.icm
        task = client.post("/v1/tasks", json={"task_id": "victim", "description": "Fruits or animals?"}).json()
        other = client.post("/v1/tasks", json={"task_id": "other", "description": "Tools or colors?"}).json()
        adapter_id = task["adapter_id"]
        key = f"{redis_prefix}:adapter:{adapter_id}"
        original = raw.get(key)
        assert original is not None
        served = client.get(f"/v1/adapters/{adapter_id}/weights", params={"format": "safetensors"}).content
        assert served == original
        zipped = client.get(f"/v1/adapters/{adapter_id}/weights").content
        body = {"model": "victim", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        reference = client.post("/v1/completions", json=body).json()["choices"][0]["text"]

        torch_payload = io.BytesIO()
        torch.save({"lora": torch.zeros(4), "trap": _Trap(marker)}, torch_payload)
        bad_entries = {
            "truncated": original[: len(original) // 2],
            "header only": original[:64],
            "empty": b"",
            "bit flip": original[:-5] + bytes([original[-5] ^ 0x01]) + original[-4:],
            "another adapter": raw.get(f"{redis_prefix}:adapter:{other['adapter_id']}"),
            "forged checksum": _forged_header(original),
            "huge header length": (2**62).to_bytes(8, "little") + original[8:],
            "pickle": pickle.dumps(_Trap(marker)),
            "torch.save": torch_payload.getvalue(),
        }
        for name, payload in bad_entries.items():
            raw.set(key, payload)
            state.cache._memory.clear()  # the memory tier forgets: the next lookup reads Redis
            weights = client.get(f"/v1/adapters/{adapter_id}/weights", params={"format": "safetensors"})
            assert weights.status_code == 200, (name, weights.text)
            assert weights.content == original, f"{name}: served bytes differ from the original"
            assert raw.get(key) == original, f"{name}: the Redis entry was not repaired"
            # the same through inference and the zip download
            raw.set(key, payload)
            state.cache._memory.clear()
            state.engine.release_adapter(adapter_id)  # make the engine take the adapter from the cache again
            assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == reference, name
            raw.set(key, payload)
            state.cache._memory.clear()
            assert client.get(f"/v1/adapters/{adapter_id}/weights").content == zipped, name
        metrics = client.get("/metrics").text
    raw.close()
    corrupt = metric_value(metrics, "icm_lora_adapter_cache_total", tier="redis", result="corrupt")
    print(f"FIGURE corrupt-cache: {len(bad_entries)} kinds of bad bytes x 3 paths, {corrupt:.0f} detected as corrupt, "
          f"0 served")  # fmt: skip
    assert corrupt == 3 * len(bad_entries)
    assert not marker.exists(), "a cached payload was unpickled"
