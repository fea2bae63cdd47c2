"""End-to-end training of the generator through the base model (Text-to-LoRA's SFT objective).

Each step draws ``e2e_tasks_per_step`` tasks and ``e2e_examples_per_task`` of each one's train examples; the CVAE
decodes each task's LoRA from its condition (z = 0, the deterministic adapter the service serves, with the same
condition dropout as reconstruction training); the LoRAs are applied to the frozen base model with
``FunctionalLora`` (each batch row with its own task's LoRA) and the loss is the next-token loss of the examples'
answers (followed by the end-of-sequence token). Gradients reach the CVAE only.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from generator.base_model import BaseModel
from generator.batching import EncodedPair, pad_pairs
from generator.config import CVAETrainingSettings, LoraTrainingSettings
from generator.cvae import CVAE
from generator.functional_lora import FunctionalLora, answer_loss
from generator.lora_layout import LoraLayout, NormStats
from generator.task_encoder import ConditionStats
from generator.tasks import Task
from generator.training.train_cvae import TaskVectors, training_condition
from generator.training.train_loras import encode_examples


@dataclass
class EndToEndResult:
    losses: list[float]
    seconds: float


def train_end_to_end(
    cvae: CVAE,
    norm: NormStats,
    cond_stats: ConditionStats,
    vectors: TaskVectors,
    tasks: Sequence[Task],
    base: BaseModel,
    layout: LoraLayout,
    lora_training: LoraTrainingSettings,
    settings: CVAETrainingSettings,
    show_progress: bool = True,
) -> EndToEndResult:
    if settings.e2e_steps < 1:
        raise ValueError("e2e_steps must be >= 1")
    pairs: list[list[EncodedPair]] = [
        encode_examples(base.tokenizer, t.train, lora_training.max_length, lora_training.end_token) for t in tasks
    ]
    pad_id = int(base.tokenizer.pad_token_id)
    device = next(base.model.parameters()).device
    rng = random.Random(f"e2e:{settings.seed}")
    torch.manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(
        [p for p in cvae.parameters() if p.requires_grad], lr=settings.e2e_learning_rate, weight_decay=0.0
    )
    warmup = max(1, settings.e2e_steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / settings.e2e_steps)))
        ),
    )
    frozen = [p.requires_grad for p in base.model.parameters()]
    for p in base.model.parameters():
        p.requires_grad_(False)
    functional = FunctionalLora(base.model, layout)
    mean, scale = norm.mean.to(device), norm.scale[norm.segment_ids].to(device)
    cvae.to(device).train()
    losses: list[float] = []
    start = time.perf_counter()
    n_tasks = len(tasks)
    n_views = vectors.in_context[0].shape[0]
    try:
        with tqdm(range(settings.e2e_steps), desc="generator, end to end", disable=not show_progress) as bar:
            for step in bar:
                chosen = rng.sample(range(n_tasks), min(settings.e2e_tasks_per_step, n_tasks))
                conds, rows, batch_pairs = [], [], []
                for slot, task in enumerate(chosen):
                    conds.append(training_condition(cond_stats, vectors, task, rng.randrange(n_views), settings, rng))
                    pool = pairs[task]
                    picks = rng.sample(range(len(pool)), min(settings.e2e_examples_per_task, len(pool)))
                    batch_pairs += [pool[i] for i in picks]
                    rows += [slot] * len(picks)
                cond = torch.stack(conds).to(device)
                z = torch.zeros(len(chosen), cvae.config.latent_dim, device=device)
                lora_vectors = cvae.decode(z, cond) * scale + mean  # [T, D] de-normalised LoRAs
                batch = pad_pairs(batch_pairs, pad_id)
                with functional.applied(lora_vectors, torch.tensor(rows, device=device)):
                    loss = answer_loss(
                        base.model,
                        batch.input_ids.to(device),
                        batch.attention_mask.to(device),
                        batch.labels.to(device),
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(cvae.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                if step % 10 == 0 or step == settings.e2e_steps - 1:
                    recent = losses[-20:]
                    bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
    finally:
        functional.remove()
        for p, flag in zip(base.model.parameters(), frozen, strict=True):
            p.requires_grad_(flag)
        cvae.to("cpu").eval()  # the generator decodes on the CPU (one small MLP pass per adapter)
    return EndToEndResult(losses=losses, seconds=time.perf_counter() - start)
