"""The base model wrapped once with one PEFT LoRA whose weights are replaced in place.

Training, evaluation and the checks against plain ``peft`` all need "the base model with these LoRA weights".
Wrapping once and copying weights in is much cheaper than building a new ``PeftModel`` per adapter, and the LoRA
starts from the same initial A/B for every task (``init_seed``), which keeps all trained LoRAs comparable.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel

from generator.config import LoraSettings
from generator.lora_layout import LoraLayout


def peft_lora_config(settings: LoraSettings) -> LoraConfig:
    """The PEFT config matching ``settings`` (dropout 0, no bias: the generator makes A and B only)."""
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,  # type: ignore[arg-type]  # PEFT types it int; floats work
        target_modules=list(settings.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


class LoraModel:
    """``model`` is the PeftModel; the base model's own weights are frozen and shared, never copied."""

    def __init__(self, base: PreTrainedModel, settings: LoraSettings, init_seed: int = 0) -> None:
        self.settings = settings
        self.layout = LoraLayout.from_model(base, settings)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self.model: PeftModel = get_peft_model(base, peft_lora_config(settings))
        self.model.eval()
        self._init_vector = self.vector()

    @property
    def init_vector(self) -> torch.Tensor:
        """The LoRA weights right after initialisation (B = 0, so the model equals the base model)."""
        return self._init_vector.clone()

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        return [p for name, p in self.model.named_parameters() if "lora_" in name]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Current LoRA weights under the keys of a saved PEFT adapter: fp32 on the CPU whatever the model's device
        and dtype (collections, checkpoints and exported adapters are fp32 safetensors)."""
        return {
            k: v.detach().to(device="cpu", dtype=torch.float32, copy=True)
            for k, v in get_peft_model_state_dict(self.model).items()
        }

    def vector(self) -> torch.Tensor:
        return self.layout.flatten(self.tensors())

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.layout.flatten(tensors)  # validates keys and shapes before touching the model
        result = set_peft_model_state_dict(self.model, tensors)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"PEFT did not take LoRA keys {unexpected[:3]}")

    def load_vector(self, vector: torch.Tensor) -> None:
        self.load_tensors(self.layout.unflatten(vector))

    def reset(self) -> None:
        self.load_vector(self._init_vector)

    @contextmanager
    def base_only(self) -> Iterator[PeftModel]:
        """The base model without the LoRA (what the model is when no adapter is requested)."""
        with self.model.disable_adapter():
            yield self.model
