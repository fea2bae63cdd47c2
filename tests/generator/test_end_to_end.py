"""End-to-end training pieces: functional LoRA parity with peft, e2e training, answers that stop, refinement,
self-check, per-example scoring and paired bootstrap intervals."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from generator.adapter import GeneratedAdapter
from generator.base_model import BaseModel, load_base_model
from generator.batching import (
    AnswerGroup,
    answer_logprobs,
    encode_group,
    encode_pair,
    group_length,
    layout_rows,
    pack_groups,
    packed_answer_logprobs,
    pad_pairs,
)
from generator.checkpoint import load_checkpoint, save_checkpoint
from generator.config import ConfigError, CVAETrainingSettings, LoraSettings, LoraTrainingSettings
from generator.functional_lora import FunctionalLora, answer_loss, answer_losses
from generator.lora_layout import NormStats
from generator.lora_model import LoraModel
from generator.refine import RefinePlan, refine, refined_adapter_id
from generator.selfcheck import (
    AnswerScorer,
    LoraModelScorer,
    SelfCheck,
    check_examples,
    describe,
    encode_groups,
    self_check,
)
from generator.tasks import Example, TaskSpec, format_prompt, format_target, synthetic_task
from generator.training.evaluate import paired_bootstrap
from generator.training.pipeline import SMALL_SETTINGS, Run, step_evaluate, step_train_generator
from generator.training.scoring import exact_match_correct, multiple_choice_correct
from generator.training.train_cvae import continued_from
from generator.training.train_e2e import partners
from generator.training.train_loras import encode_examples, train_lora

TASK = synthetic_task("fruit", "animal", ("yes", "no"))


def _random_lora(lora: LoraModel, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return lora.init_vector + 0.05 * torch.randn(lora.layout.dim, generator=generator)


def test_functional_lora_equals_peft_per_row(tiny_base: BaseModel) -> None:
    lora = LoraModel(tiny_base.model, LoraSettings())
    first, second = _random_lora(lora, 1), _random_lora(lora, 2)
    pairs = [
        encode_pair(tiny_base.tokenizer, format_prompt(e.input), format_target(e.output), 32) for e in TASK.test[:4]
    ]
    batch = pad_pairs(pairs, tiny_base.tokenizer.pad_token_id)
    expected = []
    for row, vector in enumerate((first, second, first, second)):
        lora.load_vector(vector)
        with torch.no_grad():
            logits = lora.model(
                input_ids=batch.input_ids[row : row + 1], attention_mask=batch.attention_mask[row : row + 1]
            )
        expected.append(logits.logits[0])
    layout = lora.layout
    plain = lora.model.unload()
    functional = FunctionalLora(plain, layout)
    with torch.no_grad(), functional.applied(torch.stack([first, second]), torch.tensor([0, 1, 0, 1])):
        got = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    for row in range(4):
        valid = batch.attention_mask[row].bool()
        torch.testing.assert_close(got[row][valid], expected[row][valid], atol=1e-5, rtol=1e-4)
    functional.remove()
    assert not any(type(m).__name__ == "_RowLoraLinear" for m in plain.modules())


def test_answer_loss_matches_the_full_logits(tiny_base: BaseModel) -> None:
    pairs = encode_examples(tiny_base.tokenizer, TASK.train[:6], 32)
    batch = pad_pairs(pairs, tiny_base.tokenizer.pad_token_id)
    with torch.no_grad():
        full = tiny_base.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        ours = answer_loss(tiny_base.model, batch.input_ids, batch.attention_mask, batch.labels)
    torch.testing.assert_close(ours, full, atol=1e-5, rtol=1e-5)


def test_training_answers_end_with_eos_so_completions_stop(tiny_base: BaseModel) -> None:
    tokenizer = tiny_base.tokenizer
    pair = encode_examples(tokenizer, TASK.train[:1], 32)[0]
    assert pair.ids[-1] == tokenizer.eos_token_id
    assert encode_examples(tokenizer, TASK.train[:1], 32, end=False)[0].ids[-1] != tokenizer.eos_token_id
    lora = LoraModel(tiny_base.model, LoraSettings())
    settings = LoraTrainingSettings(steps=80, batch_size=16, learning_rate=1e-2, max_length=32, checkpoints=1)
    trained = train_lora(lora, tokenizer.pad_token_id, encode_examples(tokenizer, TASK.train, 32), settings, "t")
    lora.load_vector(trained.checkpoints[-1])
    ids = torch.tensor([encode_pair(tokenizer, format_prompt(TASK.test[0].input), "", 32).ids])
    with torch.no_grad():
        out = lora.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()
    assert tokenizer.eos_token_id in new, tokenizer.decode(new)
    answer = tokenizer.decode(new[: new.index(tokenizer.eos_token_id)]).strip()
    assert answer in ("yes", "no")


def test_norm_at_init_maps_zero_to_the_lora_initialisation(tiny_base: BaseModel) -> None:
    lora = LoraModel(tiny_base.model, LoraSettings())
    norm = NormStats.at_init(lora.init_vector, lora.layout)
    torch.testing.assert_close(norm.denormalise(torch.zeros(lora.layout.dim)), lora.init_vector)
    b_segments = [i for i, s in enumerate(lora.layout.segments) if s.key.endswith("lora_B.weight")]
    assert all(float(norm.scale[i]) == pytest.approx(0.01) for i in b_segments)


def test_e2e_from_scratch_needs_no_collection_and_lowers_the_loss(tmp_path: Path) -> None:
    settings = dataclasses.replace(
        SMALL_SETTINGS,
        cvae_training=CVAETrainingSettings(steps=0, e2e_steps=60, e2e_learning_rate=1e-3, description_dropout=0.5),
    )
    run = Run.create(tmp_path / "run", settings, "synthetic:6", unseen_fraction=0.34)
    base = load_base_model("tiny")
    generator = step_train_generator(run, base, progress=False)
    info = generator.checkpoint.info
    assert info["objective"] == "e2e" and info["collection_bytes"] == 0
    assert info["e2e_final_loss"] < info["e2e_first_loss"]
    assert not (tmp_path / "run" / "manifest.json").exists()
    report = step_evaluate(run, base, progress=False, plot=False, variants=("base", "generated", "wrong_vector"))
    unseen = [r for r in report["tasks"] if r["split"] == "unseen"]
    assert unseen and all(len(r["correct"]["generated"]) == r["test_examples"] for r in unseen)
    assert all("wrong_task" in r and r["wrong_task"] != r["task"] for r in unseen)

    # continued end to end from its packed form (e2e_init): a fresh schedule and new batches, its id recorded
    packed = tmp_path / "packed"
    start_id = save_checkpoint(generator.checkpoint, packed, packed=True)
    more = dataclasses.replace(run.settings.cvae_training, e2e_steps=10, seed=1, e2e_init=str(packed))
    with pytest.raises(ValueError, match="another base model, LoRA layout or task encoder"):
        continued_from(more, generator.checkpoint.layout, dataclasses.replace(run.settings.encoder, queries=1), "tiny")
    again = Run.create(tmp_path / "again", dataclasses.replace(run.settings, cvae_training=more), "synthetic:6", 0.34)
    continued = step_train_generator(again, base, progress=False).checkpoint
    assert continued.info["objective"] == "e2e-continued" and continued.info["e2e_init"] == start_id
    start = load_checkpoint(packed)
    torch.testing.assert_close(continued.norm.mean, start.norm.mean)
    assert not torch.equal(continued.cvae.dec_shared.weight, start.cvae.dec_shared.weight)  # it trained on


def test_settings_name_the_objective() -> None:
    assert CVAETrainingSettings().objective == "reconstruction"
    assert CVAETrainingSettings(steps=0, e2e_steps=5).objective == "e2e"
    assert CVAETrainingSettings(steps=5, e2e_steps=5).objective == "reconstruction+e2e"
    assert CVAETrainingSettings(steps=0, e2e_steps=5, e2e_init="g").objective == "e2e-continued"
    with pytest.raises(ConfigError, match="e2e_init"):
        CVAETrainingSettings(steps=5, e2e_steps=5, e2e_init="g")
    assert CVAETrainingSettings(description_dropout=0.6).hide_description == 0.6
    with pytest.raises(ConfigError):
        CVAETrainingSettings(steps=0, e2e_steps=0)
    with pytest.raises(ConfigError):
        CVAETrainingSettings(condition_dropout=0.4, description_dropout=0.7)


def test_refinement_is_deterministic_and_fits_the_examples(tiny_base: BaseModel) -> None:
    lora = LoraModel(tiny_base.model, LoraSettings())
    spec = TaskSpec(TASK.description, TASK.train[:8])
    settings = RefinePlan(steps=16, learning_rate=1e-2, max_length=32)
    start = lora.init_vector
    first = refine(lora, tiny_base.tokenizer, spec, settings, start)
    again = refine(lora, tiny_base.tokenizer, spec, settings, start)
    assert torch.equal(first, again)
    scorer = LoraModelScorer(lora, tiny_base.tokenizer.pad_token_id)
    groups = encode_groups(tiny_base.tokenizer, spec.examples, 32, choices=False)
    adapter = GeneratedAdapter(lora.layout.unflatten(first), lora.settings, "tiny:0", "refined")
    base, tuned = scorer(groups, [None, adapter]).mean(dim=1).tolist()
    assert tuned > base
    assert refined_adapter_id("a" * 32, settings) != refined_adapter_id("b" * 32, settings)
    assert refined_adapter_id("a" * 32, settings) != refined_adapter_id("a" * 32, RefinePlan(steps=8))
    with pytest.raises(ConfigError):
        RefinePlan(steps=0)
    with pytest.raises(ConfigError):
        RefinePlan(steps=65)


def test_self_check_uses_held_out_examples_when_there_are_enough() -> None:
    examples = tuple(Example(f"in {i}", f"out {i}") for i in range(10))
    chosen, held_out = check_examples(TaskSpec("d", examples), read=8)
    assert held_out and chosen == examples[8:]
    chosen, held_out = check_examples(TaskSpec("d", examples[:9]), read=8)
    assert not held_out and chosen == examples[:9]


def test_batched_exact_match_equals_one_at_a_time(tiny_base: BaseModel) -> None:
    examples = [Example(e.input, e.output) for e in TASK.test[:6]]
    batched = exact_match_correct(tiny_base.model, tiny_base.tokenizer, examples, max_length=32, batch_size=4)
    single = [exact_match_correct(tiny_base.model, tiny_base.tokenizer, [e], max_length=32)[0] for e in examples]
    assert batched == single


def test_packed_multiple_choice_picks_the_choice_padded_rows_pick(tiny_base: BaseModel) -> None:
    """The packed scorer (prompt once, every choice after it) agrees with one padded row per (prompt, choice), the
    way the scorer worked before, on every example; batches of any size give the same answers."""
    lora = LoraModel(tiny_base.model, LoraSettings())
    lora.load_vector(_random_lora(lora, 3))
    tokenizer = tiny_base.tokenizer
    words = ("yes", "no", "maybe so", "never again")
    examples = [Example(e.input, words[i % 4], choices=words) for i, e in enumerate(TASK.test[:10])]
    packed = multiple_choice_correct(lora.model, tokenizer, examples, max_length=48)
    tiny_batches = multiple_choice_correct(lora.model, tokenizer, examples, max_length=48, max_tokens=1)
    padded = []
    with torch.no_grad():
        for example in examples:
            pairs = [encode_pair(tokenizer, format_prompt(example.input), format_target(c), 48) for c in words]
            batch = pad_pairs(pairs, tokenizer.pad_token_id)
            logits = lora.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            total, count = answer_logprobs(logits, batch.labels)
            padded.append(float(words[int(torch.argmax(total / count))] == example.output))
    assert packed == padded == tiny_batches
    assert 0 < sum(packed) < len(packed)  # not a degenerate all-right / all-wrong case


def test_paired_bootstrap_interval() -> None:
    rows = [
        {"correct": {"a": [1.0] * 30 + [0.0] * 10, "b": [0.0] * 40}},
        {"correct": {"a": [1.0] * 20, "b": [1.0] * 20}},
        {"correct": {"b": [1.0] * 5}},  # no "a": not paired, left out
    ]
    ci = paired_bootstrap(rows, "a", "b")
    assert ci is not None
    assert ci["mean"] == pytest.approx(30 / 60, abs=1e-4)
    assert ci["low"] < ci["mean"] < ci["high"]
    assert ci["low"] > 0.3 and ci["tasks"] == 2 and ci["examples"] == 60
    same = paired_bootstrap([{"correct": {"a": [1.0, 0.0] * 10, "b": [1.0, 0.0] * 10}}], "a", "b")
    assert same is not None and same["low"] == same["high"] == 0.0
    assert paired_bootstrap(rows, "a", "c") is None


def test_self_check_normalises_over_choices_so_format_alone_does_not_pass() -> None:
    """A scorer double: the "adapter" makes every choice far likelier (the format) but prefers the wrong one."""
    examples = tuple(Example(f"q{i}", "yes", ("yes", "no")) for i in range(4))
    spec = TaskSpec("d", examples)

    def scorer(groups: Sequence[AnswerGroup], adapters: Sequence[object]) -> torch.Tensor:
        assert [len(g.answers) for g in groups] == [2] * len(groups) and adapters[0] is None
        base = [-5.0, -6.0] * len(groups)  # base: unlikely answers, but the right one a little likelier
        tuned = [-2.0, -0.5] * len(groups)  # adapter: likelier answers, the wrong one first
        return torch.tensor([base, tuned])

    tokenizer = load_base_model("tiny").tokenizer
    adapter = GeneratedAdapter({}, LoraSettings(), "tiny:0", "x")
    check = self_check(spec, adapter, scorer, tokenizer, read=8)
    assert check is not None and not check.passed and check.examples == 4
    free = TaskSpec("d", tuple(Example(e.input, e.output) for e in examples))  # no choices: plain log-likelihood

    def plain(groups: Sequence[AnswerGroup], adapters: Sequence[object]) -> torch.Tensor:
        assert [len(g.answers) for g in groups] == [1] * len(groups)
        return torch.tensor([[-5.0 if a is None else -1.0] * len(groups) for a in adapters])

    check = self_check(free, adapter, plain, tokenizer, read=8)
    assert check is not None and check.passed and check.delta == 4.0


def test_self_check_decides_by_examples_right_before_likelihood() -> None:
    """The pattern of BIG-bench swahili_english_proverbs: the adapter is far more confident on two examples the base
    model gets badly wrong, so its mean normalised likelihood is higher, but it answers fewer examples right: it
    fails. With as many right, the likelihood decides; without choices, only the likelihood."""
    examples = tuple(Example(f"q{i}", "yes", ("yes", "no")) for i in range(4))
    spec = TaskSpec("d", examples)

    def scorer_of(base: list[float], tuned: list[float]) -> AnswerScorer:
        return lambda groups, adapters: torch.tensor([base, tuned])

    tokenizer = load_base_model("tiny").tokenizer
    adapter = GeneratedAdapter({}, LoraSettings(), "tiny:0", "x")
    # base: right on examples 0 and 1 (narrowly), very wrong on 2 and 3
    base = [-1.0, -1.1, -1.0, -1.1, -9.0, -1.0, -9.0, -1.0]
    tuned = [-1.2, -1.0, -1.2, -1.0, -1.0, -1.1, -1.1, -1.2]  # right on 2 and 3 only: 2 right, like the base model
    check = self_check(spec, adapter, scorer_of(base, tuned), tokenizer, read=8)
    assert check is not None and (check.base_correct, check.adapter_correct) == (2, 2)
    assert check.delta > 0 and check.passed  # a tie: the likelihood decides
    tuned[4] = -1.2  # now wrong on example 2 as well: 1 right, still far likelier on average
    check = self_check(spec, adapter, scorer_of(base, tuned), tokenizer, read=8)
    assert check is not None and check.adapter_correct == 1 and check.delta > 1.0 and not check.passed
    stored = check.to_dict()
    assert (stored["base_correct"], stored["adapter_correct"]) == (2, 1)
    assert describe(stored).startswith("1 of 4 examples right vs 2 without the adapter; answer log-likelihood +")
    better = [-1.0, -1.2, -1.0, -1.2, -1.0, -1.1, -1.1, -1.2]  # all 4 right, though less likely than base on 0, 1
    check = self_check(spec, adapter, scorer_of(base, better), tokenizer, read=8)
    assert check is not None and check.adapter_correct == 4 and check.passed
    assert SelfCheck(-1.0, -2.0, 4, False, base_correct=1, adapter_correct=2).passed  # more right passes outright
    assert not SelfCheck(-1.0, -0.5, 4, False, margin=0.0, base_correct=3, adapter_correct=2).passed
    assert (
        describe({"delta": -0.5, "base_correct": None}) == "answer log-likelihood -0.500 nats/token vs the base model"
    )


def test_self_check_counts_right_answers_as_the_report_scores_them(tiny_base: BaseModel) -> None:
    """``base_correct`` / ``adapter_correct`` equal the quality report's multiple-choice scorer on the same examples."""
    lora = LoraModel(tiny_base.model, LoraSettings())
    lora.load_vector(_random_lora(lora, 4))
    words = ("yes", "no", "maybe so")
    examples = tuple(Example(e.input, words[i % 3], choices=words) for i, e in enumerate(TASK.test[:8]))
    adapter = GeneratedAdapter(lora.layout.unflatten(_random_lora(lora, 4)), lora.settings, "tiny:0", "x")
    scorer = LoraModelScorer(lora, tiny_base.tokenizer.pad_token_id)
    check = self_check(TaskSpec("d", examples), adapter, scorer, tiny_base.tokenizer, read=8, max_length=48)
    assert check is not None
    tuned = multiple_choice_correct(lora.model, tiny_base.tokenizer, examples, max_length=48)
    with lora.base_only() as base:
        plain = multiple_choice_correct(base, tiny_base.tokenizer, examples, max_length=48)
    assert (check.base_correct, check.adapter_correct) == (int(sum(plain)), int(sum(tuned)))


