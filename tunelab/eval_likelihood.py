"""The study's per-sample likelihood measures as eval metrics during training: `--eval_likelihood nll,kl`.

    tunelab train --do_train --do_eval --val_size 0.1 --eval_strategy steps --eval_steps 50 \
        --eval_likelihood nll,kl --metric_for_best_model kl --early_stopping_patience 3 ...

At every evaluation of `--do_train --do_eval` (and the final one), besides HF's eval_loss, the eval rows are
scored in one teacher-forced pass (tunelab/likelihood.py, the pass `tunelab eval` and the study use) and
these metrics join the evaluation's before it is logged — so they land in trainer_state.json's log_history,
in the --report_to trackers, and --metric_for_best_model / --early_stopping_patience can use them:
- `nll`: eval_nll, mean NLL per reference token over all eval tokens (what `tunelab eval` calls eval_nll), and
  eval_nll_sample_mean, the mean over samples of each sample's NLL per token (likelihood.jsonl's `nll`
  column, what the study's paired differences average);
- `kl`: eval_kl and eval_kl_sample_mean, the same two means of KL(base || model) per reference token
  (the base's top --likelihood_topk log-probs + a rest bucket: a lower bound of the full KL), and
  eval_kl_topk_mass, the base mass that top-k held.
"The base" is the model this run's method is applied to: the base model, with --checkpoint_dir's
checkpoints merged in when given (so a LoRA run's KL is that of its adapter alone). Its log-probs are
computed once, before the method is applied (`prepare`); for a plain base model they are read from or saved
to the same cache as `tunelab eval`'s (tunelab/retention.py). Lower is better for every measure:
--metric_for_best_model nll / kl picks the lowest unless --greater_is_better says otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

from tunelab.validate import parse_measures

logger = logging.getLogger(__name__)


def summarize(scores, measures: tuple[str, ...], covered_mass: float | None = None) -> dict[str, float]:
    """The metrics of `measures` (unprefixed: nll, nll_sample_mean, kl, kl_sample_mean, kl_topk_mass) from a
    likelihood.Scores; a sample without response tokens counts in neither mean."""
    from tunelab.likelihood import aggregate, records

    totals, per_sample = aggregate(scores), records(scores)
    out: dict[str, float] = {}
    for name in measures:
        out[name] = totals[name]
        values = [r[name] for r in per_sample if r[name] is not None]
        if values:
            out[f"{name}_sample_mean"] = round(sum(values) / len(values), 6)
    if "kl" in measures and covered_mass is not None:
        out["kl_topk_mass"] = round(covered_mass, 6)
    return out


@dataclasses.dataclass
class LikelihoodEval:
    """The eval rows, the measures to score on them and the base's log-probs (for kl)."""

    rows: list[dict]  # {"input_ids", "labels"}: the eval set's training-style rows, in order
    tokenizer: Any
    batch_size: int
    measures: tuple[str, ...]
    precision: Any = None  # the autocast dtype training runs under (torch.bfloat16 / float16), or None
    base: Any = None  # likelihood.BaseTopK of the base model on `rows` (kl)

    def score(self, model, topk: int = 0):
        """(Scores, BaseTopK or None) of `model` on the rows, in eval mode, without gradients (no inference
        mode: tensors a layer cache keeps here are reused by training steps)."""
        from tunelab.likelihood import score_in_shards

        was_training = model.training
        model.eval()
        try:
            return score_in_shards(model, self.rows, self.tokenizer, self.batch_size, self._context(model),
                                   base=self.base if "kl" in self.measures else None, topk=topk)
        finally:
            model.train(was_training)

    def metrics(self, model) -> dict[str, float]:
        """The measures of `model` (unprefixed keys, see summarize)."""
        scores, _ = self.score(model)
        return summarize(scores, self.measures, self.base.covered_mass() if self.base is not None else None)

    @contextlib.contextmanager
    def _context(self, model):
        import torch

        device = next(model.parameters()).device.type
        with torch.no_grad(), torch.autocast(device, dtype=self.precision, enabled=self.precision is not None):
            yield


def prepare(args, model, eval_dataset, tokenizer, base_path: str, checkpoints: list[str]) -> LikelihoodEval | None:
    """The LikelihoodEval of a training run with --eval_likelihood, None without. `model` is the model before the
    method is applied (the base, checkpoints merged): with kl, its log-probs on the eval rows are computed here,
    on the training device, or read from the cache."""
    import torch

    measures = parse_measures(args.run.eval_likelihood)
    if not measures or eval_dataset is None:
        return None
    t = args.training
    evaluator = LikelihoodEval([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in eval_dataset],
                               tokenizer, t.per_device_eval_batch_size, measures,
                               torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else None)
    if "kl" in measures:
        def compute():
            return evaluator.score(_on_training_device(model, t), topk=args.generation.likelihood_topk)[1]

        if checkpoints:  # the merged model is not base_path's own: computed, not cached
            evaluator.base = compute()
        else:
            from tunelab.retention import base_likelihood

            evaluator.base = base_likelihood(args, base_path, eval_dataset, compute)
        logger.info("eval likelihood: base log-probs of %d eval rows (top-%d mass %.4f)", len(evaluator.rows),
                    evaluator.base.k, evaluator.base.covered_mass())
    return evaluator


def _on_training_device(model, training):
    """`model` on the device it will train on, where that is ours to do: not a quantized or device-mapped model
    (placed at load) nor DeepSpeed / FSDP (their engines place the parameters; the pass then runs where the
    model is)."""
    from tunelab.quantization import is_quantized

    if getattr(model, "hf_device_map", None) or is_quantized(model) or training.deepspeed or training.fsdp:
        return model
    return model.to(training.device)
