"""Collection, task vectors, generator checkpoints and generation, on a small run built once per session."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from generator.base_model import BaseModel, load_base_model
from generator.checkpoint import CheckpointError, _generator_id, load_checkpoint
from generator.config import TaskEncoderSettings
from generator.files import safe_name
from generator.generate import AdapterGenerator, GeneratorMismatchError
from generator.task_encoder import ModelHiddenStateReader, ReadBatch, TaskEncoder, read_batches, reader_texts
from generator.tasks import Example, TaskSpec
from generator.training.pipeline import Run, step_train_loras
from generator.training.train_loras import load_collection
from icm_lora.cli import app


def _generator(run_dir: Path, base: BaseModel | None = None) -> AdapterGenerator:
    base = base or load_base_model("tiny")
    checkpoint = load_checkpoint(run_dir / "generator")
    return AdapterGenerator(checkpoint, TaskEncoder.for_model(base.model, base.tokenizer, checkpoint.encoder))


def test_collection_has_checkpoints_that_learned(small_run: Path) -> None:
    run = Run.open(small_run)
    collection = load_collection(small_run, run.seen + run.unseen)
    manifest = json.loads((small_run / "manifest.json").read_text())
    assert collection.checkpoints.shape[:2] == (6, 3)
    for name in run.seen + run.unseen:
        entry = manifest["tasks"][name]
        assert entry["final_loss"] < entry["first_loss"]
    assert collection.multitask is not None
    assert manifest["multitask"]["tasks"] == run.seen
    # checkpoints come from the tail of one trajectory: close to each other, not identical
    ckpts = collection.checkpoints[0]
    assert not torch.equal(ckpts[0], ckpts[-1])


def test_collection_is_resumable(small_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(small_run, folder)
    run = Run.open(folder)
    lora_files = sorted((folder / "loras").glob("*.safetensors"))
    before = {p.name: p.stat().st_mtime_ns for p in lora_files}
    victim = lora_files[0]
    victim.write_bytes(victim.read_bytes()[:100])  # a truncated file must be retrained, not trusted
    step_train_loras(run, load_base_model("tiny"), multitask_steps=60, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in sorted((folder / "loras").glob("*.safetensors"))}
    changed = [name for name in before if before[name] != after[name]]
    assert changed == [victim.name]
    assert load_file(str(victim))["checkpoints"].shape[0] == 3


def test_oracles_only_with_the_seen_tasks_multitask_lora(small_run: Path, tmp_path: Path) -> None:
    """An end-to-end run trains no seen LoRA, but its report still needs the oracles and the multi-task baseline."""
    folder = tmp_path / "e2e"
    folder.mkdir()
    shutil.copy(small_run / "run.json", folder / "run.json")
    run = Run.open(folder)
    step_train_loras(run, load_base_model("tiny"), progress=False, seen_tasks=False)  # no steps given: no multi-task
    assert sorted(p.stem for p in (folder / "loras").glob("*.safetensors")) == sorted(map(safe_name, run.unseen))
    step_train_loras(run, load_base_model("tiny"), multitask_steps=8, progress=False, seen_tasks=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["tasks"]) == sorted(run.unseen)
    assert manifest["multitask"]["tasks"] == run.seen and manifest["multitask"]["steps"] == 8
    assert load_collection(folder, run.unseen).multitask is not None


def test_seen_sample_trains_a_seeded_subset_of_the_seen_tasks(small_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "sampled"
    folder.mkdir()
    shutil.copy(small_run / "run.json", folder / "run.json")
    run = Run.open(folder)
    sample = run.seen_sample(2)
    assert len(sample) == 2 and set(sample) < set(run.seen) and sample == Run.open(folder).seen_sample(2)
    result = CliRunner().invoke(
        app, ["train-loras", "--run", str(folder), "--seen-sample", "2", "--no-oracles", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["tasks"]) == sorted(sample)
    assert manifest["multitask"]["tasks"] == run.seen  # the baseline still learns from every seen task
    bad = CliRunner().invoke(app, ["train-loras", "--run", str(folder), "--seen-sample", "99", "--no-progress"])
    assert bad.exit_code != 0 and "seen sample must be in 1..4" in bad.output


def test_generation_is_deterministic(small_run: Path) -> None:
    generator = _generator(small_run)
    spec = TaskSpec("Decide whether the words are fruits or tools.", (Example("kiwi pear lime", "yes"),))
    first, again = generator.generate(spec), generator.generate(spec)
    assert first.adapter_id == again.adapter_id
    assert all(torch.equal(first.tensors[k], again.tensors[k]) for k in first.tensors)
    # a fresh process-equivalent: reload checkpoint and model
    fresh = _generator(small_run).generate(spec)
    assert fresh.sha256 == first.sha256
    seeded, seeded_again, other = generator.generate(spec, 1), generator.generate(spec, 1), generator.generate(spec, 2)
    assert seeded.sha256 == seeded_again.sha256 and seeded.sha256 != other.sha256 != first.sha256
    assert seeded.adapter_id != first.adapter_id


def test_description_only_and_examples_only(small_run: Path) -> None:
    generator = _generator(small_run)
    by_description = generator.generate(TaskSpec("Are these colors or animals?"))
    by_examples = generator.generate(TaskSpec(examples=(Example("red blue teal", "up"),)))
    assert by_description.sha256 != by_examples.sha256
    assert generator.last_timings.encode_s >= 0 and generator.last_timings.decode_s > 0


def test_task_encoder_parts(tiny_base: BaseModel) -> None:
    settings = TaskEncoderSettings(max_examples=2, max_length=32)
    encoder = TaskEncoder.for_model(tiny_base.model, tiny_base.tokenizer, settings)
    both = encoder.encode(TaskSpec("Label words.", (Example("a", "b"), Example("c", "d"), Example("e", "f"))))
    assert both.description is not None and both.description.shape == (384,)
    assert abs(float(both.description.norm()) - 1.0) < 1e-4
    assert both.in_context is not None and both.in_context.shape == (64,)
    # only the first max_examples examples are read
    two = encoder.encode(TaskSpec("Label words.", (Example("a", "b"), Example("c", "d"))))
    assert two.in_context is not None and torch.allclose(two.in_context, both.in_context, atol=1e-5)
    other = encoder.encode(TaskSpec("Label words.", (Example("x", "y"),)))
    assert other.in_context is not None and not torch.allclose(other.in_context, both.in_context)
    assert encoder.encode(TaskSpec("Only words.")).in_context is None
    assert encoder.encode(TaskSpec(examples=(Example("a", "b"),))).description is None
    no_desc = TaskEncoder.for_model(tiny_base.model, tiny_base.tokenizer, TaskEncoderSettings(use_examples=False))
    with pytest.raises(ValueError, match="configured to use"):
        no_desc.encode(TaskSpec(examples=(Example("a", "b"),)))


def test_in_context_read_puts_demonstrations_before_each_query(tiny_base: BaseModel) -> None:
    examples = (Example("a", "b"), Example("c", "d"), Example("e", "f"))
    settings = TaskEncoderSettings(max_examples=3, max_length=64, example_read="in_context", queries=2)
    assert reader_texts(examples, settings) == [
        "Input: a\nOutput: b\n\nInput: c\nOutput: d\n\nInput: e\nOutput:",
        "Input: a\nOutput: b\n\nInput: e\nOutput: f\n\nInput: c\nOutput:",
    ]
    assert reader_texts(examples[:1], settings) == ["Input: a\nOutput:"]  # one example: its input alone
    in_context = TaskEncoder.for_model(tiny_base.model, tiny_base.tokenizer, settings)
    separate = TaskEncoder.for_model(
        tiny_base.model, tiny_base.tokenizer, TaskEncoderSettings(max_examples=3, max_length=64)
    )
    spec = TaskSpec("Label words.", examples)
    reordered = TaskSpec("Label words.", (examples[2], examples[0], examples[1]))
    read, again = in_context.encode(spec).in_context, in_context.encode(reordered).in_context
    assert read is not None and again is not None and read.shape == (64,)
    assert not torch.allclose(read, again, atol=1e-4)  # other queries, other contexts
    flat, flat_again = separate.encode(spec).in_context, separate.encode(reordered).in_context
    assert flat is not None and flat_again is not None and torch.allclose(flat, flat_again, atol=1e-5)
    assert not torch.allclose(read, flat, atol=1e-3)
    with pytest.raises(ValueError, match="example_read"):
        TaskEncoderSettings(example_read="pooled")
    with pytest.raises(ValueError, match="queries"):
        TaskEncoderSettings(queries=0)


def test_hidden_state_reader_ignores_padding(tiny_base: BaseModel) -> None:
    reader = ModelHiddenStateReader(tiny_base.model, tiny_base.tokenizer, layer=None, max_length=32)
    alone = reader(["Input: kiwi\nOutput: yes"])
    batched = reader(["Input: kiwi\nOutput: yes", "Input: a much longer text with many words in it\nOutput: no"])
    assert torch.allclose(alone[0], batched[0], atol=1e-5)
    texts = [f"Input: fruit number {i} of the list\nOutput: {'yes' if i % 2 else 'no'}" for i in range(7)]
    whole = ModelHiddenStateReader(tiny_base.model, tiny_base.tokenizer, None, 32, budget=10**6)(texts)
    passes = read_batches(tiny_base.tokenizer, texts, 32, budget=30)
    assert len(passes) > 2 and all(b.ids.numel() <= 30 for b in passes)  # in order, every row once

    def rows(batches: list[ReadBatch]) -> list[list[int]]:
        return [b.ids[i, : int(b.last[i]) + 1].tolist() for b in batches for i in range(b.ids.shape[0])]

    assert rows(passes) == rows(read_batches(tiny_base.tokenizer, texts, 32, 10**6))
    split = ModelHiddenStateReader(tiny_base.model, tiny_base.tokenizer, None, 32, budget=30)(texts)
    assert torch.allclose(whole, split, atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        ModelHiddenStateReader(tiny_base.model, tiny_base.tokenizer, layer=7, max_length=32)


def test_checkpoint_round_trip_and_corruption(small_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "gen"
    shutil.copytree(small_run / "generator", folder)
    checkpoint = load_checkpoint(folder)
    assert checkpoint.base_model == "tiny:0" and len(checkpoint.training_tasks) == 4
    z, c = torch.zeros(1, checkpoint.cvae.config.latent_dim), torch.randn(1, checkpoint.cvae.config.cond_dim)
    reloaded = load_checkpoint(folder)
    assert torch.equal(checkpoint.cvae.decode(z, c), reloaded.cvae.decode(z, c))
    assert reloaded.generator_id == checkpoint.generator_id

    weights = folder / "generator.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(folder)
    weights.write_bytes(original)

    config_path = folder / "generator.json"
    config = json.loads(config_path.read_text())
    config["base_model"] = "something-else"
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="generator_id does not match"):
        load_checkpoint(folder)
    config_path.write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(folder)
    config_path.unlink()
    with pytest.raises(CheckpointError, match="no generator checkpoint"):
        load_checkpoint(folder)


def test_packed_export_decodes_the_same_adapters_at_under_half_the_size(small_run: Path, tmp_path: Path) -> None:
    """``icm-lora export-generator``: the decoder alone in fp16; adapters equal the fp32 checkpoint's to fp16
    rounding; its own generator id; tampering still refused; it cannot encode (no encoder shipped)."""
    out = tmp_path / "packed"
    result = CliRunner().invoke(
        app,
        ["export-generator", "--generator", str(small_run / "generator"), "--out", str(out), "--weights", "float16"],
    )
    assert result.exit_code == 0, result.output
    full, packed = load_checkpoint(small_run / "generator"), load_checkpoint(out)
    assert packed.generator_id != full.generator_id
    assert (out / "generator.safetensors").stat().st_size < 0.5 * (
        small_run / "generator" / "generator.safetensors"
    ).stat().st_size
    assert json.loads((out / "generator.json").read_text())["packed"] == {"cvae_dtype": "float16", "decoder_only": True}
    z = torch.zeros(4, full.cvae.config.latent_dim)
    c = torch.randn(4, full.cvae.config.cond_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = full.norm.denormalise(full.cvae.decode(z, c)), packed.norm.denormalise(packed.cvae.decode(z, c))
    assert got.dtype == torch.float32
    assert float(torch.nn.functional.cosine_similarity(want, got, dim=1).min()) > 0.9999
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-2)
    with pytest.raises(RuntimeError, match="without its encoder"):
        packed.cvae.encode(want, c)
    weights = out / "generator.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(out)


@pytest.mark.parametrize(("weights", "min_cosine"), [("int8", 0.999), ("int4", 0.99)])
def test_quantized_export_decodes_nearly_the_same_adapters(
    small_run: Path, tmp_path: Path, weights: str, min_cosine: float
) -> None:
    """The default shipping form (int4) and int8: large matrices as integers + group scales, the normalisation
    mean in int8; the learned part of each adapter (its offset from the mean) keeps its direction; a quantised
    tensor that goes missing, or a weight format nobody knows, is refused with a clear message."""
    fp16, out = tmp_path / "fp16", tmp_path / weights
    args = ["export-generator", "--generator", str(small_run / "generator")]
    assert CliRunner().invoke(app, [*args, "--out", str(fp16), "--weights", "float16"]).exit_code == 0
    result = CliRunner().invoke(app, [*args, "--out", str(out), *(["--weights", weights] if weights == "int8" else [])])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "generator.json").read_text())
    quantized = config["packed"]["quantized"]["tensors"]
    assert quantized["norm.mean"]["bits"] == 8
    assert any(name.startswith("cvae.") and entry["bits"] == int(weights[3:]) for name, entry in quantized.items())
    assert (out / "generator.safetensors").stat().st_size < 0.75 * (fp16 / "generator.safetensors").stat().st_size
    full, packed = load_checkpoint(small_run / "generator"), load_checkpoint(out)
    assert packed.generator_id not in (full.generator_id, load_checkpoint(fp16).generator_id)
    z = torch.zeros(8, full.cvae.config.latent_dim)
    c = torch.randn(8, full.cvae.config.cond_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = full.norm.denormalise(full.cvae.decode(z, c)) - full.norm.mean
        got = packed.norm.denormalise(packed.cvae.decode(z, c)) - full.norm.mean
    assert float(torch.nn.functional.cosine_similarity(want, got, dim=1).min()) > min_cosine

    name = next(n for n in quantized if n.startswith("cvae."))
    tensors = load_file(out / "generator.safetensors")
    del tensors[f"qscale:{name}"]
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    save_file(tensors, tampered / "generator.safetensors", metadata={"format": config["format"]})
    config["weights_sha256"] = hashlib.sha256((tampered / "generator.safetensors").read_bytes()).hexdigest()
    config["generator_id"] = _generator_id(config)  # a consistent checkpoint that lacks one scale tensor
    (tampered / "generator.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"quantised tensor .* is missing"):
        load_checkpoint(tampered)
    bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x"), "--weights", "int3"])
    assert bad.exit_code != 0 and "unknown weight format 'int3'" in bad.output


def test_condition_on_examples_leaves_the_description_out_only_when_there_are_examples(small_run: Path) -> None:
    """``condition="examples"``: a spec with examples gets the adapter of its examples alone (the same weights as the
    spec without a description), under an id of its own; a spec without examples is unchanged, id included."""
    base = load_base_model("tiny")
    checkpoint = load_checkpoint(small_run / "generator")
    encoder = TaskEncoder.for_model(base.model, base.tokenizer, checkpoint.encoder)
    both, examples = AdapterGenerator(checkpoint, encoder), AdapterGenerator(checkpoint, encoder, "examples")
    shots = (Example("kiwi pear lime", "yes"), Example("stone wood iron", "no"))
    spec = TaskSpec("Answer yes when every word is a fruit.", shots)
    alone = examples.generate(spec)
    same_weights = both.generate(TaskSpec("", shots))
    assert all(torch.equal(alone.tensors[k], same_weights.tensors[k]) for k in alone.tensors)
    assert alone.adapter_id not in (both.adapter_id(spec), same_weights.adapter_id)
    assert alone.sha256 != both.generate(spec).sha256  # the description did count under "both"
    described = TaskSpec("Answer yes when every word is a fruit.")
    assert examples.adapter_id(described) == both.adapter_id(described)
    assert examples.generate(described).sha256 == both.generate(described).sha256
    with pytest.raises(ValueError, match="condition must be one of"):
        AdapterGenerator(checkpoint, encoder, "description")


def test_generator_refuses_a_mismatched_encoder(small_run: Path, tiny_base: BaseModel) -> None:
    checkpoint = load_checkpoint(small_run / "generator")
    other_settings = TaskEncoderSettings(max_examples=3, max_length=32)
    with pytest.raises(GeneratorMismatchError, match="settings"):
        AdapterGenerator(checkpoint, TaskEncoder.for_model(tiny_base.model, tiny_base.tokenizer, other_settings))


def test_hidden_states_at_matches_the_full_forward() -> None:
    from generator.task_encoder import hidden_states_at

    base = load_base_model("tiny")
    texts = ["Input: a\nOutput: b", "Input: longer text here\nOutput: c"]
    ids = base.tokenizer(texts, return_tensors="pt", padding=True)
    decoder = base.model.base_model
    with torch.no_grad():
        full = decoder(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], output_hidden_states=True)
        hooks_before = [len(block._forward_hooks) for block in decoder.layers]  # transformers' own, installed lazily
        for layer in range(len(full.hidden_states)):
            partial = hidden_states_at(decoder, ids["input_ids"], ids["attention_mask"], layer)
            assert torch.equal(partial, full.hidden_states[layer]), layer
    assert [len(block._forward_hooks) for block in decoder.layers] == hooks_before  # the early-exit hook is removed
