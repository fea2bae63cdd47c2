"""The offline pipeline over one run folder, step by step (each step resumable), and the ``demo`` preset.

Run folder::

    run.json          settings, the suite, which tasks the generator trains on (seen) and which it never sees
    manifest.json     + loras/     LoRA collection (train_loras.py); unseen tasks get oracle LoRAs for the report
    task_vectors/     cached task vectors
    generator/        generator.safetensors + generator.json
    report/           quality.json, quality.md, quality.png
"""

from __future__ import annotations

import random
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from generator.base_model import BaseModel, load_base_model
from generator.config import (
    CVAETrainingSettings,
    LoraSettings,
    LoraTrainingSettings,
    PipelineSettings,
    TaskEncoderSettings,
)
from generator.device import CPU_FP32, Placement
from generator.files import read_json, write_json
from generator.generate import AdapterGenerator
from generator.lora_layout import LoraLayout
from generator.lora_model import LoraModel
from generator.task_encoder import TaskEncoder
from generator.tasks import Task, TaskFormatError, load_bigbench_suite, load_jsonl_suite, synthetic_suite
from generator.training.evaluate import VARIANTS, ReportInputs, evaluate, write_report
from generator.training.train_cvae import train_and_save
from generator.training.train_loras import collect_loras, load_collection, trained_names

RUN_FILE = "run.json"


BIGBENCH_MAX_TEST = 40  # test examples scored per BIG-bench task (log-likelihood scoring is the slow part on CPU)
BIGBENCH_MAX_EXAMPLES = 2000  # a seeded sample of the larger tasks (some have 50,000 examples)


def read_names_file(path: Path) -> tuple[list[str], list[str]]:
    """Task names, one per line (``#`` starts a comment); a line ``NAME unseen`` marks a held-out task.

    Returns (all names in file order, the held-out ones).
    """
    names: list[str] = []
    unseen: list[str] = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 2 or (len(parts) == 2 and parts[1] != "unseen"):
            raise TaskFormatError(f"{path}:{number}: expected 'TASK' or 'TASK unseen', got {raw.strip()!r}")
        names.append(parts[0])
        if len(parts) == 2:
            unseen.append(parts[0])
    if len(set(names)) != len(names):
        raise TaskFormatError(f"{path}: a task is listed twice")
    return names, unseen


def suite_unseen(spec: str) -> list[str] | None:
    """The held-out tasks a suite file marks (``bigbench:`` suites), or None when the suite marks none."""
    kind, _, rest = spec.partition(":")
    if kind != "bigbench":
        return None
    _, unseen = read_names_file(Path(rest.rpartition(":")[2]))
    return unseen or None


def load_suite(spec: str) -> list[Task]:
    """``synthetic:N[:SEED]`` | ``jsonl:FOLDER`` | ``bigbench:ROOT:NAMES_FILE`` (one task name per line)."""
    kind, _, rest = spec.partition(":")
    if kind == "synthetic":
        parts = rest.split(":") if rest else ["24"]
        try:
            return synthetic_suite(int(parts[0]), seed=int(parts[1]) if len(parts) > 1 else 0)
        except ValueError as exc:
            raise TaskFormatError(f"bad synthetic suite {spec!r}: {exc}") from None
    if kind == "jsonl":
        return load_jsonl_suite(Path(rest))
    if kind == "bigbench":
        root, _, names_file = rest.rpartition(":")
        names, _ = read_names_file(Path(names_file))
        return load_bigbench_suite(Path(root), names, max_test=BIGBENCH_MAX_TEST, max_examples=BIGBENCH_MAX_EXAMPLES)
    raise TaskFormatError(f"unknown suite {spec!r}: use synthetic:N, jsonl:FOLDER or bigbench:ROOT:NAMES_FILE")


