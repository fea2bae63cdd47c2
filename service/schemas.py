"""Request and response models: the wire contract of the HTTP API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

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
    model_config = ConfigDict(strict=True, extra="forbid")

    input: Text
    output: Text
    choices: list[Text] | None = Field(None, min_length=2, max_length=32)


class TaskSpecIn(BaseModel):
    """A task: a description, examples, or both."""

    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra={"examples": [_EXAMPLE_SPEC]})

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
    """Mean log-likelihood per answer token of the task's examples, with the adapter and with the base model, and for
    multiple-choice examples how many each answers right: fewer right than the base model fails, more passes, a tie
    is decided by the likelihood."""

    base_loglik: float
    adapter_loglik: float
    delta: float = Field(description="adapter_loglik - base_loglik")
    base_correct: int | None = Field(
        None, description="Examples whose top choice is the expected output, base model (null without choices)"
    )
    adapter_correct: int | None = Field(None, description="The same with the adapter")
    examples: int = Field(description="Examples scored")
    held_out: bool = Field(description="True when they were not read by the task encoder")
    passed: bool


class FileDigests(BaseModel):
    """SHA-256 of the exact bytes of each download format (``sha256sum`` of the downloaded file); also its ETag."""

    zip: str = Field(description="The PEFT folder as a zip (GET .../weights)")
    safetensors: str = Field(description="The bare safetensors file (GET .../weights?format=safetensors)")


class AdapterMetadata(BaseModel):
    adapter_id: str
    generator_id: str
    base_model: str
    seed: int | None
    rank: int
    alpha: float
    target_modules: list[str]
    num_parameters: int
    sha256: FileDigests
    tensors_sha256: str = Field(description="Digest of the tensors (keys, dtypes, shapes, values), whatever the format")
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

    task_id: str | None = Field(
        None,
        pattern=TASK_ID_PATTERN,
        description="1 to 128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit; not the base "
        "model's served name (any case). Default: task-<16 hex digits> derived from the spec and seed",
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    refine_steps: RefineSteps = 0
    replace: bool = Field(
        False,
        strict=True,
        description="Replace the spec of an existing task with this id (without it: 409): a new registration with a "
        "new adapter id; the task's metadata and defaults are kept, its old adapters leave the caches",
    )


class AdapterSummary(BaseModel):
    """An adapter this service can serve: its durable spec (the weights are regenerated from it on demand)."""

    adapter_id: str
    kind: Literal["generated", "refined"]
    description: str
    num_examples: int
    seed: int | None
    parent_adapter_id: str | None = Field(None, description="For a refined adapter: the generated one it refines")
    refine_steps: int | None = None
    url: str = Field(description="Its metadata (GET)")


class AdapterList(BaseModel):
    data: list[AdapterSummary]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= to get the next page")


class AdapterDeleted(BaseModel):
    adapter_id: str
    deleted: Literal[True] = True


# --- task settings (PATCH /v1/tasks/{task_id}) ----------------------------------------------------------------------

MAX_METADATA_KEYS = 32
MetadataKey = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]
MetadataValue = Annotated[Text, Field(max_length=512)]


class GenerationDefaults(BaseModel):
    """Generation settings stored with a task, applied to a completion for the task when the request does not set
    them. Types are strict: ``"5"`` is not a number."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: list[Annotated[Text, Field(min_length=1, max_length=64)]] | None = Field(None, max_length=4)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


IMMUTABLE_TASK_FIELDS = ("description", "examples", "seed", "task_id", "refine_steps")


