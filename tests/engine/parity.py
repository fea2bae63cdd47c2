"""Engine vs plain peft on one base model in one dtype: greedy tokens (alone and in one mixed batch) and answer
log-likelihoods. Shared by the low-precision and the architecture tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel

from generator.adapter import GeneratedAdapter
from generator.base_model import BaseModel
from generator.batching import answer_logprobs, encode_pair, pad_pairs
from generator.config import LoraSettings
from generator.lora_layout import LoraLayout
from generator.selfcheck import encode_groups
from generator.tasks import Example, format_prompt, format_target
from service.engine import Engine, EngineConfig, SamplingParams

# where the parity tests run: the CPU in CI; bench/gpu.sh sets cuda (tiny models are built on the CPU, then moved)
TEST_DEVICE = torch.device(os.environ.get("ICM_LORA_TEST_DEVICE", "cpu"))

EXAMPLES = (
    Example("red green blue", "blue green red"),
    Example("one two", "two one"),
    Example("a much longer input with many more words in it than the others", "it"),
)


@dataclass
class Parity:
    alone: list[list[int]]  # engine, one request at a time
    mixed: list[list[int]]  # engine, every row in one batch
    reference: list[list[int]]  # plain peft, one request at a time
    engine_scores: torch.Tensor  # [adapters, examples] mean answer log-probability per token
    reference_scores: torch.Tensor
    reference_logits: list[torch.Tensor]  # per reference row, [steps, vocab] in fp32: how close each choice was

    @staticmethod
    def agreement(got: Sequence[Sequence[int]], want: Sequence[Sequence[int]]) -> float:
        """Share of generated positions whose token equals the reference's."""
        same = total = 0
        for a, b in zip(got, want, strict=True):
            total += max(len(a), len(b))
            same += sum(x == y for x, y in zip(a, b, strict=False))
        return same / total

    def first_divergences(self, got: Sequence[Sequence[int]]) -> list[float]:
        """For each row of ``got`` that leaves the reference: how far the engine's token at the first differing
        position is below the reference's choice there, in the reference's own logits (0 = an exact tie)."""
        gaps = []
        for row, (a, b) in enumerate(zip(got, self.reference, strict=True)):
            differ = [i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y]
            if differ:
                logits = self.reference_logits[row][differ[0]]
                gaps.append(float(logits[b[differ[0]]] - logits[a[differ[0]]]))
        return gaps


FP32_NEAR_TIE = 1e-3  # logits: a fast path's fp32 rounding differs from plain peft's by about 1e-6 relative
BF16_NEAR_TIE = 0.0625  # logits: 2 bf16 ulps at the tiny model's logit magnitudes (4-8), where bf16's ulp is 1/32
BF16_MIXED_FLOOR = 0.95  # the target, alone and mixed; see test_low_precision.py


def assert_equal_up_to_near_ties(parity: Parity, near_tie: float = FP32_NEAR_TIE) -> None:
    """Greedy tokens equal peft's on at least 95% of positions alone and mixed, every row that leaves them doing so
    at a near tie of peft's own logits, and the self-check's scores as exact as without a fast path."""
    assert Parity.agreement(parity.alone, parity.reference) >= 0.95
    assert Parity.agreement(parity.mixed, parity.reference) >= 0.95
    gaps = parity.first_divergences(parity.alone) + parity.first_divergences(parity.mixed)
    assert all(gap <= near_tie for gap in gaps), gaps
    assert torch.allclose(parity.engine_scores, parity.reference_scores, atol=1e-5)


