"""Request and response models: the service's wire contract (``service/schemas.py``), written again here so that the
client depends on httpx and pydantic only. Unknown response fields are ignored, so a newer service stays readable."""

from __future__ import annotations

from typing import Any, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict as ValidatedTypedDict  # typing.TypedDict is not validated by pydantic on 3.11


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Example(_Model):
    """One input/output example of a task; ``choices`` for multiple-choice tasks."""

    input: str
    output: str
    choices: list[str] | None = None


class SelfCheck(_Model):
    """An adapter's self-check: mean log-likelihood per answer token of the task's examples, with the adapter and
    with the base model, and for multiple-choice examples how many each answers right (None without choices);
    ``passed`` when the adapter answers no fewer right and, on a tie, is not less likely (by the service's
    margin)."""

    base_loglik: float
    adapter_loglik: float
    delta: float
    base_correct: int | None = None
    adapter_correct: int | None = None
    examples: int
    held_out: bool
    passed: bool


class Refinement(_Model):
    """A task's refinement: ``status`` none, queued, running, done or failed; ``adapter_id`` the refined adapter."""

    status: Literal["none", "queued", "running", "done", "failed"] = "none"
    steps: int = 0
    adapter_id: str | None = None
    error: str | None = None
    self_check: SelfCheck | None = None


class ServingInfo(_Model):
    """``icm_lora`` in a task's completion: which adapter served it (``served`` "adapter" or "base") and the
    warning the service gives when the adapter failed its self-check (also the ``X-ICM-LoRA-Warning`` header)."""

    adapter_id: str
    served: Literal["adapter", "base"]
    refined: bool = False
    warning: str | None = None


class FileDigests(_Model):
    """SHA-256 of the exact bytes of each download format (what ``sha256sum`` of the downloaded file prints)."""

    zip: str
    safetensors: str


class AdapterMetadata(_Model):
    adapter_id: str
    generator_id: str
    base_model: str
    seed: int | None = None
    rank: int
    alpha: float
    target_modules: list[str]
    num_parameters: int
    sha256: FileDigests
    tensors_sha256: str = Field(description="Digest of the tensors, whatever the format")
    cached: bool
    weights_url: str
    self_check: SelfCheck | None = None
    parent_adapter_id: str | None = Field(None, description="For a refined adapter: the adapter it refines")
    refine_steps: int | None = None
    refined_adapter_id: str | None = Field(None, description="Only in the answer to generate_adapter(refine_steps=N)")


class AdapterSummary(_Model):
    """One entry of ``list_adapters``: an adapter the service can serve (from its stored spec)."""

    adapter_id: str
    kind: Literal["generated", "refined"]
    description: str
    num_examples: int
    seed: int | None = None
    parent_adapter_id: str | None = None
    refine_steps: int | None = None
    url: str


class AdapterPage(_Model):
    data: list[AdapterSummary]
    next_cursor: str | None = None


class AdapterDeleted(_Model):
    adapter_id: str
    deleted: bool


class TaskDefaults(ValidatedTypedDict, total=False):
    """Generation settings stored with a task (``update_task``), used when a completion request does not set them.
    In ``update_task`` a field set to None removes it."""

    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    stop: list[str] | None
    seed: int | None


class Task(_Model):
    task_id: str
    description: str
    examples: list[Example]
    seed: int | None = None
    created_at: float
    adapter_id: str | None = None
    adapter: AdapterMetadata | None = Field(None, description="Only in the answer to create_task")
    self_check: SelfCheck | None = None
    refinement: Refinement = Field(default_factory=Refinement)
    metadata: dict[str, str] = Field(default_factory=dict, description="Labels set with update_task")
    defaults: TaskDefaults = Field(default_factory=lambda: TaskDefaults(), description="Set with update_task")


class TaskPage(_Model):
    data: list[Task]
    next_cursor: str | None = None


class Resolution(_Model):
    """What ``resolve`` found for a name: a task (``task_id``) or an adapter id; both None when neither.
    ``adapter_id`` is the adapter served for it outside icm-lora: a task's refined adapter once done, else its
    generated one."""

    name: str
    task_id: str | None = None
    adapter_id: str | None = None


class ResolvePage(_Model):
    data: list[Resolution]


class ChatMessage(_Model):
    """``developer`` is read as ``system`` by the service."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(_Model):
    index: int = 0
    text: str
    finish_reason: str | None = None


class Completion(_Model):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    icm_lora: ServingInfo | None = None

    @property
    def text(self) -> str:
        """The first choice's text (``choices`` has ``n`` of them when ``n`` is given)."""
        return self.choices[0].text if self.choices else ""


class ChatChoice(_Model):
    index: int = 0
    message: ChatMessage
    finish_reason: str | None = None


class ChatCompletion(_Model):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    icm_lora: ServingInfo | None = None

    @property
    def content(self) -> str:
        """The first choice's message content."""
        return self.choices[0].message.content if self.choices else ""


class CompletionChunkChoice(_Model):
    index: int = 0
    text: str = ""
    finish_reason: str | None = None


class CompletionChunk(_Model):
    """One server-sent event of a streamed completion."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    icm_lora: ServingInfo | None = Field(None, description="In the final chunk of a task's stream")

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.choices)

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None


class ChatDelta(_Model):
    role: Literal["system", "user", "assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Model):
    index: int = 0
    delta: ChatDelta = Field(default_factory=ChatDelta)
    finish_reason: str | None = None


class ChatCompletionChunk(_Model):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    icm_lora: ServingInfo | None = Field(None, description="In the final chunk of a task's stream")

    @property
    def text(self) -> str:
        return "".join(c.delta.content or "" for c in self.choices)

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None


class Model(_Model):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "icm-lora"


class ModelList(_Model):
    object: str = "list"
    data: list[Model]


class Health(_Model):
    status: str
    checks: dict[str, Any] = Field(default_factory=dict)


class SamplingOptions(TypedDict, total=False):
    """Optional fields of ``complete`` and ``chat``, passed through to the service as given."""

    max_tokens: int
    max_completion_tokens: int
    temperature: float
    top_p: float
    stop: str | list[str]
    seed: int
    user: str
    n: int
    presence_penalty: float
    frequency_penalty: float
    logit_bias: dict[str, float]
