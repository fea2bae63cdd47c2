"""Frozen, validated settings shared by the offline pipeline and the service.

Every dataclass checks itself in ``__post_init__`` so a bad value fails where it is written, not deep in a training
loop. All of them round-trip through plain dicts (``to_dict`` / ``from_dict``) because they are stored in JSON
manifests and generator checkpoints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Self


class ConfigError(ValueError):
    """A setting is out of range or inconsistent."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


class _DictMixin:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - names
        _require(not unknown, f"{cls.__name__}: unknown fields {sorted(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


@dataclass(frozen=True)
class LoraSettings(_DictMixin):
    """Which modules get a LoRA and of what shape."""

    rank: int = 4
    alpha: float = 8.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        _require(1 <= self.rank <= 256, f"LoRA rank must be in [1, 256], got {self.rank}")
        _require(self.alpha > 0, f"LoRA alpha must be positive, got {self.alpha}")
        _require(len(self.target_modules) > 0, "at least one target module is needed")
        _require(len(set(self.target_modules)) == len(self.target_modules), "target modules must be distinct")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class LoraTrainingSettings(_DictMixin):
    """How one task's LoRA is trained and which checkpoints are kept.

    ``init_seed`` is the same for every task on purpose: all LoRAs then start from the same A matrices, so their
    weights live in one shared coordinate system that a generator can learn (different random inits would make the
    collection mostly noise).

    ``end_token``: every training answer is followed by the tokenizer's end-of-sequence token, so an adapter learns to
    stop after its answer (a label task's completion is " negative", then ``finish_reason: "stop"``).
    """

    steps: int = 40
    batch_size: int = 8
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    max_length: int = 80
    checkpoints: int = 5
    checkpoint_every: int = 4
    init_seed: int = 0
    data_seed: int = 0
    end_token: bool = True

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "steps must be >= 1")
        _require(self.batch_size >= 1, "batch_size must be >= 1")
        _require(self.learning_rate > 0, "learning_rate must be positive")
        _require(self.max_length >= 8, "max_length must be >= 8")
        _require(self.checkpoints >= 1, "checkpoints must be >= 1")
        _require(self.checkpoint_every >= 1, "checkpoint_every must be >= 1")
        _require(
            (self.checkpoints - 1) * self.checkpoint_every < self.steps,
            f"{self.checkpoints} checkpoints every {self.checkpoint_every} steps do not fit in {self.steps} steps",
        )

    def checkpoint_steps(self) -> list[int]:
        """Steps (1-based) after which a checkpoint is kept: the tail of the trajectory, ending at the last step."""
        return [self.steps - i * self.checkpoint_every for i in reversed(range(self.checkpoints))]


@dataclass(frozen=True)
class TaskEncoderSettings(_DictMixin):
    """How a task becomes a task vector.

    ``hidden_layer``: which hidden state of the base model is read for the in-context vector; negative counts from the
    end, ``None`` means the middle layer (where in-context task vectors are known to be most informative).

    ``example_read``: ``"separate"`` reads each example alone (``Input: x Output: y``, last token) and averages;
    ``"in_context"`` reads the task the way in-context learning does (Hendel et al., 2023, "In-context learning
    creates task vectors"): the other examples as demonstrations followed by one example's input, at the position
    where the model is about to answer, averaged over up to ``queries`` such contexts (the last examples as queries).
    ``max_length`` bounds each text read (a context is cut from the left, so the query and the nearest
    demonstrations stay).
    """

    max_examples: int = 8
    max_length: int = 96
    hidden_layer: int | None = None
    use_description: bool = True
    use_examples: bool = True
    example_read: str = "separate"
    queries: int = 3

    def __post_init__(self) -> None:
        _require(1 <= self.max_examples <= 256, "max_examples must be in [1, 256]")
        _require(self.example_read in ("separate", "in_context"), "example_read must be separate or in_context")
        _require(1 <= self.queries <= 256, "queries must be in [1, 256]")
        _require(self.max_length >= 8, "max_length must be >= 8")
        _require(self.use_description or self.use_examples, "the encoder needs the description or the examples")


@dataclass(frozen=True)
class CVAEConfig(_DictMixin):
    """Sizes of the conditional VAE.

    The flat LoRA vector is cut into chunks (one per LoRA matrix, see ``LoraLayout.chunk_sizes``) that share one
    encoder and one decoder head, told apart by a learned chunk embedding, plus a chunk-specific basis of rank
    ``basis_rank``. That keeps the generator small when the base model has many layers (see ``cvae.py``).
    """

    lora_dim: int
    cond_dim: int
    chunk_sizes: tuple[int, ...]
    latent_dim: int = 32
    hidden_dim: int = 256
    chunk_embedding_dim: int = 32
    basis_rank: int = 4

    def __post_init__(self) -> None:
        _require(self.basis_rank >= 0, "basis_rank must be >= 0")
        _require(self.lora_dim >= 1, "lora_dim must be >= 1")
        _require(self.cond_dim >= 1, "cond_dim must be >= 1")
        _require(len(self.chunk_sizes) >= 1, "at least one chunk")
        _require(sum(self.chunk_sizes) == self.lora_dim, "chunk sizes must add up to lora_dim")
        _require(self.latent_dim >= 1 and self.hidden_dim >= 1, "latent_dim and hidden_dim must be >= 1")
        _require(self.chunk_embedding_dim >= 1, "chunk_embedding_dim must be >= 1")