def test_packed_groups_score_as_one_pair_per_row(tiny_base: BaseModel) -> None:
    """A prompt read once for all its answers gives each answer the log-likelihood it gets alone after the prompt."""
    tokenizer, model = tiny_base.tokenizer, tiny_base.model
    cases = [
        ("Is the sky blue?", [" yes", " no", " not on a cloudy day"]),
        ("2 + 2 =", [" 4"]),
        ("a fruit: apple, car or stone", [" apple", " car", " stone"]),
    ]
    groups = [encode_group(tokenizer, format_prompt(p), answers, 48) for p, answers in cases]
    pairs = [encode_pair(tokenizer, format_prompt(p), a, 48) for p, answers in cases for a in answers]
    assert [g.prompt + g.answers[0] for g in groups] == [pairs[0].ids, pairs[3].ids, pairs[4].ids]
    with torch.inference_mode():
        batch = pad_pairs(pairs, tokenizer.pad_token_id)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        total, count = answer_logprobs(logits, batch.labels)
        packed = packed_answer_logprobs(model, pack_groups(groups, tokenizer.pad_token_id))
    assert packed.shape == (7,)
    assert torch.allclose(packed, total / count, atol=1e-5)
    assert packed.unique().numel() == 7  # the answers do not see each other (otherwise equal scores are unlikely)


