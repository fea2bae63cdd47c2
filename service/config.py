"""Service settings from the environment (prefix ``ICM_LORA_``), validated at start-up."""

from __future__ import annotations

import functools
import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from generator.defaults import (
    DEFAULT_BASE_MODEL,
    DEVICE_CHOICES,
    check_device_name,
    check_dtype_name,
    default_data_dir,
    packaged_generator,
)
from generator.defaults import PACKAGED_GENERATORS as PACKAGED_GENERATORS  # re-exported (tests)

if TYPE_CHECKING:
    from generator.device import Placement


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ICM_LORA_", extra="ignore")

    # models
    base_model: str = Field(DEFAULT_BASE_MODEL, description="smollm2-135m (packaged), tiny, or a HF path/id")
    generator_path: Path | None = Field(
        None, description="Generator checkpoint folder; default: the packaged one for the base model, if any"
    )
    data_dir: Path = Field(default_factory=default_data_dir, description="Caches and the SQLite task registry")
    served_model_name: str = Field("", description="Name of the adapter-free model in /v1/models (default: base)")
    device: str = Field("auto", description=f"{DEVICE_CHOICES}; auto = cuda when a GPU is present, else cpu")
    dtype: str = Field("auto", description="auto, float32, bfloat16 or float16; auto = bfloat16 on cuda, else float32")

    # stores
    redis_url: str | None = Field(None, description="redis://host:port/db; unset = embedded stores only")
    redis_prefix: str = Field("icm-lora", min_length=1, max_length=64)
    task_store: str = Field("auto", description="sqlite | redis | auto (redis when redis_url is set)")
    adapter_ttl_s: int = Field(7 * 24 * 3600, ge=1)
    adapter_spec_ttl_s: int = Field(
        30 * 24 * 3600,
        ge=60,
        description="Redis: an adapter-spec record expires this long after its last use, unless a task uses it",
    )
    memory_cache_size: int = Field(64, ge=1, description="Adapters kept in process memory")

    # engine
    num_slots: int = Field(
        32,
        ge=1,
        le=1024,
        description="LoRA slots in the resident model; at least max_batch_size, or a batch of distinct adapters "
        "decodes only as many rows as there are slots",
    )
    max_batch_size: int = Field(16, ge=1, le=1024)
    max_queue: int = Field(64, ge=1)
    prefill_chunk: int = Field(256, ge=1)  # prompts longer than this are prefilled in chunks between decode steps
    prefill_chunk_ms: float = Field(
        50.0,
        ge=0,
        le=10_000,
        description="CPU: while streams decode, each chunk of a long prompt is sized to take about this long (at most"
        " prefill_chunk tokens); 0: every chunk is prefill_chunk tokens",
    )
    kv_cache_mb: int = Field(4096, ge=1)  # the engine's KV cache budget (admission waits, or 413 if it never fits)
    max_decode_groups: int = Field(4, ge=1, le=16)  # running rows' groups, one forward pass each (1: one pass for all)
    prefix_cache_entries: int = Field(64, ge=0, le=4096)  # adapters whose chat-template opening is kept (0: off)
    engine_threads: int = Field(
        -1,
        ge=-1,
        le=1024,
        description="Intra-op threads of the engine thread; every other thread of the service then runs one (-1: "
        "torch's default thread count, the machine's cores or OMP_NUM_THREADS; 0: torch's default for every thread)",
    )
    packed_linears: bool = Field(
        True,
        description="CPU: generation runs its Linears on oneDNN-packed copies of the weights (faster; as much memory"
        " again as the weights; greedy tokens may leave plain peft's at a near tie); adapters are made on plain ones",
    )
    matmul_decode_attention: bool = Field(
        True,
        description="CPU, float32: a decode step's attention runs as two batched matmuls instead of SDPA's flash"
        " kernel (faster at decode sizes; equal up to float rounding); passes without a cache keep SDPA",
    )
    attend_rows_alone: bool = Field(
        True,
        description="CPU, bfloat16 / float16: a decode step attends each row over its own keys only, so a row's"
        " tokens do not depend on the other rows' padding (greedy parity with plain peft); false: one call over the"
        " padded rows, faster",
    )
    arrival_wait_ms: float = Field(
        25.0,
        ge=0,
        le=1000,
        description="An idle engine holds its first prefill up to this long while other completion requests are still"
        " being parsed, so that a burst is prefilled in one pass; a lone request is never held (0: off)",
    )
    fused_passes: bool = Field(
        True,
        description="CPU: every decode group's step and a long prompt's prefill chunk go in one forward pass (one"
        " pass over the weights instead of one each; equal up to float rounding)",
    )

    # limits
    max_examples: int = Field(64, ge=1)
    max_text_chars: int = Field(8000, ge=1, description="Per description / example field")
    max_prompt_tokens: int = Field(2048, ge=1)
    max_tokens: int = Field(512, ge=1, description="Upper bound for max_tokens in completions")
    max_body_bytes: int = Field(1_000_000, ge=1024)

    # adapter quality
    condition: Literal["examples", "both"] = Field(
        "examples",
        description="What a task with examples conditions the generator on: its examples alone (examples), or its "
        "description and examples (both); a task without examples always uses its description",
    )
    self_check: Literal["fallback", "refine", "keep"] = Field(
        "fallback",
        description="An adapter that explains its task's examples worse than the base model: serve the base model "
        "(fallback), refine it and serve the base model until the refined one passes (refine), or serve it (keep); "
        "every response about it carries a warning",
    )
    self_check_margin: float = Field(
        0.0,
        ge=-100.0,
        le=100.0,
        description="An adapter passes when its mean answer log-likelihood per token is at least base - margin "
        "(a negative margin demands an improvement); for multiple-choice examples only when it answers as many "
        "right as the base model (more right passes, fewer fails, whatever the margin)",
    )
    refine_default_steps: int = Field(16, ge=1, le=64, description="Refinement steps the refine policy starts")
    refine_learning_rate: float = Field(2e-3, gt=0.0, le=1.0, description="Learning rate of refinements")
    refine_batch_size: int = Field(8, ge=1, le=64, description="Examples per refinement step")
    refine_queue_size: int = Field(8, ge=1, le=1024, description="Refinements waiting before 429")

    # security
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list, description="Comma-separated")
    rate_limit_per_minute: int = Field(
        0, ge=0, description="Per API key (or client address); shared by every replica on one Redis; 0 = off"
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated addresses or networks (CIDR) of reverse proxies whose X-Forwarded-For / "
        "X-Forwarded-Proto are believed; from anyone else they are ignored. Empty: trust none",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # server
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value: object) -> object:
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",") if p.strip()]
        if isinstance(value, list):
            for proxy in value:
                try:
                    ipaddress.ip_network(str(proxy), strict=False)
                except ValueError:
                    raise ValueError(f"trusted_proxies: {proxy!r} is not an IP address or network") from None
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        return check_device_name(value)

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        return check_dtype_name(value)

    def placement(self) -> Placement:
        """The device and dtype on this machine; ``PlacementError`` (a ``ValueError``) says why they cannot be used.
        Imports torch (this module does not: the service's start-up shim reads the settings first)."""
        from generator.device import resolve_placement

        return resolve_placement(self.device, self.dtype)

    @field_validator("task_store")
    @classmethod
    def _check_store(cls, value: str) -> str:
        if value not in {"sqlite", "redis", "auto"}:
            raise ValueError("task_store must be sqlite, redis or auto")
        return value

    @property
    def use_redis_tasks(self) -> bool:
        return self.task_store == "redis" or (self.task_store == "auto" and bool(self.redis_url))

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.base_model

    def resolved_generator_path(self) -> Path | None:
        if self.generator_path is not None:
            return self.generator_path
        return packaged_generator(self.base_model)


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings; tests pass their own ``Settings`` to ``create_app`` instead."""
    return Settings()