@dataclass(frozen=True)
class CVAETrainingSettings(_DictMixin):
    """How the CVAE is trained on the collection.

    ``condition_dropout``: probability of hiding the examples part of a task vector during training;
    ``description_dropout`` (default: the same) that of hiding the description, so that the generator works from a
    description alone or from examples alone, and has to read the examples where tasks share a description.

    ``steps`` train the CVAE to reconstruct the collection's LoRAs; ``e2e_steps`` then (or from scratch, with
    ``steps = 0``) train it end to end: the generated LoRA is applied to the base model and the loss is the task's
    next-token loss on its train examples (``e2e_tasks_per_step`` tasks x ``e2e_examples_per_task`` examples a step).

    ``e2e_contrast_weight`` > 0 adds a task-specificity term: each task's examples are also scored under another
    chosen task's LoRA (a sibling from the same family when one exists, with probability ``e2e_sibling_rate``), and
    ``max(0, margin - (loss under the other LoRA - loss under its own))`` per task is added with that weight, so an
    adapter that helps every task alike (a format adapter) is not enough.

    ``e2e_init``: a generator folder (training or packed form) whose decoder, normalisation and condition statistics
    the end-to-end training starts from instead of a fresh decoder: a trained generator continued for more steps
    (with a new ``seed``, new batches), with a fresh optimiser and learning-rate schedule. Needs ``steps = 0``; the
    generator must match the run's base model, LoRA layout and task encoder. Its id is recorded in the new one.
    """

    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    kl_weight: float = 1e-3
    kl_warmup_steps: int = 200
    condition_dropout: float = 0.15
    condition_noise: float = 0.05
    seed: int = 0
    description_dropout: float | None = None
    e2e_steps: int = 0
    e2e_tasks_per_step: int = 4
    e2e_examples_per_task: int = 4
    e2e_learning_rate: float = 3e-4
    e2e_contrast_weight: float = 0.0
    e2e_contrast_margin: float = 0.25
    e2e_sibling_rate: float = 0.5
    e2e_init: str = ""

    def __post_init__(self) -> None:
        _require(self.steps >= 0 and self.e2e_steps >= 0, "steps and e2e_steps must be >= 0")
        _require(self.steps + self.e2e_steps >= 1, "the generator needs reconstruction steps, e2e steps or both")
        _require(self.batch_size >= 1, "batch_size must be >= 1")
        _require(self.learning_rate > 0 and self.e2e_learning_rate > 0, "learning rates must be positive")
        _require(self.kl_weight >= 0, "kl_weight must be >= 0")
        _require(0 <= self.condition_dropout < 0.5, "condition_dropout must be in [0, 0.5)")
        _require(
            self.description_dropout is None or 0 <= self.description_dropout <= 0.9,
            "description_dropout must be in [0, 0.9]",
        )
        _require(
            self.condition_dropout + self.hide_description < 1, "condition_dropout + description_dropout must be < 1"
        )
        _require(self.condition_noise >= 0, "condition_noise must be >= 0")
        _require(self.e2e_tasks_per_step >= 1 and self.e2e_examples_per_task >= 1, "e2e batch sizes must be >= 1")
        _require(self.e2e_contrast_weight >= 0 and self.e2e_contrast_margin >= 0, "e2e contrast must be >= 0")
        _require(0 <= self.e2e_sibling_rate <= 1, "e2e_sibling_rate must be in [0, 1]")
        _require(
            not self.e2e_init or (self.e2e_steps >= 1 and self.steps == 0),
            "e2e_init continues a generator end to end: it needs e2e_steps >= 1 and steps = 0",
        )
        _require(
            self.e2e_contrast_weight == 0 or self.e2e_tasks_per_step >= 2,
            "e2e_contrast_weight needs e2e_tasks_per_step >= 2 (another task's LoRA to compare with)",
        )

    @property
    def hide_description(self) -> float:
        """Probability of hiding the description (``description_dropout``, or ``condition_dropout`` when unset)."""
        return self.condition_dropout if self.description_dropout is None else self.description_dropout

    @property
    def objective(self) -> str:
        """``reconstruction``, ``e2e`` (end to end from scratch) or ``reconstruction+e2e``."""
        if self.e2e_steps == 0:
            return "reconstruction"
        if self.e2e_init:
            return "e2e-continued"
        return "e2e" if self.steps == 0 else "reconstruction+e2e"


@dataclass(frozen=True)
class PipelineSettings(_DictMixin):
    """Everything one offline run needs; stored in the run's manifest."""

    base_model: str = "smollm2-135m"
    lora: LoraSettings = field(default_factory=LoraSettings)
    lora_training: LoraTrainingSettings = field(default_factory=LoraTrainingSettings)
    encoder: TaskEncoderSettings = field(default_factory=TaskEncoderSettings)
    cvae_training: CVAETrainingSettings = field(default_factory=CVAETrainingSettings)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineSettings:
        return cls(
            base_model=data.get("base_model", "smollm2-135m"),
            lora=LoraSettings.from_dict(data.get("lora", {})),
            lora_training=LoraTrainingSettings.from_dict(data.get("lora_training", {})),
            encoder=TaskEncoderSettings.from_dict(data.get("encoder", {})),
            cvae_training=CVAETrainingSettings.from_dict(data.get("cvae_training", {})),
        )
