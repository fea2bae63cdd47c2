"""The vLLM side: a ``LoRAResolver`` backed by an icm-lora service, registered by a ``vllm.general_plugins`` entry
point.

vLLM asks the resolver for a ``model`` it does not know yet (only when ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``);
the answer is kept by vLLM for later requests. So that a deleted (or re-registered) task stops being served with its
old adapter, a watcher re-checks every resolved name with the service each ``ICM_LORA_VLLM_REFRESH_S`` seconds and
unloads the ones that are gone or changed through vLLM's own ``/v1/unload_lora_adapter`` (the next request for a
re-registered task resolves it again). While the service cannot be reached, resolved names keep being served and
new names answer 404; nothing raises into vLLM.

Environment: ``ICM_LORA_BASE_URL`` / ``ICM_LORA_API_KEY`` (the client SDK's), ``ICM_LORA_VLLM_CACHE_DIR`` (default
``~/.cache/icm-lora/vllm-adapters``), ``ICM_LORA_VLLM_MAX_ADAPTERS`` (64), ``ICM_LORA_VLLM_REFRESH_S`` (5),
``ICM_LORA_VLLM_URL`` (this vLLM server, default ``http://127.0.0.1:<--port>``), ``VLLM_API_KEY`` (vLLM's key, if set).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import httpx
from icm_lora_client import AsyncClient, ICMLoraError, RetryPolicy
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from icm_lora_vllm.store import AdapterStore, Resolved

log = logging.getLogger("vllm.icm_lora")  # under vLLM's logger: its handlers and level apply
RESOLVER_NAME = "icm-lora"


def _own_url() -> str:
    configured = os.environ.get("ICM_LORA_VLLM_URL")
    if configured:
        return configured.rstrip("/")
    port = "8000"
    for index, arg in enumerate(sys.argv):
        if arg == "--port" and index + 1 < len(sys.argv):
            port = sys.argv[index + 1]
        elif arg.startswith("--port="):
            port = arg.split("=", 1)[1]
    return f"http://127.0.0.1:{port}"


class IcmLoraResolver(LoRAResolver):
    """``vllm``: the HTTP client that reaches this vLLM server's own API (for unloading), based at its URL."""

    def __init__(self, store: AdapterStore, refresh_s: float, vllm: httpx.AsyncClient) -> None:
        self.store = store
        self.refresh_s = refresh_s
        self.vllm = vllm
        self.resolved: dict[str, Resolved] = {}
        self._watcher: asyncio.Task[None] | None = None

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        try:
            found = await self.store.fetch(lora_name)
        except (ICMLoraError, OSError, ValueError) as exc:  # outage (after the SDK's retries), bad download
            log.warning("icm-lora: cannot resolve %r now: %s", lora_name, exc)
            return None
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        if found is None:
            return None
        self.resolved[lora_name] = found
        log.info("icm-lora: %r -> adapter %s", lora_name, found.adapter_id)
        return LoRARequest(
            lora_name=lora_name,
            lora_int_id=found.int_id,
            lora_path=str(found.path),
            base_model_name=base_model_name,
        )

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:  # never let the watcher die
                log.exception("icm-lora: refresh failed")

    async def refresh(self) -> list[str]:
        """Unload every resolved name whose task is gone or serves another adapter now, or whose folder was
        evicted; returns the names unloaded. One request to icm-lora (per 256 names) however many are served."""
        # What is checked is what was resolved when the request left: a name resolved (or resolved again) while it
        # is in flight is not in its answer, and must not be judged by it.
        checked = dict(self.resolved)
        if not checked:
            return []
        try:
            current = await self.store.lookup_many(list(checked))
        except ICMLoraError as exc:  # service down: keep serving what is loaded
            log.warning("icm-lora: cannot re-check %d names: %s", len(checked), exc)
            return []
        stale = []
        for name, known in checked.items():
            found = current.get(name)
            held = (known.path / "adapter_model.safetensors").is_file()
            if self.resolved.get(name) is known and (found is None or found[1] != known.adapter_id or not held):
                stale.append(name)
        for name in stale:
            known = checked[name]
            if self.resolved.get(name) is known and await self._unload(name) and self.resolved.get(name) is known:
                del self.resolved[name]  # unless vLLM resolved it again while the unload was in flight
        in_use = {r.adapter_id for r in self.resolved.values()}
        for adapter_id in self.store.held() - in_use:
            self.store.drop(adapter_id)
        return stale

    async def _unload(self, name: str) -> bool:
        try:
            response = await self.vllm.post("/v1/unload_lora_adapter", json={"lora_name": name})
        except httpx.HTTPError as exc:
            log.warning("icm-lora: cannot unload %r from vLLM: %s", name, exc)
            return False
        if response.status_code not in (200, 404):  # 404: vLLM no longer has it either
            log.warning("icm-lora: unloading %r answered %s: %s", name, response.status_code, response.text[:200])
            return False
        log.info("icm-lora: %r is no longer served (task deleted or changed)", name)
        return True


def build_resolver() -> IcmLoraResolver:
    folder = Path(os.environ.get("ICM_LORA_VLLM_CACHE_DIR") or Path.home() / ".cache" / "icm-lora" / "vllm-adapters")
    client = AsyncClient(retry=RetryPolicy(max_retries=3, max_delay=2.0))  # about 3 s of backoff at most
    store = AdapterStore(client, folder, int(os.environ.get("ICM_LORA_VLLM_MAX_ADAPTERS", "64")))
    key = os.environ.get("VLLM_API_KEY")
    vllm = httpx.AsyncClient(
        base_url=_own_url(), timeout=10, headers={"Authorization": f"Bearer {key}"} if key else None
    )
    return IcmLoraResolver(store, float(os.environ.get("ICM_LORA_VLLM_REFRESH_S", "5")), vllm)


def register() -> None:
    """The ``vllm.general_plugins`` entry point; vLLM calls it in each of its processes."""
    if RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, build_resolver())
