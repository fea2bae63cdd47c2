"""Connection settings shared by both clients: base URL and API key (arguments, else environment), timeouts, headers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import httpx

from ._retry import RetryPolicy

BASE_URL_ENV = "ICM_LORA_BASE_URL"
API_KEY_ENV = "ICM_LORA_API_KEY"
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# generation on a CPU can take a while: a generous read timeout, a short connect timeout
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=10.0)
VERSION = "0.1.0"

Timeout = float | httpx.Timeout | None


@dataclass(frozen=True)
class ClientConfig:
    base_url: str
    api_key: str | None
    timeout: httpx.Timeout
    retry: RetryPolicy

    @classmethod
    def resolve(
        cls,
        base_url: str | None,
        api_key: str | None,
        timeout: Timeout,
        max_retries: int,
        retry: RetryPolicy | None,
    ) -> ClientConfig:
        url = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        policy = retry if retry is not None else RetryPolicy(max_retries=max_retries)
        return cls(url.rstrip("/"), key, httpx.Timeout(timeout), policy)

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"User-Agent": f"icm-lora-client/{VERSION}", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        headers.update(extra or {})
        return headers