def test_answer_losses_per_group_match_answer_loss_per_subset(tiny_base: BaseModel) -> None:
    pairs = encode_examples(tiny_base.tokenizer, TASK.train[:6], 32)
    batch = pad_pairs(pairs, tiny_base.tokenizer.pad_token_id)
    groups = torch.tensor([0, 1, 0, 2, 1, 0])
    with torch.no_grad():
        per_group = answer_losses(
            tiny_base.model, batch.input_ids, batch.attention_mask, batch.labels, groups, num_groups=4
        )
        for g in range(3):
            rows = (groups == g).nonzero()[:, 0]
            alone = answer_loss(tiny_base.model, batch.input_ids[rows], batch.attention_mask[rows], batch.labels[rows])
            torch.testing.assert_close(per_group[g], alone, atol=1e-5, rtol=1e-5)
    assert float(per_group[3]) == 0.0  # an empty group


def test_partners_pair_the_chosen_tasks() -> None:
    assert partners(4) == [1, 0, 3, 2]
    assert partners(3) == [1, 0, 0]
    assert partners(2) == [1, 0]
    with pytest.raises(ConfigError):
        CVAETrainingSettings(steps=0, e2e_steps=5, e2e_tasks_per_step=1, e2e_contrast_weight=1.0)


def test_contrastive_e2e_makes_adapters_fit_their_own_task(tmp_path: Path) -> None:
    """Two synthetic tasks of one family with opposite labels: with the contrastive term each task's own LoRA ends
    up fitting it better than its partner's by a clear, growing gap."""
    settings = dataclasses.replace(
        SMALL_SETTINGS,
        cvae_training=CVAETrainingSettings(
            steps=0,
            e2e_steps=60,
            e2e_learning_rate=1e-3,
            description_dropout=0.5,
            e2e_tasks_per_step=2,
            e2e_contrast_weight=1.0,
            e2e_contrast_margin=0.5,
            e2e_sibling_rate=1.0,
        ),
    )
    run = Run.create(tmp_path / "run", settings, "synthetic:6", unseen_fraction=0.34)
    generator = step_train_generator(run, load_base_model("tiny"), progress=False)
    info = generator.checkpoint.info
    assert info["e2e_final_gap"] > info["e2e_first_gap"]
    assert info["e2e_final_gap"] > 0.05
    assert info["e2e_final_loss"] < info["e2e_first_loss"]


