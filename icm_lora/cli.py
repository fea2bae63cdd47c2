"""The ``icm-lora`` command: the offline pipeline (train-loras, train-generator, export-generator, evaluate), generate,
demo, serve.

Lives outside ``generator`` so that the generator package never imports the service.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from generator.device import Placement
    from generator.training.pipeline import Run

app = typer.Typer(help="icm-lora: generate LoRA adapters from task descriptions and examples.", no_args_is_help=True)

RunOption = Annotated[Path, typer.Option("--run", help="Run folder (created by train-loras).")]
ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


SuiteOption = Annotated[str, typer.Option(help="synthetic:N[:SEED] | jsonl:FOLDER | bigbench:ROOT:NAMES_FILE")]
BaseModelOption = Annotated[str, typer.Option(help="smollm2-135m (packaged), tiny, or a HF path/id")]
SettingsOption = Annotated[Path | None, typer.Option(help="JSON file of pipeline settings (see README)")]
DeviceOption = Annotated[
    str, typer.Option("--device", help="auto | cpu | cuda | cuda:N (auto: cuda when a GPU is present, else cpu)")
]
DtypeOption = Annotated[
    str, typer.Option("--dtype", help="auto | float32 | bfloat16 | float16 (auto: bfloat16 on cuda, float32 on cpu)")
]
UnseenFractionOption = Annotated[float, typer.Option(help="Share of tasks the generator never sees")]
UnseenOption = Annotated[
    str, typer.Option(help="Comma-separated task names held out (default: marked in the suite file, or a fraction)")
]


def _placement(device: str, dtype: str) -> Placement:
    """The checked device and dtype, before any model loads; a clear error (exit 2) when they cannot be used."""
    from generator.device import resolve_placement

    try:
        return resolve_placement(device, dtype)
    except ValueError as exc:
        raise _fail(str(exc)) from None


def _open_or_create_run(
    run: Path,
    suite: str,
    settings: Path | None,
    base_model: str,
    unseen: str,
    unseen_fraction: float,
    default_suite: str | None = None,
) -> Run:
    """The run folder's ``Run``: opened when it exists (then the creating options must be left out), else created
    from ``--suite`` (or ``default_suite``; without either, a missing run folder is an error)."""
    from generator.config import PipelineSettings
    from generator.training.pipeline import RUN_FILE, Run

    if (run / RUN_FILE).is_file():
        if suite or settings or base_model or unseen:
            raise _fail(f"{run} already has a {RUN_FILE}; resume without --suite/--settings/--base-model/--unseen")
        return Run.open(run)
    if not suite and default_suite is None:
        raise _fail(f"{run} is not a run folder (no {RUN_FILE}); give --suite (and --settings) to create one")
    data = json.loads(settings.read_text()) if settings else {}
    if base_model:
        data["base_model"] = base_model
    held_out = [n.strip() for n in unseen.split(",") if n.strip()] or None
    return Run.create(run, PipelineSettings.from_dict(data), suite or str(default_suite), unseen_fraction, held_out)


@app.command("train-loras")
def train_loras(
    run: RunOption,
    suite: SuiteOption = "",
    base_model: BaseModelOption = "",
    settings: SettingsOption = None,
    unseen_fraction: UnseenFractionOption = 0.25,
    unseen: UnseenOption = "",
    multitask_steps: Annotated[
        int | None, typer.Option(help="Steps of the multi-task LoRA (default 4x steps; --no-seen: none unless set)")
    ] = None,
    oracles: Annotated[bool, typer.Option(help="Also train LoRAs for unseen tasks (report only)")] = True,
    seen: Annotated[bool, typer.Option(help="Train the seen tasks' LoRAs (--no-seen: only the oracles)")] = True,
    seen_sample: Annotated[
        int | None, typer.Option(help="Only this many seen tasks (seeded choice), for the seen-task report")
    ] = None,
    shard: Annotated[str, typer.Option(help="I/N: every N-th task from the I-th, for parallel runs")] = "",
    progress: ProgressOption = True,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Train one LoRA per task (resumable: finished tasks are skipped) and the multi-task baseline."""
    from generator.base_model import load_base_model
    from generator.training.pipeline import step_train_loras

    placement = _placement(device, dtype)
    try:
        pipeline_run = _open_or_create_run(run, suite, settings, base_model, unseen, unseen_fraction, "synthetic:32")
        base = load_base_model(pipeline_run.settings.base_model, placement=placement)
        step_train_loras(pipeline_run, base, multitask_steps, progress, oracles, _parse_shard(shard), seen, seen_sample)
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"LoRA collection ready in {run}")


