"""LoRA collection: train one LoRA per task, keep checkpoints from the tail of its trajectory.

Layout of a collection folder::

    manifest.json                 settings, layout, and one entry per finished task
    loras/<task>.safetensors      tensor "checkpoints" [K, D] (flat LoRA vectors), metadata: task, settings id
    loras/_multitask.safetensors  one LoRA trained on all tasks' train examples (a baseline)

Resumable: a task whose file exists with the same settings id is skipped. Files are written atomically, so an
interrupted run leaves only finished tasks behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from generator.base_model import BaseModel
from generator.batching import EncodedPair, encode_pair, pad_pairs
from generator.config import LoraSettings, LoraTrainingSettings
from generator.files import read_json, safe_name, write_atomic, write_json
from generator.functional_lora import answer_loss
from generator.lora_model import LoraModel
from generator.tasks import Example, Task, format_prompt, format_target

log = logging.getLogger(__name__)

MULTITASK_NAME = "_multitask"
MANIFEST = "manifest.json"


@dataclass
class TrainedLora:
    """A task's kept checkpoints (``[K, D]`` flat vectors) and its loss curve."""

    task: str
    checkpoints: torch.Tensor
    checkpoint_steps: list[int]
    losses: list[float]
    seconds: float


def settings_id(base_model: str, lora: LoraSettings, training: LoraTrainingSettings) -> str:
    """Changes whenever a setting that shapes the trained weights changes; a mismatch forces retraining."""
    blob = json.dumps({"base": base_model, "lora": lora.to_dict(), "train": training.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int, end: bool = True
) -> list[EncodedPair]:
    """Tokenised once per task and reused for every step; ``end``: each answer ends with the EOS token."""
    return [
        encode_pair(tokenizer, format_prompt(e.input), format_target(e.output), max_length, end=end) for e in examples
    ]


def train_lora(
    lora: LoraModel,
    pad_id: int,
    pairs: Sequence[EncodedPair],
    settings: LoraTrainingSettings,
    name: str,
    progress: tqdm | None = None,
    start: torch.Tensor | None = None,
) -> TrainedLora:
    """Train the LoRA on ``pairs``, loss on the answer tokens only, from ``start`` (a flat LoRA vector, e.g. a
    generated adapter being refined) or from the shared initialisation. Deterministic for the same inputs."""
    if not pairs:
        raise ValueError(f"task {name!r} has no training examples")
    if start is None:
        lora.reset()
    else:
        lora.load_vector(start)
    params = lora.lora_parameters()
    device = params[0].device
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    keep = set(settings.checkpoint_steps())
    rng = random.Random(f"{settings.data_seed}:{name}")
    order: list[int] = []
    kept: list[torch.Tensor] = []
    losses: list[float] = []
    began = time.perf_counter()
    lora.model.train()
    try:
        for step in range(1, settings.steps + 1):
            batch_idx: list[int] = []
            while len(batch_idx) < settings.batch_size:
                if not order:
                    order = list(range(len(pairs)))
                    rng.shuffle(order)
                batch_idx.append(order.pop())
            batch = pad_pairs([pairs[i] for i in batch_idx], pad_id)
            # the output head only where a label is predicted: the same loss as the model's own, 30% less work
            loss = answer_loss(
                lora.model, batch.input_ids.to(device), batch.attention_mask.to(device), batch.labels.to(device)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if step in keep:
                kept.append(lora.vector())
            if progress is not None:
                progress.set_postfix(task=name[:24], step=step, loss=f"{losses[-1]:.3f}", refresh=False)
                progress.update(1)
    finally:
        lora.model.eval()
    return TrainedLora(
        task=name,
        checkpoints=torch.stack(kept),
        checkpoint_steps=sorted(keep),
        losses=losses,
        seconds=time.perf_counter() - began,
    )


def _save_trained(path: Path, trained: TrainedLora, sid: str) -> None:
    metadata = {
        "task": trained.task,
        "settings_id": sid,
        "checkpoint_steps": json.dumps(trained.checkpoint_steps),
        "final_loss": f"{trained.losses[-1]:.6f}",
    }
    write_atomic(path, save({"checkpoints": trained.checkpoints.contiguous()}, metadata=metadata))


def _is_done(path: Path, sid: str) -> bool:
    if not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("settings_id") == sid
    except Exception:  # a truncated or foreign file is retrained, not trusted
        return False


def collect_loras(
    base: BaseModel,
    tasks: Sequence[Task],
    out_dir: Path,
    lora_settings: LoraSettings,
    training: LoraTrainingSettings,
    multitask_steps: int | None = None,
    show_progress: bool = True,
    multitask_tasks: Sequence[Task] | None = None,
    shard: int = 0,
    shard_count: int = 1,
) -> dict[str, object]:
    """Train (or skip, if already done) every task's LoRA and the multi-task LoRA; return the manifest.

    The multi-task LoRA learns from the train examples of ``multitask_tasks`` (default: ``tasks``), mixed; they need
    not be among ``tasks`` (an end-to-end run trains only the oracles, and the multi-task LoRA of the seen tasks).
    ``shard``/``shard_count``: this process trains tasks ``i`` with ``i % shard_count == shard`` (the last shard also
    the multi-task LoRA), so several single-threaded processes can share one collection folder.
    """
    if not 0 <= shard < shard_count:
        raise ValueError(f"shard must be in [0, {shard_count}), got {shard}")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError("task names must be unique")
    sid = settings_id(base.name, lora_settings, training)
    lora = LoraModel(base.model, lora_settings, init_seed=training.init_seed)
    pad_id = base.tokenizer.pad_token_id
    manifest = ManifestWriter(
        out_dir / MANIFEST,
        {
            "settings_id": sid,
            "base_model": base.name,
            "lora": lora_settings.to_dict(),
            "lora_training": training.to_dict(),
            "layout_dim": lora.layout.dim,
        },
    )
    mine = [t for i, t in enumerate(tasks) if i % shard_count == shard]
    todo = [t for t in mine if not _is_done(out_dir / "loras" / f"{safe_name(t.name)}.safetensors", sid)]
    known = manifest.read().get("tasks", {})
    pending = {t.name for t in todo}
    for task in mine:  # finished files whose manifest entry was lost (a kill between the two writes)
        if task.name not in pending and isinstance(known, dict) and task.name not in known:
            manifest.set_task(task.name, {"file": f"loras/{safe_name(task.name)}.safetensors"})
    jobs: list[tuple[str, list[Example], int]] = [(t.name, list(t.train), training.steps) for t in todo]
    multi_steps = multitask_steps if multitask_steps is not None else training.steps * 4
    multi_path = out_dir / "loras" / f"{MULTITASK_NAME}.safetensors"
    multi_training = _with_steps(training, multi_steps)
    multi_tasks = list(multitask_tasks) if multitask_tasks is not None else list(tasks)
    multi_names = [t.name for t in multi_tasks]
    multi_sid = settings_id(base.name, lora_settings, multi_training) + ":" + _names_id(multi_names)
    multitask_shard = shard == shard_count - 1
    if multitask_shard and multi_steps > 0 and not _is_done(multi_path, multi_sid):
        jobs.append((MULTITASK_NAME, [e for t in multi_tasks for e in t.train], multi_steps))
    skipped = len(mine) - len(todo)
    total_steps = sum(steps for _, _, steps in jobs)
    where = f", shard {shard + 1}/{shard_count}" if shard_count > 1 else ""
    desc = f"LoRA collection ({len(mine)} tasks{where}, {skipped} done already)"
    with tqdm(total=total_steps, desc=desc, disable=not show_progress, unit="step") as bar:
        for name, examples, steps in jobs:
            task_training = _with_steps(training, steps)
            pairs = encode_examples(base.tokenizer, examples, training.max_length, training.end_token)
            trained = train_lora(lora, pad_id, pairs, task_training, name, bar)
            if name == MULTITASK_NAME:
                _save_trained(multi_path, trained, multi_sid)
                manifest.set_multitask({"steps": steps, "final_loss": trained.losses[-1], "tasks": multi_names})
            else:
                _save_trained(out_dir / "loras" / f"{safe_name(name)}.safetensors", trained, sid)
                manifest.set_task(
                    name,
                    {
                        "file": f"loras/{safe_name(name)}.safetensors",
                        "train_examples": len(examples),
                        "final_loss": trained.losses[-1],
                        "first_loss": trained.losses[0],
                        "seconds": round(trained.seconds, 2),
                    },
                )
    lora.model.unload()  # give the base model back without LoRA layers
    return manifest.read()


class ManifestWriter:
    """Read-merge-write of the collection manifest under a file lock, so that shards of one collection (separate
    processes over disjoint tasks) never drop each other's entries."""

    def __init__(self, path: Path, header: dict[str, object]) -> None:
        self.path = path
        self.header = header
        self._update(lambda manifest: None)

    def read(self) -> dict[str, object]:
        return read_json(self.path) if self.path.is_file() else {}

    def set_task(self, name: str, entry: dict[str, object]) -> None:
        self._update(lambda manifest: manifest.setdefault("tasks", {}).__setitem__(name, entry))

    def set_multitask(self, entry: dict[str, object]) -> None:
        self._update(lambda manifest: manifest.__setitem__("multitask", entry))

    def _update(self, change: Callable[[dict[str, Any]], None]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            manifest: dict[str, Any] = self.read()
            if manifest.get("settings_id") not in (None, self.header["settings_id"]):
                log.warning("collection settings changed: every task is retrained")
                manifest = {}
            manifest.update(self.header)
            manifest.setdefault("tasks", {})
            change(manifest)
            write_json(self.path, manifest)


def _with_steps(training: LoraTrainingSettings, steps: int) -> LoraTrainingSettings:
    data = training.to_dict()
    data["steps"] = max(steps, 1)
    data["checkpoint_every"] = min(
        training.checkpoint_every, max(1, (data["steps"] - 1) // max(1, training.checkpoints))
    )
    data["checkpoints"] = min(training.checkpoints, data["steps"])
    return LoraTrainingSettings.from_dict(data)


def _names_id(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:8]


def trained_names(out_dir: Path, tasks: Sequence[Task]) -> list[str]:
    """Those of ``tasks`` that have a trained LoRA in the collection (none when there is no collection)."""
    if not (out_dir / MANIFEST).is_file():
        return []
    entries = read_json(out_dir / MANIFEST).get("tasks", {})
    return [t.name for t in tasks if t.name in entries]


@dataclass
class Collection:
    """The trained checkpoints of a collection, loaded from safetensors only."""

    tasks: list[str]
    checkpoints: torch.Tensor  # [N_tasks, K, D]
    multitask: torch.Tensor | None  # [D], last checkpoint of the multi-task LoRA
    manifest: dict[str, object]

    def nbytes(self) -> int:
        return self.checkpoints.numel() * 4


def load_collection(out_dir: Path, tasks: Sequence[str] | None = None, dim: int = 0) -> Collection:
    """``tasks`` = [] gives an empty collection (of vectors of ``dim``), also where no collection was trained."""
    if tasks is not None and not tasks and not (out_dir / MANIFEST).is_file():
        return Collection(tasks=[], checkpoints=torch.zeros(0, 1, dim), multitask=None, manifest={})
    manifest = read_json(out_dir / MANIFEST)
    entries = manifest.get("tasks", {})
    names = list(tasks) if tasks is not None else sorted(entries)
    missing = [n for n in names if n not in entries]
    if missing:
        raise FileNotFoundError(f"no trained LoRA for tasks {missing[:5]} in {out_dir}; run train-loras first")
    stacks = [load_file(str(out_dir / entries[n]["file"]))["checkpoints"] for n in names]
    multi_path = out_dir / "loras" / f"{MULTITASK_NAME}.safetensors"
    multitask = load_file(str(multi_path))["checkpoints"][-1] if multi_path.is_file() else None
    return Collection(
        tasks=names,
        checkpoints=torch.stack(stacks) if stacks else torch.zeros(0, 1, dim),
        multitask=multitask,
        manifest=manifest,
    )
