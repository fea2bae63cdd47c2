"""The self-check in the service: run once per adapter when it is made, stored in its metadata, and the serving
decision it drives (``ICM_LORA_SELF_CHECK``).

The check (``generator.selfcheck``) scores the task's examples with the adapter and with the base model through the
engine (``Engine.answer_logprobs``), so the service keeps one copy of the model. Its result goes into the adapter's
metadata (``self_check``, JSON), which the safetensors header carries: every cache tier keeps it, and a regenerated
adapter gets the same result. The adapter id does not depend on it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from generator.adapter import GeneratedAdapter
from generator.batching import AnswerGroup
from generator.selfcheck import AnswerScorer, SelfCheck, SelfCheckPolicy, describe, self_check
from generator.tasks import TaskSpec
from service.task_store import CheckResult, Refinement

CHECK_KEY = "self_check"


class BaseScores:
    """An ``AnswerScorer`` around another that keeps the base model's scores of each list of answer groups (least
    recently used dropped first, ``entries`` of them): the check of a refined adapter, of a regenerated one, or of
    another spec with the same examples scores only the adapter's rows, and its base figures are those of the first
    check of those examples."""

    def __init__(self, scorer: AnswerScorer, entries: int = 256) -> None:
        self.scorer = scorer
        self.entries = entries
        self.hits_total = 0
        self._base: OrderedDict[tuple[AnswerGroup, ...], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, groups: Sequence[AnswerGroup], adapters: Sequence[GeneratedAdapter | None]) -> torch.Tensor:
        key = tuple(groups)
        with self._lock:
            cached = self._base.get(key)
            if cached is not None:
                self._base.move_to_end(key)
        if cached is None or None not in adapters:
            scores = self.scorer(groups, adapters)
            if None in adapters:
                with self._lock:
                    self._base[key] = scores[list(adapters).index(None)].clone()
                    while len(self._base) > self.entries:
                        self._base.popitem(last=False)
            return scores
        with self._lock:
            self.hits_total += 1
        rest = [a for a in adapters if a is not None]
        scored = iter(self.scorer(groups, rest)) if rest else iter(())
        return torch.stack([cached if a is None else next(scored) for a in adapters])


class AdapterChecker:
    """``(spec, adapter) -> SelfCheck | None``; blocking, called from a worker thread one at a time (it owns its
    tokenizer copy: fast tokenizers are not safe to share between threads). The base model's scores of a set of
    examples are kept (``BaseScores``)."""

    def __init__(
        self, scorer: AnswerScorer, tokenizer: PreTrainedTokenizerBase, read: int, max_length: int, margin: float
    ) -> None:
        self.scorer = scorer if isinstance(scorer, BaseScores) else BaseScores(scorer)
        self.tokenizer = copy.deepcopy(tokenizer)
        self.read = read
        self.max_length = max_length
        self.margin = margin

    def __call__(self, spec: TaskSpec, adapter: GeneratedAdapter) -> SelfCheck | None:
        return self_check(spec, adapter, self.scorer, self.tokenizer, self.read, self.max_length, self.margin)


def with_check(adapter: GeneratedAdapter, check: SelfCheck) -> GeneratedAdapter:
    """The same adapter (same id and tensors) with the check in its metadata."""
    metadata = {**adapter.metadata, CHECK_KEY: json.dumps(check.to_dict(), sort_keys=True)}
    return dataclasses.replace(adapter, metadata=metadata)


def check_of(adapter: GeneratedAdapter) -> CheckResult | None:
    """The check stored in an adapter's metadata; None when it has none (no examples, or made before checks)."""
    raw = adapter.metadata.get(CHECK_KEY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def passed(check: CheckResult | None) -> bool:
    """An unchecked adapter (no examples to check against) counts as passing: there is nothing to compare."""
    return check is None or bool(check.get("passed", True))


Use = Literal["refined", "generated", "base"]


@dataclass(frozen=True)
class ServingChoice:
    """Which adapter serves a task, and the warning every response about it carries (None when all is well)."""

    use: Use
    adapter_id: str
    warning: str | None = None


def _describe(kind: str, adapter_id: str, check: CheckResult | None) -> str:
    how = describe(check) if check else ""
    return f"the {kind} adapter {adapter_id} failed its self-check" + (f" ({how})" if how else "")


def choose_adapter(
    policy: SelfCheckPolicy,
    generated_id: str,
    generated_check: CheckResult | None,
    refinement: Refinement,
) -> ServingChoice:
    """A refined adapter that passes wins, then a generated one that passes. When neither passes: ``keep`` serves
    the adapter anyway (the refined one if there is one), ``fallback`` and ``refine`` serve the base model; either
    way with a warning. Never a silent downgrade."""
    refined = refinement.adapter_id if refinement.status == "done" else None
    if refined is not None and passed(refinement.self_check):
        return ServingChoice("refined", refined)
    if passed(generated_check):
        return ServingChoice("generated", generated_id)
    if refined is not None:
        failed_id, why = refined, _describe("refined", refined, refinement.self_check)
    else:
        failed_id, why = generated_id, _describe("generated", generated_id, generated_check)
    if policy == "keep":
        return ServingChoice("refined" if refined else "generated", failed_id, f"{why}; served anyway (policy keep)")
    if policy == "refine" and refinement.status in ("queued", "running"):
        return ServingChoice(
            "base", failed_id, f"{why}; the base model serves until its refinement ({refinement.status}) passes"
        )
    return ServingChoice("base", failed_id, f"{why}; the base model served this request instead")
