"""The one training loop: HF `Trainer` with tunelab's loss, padding-free batches and pickle-free checkpoints.

Every method trains through `TunelabTrainer`; methods differ only in the model they hand it
(tunelab/methods/). What this subclass changes, and why:
- loss: cross-entropy computed only at supervised positions (`logits_to_keep` as a boolean mask, a public
  transformers API), so the vocab projection is skipped for prompt tokens — same value as the full-logits
  loss, fewer FLOPs (tests/test_trainer.py checks equality); on a CPU the cross-entropy runs in cache-sized
  chunks without full-size fp32 copies of the logits (tunelab/cross_entropy.py);
- padding-free batches: a right-padded batch runs as one row holding its samples back to back, with
  attention kept inside each sample (tunelab/attention.py; under --attn_implementation flash_attention_2,
  its own varlen kernel). Same samples, same order, same targets, so
  the same loss up to float noise — minus the FLOPs spent on padding;
- frozen weights cast once: under bf16/fp16 autocast the frozen nn.Linear weights are held in that dtype
  for the whole of training instead of being re-cast at every forward, and on a CPU dropout masks come from
  16-bit random lanes (tunelab/speedups.py; same numbers, fewer bytes moved per step);
- saving: weights through `methods.save_trainable` (safetensors), and optimizer / scheduler / RNG / scaler
  state as safetensors + JSON instead of torch pickles (tunelab/hf_checkpoints.py, the one workaround
  that overrides private Trainer methods).
Each speed-up can be switched off through `speedups=SpeedupOptions(...)` (bench/ measures them that way).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from tunelab import methods
from tunelab.attention import flash_varlen, pack_batch, packed_attention_enabled
from tunelab.cross_entropy import cross_entropy
from tunelab.hf_checkpoints import PickleFreeCheckpoints
from tunelab.paths import apply_umask
from tunelab.speedups import SpeedupOptions, cpu_dropout, linear_weights_cast


def supervised_loss(model, inputs: dict[str, torch.Tensor], options: SpeedupOptions = SpeedupOptions()
                    ) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100.

    Only the hidden states that predict a supervised token go through the output projection:
    keep[b, t] is True when labels[b, t + 1] is supervised, so logits come back as (num_kept, vocab).
    options.supervised_logits False: HF's own loss from logits at every position (the same value).
    """
    if not options.supervised_logits:
        return model(**inputs).loss
    labels = inputs["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**model_inputs, logits_to_keep=keep, use_cache=False).logits
    targets = labels[:, 1:][keep[:, :-1]]
    if targets.numel() == 0:  # a batch with nothing to learn contributes zero loss, not NaN
        return logits.sum() * 0.0
    logits = logits.reshape(-1, logits.shape[-1])
    if not options.chunked_cross_entropy:
        return F.cross_entropy(logits.float(), targets)
    return cross_entropy(logits, targets)


def supervised_tokens(label_rows) -> int:
    """Positions supervised_loss sends through the output projection over `label_rows` (one pass over the
    data): tokens with a label other than -100, less each row's first token, which no position predicts."""
    return sum(sum(1 for t in labels[1:] if t != -100) for labels in label_rows)


class UmaskModes(TrainerCallback):
    """A saved checkpoint's files get the user's umask modes (paths.apply_umask: safetensors writes 0600)."""

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and os.path.isdir(folder):
            apply_umask(folder)


class TunelabTrainer(PickleFreeCheckpoints, Trainer):
    """HF Trainer + tunelab's supervised-position loss, padding-free batches and safetensors/JSON checkpoints."""

    def __init__(self, *args, method_info: methods.MethodInfo, base_model: str, run_args: dict,
                 speedups: SpeedupOptions = SpeedupOptions(), likelihood=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.likelihood = likelihood  # eval_likelihood.LikelihoodEval: --eval_likelihood's measures, or None
        self.method_info = method_info
        self.base_model = base_model
        self.run_args = run_args
        self.speedups = speedups
        self.packing = False  # True while train() runs the model on packed attention
        self.loss_is_scaled_for_ga = False  # our loss is a per-micro-batch mean; the Trainer divides by GA steps
        self.add_callback(UmaskModes())

    def train(self, *args, **kwargs):
        # compiled graphs would see a new packed length every step; compile keeps padded batches
        attention = dataclasses.replace(self.speedups, packing=self.speedups.packing and not self.args.torch_compile)
        try:
            with packed_attention_enabled(self.model, attention) as packing, \
                    linear_weights_cast(self.model, self._frozen_weight_dtype(), frozen_only=True), \
                    cpu_dropout(self.model, self.args.device, self.speedups.dropout_masks):
                self.packing = packing or flash_varlen(self.model, attention)  # flash attention packs by itself
                return super().train(*args, **kwargs)
        finally:
            self.packing = False

    def _frozen_weight_dtype(self) -> torch.dtype | None:
        """The autocast dtype frozen linear weights can be held in, None where that is not ours to do:
        switched off, no autocast, DeepSpeed / FSDP (their engines own parameter dtypes), full fine-tuning
        (nothing frozen that a saved checkpoint would not contain)."""
        if not self.speedups.cast_frozen_weights or self.is_deepspeed_enabled or self.is_fsdp_enabled \
                or methods.get_method(self.method_info.finetuning_type).whole_model:
            return None
        return torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """HF's loop (eval_loss), plus --eval_likelihood's measures of the eval set (tunelab/eval_likelihood.py)
        in the same metrics: evaluate() logs them, hands them to the callbacks (early stopping) and the best-
        checkpoint choice after this returns."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        if self.likelihood is not None and description == "Evaluation":
            measured = self.likelihood.metrics(self.model)
            output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in measured.items()})
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        packed = pack_batch(inputs, self.speedups) if self.packing else None
        loss = supervised_loss(model, packed or inputs, self.speedups)
        # eval during training (prediction_step) reads outputs as a dict; the loss is all it measures
        return (loss, {"loss": loss}) if return_outputs else loss