def run_parity(
    load: Callable[[], BaseModel],
    adapters: Sequence[GeneratedAdapter | None],
    prompts: Sequence[str],
    max_tokens: int,
    folder: Path,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    packed: bool = False,
    decode_attention: bool = False,
    prefill_chunk: int = 256,
    fused: bool = False,
) -> Parity:
    """Every prompt with every adapter (None: the base model); ``load`` builds a fresh copy of the base model.
    ``packed``: the engine generates on packed Linear weights (``EngineConfig.packed_linears``); ``decode_attention``:
    its decode steps attend through batched matmuls (``EngineConfig.matmul_decode_attention``); ``prefill_chunk``:
    longer prompts are read in chunks, ``fused``: in the passes of decode steps (``fused_passes``)."""
    engine_base = load()
    tokenizer = engine_base.tokenizer
    rows = [(tokenizer(p)["input_ids"], a) for a in adapters for p in prompts]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    groups = encode_groups(tokenizer, EXAMPLES, max_length=48, choices=False)
    pairs = [encode_pair(tokenizer, format_prompt(e.input), format_target(e.output), 48) for e in EXAMPLES]
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    config = EngineConfig(
        num_slots=len(adapters),
        target_modules=target_modules,
        packed_linears=packed,
        matmul_decode_attention=decode_attention,
        prefill_chunk=prefill_chunk,
        fused_passes=fused,
    )
    with Engine(engine_base, config) as engine:
        alone = [engine.generate(ids, a, params).token_ids for ids, a in rows]
        mixed = [r.token_ids for r in engine.generate_many([r[0] for r in rows], [r[1] for r in rows], params)]
        engine_scores = engine.answer_logprobs(groups, adapters)  # every adapter's rows in one pass

    batch = pad_pairs(pairs, pad)
    reference: list[list[int]] = []
    reference_logits: list[torch.Tensor] = []
    reference_scores = []
    for i, a in enumerate(adapters):
        model = load().model
        if a is not None:
            # the adapter in the base model's dtype, as the engine's slots hold it (peft would upcast it to fp32)
            model = PeftModel.from_pretrained(model, a.save_peft(folder / f"a{i}"), autocast_adapter_dtype=False)
        model.eval()
        device = next(model.parameters()).device
        with torch.inference_mode():
            for ids, row_adapter in rows:
                if row_adapter is not a:
                    continue
                tokens, logits_per_step = _greedy(model, ids, max_tokens, device)
                reference.append(tokens)
                reference_logits.append(logits_per_step)
            logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
            total, count = answer_logprobs(logits, batch.labels.to(device))
            reference_scores.append((total / count.clamp_min(1)).float().cpu())
    return Parity(alone, mixed, reference, engine_scores, torch.stack(reference_scores), reference_logits)


def _greedy(
    model: torch.nn.Module, ids: Sequence[int], max_tokens: int, device: torch.device
) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding with the model's own KV cache, through EOS (the engine's ``ignore_eos``; ``generate`` would
    stop there, or with ``min_new_tokens`` mask EOS out); the tokens and each step's logits (fp32, CPU)."""
    input_ids = torch.tensor([list(ids)], device=device)
    out = model(input_ids=input_ids, use_cache=True)
    tokens: list[int] = []
    steps: list[torch.Tensor] = []
    while True:
        last = out.logits[0, -1]
        steps.append(last.float().cpu())
        token = last.argmax()
        tokens.append(int(token))
        if len(tokens) == max_tokens:
            return tokens, torch.stack(steps)
        out = model(input_ids=token.view(1, 1), cache=out.past_key_values, use_cache=True)


def architecture_adapters(
    architecture: str, base: BaseModel, seeds: Sequence[int] = (1, 2)
) -> tuple[LoraSettings, list[GeneratedAdapter | None]]:
    """The LoRA settings of a tiny architecture (Phi-3 fuses ``qkv_proj``) and [no adapter, one random adapter per
    seed] for ``base``."""
    settings = LoraSettings(target_modules=("qkv_proj",) if architecture == "phi3" else ("q_proj", "v_proj"))
    layout = LoraLayout.from_model(base.model, settings)
    adapters: list[GeneratedAdapter | None] = [None]
    for seed in seeds:
        vector = torch.randn(layout.dim, generator=torch.Generator().manual_seed(seed)) * 0.5
        adapters.append(GeneratedAdapter(layout.unflatten(vector), settings, base.name, f"{architecture}-{seed}"))
    return settings, adapters
