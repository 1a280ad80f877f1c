"""The one training loop: HF `Trainer` with tunelab's loss and pickle-free checkpoints.

Every method trains through `TunelabTrainer`; methods differ only in the model they hand it
(tunelab/methods/). What this subclass changes, and why:
- loss: cross-entropy computed only at supervised positions (`logits_to_keep` as a boolean mask, a public
  transformers API), so the vocab projection is skipped for prompt tokens — same value as the full-logits
  loss, fewer FLOPs (tests/test_trainer.py checks equality); on a CPU the cross-entropy runs in cache-sized
  chunks without full-size fp32 copies of the logits (tunelab/cross_entropy.py);
- padding-free batches: a right-padded batch runs as one row holding its samples back to back
  (`pack_batch`), with attention kept inside each sample (`packed_attention`, registered through
  transformers' public AttentionInterface). Same samples, same order, same targets, so the same loss up
  to float noise — minus the FLOPs spent on padding (tests/test_speed.py; 1.6x on alpaca rows cut at 256
  tokens, bench/README.md). On a CPU, batches without padding are packed too when their rows fit the
  matmul attention (12% faster than SDPA on the dense batch); consecutive samples of one length share one
  batched attention call, so a batch without padding makes one call per layer. With LoRA dropout the
  random masks are drawn over the packed tensor, so a seeded run draws different (equally distributed)
  masks than a padded one would;
- frozen weights cast once: under bf16/fp16 autocast the frozen nn.Linear weights are held in that dtype
  for the whole of training instead of being re-cast at every forward (tunelab.speedups.py; same
  numbers, fewer bytes moved per step);
- saving: weights through `methods.save_trainable` (safetensors), and optimizer / scheduler / RNG / scaler
  state as safetensors + JSON instead of torch pickles, so no checkpoint file needs `torch.load`.
DeepSpeed and FSDP keep their engines' own checkpoint formats (they own that state).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer

from tunelab import methods
from tunelab.cross_entropy import cross_entropy
from tunelab.speedups import active_autocast_dtype, cpu_dropout, linear_weights_cast

logger = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_extra_state.json"  # optimizer structure, scheduler, scaler, python/numpy RNG
RNG_FILE = "rng_state.safetensors"


def supervised_loss(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100.

    Only the hidden states that predict a supervised token go through the output projection:
    keep[b, t] is True when labels[b, t + 1] is supervised, so logits come back as (num_kept, vocab).
    """
    labels = inputs["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**model_inputs, logits_to_keep=keep, use_cache=False).logits
    targets = labels[:, 1:][keep[:, :-1]]
    if targets.numel() == 0:  # a batch with nothing to learn contributes zero loss, not NaN
        return logits.sum() * 0.0
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)


# ---- padding-free batches ----

PACKED_ATTENTION = "tunelab_packed"  # the name packed_attention is registered under in transformers
MATMUL_ATTENTION_MAX_LEN = 256  # longer samples go through SDPA (memory O(L), not O(L^2)), see _matmul_attention
# _matmul_attention's softmax runs in the scores' own dtype (None): for bf16/fp16 scores torch's CPU kernel computes
# in fp32 and rounds once, so the probabilities are bit-identical to transformers' fp32 softmax + cast back, minus
# two full-size cast passes per layer (one forward, one backward); 1.05x per step on 256-token rows (bench/README.md)
SOFTMAX_DTYPE: torch.dtype | None = None


