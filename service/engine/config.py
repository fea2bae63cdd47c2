"""Engine sizes. Frozen and checked on creation, like the generator's settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    """``num_slots`` LoRA slots of rank ``max_rank`` per target module. Smaller ranks are zero-padded (exact, but each
    slot costs memory traffic in every mixed-batch step in proportion to ``max_rank``), larger ones are refused: set it
    to the generator's LoRA rank (4 by default, ``LoraSettings.rank``).

    ``max_batch_size``: rows decoded together. ``max_queue``: waiting requests beyond which ``submit`` raises
    ``QueueFull``. ``max_prefill_tokens``: padded prompt tokens prefilled in one forward pass (new requests beyond it
    wait for the next step). ``check_base_model``: refuse adapters whose ``base_model`` names another model.
    ``prefill_chunk``: the prefill token budget of one loop iteration for a long prompt: a prompt longer than this is
    read in chunks of this many tokens, one chunk between two decode steps (running streams keep decoding meanwhile);
    shorter prompts are prefilled together in one pass as before. The same budget bounds the other work that runs
    between two decode steps: a hidden-state read for adapter generation and the self-check's scoring go in passes of at
    most this many padded tokens (a single row longer than that is a pass of its own). ``max_prepared``: prepared
    adapters (checked and laid out as a slot row) kept by adapter id, least recently used dropped first, so a request
    for an adapter seen recently prepares nothing. ``kv_cache_bytes``: the KV cache's memory budget. Admission reserves,
    for the batch, rows x the longest (prompt + max_tokens) among them (the cache is left-padded to its longest row); a
    request that would exceed it waits until rows leave, and one that could never fit alone is refused
    (``RequestTooLarge``). The cache's buffers grow with spare room (up to half again), so memory may reach about 1.5x
    the budget.
    ``prefill_chunk_target_ms``: while rows are decoding, size each chunk of a long prompt so that its pass takes
    about this long (``pacing.py``: from the seconds per token of the chunk before; at most ``prefill_chunk`` and
    twice the chunk before, at least 8 tokens), on the CPU; 0 keeps every chunk at ``prefill_chunk``. A smaller
    value keeps running streams closer to their pace while a long prompt is read, and makes that prompt's first token
    later.
    ``max_decode_groups``: running rows may decode in up to this many groups, one forward pass each, so that a long
    row does not pad every short one (the scheduler's module docstring); 1 keeps every row in one pass.
    ``prefix_cache_entries``: adapters (the base model counts as one) whose keys and values of the chat template's
    opening are kept, so that a chat prompt prefills only what follows it (``prefix_cache.py``); 0 turns it off.
    ``packed_linears``: on the CPU, generation runs its Linears on weights oneDNN has laid out once, q/k/v and gate/up
    as one GEMM each (``packed.py``: faster, a second copy of the weights in memory, greedy tokens equal to plain
    peft's except at near ties); the passes that make adapters keep the plain weights. Off by default here (exact
    parity); the service turns it on.
    ``matmul_decode_attention``: on the CPU in float32, a decode step's attention runs as two batched matmuls instead
    of SDPA's flash kernel (``attention.py``: faster at decode sizes, equal up to float rounding); every pass without
    a cache, among them those that make adapters, keeps SDPA. Off by default here; the service turns it on.
    ``fused_passes``: on the CPU, all decode groups' steps and a long prompt's chunk go in one forward pass per step
    (``fused.py``: one pass over the weights instead of one per group and chunk, so a chunk or a second group adds
    only its tokens' cost); equal up to float rounding. Off by default here; the service turns it on.
    ``attend_rows_alone``: in bf16 / fp16 on the CPU, a decode step attends each row over its own keys only
    (``attention.py``), so a row's tokens do not depend on the other rows' padding (greedy parity with plain peft in
    a mixed batch); off: one SDPA call over the padded rows, faster (measured 1.25x the bf16 tok/s with 16 adapters),
    and a near tie may then go another way in a mixed batch. fp32 is unaffected.
    ``threads``: intra-op threads of the engine thread (0: torch's setting as it is). With N > 0 the engine thread
    runs on N and the thread that builds the engine keeps its own setting. The service gives the engine every core
    and every other thread one: once a process has more OpenMP threads than cores, libgomp stops spinning between
    parallel regions for all of them, and a decode step's small ops each wait for a woken thread (measured: a LoRA
    ``bmm`` pair 14 -> 93 us, the engine 200 -> 250 tok/s at batch 16 when only it runs multi-threaded).
    ``arrival_wait_ms``: how long an idle engine holds its first prefill while requests it has been told of
    (``Engine.arrival``) are still on their way to ``submit``, so that a burst which reaches it one request at a time
    is prefilled in one pass (0: never). A request with no other arrival open is not held. The service turns it on.
    """

    num_slots: int = 16
    max_rank: int = 4
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    max_batch_size: int = 32
    max_queue: int = 256
    max_prefill_tokens: int = 2048
    check_base_model: bool = True
    max_prepared: int = 256
    prefill_chunk: int = 256
    prefill_chunk_target_ms: float = 0.0
    kv_cache_bytes: int = 4 * 2**30
    max_decode_groups: int = 4
    prefix_cache_entries: int = 64
    packed_linears: bool = False
    matmul_decode_attention: bool = False
    fused_passes: bool = False
    attend_rows_alone: bool = True
    threads: int = 0
    arrival_wait_ms: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.target_modules, tuple):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        for name in (
            "num_slots",
            "max_rank",
            "max_batch_size",
            "max_queue",
            "max_prefill_tokens",
            "max_prepared",
            "prefill_chunk",
            "max_decode_groups",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.prefill_chunk_target_ms < 0:
            raise ValueError(f"EngineConfig.prefill_chunk_target_ms must be >= 0, got {self.prefill_chunk_target_ms}")
        if self.threads < 0:
            raise ValueError(f"EngineConfig.threads must be >= 0, got {self.threads}")
        if self.arrival_wait_ms < 0:
            raise ValueError(f"EngineConfig.arrival_wait_ms must be >= 0, got {self.arrival_wait_ms}")
        if self.prefix_cache_entries < 0:
            raise ValueError(f"EngineConfig.prefix_cache_entries must be >= 0, got {self.prefix_cache_entries}")
        if not self.target_modules:
            raise ValueError("EngineConfig.target_modules is empty")