@dataclass
class Run:
    folder: Path
    settings: PipelineSettings
    suite: str
    seen: list[str]
    unseen: list[str]

    @classmethod
    def create(
        cls,
        folder: Path,
        settings: PipelineSettings,
        suite: str,
        unseen_fraction: float,
        unseen: list[str] | None = None,
    ) -> Run:
        tasks = load_suite(suite)
        names = [t.name for t in tasks]
        if unseen is None:
            unseen = suite_unseen(suite)
        if unseen is None:
            shuffled = names[:]
            random.Random(0).shuffle(shuffled)
            unseen = sorted(shuffled[: round(len(names) * unseen_fraction)])
        bad = [n for n in unseen if n not in names]
        if bad:
            raise TaskFormatError(f"unseen tasks not in the suite: {bad}")
        seen = [n for n in names if n not in unseen]
        if not seen:
            raise TaskFormatError("no task is left for the generator to train on")
        run = cls(folder, settings, suite, seen, list(unseen))
        run.save()
        return run

    def save(self) -> None:
        write_json(
            self.folder / RUN_FILE,
            {"settings": self.settings.to_dict(), "suite": self.suite, "seen": self.seen, "unseen": self.unseen},
        )

    @classmethod
    def open(cls, folder: Path) -> Run:
        path = folder / RUN_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a run folder (no {RUN_FILE}); start with train-loras")
        data = read_json(path)
        return cls(folder, PipelineSettings.from_dict(data["settings"]), data["suite"], data["seen"], data["unseen"])

    def tasks(self) -> tuple[list[Task], list[Task]]:
        by_name = {t.name: t for t in load_suite(self.suite)}
        return [by_name[n] for n in self.seen], [by_name[n] for n in self.unseen]

    def seen_sample(self, count: int) -> list[str]:
        """``count`` seen tasks chosen by a fixed seed, in suite order: the seen tasks whose LoRAs an end-to-end run
        trains (``train-loras --seen-sample``) to measure generated vs trained where a full collection would cost
        too much; ``bench/quality.py --seen-sample`` scores the same ones."""
        if not 1 <= count <= len(self.seen):
            raise ValueError(f"seen sample must be in 1..{len(self.seen)}, got {count}")
        chosen = set(random.Random(f"seen-sample:{count}").sample(self.seen, count))
        return [n for n in self.seen if n in chosen]

    @property
    def generator_dir(self) -> Path:
        return self.folder / "generator"

    @property
    def report_dir(self) -> Path:
        return self.folder / "report"


def step_train_loras(
    run: Run,
    base: BaseModel,
    multitask_steps: int | None = None,
    progress: bool = True,
    oracles: bool = True,
    shard: tuple[int, int] = (0, 1),
    seen_tasks: bool = True,
    seen_sample: int | None = None,
) -> None:
    """``oracles``: also train LoRAs for the unseen tasks (the report's upper bound there; the generator never
    sees them). Skipping them saves a quarter of the collection time on the real model. ``seen_tasks=False``: only
    the oracles (for a generator trained end to end, which needs no collection), and the multi-task LoRA of the seen
    tasks only when ``multitask_steps`` is given. ``seen_sample``: only that many seen tasks' LoRAs
    (``Run.seen_sample``); the multi-task LoRA still learns from every seen task."""
    seen, unseen = run.tasks()
    sample = set(run.seen_sample(seen_sample)) if seen_sample is not None else {t.name for t in seen}
    collected = [t for t in seen if t.name in sample]
    collect_loras(
        base,
        (collected if seen_tasks else []) + (unseen if oracles else []),
        run.folder,
        run.settings.lora,
        run.settings.lora_training,
        multitask_steps if seen_tasks or multitask_steps is not None else 0,
        progress,
        multitask_tasks=seen,
        shard=shard[0],
        shard_count=shard[1],
    )


def step_train_generator(run: Run, base: BaseModel, progress: bool = True) -> AdapterGenerator:
    """Reconstruction on the collection and/or end-to-end training (``cvae_training.steps`` / ``e2e_steps``); end to
    end from scratch needs no collection."""
    seen, _ = run.tasks()
    training = run.settings.cvae_training
    collection = load_collection(run.folder, [t.name for t in seen]) if training.steps > 0 else None
    lora = LoraModel(base.model, run.settings.lora, run.settings.lora_training.init_seed)
    layout, init_vector = lora.layout, lora.init_vector
    lora.model.unload()  # the base model without LoRA layers again
    encoder = TaskEncoder.for_model(base.model, base.tokenizer, run.settings.encoder)
    checkpoint = train_and_save(
        collection,
        seen,
        encoder,
        base,
        layout,
        run.settings.lora_training,
        training,
        run.generator_dir,
        cache_dir=run.folder,
        show_progress=progress,
        init_vector=init_vector,
    )
    return AdapterGenerator(checkpoint, encoder)


