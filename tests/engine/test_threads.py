"""``EngineConfig.threads``: the engine thread runs on its own intra-op thread count, the caller keeps its own."""

from __future__ import annotations

import torch

from generator.base_model import load_base_model
from service.engine import Engine, EngineConfig, SamplingParams


def test_the_engine_thread_has_its_own_thread_count_and_the_caller_keeps_its_own() -> None:
    caller = torch.get_num_threads()
    wanted = 1 if caller > 1 else 2
    with Engine(load_base_model("tiny"), EngineConfig(num_slots=1, threads=wanted)) as engine:
        assert torch.get_num_threads() == caller
        assert engine._scheduler.call(torch.get_num_threads).result() == wanted
        result = engine.generate("hello there", None, SamplingParams(max_tokens=4, ignore_eos=True))
        assert len(result.token_ids) == 4
    with Engine(load_base_model("tiny"), EngineConfig(num_slots=1)) as engine:  # 0: torch's setting as it is
        assert engine._scheduler.call(torch.get_num_threads).result() == caller
