"""Resumable end-to-end training: the generator's training state written every few steps, so a run interrupted (a
session's end, a killed process) continues where it stopped instead of starting again.

Two files beside the generator being trained (``e2e-state.safetensors``: the CVAE's parameters, the optimiser's
moments and the torch RNG; ``e2e-state.json``: the step, the loss curves, the scheduler, the Python RNG, and a
fingerprint of everything the training depends on). A state whose fingerprint differs (other settings, other tasks,
another base model) is ignored and training starts from scratch. A resumed run takes the same steps with the same
random draws as an uninterrupted one. The files are removed when the generator is saved.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from generator.files import read_json, write_atomic, write_json

STATE_WEIGHTS = "e2e-state.safetensors"
STATE_INFO = "e2e-state.json"


@dataclass
class Progress:
    """What a resumed run needs besides the tensors: steps done, curves, seconds spent, and the checkpoint's info
    from before end-to-end training (the reconstruction figures, when there was reconstruction)."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class TrainingState:
    def __init__(self, folder: Path, key: str) -> None:
        self.folder = folder
        self.key = key

    @property
    def _weights(self) -> Path:
        return self.folder / STATE_WEIGHTS

    @property
    def _info(self) -> Path:
        return self.folder / STATE_INFO

    def exists(self) -> bool:
        """A saved state for this very training (same fingerprint)."""
        if not (self._weights.is_file() and self._info.is_file()):
            return False
        try:
            return bool(read_json(self._info).get("fingerprint") == self.key)
        except (OSError, ValueError):
            return False

    def save(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        rng: random.Random,
        progress: Progress,
    ) -> None:
        tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        opt = optimizer.state_dict()
        for index, slots in opt["state"].items():
            for name, value in slots.items():
                tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                tensors[f"optim.{index}.{name}"] = tensor.detach().contiguous().cpu()
        tensors["torch_rng"] = torch.get_rng_state()
        version, internal, gauss = rng.getstate()
        info = {
            "fingerprint": self.key,
            "step": progress.step,
            "losses": progress.losses,
            "gaps": progress.gaps,
            "seconds": progress.seconds,
            "info": progress.info,
            "param_groups": opt["param_groups"],
            "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
            "python_rng": [version, list(internal), gauss],
        }
        # weights first: a state is only complete (and only used) once its info file names this fingerprint
        write_atomic(self._weights, save(tensors))
        write_json(self._info, info)

    def load(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        rng: random.Random,
    ) -> Progress | None:
        """Restore everything from the saved state and return its progress; None when there is none for this key."""
        if not self.exists():
            return None
        info = read_json(self._info)
        tensors = load_file(str(self._weights))
        module.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
        scheduler.load_state_dict({**info["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
        torch.set_rng_state(tensors["torch_rng"])
        version, internal, gauss = info["python_rng"]
        rng.setstate((version, tuple(internal), gauss))
        return Progress(info["step"], info["losses"], info["gaps"], info["seconds"], info["info"])

    def clear(self) -> None:
        self._info.unlink(missing_ok=True)
        self._weights.unlink(missing_ok=True)