def pack_batch(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """A right-padded batch [B, T] as one padding-free row [1, N] (N = real tokens), samples in order.

    position_ids restart at 0 for every sample (as in the padded batch) and `cu_seq_lens_q` (transformers'
    name for sample boundaries, [B + 1] cumulative lengths) tells packed_attention where samples end. Each
    sample's first label becomes -100: in the packed row the token before it belongs to the previous
    sample (the padded batch never predicts a first token either). None when packing cannot be exact
    (left padding, inputs other than ids, mask and labels) or gains nothing: a batch without padding is
    packed only on a CPU with rows short enough for the matmul attention (12% faster than SDPA on the
    dense batch there, bench/README.md); elsewhere SDPA on the dense batch is as fast and needs less memory.
    """
    mask = inputs.get("attention_mask")
    if mask is None or set(inputs) != {"input_ids", "attention_mask", "labels"}:
        return None
    if bool(mask.all()) and (mask.device.type != "cpu" or mask.shape[1] > MATMUL_ATTENTION_MAX_LEN):
        return None
    mask = mask.bool()
    lengths = mask.sum(1)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    if not bool((mask == (positions < lengths[:, None])).all()):
        return None  # not right-padded: the padded batch's positions would not start at 0
    labels = inputs["labels"].clone()
    labels[:, 0] = -100
    cu_seq_lens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return {"input_ids": inputs["input_ids"][mask][None], "labels": labels[mask][None],
            "position_ids": positions[mask][None], "cu_seq_lens_q": cu_seq_lens}


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, **kwargs):
    """Causal attention inside each sample of a packed row ([1, heads, N, head_dim], bounds in
    kwargs["cu_seq_lens_q"]); exactly transformers' SDPA attention when there are no bounds (unpacked
    batches, generation)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    runs = equal_length_runs((bounds[1:] - bounds[:-1]).tolist())
    sizes = [length * count for length, count in runs]
    cpu = query.device.type == "cpu"
    # split, not slices: one gradient concatenation in backward instead of a zero-filled full-size
    # gradient per piece and tensor (slicing's backward), which grew with the number of samples
    outputs = [(_matmul_attention if cpu and length <= MATMUL_ATTENTION_MAX_LEN else _sdpa_attention)(
               q, k, v, scaling, dropout, count)
               for q, k, v, (length, count) in zip(query.split(sizes, dim=2), key.split(sizes, dim=2),
                                                   value.split(sizes, dim=2), runs)]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None  # [1, N, heads, head_dim] like SDPA's


def equal_length_runs(lengths: list[int]) -> list[tuple[int, int]]:
    """Consecutive samples of one length, as (length, count) in order; empty samples dropped.
    [256, 256, 90, 256] -> [(256, 2), (90, 1), (256, 1)]: each run is one batched attention call (a batch
    without padding is a single run), not one call per sample."""
    runs: list[tuple[int, int]] = []
    for length in lengths:
        if runs and runs[-1][0] == length:
            runs[-1] = (length, runs[-1][1] + 1)
        elif length:
            runs.append((length, 1))
    return runs


def _samples_first(x: torch.Tensor, count: int) -> torch.Tensor:
    """[1, heads, count * L, head_dim] -> [count, heads, L, head_dim] (a view)."""
    return x.view(x.shape[1], count, -1, x.shape[3]).transpose(0, 1)


def _samples_joined(x: torch.Tensor) -> torch.Tensor:
    """[count, heads, L, head_dim] -> [1, heads, count * L, head_dim] (inverse of _samples_first)."""
    return x.transpose(0, 1).reshape(1, x.shape[1], -1, x.shape[3])


def _sdpa_attention(query, key, value, scaling, dropout, count=1):
    """`count` equal-length samples' causal attention as one batched SDPA call."""
    out = F.scaled_dot_product_attention(_samples_first(query, count), _samples_first(key, count),
                                         _samples_first(value, count), dropout_p=dropout, is_causal=True,
                                         scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return _samples_joined(out)


def _matmul_attention(query, key, value, scaling, dropout, count=1):
    """The causal attention of `count` samples of one length L as two batched matmuls and a softmax computed
    in fp32 (transformers' eager attention; see SOFTMAX_DTYPE). Grouped-query heads share their K/V head in
    the matmuls themselves — the queries of one K/V head and sample are stacked into one [groups * L,
    head_dim] matrix — instead of copying K and V per query head (repeat_kv) and summing the copies'
    gradients back; the scale and the causal mask ride in the first matmul (baddbmm's alpha and bias).
    Why by hand: on CPU, SDPA's flash kernel makes a whole LoRA training step on SmolLM2 ~11% slower than
    this for samples of <= 256 tokens (bench/README.md). The price is the [heads, L, L] probabilities kept
    for backward (~0.3 GB in bf16 there), hence only up to MATMUL_ATTENTION_MAX_LEN tokens per sample."""
    heads, head_dim, kv_heads = query.shape[1], query.shape[3], key.shape[1]
    length = query.shape[2] // count
    groups = heads // kv_heads  # query head h uses K/V head h // groups, as in repeat_kv
    mask = _causal_bias(length, groups, active_autocast_dtype(query.device) or query.dtype, query.device)
    # [1, kv_heads * groups, count * L, d] -> [kv_heads * count, groups * L, d]: one matrix per (K/V head, sample)
    q = query.reshape(kv_heads, groups, count, length, head_dim).transpose(1, 2)
    scores = torch.baddbmm(mask, q.reshape(kv_heads * count, groups * length, head_dim),
                           key.reshape(kv_heads * count, length, head_dim).transpose(1, 2),
                           alpha=head_dim ** -0.5 if scaling is None else scaling)
    probs = torch.softmax(scores, dim=-1, dtype=SOFTMAX_DTYPE).to(scores.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    out = torch.bmm(probs, value.reshape(kv_heads * count, length, head_dim))
    out = out.view(kv_heads, count, groups, length, head_dim).transpose(1, 2)  # [kv_heads, groups, count, L, d]
    return out.reshape(1, heads, count * length, head_dim)


@functools.lru_cache(maxsize=64)
def _causal_bias(length: int, groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[groups * L, L] additive causal mask for `groups` stacked query blocks: 0 on and below each block's
    diagonal, -inf above (a normal tensor even when first asked for under inference_mode, so later training
    steps can use it)."""
    with torch.inference_mode(False):
        block = torch.full((length, length), float("-inf"), dtype=dtype, device=device).triu_(1)
        return block.repeat(groups, 1)


def enable_packed_attention(model) -> str | None:
    """Switch the HF model in `model` (plain or peft-wrapped) from SDPA to packed_attention when that is
    exact: a causal LM on transformers' attention interface, full attention in every layer (no sliding
    window, softcap or position bias). Returns the implementation to restore afterwards, or None when
    the model is left as it is (P-Tuning's prefix cache, eager/flash attention, remote code)."""
    from transformers import AttentionInterface, PreTrainedModel
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(hf, "config", None)
    if not isinstance(hf, PreTrainedModel) or not getattr(hf, "_supports_attention_backend", False) \
            or getattr(config, "_attn_implementation", None) != "sdpa":
        return None
    text = config.get_text_config()
    if any(t != "full_attention" for t in getattr(text, "layer_types", None) or []) \
            or getattr(text, "attn_logit_softcapping", None) or getattr(text, "is_encoder_decoder", False):
        return None
    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)  # unpacked batches get SDPA's masks
    hf.set_attn_implementation(PACKED_ATTENTION)
    return "sdpa"


class TunelabTrainer(Trainer):
    """HF Trainer + tunelab's supervised-position loss, padding-free batches and safetensors/JSON checkpoints."""

    def __init__(self, *args, method_info: methods.MethodInfo, base_model: str, run_args: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.method_info = method_info
        self.base_model = base_model
        self.run_args = run_args
        self.loss_is_scaled_for_ga = False  # our loss is a per-micro-batch mean; the Trainer divides by GA steps

    def train(self, *args, **kwargs):
        # compiled graphs would see a new packed length every step; compile keeps padded batches
        restore = None if self.args.torch_compile else enable_packed_attention(self.model)
        self.packing = restore is not None
        try:
            with linear_weights_cast(self.model, self._frozen_weight_dtype(), frozen_only=True), \
                    cpu_dropout(self.model, self._dropout_device()):
                return super().train(*args, **kwargs)
        finally:
            if restore:
                hf = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
                hf.set_attn_implementation(restore)
            self.packing = False

    def _frozen_weight_dtype(self) -> torch.dtype | None:
        """The autocast dtype frozen linear weights can be held in, None where that is not ours to do:
        no autocast, DeepSpeed / FSDP (their engines own parameter dtypes), full fine-tuning (nothing
        frozen that a saved checkpoint would not contain)."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or self.method_info.finetuning_type == "full":
            return None
        return torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None

    def _dropout_device(self) -> torch.device:
        """The device whose dropout kernel decides whether nn.Dropout is swapped (a CPU: yes)."""
        return self.args.device

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        packed = pack_batch(inputs) if getattr(self, "packing", False) else None
        loss = supervised_loss(model, packed or inputs)
        return (loss, None) if return_outputs else loss

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
        Path(output_dir, "tunelab_args.json").write_text(json.dumps(self.run_args, indent=2), encoding="utf-8")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model or self.model, keep_torch_compile=False)
        meta = methods.read_method(resume_from_checkpoint)
        methods.restore_trainable(model, resume_from_checkpoint, meta)

    # ---- optimizer, scheduler, scaler: safetensors + JSON ----
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

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None or not self.args.should_save:
            return
        path = Path(output_dir, "scaler_state.json")
        path.write_text(json.dumps(scaler.state_dict(), default=_json_default), encoding="utf-8")

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