def _parse_shard(text: str) -> tuple[int, int]:
    """``"2/3"`` -> (1, 3); empty -> the whole collection."""
    if not text:
        return 0, 1
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise _fail(f"--shard must look like 1/2, got {text!r}") from None
    if not 1 <= i <= n:
        raise _fail(f"--shard {text}: I must be in 1..N")
    return i - 1, n


@app.command("train-generator")
def train_generator(
    run: RunOption,
    suite: SuiteOption = "",
    base_model: BaseModelOption = "",
    settings: SettingsOption = None,
    unseen_fraction: UnseenFractionOption = 0.25,
    unseen: UnseenOption = "",
    progress: ProgressOption = True,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Train the generator on the run's seen tasks and write run/generator/: reconstruction of the run's collection
    and/or end to end through the base model (settings ``cvae_training.steps`` / ``e2e_steps``). End-to-end training
    from scratch (``steps: 0``) needs no collection, so it can create the run folder itself."""
    from generator.base_model import load_base_model
    from generator.training.pipeline import step_train_generator

    placement = _placement(device, dtype)
    try:
        pipeline_run = _open_or_create_run(run, suite, settings, base_model, unseen, unseen_fraction)
        base = load_base_model(pipeline_run.settings.base_model, placement=placement)
        generator = step_train_generator(pipeline_run, base, progress)
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"generator {generator.generator_id} written to {pipeline_run.generator_dir}")


@app.command("export-generator")
def export_generator(
    generator_dir: Annotated[Path, typer.Option("--generator", help="Trained generator folder (run/generator)")],
    out: Annotated[Path, typer.Option(help="Folder to write the packed generator to")],
    weights: Annotated[
        str, typer.Option(help="Large decoder matrices as float16, int8 or int4 (group-wise, fp16 scales)")
    ] = "int4",  # generator.checkpoint.SHIPPED_WEIGHTS
) -> None:
    """Write the shipping form of a trained generator: the CVAE's decoder alone (what generation uses), its large
    matrices quantised (int4 by default: about 1/9 of the fp16 form's bytes for them) and the rest in fp16, the
    normalisation mean in int8. Its generator id, and so its adapter ids, differ from the training checkpoint's."""
    from generator.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    try:
        checkpoint = load_checkpoint(generator_dir)
        before = checkpoint.nbytes()
        generator_id = save_checkpoint(checkpoint, out, packed=True, weights=weights)
    except (CheckpointError, OSError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(
        f"generator {generator_id} written to {out}: {checkpoint.nbytes(True, weights)} tensor bytes (from {before})"
    )


@app.command("evaluate")
def evaluate(
    run: RunOption,
    plot: bool = True,
    variants: Annotated[str, typer.Option(help="Comma-separated report variants (default: all)")] = "",
    progress: ProgressOption = True,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Write the quality report (quality.json, quality.md, quality.png) to run/report/ and print its table.

    Resumable: tasks already scored by the same generator are read back from run/report/rows/."""
    from generator.base_model import load_base_model
    from generator.training.evaluate import VARIANTS, markdown_table
    from generator.training.pipeline import Run, step_evaluate

    chosen = [v.strip() for v in variants.split(",") if v.strip()] or list(VARIANTS)
    placement = _placement(device, dtype)
    try:
        pipeline_run = Run.open(run)
        base = load_base_model(pipeline_run.settings.base_model, placement=placement)
        report = step_evaluate(pipeline_run, base, progress, plot, chosen)
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(markdown_table(report))
    typer.echo(f"report written to {pipeline_run.report_dir}")


@app.command("generate")
def generate(
    task: Annotated[Path, typer.Option(help='JSON file: {"description": ..., "examples": [{"input", "output"}]}')],
    out: Annotated[Path, typer.Option(help="Output PEFT adapter folder")],
    generator_dir: Annotated[
        Path | None,
        typer.Option("--generator", help="Generator checkpoint folder (default: the packaged one for the base model)"),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Sample z from this seed (default: deterministic z = 0)")] = None,
    condition: Annotated[
        str, typer.Option(help="With examples: condition on them alone (examples) or with the description (both)")
    ] = "examples",
    base_model: Annotated[str, typer.Option(help="Override the base model the checkpoint names")] = "",
    check: Annotated[
        bool, typer.Option("--self-check/--no-self-check", help="Score the task's examples with the adapter vs base")
    ] = True,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """Generate one adapter for a task file and write it as a PEFT folder.

    With examples in the task, the adapter is self-checked first (as the service does): the examples answered right
    (multiple choice) and the mean log-likelihood per answer token, with the adapter vs the base model. The result is
    printed and stored in the adapter's metadata (``self_check``)."""
    from generator.base_model import load_base_model
    from generator.checkpoint import load_checkpoint
    from generator.defaults import DEFAULT_BASE_MODEL, packaged_generator
    from generator.generate import AdapterGenerator
    from generator.lora_model import LoraModel
    from generator.selfcheck import LoraModelScorer, self_check
    from generator.task_encoder import TaskEncoder
    from generator.tasks import TaskSpec
    from service.selfcheck import with_check

    result = None
    placement = _placement(device, dtype)
    try:
        spec = TaskSpec.from_dict(json.loads(task.read_text(encoding="utf-8")))
        if generator_dir is None:
            generator_dir = packaged_generator(base_model or DEFAULT_BASE_MODEL)
            if generator_dir is None:
                raise _fail(f"no packaged generator for base model {base_model!r}; give --generator")
        checkpoint = load_checkpoint(generator_dir)
        base = load_base_model(base_model or checkpoint.base_model, placement=placement)
        encoder = TaskEncoder.for_model(base.model, base.tokenizer, checkpoint.encoder)
        adapter = AdapterGenerator(checkpoint, encoder, condition).generate(spec, seed)
        if check and spec.examples:
            tokenizer = base.tokenizer
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            scorer = LoraModelScorer(LoraModel(base.model, adapter.lora), int(pad or 0))
            encoding = checkpoint.encoder
            result = self_check(spec, adapter, scorer, tokenizer, encoding.max_examples, encoding.max_length)
            if result is not None:
                adapter = with_check(adapter, result)
        adapter.save_peft(out)
    except json.JSONDecodeError as exc:
        raise _fail(f"{task}: invalid JSON ({exc.msg})") from None
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"adapter {adapter.adapter_id} ({adapter.num_parameters} parameters) written to {out}")
    if result is None:
        typer.echo("self-check: skipped" + ("" if not check else " (the task has no examples)"))
        return
    where = "held-out" if result.held_out else "in-sample"
    stored = result.to_dict()  # the figures as the adapter's metadata keeps them
    right = (
        f"{result.adapter_correct} right with the adapter vs {result.base_correct} without; "
        if result.adapter_correct is not None
        else ""
    )
    typer.echo(
        f"self-check: {'passed' if result.passed else 'FAILED'}: {right}answer log-likelihood "
        f"{stored['adapter_loglik']:.4f} with the adapter vs {stored['base_loglik']:.4f} without "
        f"({stored['delta']:+.4f} nats/token) on {result.examples} {where} examples"
    )
    if not result.passed:
        typer.secho(
            "warning: the adapter answers the task's examples worse than the base model; the service would serve "
            "the base model instead (ICM_LORA_SELF_CHECK=fallback)",
            err=True,
            fg=typer.colors.YELLOW,
        )


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option(help="Run folder for the demo")] = Path("runs/demo"),
    progress: ProgressOption = True,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
) -> None:
    """The whole pipeline on the tiny model and the synthetic task family; prints the quality table."""
    from generator.training.evaluate import markdown_table
    from generator.training.pipeline import run_demo

    report = run_demo(out, progress, _placement(device, dtype))
    typer.echo(markdown_table(report))
    typer.echo(f"demo finished in {report['seconds']} s; report in {out / 'report'}")


@app.command("serve")
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default ICM_LORA_HOST or 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default ICM_LORA_PORT or 8000)")] = None,
    device: Annotated[str | None, typer.Option("--device", help="Overrides ICM_LORA_DEVICE (default auto)")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Overrides ICM_LORA_DTYPE (default auto)")] = None,
) -> None:
    """Run the HTTP service. Configuration comes from ICM_LORA_* environment variables (see README).

    The port opens at once: the service (torch, the model, the generator) loads behind it, and until it is ready
    /readyz answers 503 "loading" and the /v1 routes 503 with Retry-After."""
    import uvicorn
    from fastapi import FastAPI

    from service.boot import DeferredApp
    from service.config import Settings

    overrides = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValueError as exc:
        raise _fail(f"invalid configuration: {exc}") from None
    if (settings.device, settings.dtype) != ("auto", "auto"):
        # an explicit device or dtype is checked before the port opens (imports torch): a missing GPU is a clear
        # error here, not a failed start behind /healthz; ``auto`` always resolves
        try:
            settings.placement()
        except ValueError as exc:
            raise _fail(str(exc)) from None

    def build() -> FastAPI:  # imported here, in the background
        from service.main import create_app

        return create_app(settings)

    uvicorn.run(
        DeferredApp(build),
        host=host or settings.host,
        port=port or settings.port,
        log_level="info",
        # X-Forwarded-For only from the configured proxies (uvicorn would otherwise trust it from 127.0.0.1)
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=settings.trusted_proxies or None,
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()
