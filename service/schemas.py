"""Request and response models: the wire contract of the HTTP API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from generator.refine import MAX_REFINE_STEPS

TASK_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


def _valid_unicode(value: str) -> str:
    """JSON's ``\\ud800`` escapes decode to lone surrogates, which no tokenizer, hash or database takes: a 422 here
    instead of a 500 further in."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (a lone surrogate escape such as \\ud800 is not)") from None
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]

_EXAMPLE_SPEC: dict[str, Any] = {
    "description": "Classify the sentiment of a hotel review as positive or negative.",
    "examples": [
        {"input": "The room was spotless and the staff were lovely.", "output": "positive"},
        {"input": "Noisy, dirty and overpriced.", "output": "negative"},
    ],
}


class ExampleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: Text
    output: Text
    choices: list[Text] | None = Field(None, min_length=2, max_length=32)


class TaskSpecIn(BaseModel):
    """A task: a description, examples, or both."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_EXAMPLE_SPEC]})

    description: Text = ""
    examples: list[ExampleIn] = Field(default_factory=list)


RefineSteps = Annotated[
    int,
    Field(
        strict=True,
        ge=0,
        le=MAX_REFINE_STEPS,
        description="Refine the generated adapter on the examples with this many training steps, in the background "
        "(0: no refinement)",
    ),
]


class AdapterRequest(TaskSpecIn):
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Sample z from this seed; default z = 0")
    refine_steps: RefineSteps = 0


class SelfCheckOut(BaseModel):
    """Mean log-likelihood per answer token of the task's examples, with the adapter and with the base model."""

    base_loglik: float
    adapter_loglik: float
    delta: float = Field(description="adapter_loglik - base_loglik")
    examples: int = Field(description="Examples scored")
    held_out: bool = Field(description="True when they were not read by the task encoder")
    passed: bool


class AdapterMetadata(BaseModel):
    adapter_id: str
    generator_id: str
    base_model: str
    seed: int | None
    rank: int
    alpha: float
    target_modules: list[str]
    num_parameters: int
    sha256: str
    cached: bool = Field(description="True when served from a cache tier instead of generated for this request")
    weights_url: str
    self_check: SelfCheckOut | None = Field(
        None, description="The adapter's self-check, run once when it was made (None: the task has no examples)"
    )
    parent_adapter_id: str | None = Field(None, description="For a refined adapter: the generated one it refines")
    refine_steps: int | None = Field(None, description="For a refined adapter: its training steps")
    refined_adapter_id: str | None = Field(
        None, description="In the answer to POST with refine_steps: the id the refined adapter will have"
    )


class TaskCreate(TaskSpecIn):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"task_id": "hotel-sentiment", **_EXAMPLE_SPEC}]}
    )

    task_id: str | None = Field(None, pattern=TASK_ID_PATTERN, description="Default: derived from the spec")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    refine_steps: RefineSteps = 0


class RefinementOut(BaseModel):
    status: Literal["none", "queued", "running", "done", "failed"] = "none"
    steps: int = 0
    adapter_id: str | None = Field(None, description="The refined adapter's id (its content address)")
    error: str | None = Field(None, description="Why it failed")
    self_check: SelfCheckOut | None = None


class TaskOut(BaseModel):
    task_id: str
    description: str
    examples: list[ExampleIn]
    seed: int | None
    created_at: float
    adapter_id: str | None = Field(None, description="Content address of the task's adapter")
    adapter: AdapterMetadata | None = Field(None, description="Full metadata (in the response to POST)")
    self_check: SelfCheckOut | None = Field(None, description="The generated adapter's self-check")
    refinement: RefinementOut = Field(default_factory=RefinementOut)


class TaskList(BaseModel):
    data: list[TaskOut]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= to get the next page")


# --- OpenAI-compatible inference ---------------------------------------------------------------------------------


class _SamplingFields(BaseModel):
    model: Text = Field(description="A task id, or the base model's name for no adapter")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported")
    user: Text | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4 or any(not s or len(s) > 64 for s in stops):
            raise ValueError("stop: at most 4 non-empty strings of at most 64 characters")
        return stops


class CompletionRequest(_SamplingFields):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "hotel-sentiment", "prompt": "Input: Great view!\nOutput:", "max_tokens": 8}]
        }
    )

    prompt: Text


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatCompletionRequest(_SamplingFields):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "hotel-sentiment", "messages": [{"role": "user", "content": "Great view!"}]}]
        }
    )

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class ServingInfo(BaseModel):
    """Which adapter served a task's request (``icm_lora`` in completion responses, not part of OpenAI's format)."""

    adapter_id: str = Field(description="The task's adapter this is about (the one that served, unless served=base)")
    served: Literal["adapter", "base"]
    refined: bool = Field(description="True when adapter_id is the refined adapter")
    warning: str | None = Field(None, description="Set when the adapter failed its self-check")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    icm_lora: ServingInfo | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    icm_lora: ServingInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "icm-lora"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str
    checks: dict[str, Any] = Field(default_factory=dict)