class TaskPatch(BaseModel):
    """A JSON merge patch of a task's settings: a key set to null removes it; keys not given are unchanged. The spec
    (description, examples, seed) is immutable: a new spec is a new task id, or POST /v1/tasks with replace, since it
    is a new adapter."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"metadata": {"owner": "search-team"}, "defaults": {"max_tokens": 4, "stop": ["\n"]}}]
        },
    )

    metadata: dict[MetadataKey, MetadataValue | None] | None = Field(
        None, max_length=MAX_METADATA_KEYS, description="Free-form labels (string values); null removes a key"
    )
    defaults: GenerationDefaults | None = Field(
        None, description="Generation settings used when a request does not set them; a field set to null is removed"
    )

    @model_validator(mode="before")
    @classmethod
    def _spec_is_immutable(cls, data: object) -> object:
        immutable = [f for f in IMMUTABLE_TASK_FIELDS if isinstance(data, dict) and f in data]
        if immutable:
            raise ValueError(
                f"{', '.join(immutable)}: a task's spec is immutable (its adapter id is derived from it); register the "
                'new spec under a new task id, or POST /v1/tasks with "replace": true'
            )
        return data


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
    metadata: dict[str, str] = Field(default_factory=dict, description="Labels set with PATCH")
    defaults: dict[str, Any] = Field(
        default_factory=dict, description="Generation settings applied when a completion request does not set them"
    )


class TaskList(BaseModel):
    data: list[TaskOut]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= to get the next page")


# --- name resolution (POST /v1/resolve) ------------------------------------------------------------------------------

MAX_RESOLVE_NAMES = 256


class ResolveRequest(BaseModel):
    model_config = ConfigDict(
        strict=True, extra="forbid", json_schema_extra={"examples": [{"names": ["hotel-sentiment"]}]}
    )

    names: list[Annotated[Text, Field(min_length=1, max_length=128)]] = Field(
        min_length=1, max_length=MAX_RESOLVE_NAMES, description="Task ids or adapter ids, in any mix"
    )


class Resolution(BaseModel):
    """``task_id`` and ``adapter_id`` are null for a name that is neither a registered task nor a servable adapter."""

    name: str
    task_id: str | None = Field(None, description="The task the name registers; null for an adapter id")
    adapter_id: str | None = Field(
        None,
        description="The adapter served for it outside icm-lora: a task's refined adapter once done, else its "
        "generated one",
    )


class ResolveResponse(BaseModel):
    data: list[Resolution] = Field(description="One per name, in the request's order")


# --- OpenAI-compatible inference ---------------------------------------------------------------------------------

MAX_CHOICES = 8  # n
MAX_PROMPTS = 16  # a list of prompts on /v1/completions
MAX_LOGIT_BIAS = 300
MAX_TOP_LOGPROBS = 20


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    include_usage: bool = Field(False, description="Send one more chunk before [DONE]: empty choices, the usage")


class _SamplingFields(BaseModel):
    """OpenAI's sampling fields. Strict: a JSON string is never read as a number or a boolean; a field this server
    does not know is a 422 naming it (nothing is silently ignored)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: Text = Field(description="A task id, or the base model's name for no adapter")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most (default 64)")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Default 1; 0 is greedy decoding")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Default 1")
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="With n > 1, choice j uses seed + j")
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="Only with stream: true")
    n: int | None = Field(None, ge=1, le=MAX_CHOICES, description="Choices to generate for each prompt (default 1)")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS, description="Token id (as a string) -> bias added to its logit"
    )
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

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not (key.isascii() and key.isdigit() and len(key) <= 9):
                raise ValueError(f"logit_bias keys are token ids written as strings of digits, got {key[:20]!r}")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ; give one of them")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1


class CompletionRequest(_SamplingFields):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "hotel-sentiment", "prompt": "Input: Great view!\nOutput:", "max_tokens": 8}]
        }
    )

    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        description=f"A prompt, or a list of up to {MAX_PROMPTS} (choices are numbered prompt by prompt)"
    )
    echo: bool = Field(False, description="Put the prompt in front of each choice's text (and its logprobs)")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="Each token's log-probability and this many most likely tokens"
    )

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["text"] = Field(description="Only text parts are supported")
    text: Text


class ChatMessage(BaseModel):
    """``developer`` is read as ``system``; a list of text parts is joined with newlines. ``name`` (OpenAI's
    participant name) is accepted and not given to the chat template, which has no place for it."""

    model_config = ConfigDict(strict=True, extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(min_length=1, max_length=64)]
    name: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")

    def template_message(self) -> dict[str, str]:
        """What the chat template gets."""
        content = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_SamplingFields):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"model": "hotel-sentiment", "messages": [{"role": "user", "content": "Great view!"}]}]
        }
    )

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    logprobs: bool = Field(False, description="Each generated token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Needs logprobs: true")

    @model_validator(mode="after")
    def _check_top_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy format: one entry per token; ``top_logprobs`` maps token text to log-probability."""

    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="None for a first prompt token (echo) with no context")
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int] = Field(description="Offsets in prompt + text (echo) or from the prompt's end")

    def followed_by(self, other: CompletionLogprobs) -> CompletionLogprobs:
        return CompletionLogprobs(
            tokens=self.tokens + other.tokens,
            token_logprobs=self.token_logprobs + other.token_logprobs,
            top_logprobs=self.top_logprobs + other.top_logprobs,
            text_offset=self.text_offset + other.text_offset,
        )


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] = Field(description="UTF-8 bytes of token (of U+FFFD where a token is part of a character)")


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobOut]
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


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
