from __future__ import annotations

from pathlib import Path

import pytest
import torch

from generator.base_model import BaseModelError, load_base_model


def test_tiny_model_is_deterministic_per_seed() -> None:
    a, b, c = load_base_model("tiny"), load_base_model("tiny:0"), load_base_model("tiny:1")
    assert a.name == b.name == "tiny:0" and c.name == "tiny:1"
    wa, wb, wc = (m.model.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.num_layers == 2 and a.hidden_size == 64


def test_tiny_tokenizer_encodes_any_text_and_has_a_chat_template() -> None:
    tokenizer = load_base_model("tiny").tokenizer
    text = "Ünïcode ✓ and words: kiwi lemon"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    assert len(tokenizer(" kiwi", add_special_tokens=False)["input_ids"]) == 1  # family words are single tokens
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "hi" in prompt and prompt.endswith("<|assistant|>")


def test_saved_tiny_model_loads_as_a_hugging_face_folder(tmp_path: Path) -> None:
    tiny = load_base_model("tiny")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    again = load_base_model(str(tmp_path))
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(tiny.model(ids).logits, again.model(ids).logits, atol=1e-6)


def test_missing_model_gives_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BaseModelError, match="cannot load base model"):
        load_base_model(str(tmp_path / "no-such-model"))
    with pytest.raises(BaseModelError, match="cannot load base model"):
        load_base_model("not/a-cached-hub-model")
    with pytest.raises(BaseModelError, match="seed must be an integer"):
        load_base_model("tiny:abc")
    with pytest.raises(BaseModelError, match="empty"):
        load_base_model("  ")
