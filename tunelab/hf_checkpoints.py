"""WORKAROUND: pickle-free Trainer checkpoints, by overriding private methods of transformers' `Trainer`.

Why: a tunelab run directory holds no pickles, so no file in it needs `torch.load` (house rule 8: weights
and state as safetensors + JSON). HF's Trainer writes its checkpoints with `torch.save`, a pickle:
`optimizer.pt`, `scheduler.pt`, `scaler.pt`, `rng_state*.pth` and `training_args.bin`, and it saves the
whole model where tunelab saves only a method's trainable weights with the method's metadata. It has no
public hook for any of that, so `PickleFreeCheckpoints` overrides the private methods that write and read
those files, all of them here and nowhere else:

    _save, _load_from_checkpoint              weights: tunelab.methods.save_trainable / restore_trainable
    _load_best_model                          --load_best_model_at_end: the same restore_trainable
    _save_optimizer_and_scheduler,            optimizer tensors as safetensors; optimizer structure and
    _load_optimizer_and_scheduler             scheduler state as JSON
    _save_scaler, _load_scaler                the fp16 gradient scaler's state as JSON
    _save_rng_state, _load_rng_state          torch RNG states as safetensors, python/numpy ones as JSON

Written against transformers 5.x (checked on 5.24; pyproject pins >=5.0,<5.40): the names, signatures and
call order above are those of `Trainer._save_checkpoint` and `Trainer._inner_training_loop` there. A new
transformers that renames one of them would silently write pickles again: tests/test_hf_checkpoints.py
checks that a checkpoint holds every file above and no pickle, and tests/test_train.py resumes from one.
Remove an override when HF's Trainer saves that state without pickles itself (e.g. optimizer / scheduler /
RNG state as safetensors + JSON, or a public hook for it), or when tunelab's checkpoints become plain
`save_pretrained` folders (weights). DeepSpeed and FSDP keep their engines' own checkpoint formats (they own
that state): there the optimizer methods fall back to HF's.

The class expects what TunelabTrainer sets: `method_info`, `base_model`, `run_args`.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab import integrity, methods

logger = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_extra_state.json"  # optimizer structure, scheduler
SCALER_FILE = "scaler_state.json"


class PickleFreeCheckpoints:
    """Mixin placed before `transformers.Trainer`: its checkpoints as safetensors + JSON (see the module)."""

    # ---- weights ----
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        # ZeRO-3 / FSDP hand over the gathered full state_dict; the unwrapped model's own tensors are shards
        methods.save_trainable(model, output_dir, self.method_info, self.base_model, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        integrity.write_json(Path(output_dir, "tunelab_args.json"), self.run_args)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model or self.model, keep_torch_compile=False)
        meta = methods.read_method(resume_from_checkpoint)
        methods.restore_trainable(model, resume_from_checkpoint, meta)

    def _load_best_model(self) -> None:  # --load_best_model_at_end: the best checkpoint's method weights
        if not self._owns_state():
            return super()._load_best_model()
        logger.info("loading the best model from %s (%s %s)", self.state.best_model_checkpoint,
                    self.args.metric_for_best_model, self.state.best_metric)
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    # ---- optimizer, scheduler, scaler ----
    def _owns_state(self) -> bool:
        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._owns_state():
            return super()._save_optimizer_and_scheduler(output_dir)
        if not self.args.should_save:
            return
        tensors, structure = _flatten_optimizer_state(self.optimizer.state_dict())
        from safetensors.torch import save_file

        save_file(tensors, os.path.join(output_dir, OPTIMIZER_FILE))
        extra = {"optimizer": structure, "scheduler": self.lr_scheduler.state_dict()}
        Path(output_dir, STATE_FILE).write_text(json.dumps(extra, default=_json_default), encoding="utf-8")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self._owns_state():
            return super()._load_optimizer_and_scheduler(checkpoint)
        if not os.path.isfile(os.path.join(checkpoint, OPTIMIZER_FILE)):
            logger.warning("no optimizer state in %s: the optimizer restarts", checkpoint)
            return
        from safetensors.torch import load_file

        extra = json.loads(Path(checkpoint, STATE_FILE).read_text(encoding="utf-8"))
        tensors = load_file(os.path.join(checkpoint, OPTIMIZER_FILE), device=str(self.args.device))
        self.optimizer.load_state_dict(_unflatten_optimizer_state(tensors, extra["optimizer"]))
        self.lr_scheduler.load_state_dict(extra["scheduler"])

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not self.args.should_save:
            return
        Path(output_dir, SCALER_FILE).write_text(json.dumps(scaler.state_dict(), default=_json_default),
                                                 encoding="utf-8")

    def _load_scaler(self, checkpoint: str | None) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is None or scaler is None or not Path(checkpoint, SCALER_FILE).is_file():
            return
        scaler.load_state_dict(json.loads(Path(checkpoint, SCALER_FILE).read_text(encoding="utf-8")))

    # ---- RNG: torch states as tensors, python/numpy states as JSON ----
    def _save_rng_state(self, output_dir: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(output_dir, exist_ok=True)  # under DDP a rank can get here before rank 0 made the folder
        tensors = {"cpu": torch.random.get_rng_state()}
        if torch.cuda.is_available():
            for i, state in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"cuda_{i}"] = state
        name = _rng_name(self.args)
        save_file(tensors, os.path.join(output_dir, name + ".safetensors"))
        np_state = np.random.get_state()
        py_state = random.getstate()
        other = {"python": [py_state[0], list(py_state[1]), py_state[2]],
                 "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
        Path(output_dir, name + ".json").write_text(json.dumps(other), encoding="utf-8")

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        name = _rng_name(self.args)
        path = Path(checkpoint, name + ".safetensors")
        if not path.is_file():
            logger.info("no RNG state in %s: reproducibility of the resumed run is not guaranteed", checkpoint)
            return
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        torch.random.set_rng_state(tensors["cpu"])
        if torch.cuda.is_available():
            cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
        other = json.loads(Path(checkpoint, name + ".json").read_text(encoding="utf-8"))
        py = other["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        np_state = other["numpy"]
        np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))


def _rng_name(args) -> str:
    return "rng_state" if args.world_size <= 1 else f"rng_state_{args.process_index}"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint's JSON state")


def _flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into named tensors (safetensors) and a JSON-able skeleton."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton: dict[str, dict[str, Any]] = {}
    for pid, per_param in state["state"].items():
        entry: dict[str, Any] = {}
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                name = f"{pid}.{key}"
                tensors[name] = value.detach().contiguous().cpu()
                entry[key] = {"tensor": name}
            else:
                entry[key] = value
        skeleton[str(pid)] = entry
    return tensors, {"state": skeleton, "param_groups": state["param_groups"]}


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    state = {}
    for pid, entry in structure["state"].items():
        state[int(pid)] = {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
                           for k, v in entry.items()}
    return {"state": state, "param_groups": structure["param_groups"]}
