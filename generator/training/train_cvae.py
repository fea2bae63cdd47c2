"""Train the CVAE on a LoRA collection, conditioned on the tasks' vectors, and write a generator checkpoint.

Task vectors are computed once per (task, encoder settings) and cached beside the collection. Each task gets its
description embedding and several in-context vectors read from different seeded samples of its *train* examples
("views"), so the generator learns that any few examples of a task point to the same LoRA.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from generator.adapter import tensors_sha256
from generator.base_model import BaseModel
from generator.checkpoint import (
    ENCODER_PREFIXES,
    CheckpointError,
    GeneratorCheckpoint,
    load_checkpoint,
    save_checkpoint,
)
from generator.config import CVAEConfig, CVAETrainingSettings, LoraTrainingSettings, TaskEncoderSettings
from generator.cvae import CVAE, cvae_loss
from generator.files import safe_name, write_atomic
from generator.lora_layout import LoraLayout, NormStats
from generator.task_encoder import ConditionStats, TaskEncoder
from generator.tasks import Task
from generator.training.resume import TrainingState, fingerprint
from generator.training.train_loras import Collection

log = logging.getLogger(__name__)


@dataclass
class TaskVectors:
    """Per task: description embedding [384] (or None) and in-context views [V, hidden]."""

    descriptions: list[torch.Tensor | None]
    in_context: list[torch.Tensor]


def compute_task_vectors(
    encoder: TaskEncoder, tasks: Sequence[Task], cache_dir: Path | None, views: int = 8, show_progress: bool = True
) -> TaskVectors:
    """View 0 is the spec a user of the task would send (``task.spec(max_examples)``); the others are resamples."""
    key = hashlib.sha256(json.dumps(encoder.settings.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    descriptions: list[torch.Tensor | None] = []
    in_context: list[torch.Tensor] = []
    for task in tqdm(tasks, desc="task vectors", disable=not show_progress):
        path = cache_dir / "task_vectors" / key / f"{safe_name(task.name)}.safetensors" if cache_dir else None
        if path is not None and path.is_file():
            cached = load_file(str(path))
            if cached["views"].shape[0] == views:
                descriptions.append(cached.get("description"))
                in_context.append(cached["views"])
                continue
        n = encoder.settings.max_examples
        samples = [task.spec(n).examples] + [task.spec(n, seed=v).examples for v in range(1, views)]
        view_vectors = torch.stack([encoder.in_context_vector(list(s)) for s in samples])
        description = encoder.encode_description(task.description)
        descriptions.append(description)
        in_context.append(view_vectors)
        if path is not None:
            tensors = {"views": view_vectors.contiguous()}
            if description is not None:
                tensors["description"] = description.contiguous()
            write_atomic(path, save(tensors))
    return TaskVectors(descriptions, in_context)


def default_cvae_config(layout: LoraLayout, cond_dim: int) -> CVAEConfig:
    return CVAEConfig(lora_dim=layout.dim, cond_dim=cond_dim, chunk_sizes=layout.chunk_sizes)


def train_cvae(
    collection: Collection | None,
    tasks: Sequence[Task],
    vectors: TaskVectors,
    layout: LoraLayout,
    encoder_settings: TaskEncoderSettings,
    base_model: str,
    settings: CVAETrainingSettings,
    cvae_config: CVAEConfig | None = None,
    show_progress: bool = True,
    init_vector: torch.Tensor | None = None,
) -> tuple[GeneratorCheckpoint, list[float]]:
    """Reconstruction training (``settings.steps``) on the collection; returns the checkpoint (not yet saved) and the
    reconstruction-loss curve. With ``steps = 0`` (end-to-end training from scratch) there is no collection: the
    normalisation is anchored at the LoRA initialisation ``init_vector`` instead (``NormStats.at_init``)."""
    if collection is not None and [t.name for t in tasks] != collection.tasks:
        raise ValueError("tasks and collection must list the same tasks in the same order")
    if settings.steps > 0 and collection is None:
        raise ValueError("reconstruction training needs a LoRA collection")
    if collection is not None:
        n_tasks, n_ckpt, dim = collection.checkpoints.shape
        norm = NormStats.fit(collection.checkpoints.reshape(-1, dim), layout)
        targets = norm.normalise(collection.checkpoints.reshape(-1, dim)).reshape(n_tasks, n_ckpt, dim)
    elif init_vector is not None:
        norm = NormStats.at_init(init_vector, layout)
    else:
        raise ValueError("training from scratch needs the LoRA initialisation vector")

    present = [d for d in vectors.descriptions if d is not None]
    desc_stack = torch.stack(present) if present else torch.zeros(1, 384)
    cond_stats = ConditionStats.fit(desc_stack, torch.cat(vectors.in_context))
    config = cvae_config or default_cvae_config(layout, cond_stats.dim)
    torch.manual_seed(settings.seed)
    cvae = CVAE(config)
    curve: list[float] = []
    if settings.steps > 0:
        curve = _reconstruct(cvae, targets, cond_stats, vectors, settings, show_progress)
    cvae.eval()
    info: dict[str, object] = {
        "cvae_training": settings.to_dict(),
        "objective": settings.objective,
        "collection_bytes": collection.nbytes() if collection is not None else 0,
    }
    if collection is not None:
        info["checkpoints_per_task"] = collection.checkpoints.shape[1]
    if curve:
        info["final_recon_loss"] = sum(curve[-20:]) / len(curve[-20:])
    checkpoint = GeneratorCheckpoint(
        cvae=cvae,
        norm=norm,
        cond=cond_stats,
        layout=layout,
        encoder=encoder_settings,
        base_model=base_model,
        training_tasks=[{"name": t.name, "family": t.family} for t in tasks],
        info=info,
    )
    return checkpoint, curve


def _reconstruct(
    cvae: CVAE,
    targets: torch.Tensor,
    cond_stats: ConditionStats,
    vectors: TaskVectors,
    settings: CVAETrainingSettings,
    show_progress: bool,
) -> list[float]:
    n_tasks, n_ckpt, _ = targets.shape
    optimizer = torch.optim.AdamW(cvae.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=settings.steps, eta_min=settings.learning_rate * 0.05
    )
    rng = random.Random(settings.seed)
    n_views = vectors.in_context[0].shape[0]
    curve: list[float] = []
    cvae.train()
    with tqdm(range(1, settings.steps + 1), desc="CVAE training", disable=not show_progress) as bar:
        for step in bar:
            rows, conds = [], []
            for _ in range(settings.batch_size):
                i, k, v = rng.randrange(n_tasks), rng.randrange(n_ckpt), rng.randrange(n_views)
                rows.append(targets[i, k])
                conds.append(training_condition(cond_stats, vectors, i, v, settings, rng))
            x, c = torch.stack(rows), torch.stack(conds)
            recon, mu, logvar = cvae(x, c)
            kl_weight = settings.kl_weight * min(1.0, step / max(1, settings.kl_warmup_steps))
            loss, recon_loss, kl = cvae_loss(recon, x, mu, logvar, kl_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(cvae.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            curve.append(float(recon_loss.detach()))
            if step % 50 == 0 or step == settings.steps:
                bar.set_postfix(recon=f"{float(recon_loss.detach()):.4f}", kl=f"{float(kl.detach()):.3f}")
    cvae.eval()
    return curve


def training_condition(
    stats: ConditionStats,
    vectors: TaskVectors,
    task: int,
    view: int,
    settings: CVAETrainingSettings,
    rng: random.Random,
) -> torch.Tensor:
    description = vectors.descriptions[task]
    in_context: torch.Tensor | None = vectors.in_context[task][view]
    roll = rng.random()
    if description is not None and roll < settings.condition_dropout:
        in_context = None
    elif description is not None and roll < settings.condition_dropout + settings.hide_description:
        description = None
    cond = stats.condition_parts(description, in_context)
    if settings.condition_noise > 0:
        noise = torch.randn(cond.shape[0] - 2, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        cond = cond.clone()
        cond[:-2] += settings.condition_noise * noise * cond[:-2].ne(0)
    return cond


def continued_from(
    settings: CVAETrainingSettings, layout: LoraLayout, encoder: TaskEncoderSettings, base_model: str
) -> GeneratorCheckpoint | None:
    """The generator ``settings.e2e_init`` names, as a trainable checkpoint (fp32, with a fresh CVAE encoder where
    it was packed: end-to-end training uses the decoder only), or None; one that does not fit the run is refused."""
    if not settings.e2e_init:
        return None
    try:
        start = load_checkpoint(Path(settings.e2e_init))
    except (CheckpointError, FileNotFoundError, OSError) as exc:
        raise ValueError(f"e2e_init: {exc}") from None
    if start.base_model != base_model or start.layout != layout or start.encoder != encoder:
        raise ValueError(
            f"e2e_init: {settings.e2e_init} was trained for another base model, LoRA layout or task encoder "
            f"({start.base_model}, {start.layout.dim} LoRA values, {start.encoder.to_dict()})"
        )
    cvae = CVAE(start.cvae.config)
    missing, unexpected = cvae.load_state_dict(start.cvae.state_dict(), strict=False)
    if unexpected or any(not key.startswith(ENCODER_PREFIXES) for key in missing):
        raise ValueError(f"e2e_init: {settings.e2e_init} has an unexpected decoder")
    start.cvae = cvae.eval()
    return start


def train_and_save(
    collection: Collection | None,
    tasks: Sequence[Task],
    encoder: TaskEncoder,
    base: BaseModel,
    layout: LoraLayout,
    lora_training: LoraTrainingSettings,
    settings: CVAETrainingSettings,
    out_dir: Path,
    cache_dir: Path | None = None,
    show_progress: bool = True,
    init_vector: torch.Tensor | None = None,
) -> GeneratorCheckpoint:
    """Reconstruction and/or end-to-end training (``settings.objective``), then the checkpoint is written.

    End-to-end training saves its state in ``out_dir`` as it goes; run again after an interruption, it resumes (and
    skips the reconstruction it had finished) when nothing it depends on changed."""
    start = continued_from(settings, layout, encoder.settings, base.name)  # refused before the slow task vectors
    vectors = compute_task_vectors(encoder, tasks, cache_dir, show_progress=show_progress)
    state = None
    if settings.e2e_steps > 0:
        key = fingerprint(
            {
                "init": start.generator_id if start is not None else "",
                "settings": settings.to_dict(),
                "lora_training": lora_training.to_dict(),
                "encoder": encoder.settings.to_dict(),
                "tasks": [t.name for t in tasks],
                "base_model": base.name,
                "lora_dim": layout.dim,
                "collection": tensors_sha256({"checkpoints": collection.checkpoints}) if collection is not None else "",
            }
        )
        state = TrainingState(out_dir, key)
    resuming = state is not None and state.exists()
    checkpoint, _ = train_cvae(
        collection,
        tasks,
        vectors,
        layout,
        encoder.settings,
        base.name,
        replace(settings, steps=0) if resuming else settings,  # the saved state has its result
        show_progress=show_progress,
        init_vector=init_vector,
    )
    if start is not None:
        checkpoint.cvae, checkpoint.norm, checkpoint.cond = start.cvae, start.norm, start.cond
        checkpoint.info["e2e_init"] = start.generator_id
    if settings.e2e_steps > 0:
        from generator.training.train_e2e import train_end_to_end

        result = train_end_to_end(
            checkpoint.cvae,
            checkpoint.norm,
            checkpoint.cond,
            vectors,
            tasks,
            base,
            layout,
            lora_training,
            settings,
            show_progress=show_progress,
            state=state,
            info=checkpoint.info,
        )
        checkpoint.info = dict(result.info)
        checkpoint.info["e2e_final_loss"] = sum(result.losses[-20:]) / len(result.losses[-20:])
        checkpoint.info["e2e_first_loss"] = sum(result.losses[:20]) / len(result.losses[:20])
        checkpoint.info["e2e_seconds"] = round(result.seconds, 1)
        if result.resumed_at:
            checkpoint.info["e2e_resumed_at"] = result.resumed_at
        if result.gaps:  # how much better each task's own LoRA fits it than its partner's, first and last 20 steps
            checkpoint.info["e2e_first_gap"] = sum(result.gaps[:20]) / len(result.gaps[:20])
            checkpoint.info["e2e_final_gap"] = sum(result.gaps[-20:]) / len(result.gaps[-20:])
    save_checkpoint(checkpoint, out_dir)
    if state is not None:
        state.clear()
    return checkpoint