def step_evaluate(
    run: Run,
    base: BaseModel,
    progress: bool = True,
    plot: bool = True,
    variants: Sequence[str] = VARIANTS,
    shard: tuple[int, int] = (0, 1),
    splits: Sequence[str] = ("seen", "unseen"),
    names: Collection[str] | None = None,
    shared_dir: Path | None = None,
) -> dict[str, Any]:
    """Score the report's variants on the tasks of ``splits`` (resumable: finished tasks are kept in report/rows/).

    With ``shard`` = (i, n), n > 1: score only every n-th task from the i-th and write no report (several processes
    fill report/rows/ in parallel; a last run without a shard assembles the report from them). ``names``: only these
    tasks. A row made by another generator keeps its generator-independent results (base, in-context, LoRA from
    init); ``shared_dir`` keeps those for every run of the same suite and base model, so each generator compared
    pays only for its own variants."""
    seen, unseen = run.tasks()
    chosen = [t for t in seen if "seen" in splits] + [t for t in unseen if "unseen" in splits]
    if names is not None:
        chosen = [t for t in chosen if t.name in names]
    trained = trained_names(run.folder, seen + unseen)  # none for a generator trained end to end from scratch
    layout = LoraLayout.from_model(base.model, run.settings.lora)
    collection = load_collection(run.folder, trained, dim=layout.dim)
    lora = LoraModel(base.model, run.settings.lora, run.settings.lora_training.init_seed)
    try:
        encoder = TaskEncoder.for_model(base.model, base.tokenizer, run.settings.encoder, no_adapter=lora.base_only)
        generator = AdapterGenerator.from_folder(run.generator_dir, encoder)
        inputs = ReportInputs(
            seen,
            unseen,
            collection,
            generator,
            lora,
            base.tokenizer,
            max_length=run.settings.lora_training.max_length,
            variants=variants,
            rows_dir=run.report_dir / "rows",
            shared_dir=shared_dir,
            only=frozenset(t.name for i, t in enumerate(chosen) if i % shard[1] == shard[0]),
        )
        report = evaluate(inputs, show_progress=progress)
    finally:
        lora.model.unload()
    if shard[1] == 1:
        write_report(report, run.report_dir, plot=plot)
    return report


# --- the small preset: a 6-task tiny-model generator in well under a minute (tests, the load benchmark) ---------

SMALL_SETTINGS = PipelineSettings(
    base_model="tiny",
    lora_training=LoraTrainingSettings(
        steps=60, batch_size=16, learning_rate=1e-2, max_length=32, checkpoints=3, checkpoint_every=5
    ),
    encoder=TaskEncoderSettings(max_examples=8, max_length=32),
    cvae_training=CVAETrainingSettings(steps=150, batch_size=16),
)


def run_small(folder: Path) -> Run:
    """6 synthetic tasks (2 unseen) on the tiny model: their LoRAs and a trained generator in ``folder``."""
    run = Run.create(folder, SMALL_SETTINGS, "synthetic:6", unseen_fraction=0.34)
    base = load_base_model("tiny")
    step_train_loras(run, base, multitask_steps=60, progress=False)
    step_train_generator(run, base, progress=False)
    return run


# --- the demo preset ----------------------------------------------------------------------------------------------

DEMO_SETTINGS = PipelineSettings(
    base_model="tiny",
    lora=LoraSettings(rank=4, alpha=8.0),
    lora_training=LoraTrainingSettings(
        steps=150, batch_size=16, learning_rate=1e-2, max_length=32, checkpoints=5, checkpoint_every=5
    ),
    encoder=TaskEncoderSettings(max_examples=8, max_length=32),
    cvae_training=CVAETrainingSettings(steps=1500, batch_size=32, learning_rate=1e-3, kl_weight=1e-3),
)
DEMO_SUITE = "synthetic:32"


def run_demo(folder: Path, progress: bool = True, placement: Placement = CPU_FP32) -> dict[str, Any]:
    """Tiny model + synthetic family, the whole pipeline: collect, train the generator, evaluate."""
    start = time.perf_counter()
    run = Run.create(folder, DEMO_SETTINGS, DEMO_SUITE, unseen_fraction=0.25)
    base = load_base_model(run.settings.base_model, placement=placement)
    step_train_loras(run, base, progress=progress)
    step_train_generator(run, base, progress=progress)
    report = step_evaluate(run, base, progress=progress)
    report["seconds"] = round(time.perf_counter() - start, 1)
    write_report(report, run.report_dir, plot=False)
    return report
