"""`tunelab eval` / `tunelab predict` (= `tunelab train --do_eval|--do_predict`): score a base model or a
tunelab checkpoint on a data set with the 2023 study's metrics, plus response-token loss and perplexity.

    tunelab predict --dataset haruhi_persona_test --checkpoint_dir runs/x --output_dir runs/x_eval \
        --max_samples 100 [--compare_base] [--generation_preset seed2023]

Writes {eval,predict}_results.json and all_results.json (keys eval_bleu-4, eval_rouge-1, ..., eval_loss,
eval_perplexity), generated_predictions.jsonl for predict, and retention.json with --compare_base.
The method, targets, template and source_prefix of a checkpoint are read from its run files.

Under `torchrun` / `accelerate launch` every rank loads the model, scores its share of the samples
(tunelab/distributed.py) and the answers are gathered back in data-set order; only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from tunelab import distributed
from tunelab.hparams import Args

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "generated_predictions.jsonl"
METRIC_KEYS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")
# Options a checkpoint's run decides unless the user sets them again: eval must format prompts as training did.
_INHERITED = ("template", "source_prefix", "max_source_length", "identity_name", "identity_author")


def inherit_from_checkpoint(args: Args, checkpoints: list[str]) -> None:
    from tunelab.runinfo import read_run_args

    if not checkpoints:
        return
    trained = read_run_args(checkpoints[-1])
    updates = {k: trained[k] for k in _INHERITED if k in trained and k not in args.explicit}
    if updates:
        logger.info("from checkpoint %s: %s", checkpoints[-1], updates)
        args.data = dataclasses.replace(args.data, **updates)


def autocast(args: Args):
    """bf16 autocast when the run resolved to bf16 (CPUs with fast bf16, or asked for); else a no-op."""
    import contextlib

    import torch

    if args.training.bf16:
        return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def response_loss(model, dataset, tokenizer, batch_size: int, args: Args) -> float:
    """Mean cross-entropy over response tokens, token-weighted over the whole set (each rank sums its
    shard; the sums are added up across ranks)."""
    rows = [{"input_ids": r["full_input_ids"], "labels": r["full_labels"]} for r in dataset]
    mine = [rows[i] for i in distributed.my_shard(len(rows))]
    sums = distributed.all_gather(_loss_sums(model, mine, tokenizer, batch_size, args))
    total, count = sum(s[0] for s in sums), sum(s[1] for s in sums)
    return total / max(count, 1)


def _loss_sums(model, rows: list[dict], tokenizer, batch_size: int, args: Args) -> tuple[float, int]:
    """(summed response-token cross-entropy, response-token count) over `rows`."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    from tunelab.trainer import supervised_loss

    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.inference_mode(), autocast(args):
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size]).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(supervised_loss(model, batch)) * n
            count += n
    return total, count


def predict(model, tokenizer, dataset, args: Args) -> list[str]:
    """The generated answer to every sample, in data-set order (each rank generates its shard)."""
    from tunelab.generation import generate_batched, generation_kwargs

    tokenizer.padding_side = "left"
    kwargs = generation_kwargs(args.generation, tokenizer)
    prompts = list(dataset["input_ids"])
    mine = [prompts[i] for i in distributed.my_shard(len(prompts))]
    with autocast(args):
        answers = generate_batched(model, tokenizer, mine, kwargs, batch_size=args.training.per_device_eval_batch_size,
                                   seed=args.training.seed, progress=distributed.is_main())
    return distributed.gather_in_order(answers, len(prompts))


def score(model, tokenizer, dataset, args: Args, generate: bool) -> tuple[dict[str, float], list[str] | None]:
    """Loss/perplexity, and BLEU/ROUGE of generated answers when `generate`; unprefixed keys."""
    from tunelab.metrics import score_corpus

    start = time.time()
    loss = response_loss(model, dataset, tokenizer, args.training.per_device_eval_batch_size, args)
    metrics: dict[str, float] = {"loss": round(loss, 6), "perplexity": round(math.exp(min(loss, 50.0)), 4)}
    preds = None
    if generate:
        preds = predict(model, tokenizer, dataset, args)
        metrics.update(score_corpus(preds, list(dataset["label"])))
    metrics["samples"] = len(dataset)
    metrics["runtime"] = round(time.time() - start, 3)
    metrics["samples_per_second"] = round(len(dataset) / max(metrics["runtime"], 1e-9), 3)
    return metrics, preds


def write_predictions(path: Path, dataset, preds: list[str]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for prompt, pred, label in zip(dataset["prompt"], preds, dataset["label"]):
            f.write(json.dumps({"prompt": prompt, "predict": pred, "label": label}, ensure_ascii=False) + "\n")


def decoding_record(args: Args) -> dict[str, Any]:
    g = args.generation
    keys = ("generation_preset", "do_sample", "num_beams", "max_new_tokens", "max_length", "repetition_penalty")
    rec = {k: getattr(g, k) for k in keys}
    if g.do_sample:
        rec.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, seed=args.training.seed)
    return rec


def run_eval(args: Args, stage: str) -> dict[str, Any]:
    from tunelab import methods, runinfo
    from tunelab.layer_cache import lower_layer_cache
    from tunelab.preprocess import build_dataset
    from tunelab.train import load_base, resolve_precision

    out = runinfo.check_output_dir(args)
    resolve_precision(args)
    device = distributed.setup(args)
    distributed.barrier()  # every rank has checked output_dir before rank 0 writes into it
    model, tokenizer, base_path, ckpts = load_base(args)
    inherit_from_checkpoint(args, ckpts)
    with args.training.main_process_first(desc="tokenize"):  # one rank per node tokenizes; the rest hit its cache
        dataset = build_dataset(args.data, tokenizer, "eval")
    model, meta = methods.load_checkpoints(model, ckpts, merge=True)
    model.to(device).eval()
    generate = stage == "predict" or args.training.predict_with_generate
    with lower_layer_cache(model, meta, args):  # the loss pass reuses cached lower layers; generation runs them all
        metrics, preds = score(model, tokenizer, dataset, args, generate)
    main = distributed.is_main()
    if main:
        runinfo.write_run_files(out, args, {"decoding.json": decoding_record(args)})
    if main and preds is not None and stage == "predict":
        write_predictions(out / PREDICTIONS_FILE, dataset, preds)
    if args.generation.compare_base and generate and ckpts:
        del model  # free the tuned model before the base model loads
        _compare_base(out, metrics, args, base_path, dataset)
    results = {f"{stage}_{k}": v for k, v in metrics.items()}
    if main:
        _save_results(out, stage, results)
        for key, value in results.items():
            print(f"  {key:<28} = {value}")
    return results


def _compare_base(out: Path, metrics: dict[str, float], args: Args, base_path: str, dataset) -> None:
    """retention.json from rank 0; the other ranks still score their shards of the base model (the
    scoring is collective), leaving only the shared base-predictions cache behind."""
    from tunelab.retention import base_metrics, write_retention

    if distributed.is_main():
        write_retention(out, metrics, args, base_path, dataset)
    else:
        base_metrics(args, base_path, dataset)


def _save_results(out: Path, stage: str, results: dict[str, Any]) -> None:
    from tunelab.runinfo import write_json

    write_json(out / f"{stage}_results.json", results)
    all_path = out / "all_results.json"
    merged = json.loads(all_path.read_text(encoding="utf-8")) if all_path.is_file() else {}
    write_json(all_path, {**merged, **results})


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]
