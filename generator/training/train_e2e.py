"""End-to-end training of the generator through the base model (Text-to-LoRA's SFT objective).

Each step draws ``e2e_tasks_per_step`` tasks and ``e2e_examples_per_task`` of each one's train examples; the CVAE
decodes each task's LoRA from its condition (z = 0, the deterministic adapter the service serves, with the same
condition dropout as reconstruction training); the LoRAs are applied to the frozen base model with
``FunctionalLora`` (each batch row with its own task's LoRA) and the loss is the next-token loss of the examples'
answers (followed by the end-of-sequence token). Gradients reach the CVAE only.

With ``e2e_contrast_weight`` > 0 the tasks of a step come in pairs (a same-family sibling as the partner with
probability ``e2e_sibling_rate``, e.g. bbq ``*_ambig`` with ``*_disambig``, which share a description), each task's
examples also run under its partner's LoRA in the same forward pass, and the loss becomes the mean of the per-task
losses plus ``weight * mean(max(0, margin - (partner's loss - own loss)))``: the generator is paid for adapters that
fit their own task better than another's, not for one adapter that helps every task alike.

With a ``TrainingState`` the run is resumable: every ``save_every`` steps the CVAE, the optimiser, the scheduler and
both RNGs are written beside the generator, and a restarted run continues from there (``generator.training.resume``).
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
from generator.functional_lora import FunctionalLora, answer_loss, answer_losses
from generator.lora_layout import LoraLayout, NormStats
from generator.task_encoder import ConditionStats
from generator.tasks import Task
from generator.training.resume import Progress, TrainingState
from generator.training.train_cvae import TaskVectors, training_condition
from generator.training.train_loras import encode_examples


@dataclass
class EndToEndResult:
    losses: list[float]
    seconds: float
    gaps: list[float]  # contrastive steps only: mean (partner's LoRA loss - own LoRA loss) per step
    info: dict[str, object]  # the checkpoint info handed in (or, when resumed, the one saved with the state)
    resumed_at: int  # 0, or the step a saved state resumed from


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
    state: TrainingState | None = None,
    info: dict[str, object] | None = None,
    save_every: int = 20,
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
    progress = (state.load(cvae, optimizer, scheduler, rng) if state is not None else None) or Progress(
        info=dict(info or {})
    )
    first = progress.step
    losses, gaps = progress.losses, progress.gaps  # gaps: per contrastive step, mean (partner's - own loss)
    start = time.perf_counter() - progress.seconds
    n_views = vectors.in_context[0].shape[0]
    contrast = settings.e2e_contrast_weight > 0
    families = _families(tasks)
    try:
        steps = range(first, settings.e2e_steps)
        with tqdm(steps, desc="generator, end to end", disable=not show_progress, initial=first) as bar:
            for step in bar:
                chosen = _choose_tasks(tasks, settings, rng, families)
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
                ids, attention, labels = (t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.labels))
                if contrast:
                    loss, gap = _contrastive_loss(functional, lora_vectors, rows, ids, attention, labels, settings)
                    gaps.append(gap)
                else:
                    with functional.applied(lora_vectors, torch.tensor(rows, device=device)):
                        loss = answer_loss(base.model, ids, attention, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(cvae.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                if step % 10 == 0 or step == settings.e2e_steps - 1:
                    recent = losses[-20:]
                    postfix = {"loss": f"{sum(recent) / len(recent):.3f}"}
                    if gaps:
                        postfix["gap"] = f"{sum(gaps[-20:]) / len(gaps[-20:]):.3f}"
                    bar.set_postfix(postfix)
                if state is not None and (step + 1) % save_every == 0 and step + 1 < settings.e2e_steps:
                    progress.step, progress.seconds = step + 1, time.perf_counter() - start
                    state.save(cvae, optimizer, scheduler, rng, progress)
    finally:
        functional.remove()
        for p, flag in zip(base.model.parameters(), frozen, strict=True):
            p.requires_grad_(flag)
        cvae.to("cpu").eval()  # the generator decodes on the CPU (one small MLP pass per adapter)
    return EndToEndResult(losses, time.perf_counter() - start, gaps, progress.info, first)


def _families(tasks: Sequence[Task]) -> list[list[int]]:
    """Per task: the other tasks of its family (empty when it has none or no family)."""
    members: dict[str, list[int]] = {}
    for i, task in enumerate(tasks):
        if task.family:
            members.setdefault(task.family, []).append(i)
    return [[j for j in members.get(task.family, []) if j != i] if task.family else [] for i, task in enumerate(tasks)]


def _choose_tasks(
    tasks: Sequence[Task], settings: CVAETrainingSettings, rng: random.Random, families: list[list[int]]
) -> list[int]:
    """The step's tasks. Without the contrastive term: a plain sample. With it: pairs (0, 1), (2, 3), ..., the
    second of each a sibling of the first with probability ``e2e_sibling_rate`` when the first has one."""
    n = min(settings.e2e_tasks_per_step, len(tasks))
    if settings.e2e_contrast_weight == 0:
        return rng.sample(range(len(tasks)), n)
    chosen: list[int] = []
    while len(chosen) < n:
        free = [i for i in range(len(tasks)) if i not in chosen]
        first = rng.choice(free)
        chosen.append(first)
        if len(chosen) == n:
            break
        siblings = [j for j in families[first] if j not in chosen]
        rest = [i for i in free if i != first]
        chosen.append(
            rng.choice(siblings) if siblings and rng.random() < settings.e2e_sibling_rate else rng.choice(rest)
        )
    return chosen


def partners(count: int) -> list[int]:
    """The task whose LoRA each of ``count`` chosen tasks is compared with: its pair's other member (0 <-> 1,
    2 <-> 3, ...); with an odd count the last one is compared with the first."""
    return [i ^ 1 if i ^ 1 < count else 0 for i in range(count)]


def _contrastive_loss(
    functional: FunctionalLora,
    lora_vectors: torch.Tensor,
    rows: list[int],
    ids: torch.Tensor,
    attention: torch.Tensor,
    labels: torch.Tensor,
    settings: CVAETrainingSettings,
) -> tuple[torch.Tensor, float]:
    """Every example under its own task's LoRA and under its partner's, in one forward pass (the batch twice)."""
    count = lora_vectors.shape[0]
    other = partners(count)
    device = ids.device
    own = torch.tensor(rows, device=device)
    lora_rows = torch.cat([own, torch.tensor([other[r] for r in rows], device=device)])
    groups = torch.cat([own, own + count])  # group t: task t's examples under its LoRA; count + t: under its partner's
    with functional.applied(lora_vectors, lora_rows):
        per_group = answer_losses(
            functional.model, ids.repeat(2, 1), attention.repeat(2, 1), labels.repeat(2, 1), groups, 2 * count
        )
    own_loss, partner_loss = per_group[:count], per_group[count:]
    gap = partner_loss - own_loss
    hinge = torch.relu(settings.e2e_contrast_margin - gap).mean()
    return own_loss.mean() + settings.e2e_contrast_weight * hinge, float(gap.detach().mean())