def test_short_groups_share_a_row_and_score_as_alone(tiny_base: BaseModel) -> None:
    """Groups packed several to a row (each its own segment, copied once per adapter) score as each does alone."""
    tokenizer, model = tiny_base.tokenizer, tiny_base.model
    cases = [
        ("a much longer question, so that two short ones fit beside it in its row?", [" yes", " no"]),
        ("2 + 2 =", [" 4", " 5"]),
        ("red or blue?", [" red", " blue", " neither"]),
        ("one", [" two"]),
    ]
    groups = [encode_group(tokenizer, format_prompt(p), answers, 48) for p, answers in cases]
    lengths = [group_length(g) for g in groups]
    assert lengths[0] >= lengths[1] + lengths[2]  # the case this test is about: short groups fit beside the longest
    layout = layout_rows(lengths)
    assert sorted(k for row in layout for k in row) == [0, 1, 2, 3] and len(layout) < len(groups)
    with torch.inference_mode():
        alone = torch.cat([packed_answer_logprobs(model, pack_groups([g], tokenizer.pad_token_id)) for g in groups])
        shared = pack_groups(groups, tokenizer.pad_token_id, copies=2)
        together = packed_answer_logprobs(model, shared)
    assert shared.rows_per_copy == len(layout) and shared.input_ids.shape[0] == 2 * len(layout)
    assert together.shape == (16,)
    assert torch.allclose(together, torch.cat([alone, alone]), atol=1e-5)
