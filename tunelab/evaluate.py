"""`tunelab eval` / `tunelab predict` (= `tunelab train --do_eval|--do_predict`): score a base model or a
tunelab checkpoint on a data set: per-sample likelihood of the reference answers (NLL, and KL drift from
the base model; tunelab/likelihood.py) and the 2023 study's BLEU/ROUGE of generated answers.

    tunelab predict --dataset haruhi_persona_test --checkpoint_dir runs/x --output_dir runs/x_eval \
        --max_samples 100 [--max_generate_samples 48] [--compare_base] [--generation_preset seed2023]

Writes {eval,predict}_results.json and all_results.json (keys eval_bleu-4, eval_rouge-1, ..., eval_loss =
eval_nll, eval_perplexity, eval_kl, eval_kl_topk_mass, eval_likelihood_samples, eval_generated_samples,
eval_generation_prompt_tokens),
likelihood.jsonl (one line per sample: index, tokens, nll, kl), generated_predictions.jsonl for predict
(index, prompt, predict, label; only the generated subset), and retention.json with --compare_base (also
printed: base, tuned, delta and noise of every score).
The method, targets, template and source_prefix of a checkpoint are read from its run files.

Order of work: the base model's pass (per-sample NLL + top-k log-probs, cached per base model and data,
tunelab/retention.py) runs on the base model before the checkpoints are applied; then the evaluated
model's likelihood pass (KL against those log-probs), then generation for the chosen subset. The prompts'
forward runs once: the likelihood pass over prompt + reference keeps the generated samples' prompt keys/values
(tunelab.prefill.PromptCache; on the base model itself that pass is the base pass) and generation decodes on
from them -- except where cached lower layers make the pass cheaper than sharing (tunelab/layer_cache.py).

Several data sets of one model (a study row's persona and general sets: `run_evals`, or
tunelab.train.run_evals): when they differ only in their data options and output dirs, the model loads once,
each set gets its base and likelihood passes, and one generation decodes every set's answers side by side
(a decoding step on a CPU reads every weight whatever the batch: 12 rows cost little more than 6), each set
then writing its own files as above, with its share of the joint generation time.

Under `torchrun` / `accelerate launch` every rank loads the model, scores its share of the samples
(tunelab/distributed.py) and the answers are gathered back in data-set order; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from tunelab import distributed
from tunelab.hparams import Args
from tunelab.names import LIKELIHOOD_FILE, PREDICTIONS_FILE
from tunelab.setup import (apply_checkpoints, autocast, check_model_options, decoding_record, resolve_precision,
                           setup_base)

logger = logging.getLogger(__name__)


def sample_likelihoods(model, dataset, tokenizer, args: Args, base=None, topk: int = 0, prompt_cache=None):
    """(Scores, BaseTopK or None) of every sample in data-set order (tunelab/likelihood.py): each rank scores
    its shard in one teacher-forced pass over the full sequences; the shards are gathered in order. The pass
    keeps the prompt keys/values `prompt_cache` asks for (shared_prompts)."""
    from tunelab.likelihood import score_in_shards

    rows = [{"input_ids": r["full_input_ids"], "labels": r["full_labels"]} for r in dataset]
    return score_in_shards(model, rows, tokenizer, args.training.per_device_eval_batch_size, _scoring(args), base,
                           topk, prompt_cache)


def shared_prompts(model, dataset, tokenizer, args: Args, generate: bool):
    """A tunelab.prefill.PromptCache (sample index -> prompt length) for the likelihood pass to fill and the
    generation that follows to use: the samples to be generated whose prompt starts their scored sequence, on
    a model the prefilled cache applies to; None otherwise. So the prompt's forward runs once, in the pass."""
    from tunelab import prefill
    from tunelab.generation import KV_CACHE_BUDGET_BYTES, generation_kwargs

    if not generate or not prefill.applies(model, generation_kwargs(args.generation, tokenizer)):
        return None
    wanted = {}
    for i in generation_subset(len(dataset), args.generation.max_generate_samples):
        prompt, full = dataset[i]["input_ids"], dataset[i]["full_input_ids"]
        if len(prompt) > 1 and full[:len(prompt)] == prompt:
            wanted[i] = len(prompt)
    return prefill.PromptCache(wanted, KV_CACHE_BUDGET_BYTES) if wanted else None


def scored_tokens(dataset) -> int:
    """The tokens a likelihood pass over `dataset` runs through the model (prompt + reference, every sample)."""
    return sum(len(ids) for ids in dataset["full_input_ids"])


@contextlib.contextmanager
def _scoring(args: Args):
    """What a likelihood pass of `tunelab eval` runs under: inference mode and the run's autocast."""
    import torch

    with torch.inference_mode(), autocast(args):
        yield


def base_pass(args: Args, model, tokenizer, base_path: str, ckpts: list[str], dataset, device, prompt_cache=None,
              ran: dict | None = None):
    """The base model's per-sample NLL and top-k log-probs on `dataset` (BaseTopK), from the cache or computed
    once (retention.base_likelihood). `model` is the base model before any checkpoint is applied, so the base
    pass runs on it (keeping the prompt keys/values `prompt_cache` asks for) and no second model is loaded; a
    full checkpoint is itself the loaded model, so its recorded base is loaded for the pass and freed after it.
    None when that base is unknown. `ran["tokens"]`: the tokens the pass ran through the model (not on a
    cache hit)."""
    from tunelab.methods import read_method
    from tunelab.retention import base_likelihood

    topk = args.generation.likelihood_topk
    if ckpts and read_method(ckpts[0])["finetuning_type"] == "full":
        base_path = read_method(ckpts[0]).get("base_model")
        if not base_path:
            return None

        def compute():
            from tunelab.model import load_model_and_tokenizer
            from tunelab.setup import base_dtype

            base_args = dataclasses.replace(args.model, model_name_or_path=base_path, checkpoint_dir=None)
            base_model = load_model_and_tokenizer(base_args, dtype=base_dtype(base_args))[0].to(device).eval()
            return counted(sample_likelihoods(base_model, dataset, tokenizer, args, topk=topk)[1])
    else:
        def compute():
            return counted(sample_likelihoods(model.to(device).eval(), dataset, tokenizer, args, topk=topk,
                                              prompt_cache=prompt_cache)[1])

    def counted(top):
        if ran is not None:
            ran["tokens"] = scored_tokens(dataset)
        return top
    return base_likelihood(args, base_path, dataset, compute)


def generation_subset(n: int, limit: int | None) -> list[int]:
    """The samples answered by generation: all n, or `limit` evenly spaced ones, i = round(j * n / limit)
    for j = 0..limit-1 (halves round up; integer arithmetic, so strictly increasing)."""
    if limit is None or limit >= n:
        return list(range(n))
    return [(2 * j * n + limit) // (2 * limit) for j in range(limit)]


def predict(model, tokenizer, prompts: list[list[int]], args: Args, prompt_cache=None,
            stats: dict | None = None) -> list[str]:
    """The generated answer to every token-id prompt (one data set's, or several sets' end to end), in order
    (each rank generates its shard); prompts found in `prompt_cache` (positions = prompts) are not run again.
    `stats["prompt_tokens_each"]`: the prompt tokens generation ran for each prompt, all ranks
    (tunelab.generation.generate_batched)."""
    from tunelab.generation import batch_tokens, generate_batched, generation_kwargs

    tokenizer.padding_side = "left"
    kwargs = generation_kwargs(args.generation, tokenizer)
    shard = distributed.my_shard(len(prompts))
    mine = [prompts[i] for i in shard]
    mine_stats: dict[str, Any] = {}
    with autocast(args):
        answers = generate_batched(model, tokenizer, mine, kwargs, batch_size=args.training.per_device_eval_batch_size,
                                   seed=args.training.seed, progress=distributed.is_main(),
                                   max_batch_tokens=batch_tokens(model, args.generation.generation_batch_tokens),
                                   prompt_cache=None if prompt_cache is None else prompt_cache.view(shard),
                                   stats=mine_stats)
    if stats is not None:
        stats["prompt_tokens_each"] = distributed.gather_in_order(mine_stats.get("prompt_tokens_each", [0] * len(mine)),
                                                                  len(prompts))
    return distributed.gather_in_order(answers, len(prompts))


@dataclasses.dataclass
class Scored:
    """What `score` measured: unprefixed metrics, likelihood.jsonl lines, and the generated answers with the
    data-set indices of the samples they answer (None without generation)."""

    metrics: dict[str, Any]
    likelihood: list[dict[str, Any]]
    predictions: list[str] | None = None
    indices: list[int] | None = None


def score(model, tokenizer, dataset, args: Args, generate: bool, base=None, is_base: bool = False,
          prompt_cache=None) -> Scored:
    """Per-sample likelihood (nll, and kl against `base`, a BaseTopK of the base model on `dataset`) of every
    sample, and BLEU/ROUGE of the answers generated for the --max_generate_samples subset when `generate`.
    `is_base`: the model is the base model itself, so kl = 0 (and its nll is `base`'s when given).
    `prompt_cache` (shared_prompts): prompt keys/values the likelihood pass keeps, or kept, for generation."""
    scored = score_likelihood(model, tokenizer, dataset, args, base, is_base, prompt_cache)
    if generate:
        generate_answers(model, tokenizer, [(scored, dataset, args, prompt_cache)])
    return scored


def score_likelihood(model, tokenizer, dataset, args: Args, base=None, is_base: bool = False,
                     prompt_cache=None) -> Scored:
    """The likelihood half of `score`: per-sample NLL / KL of every sample (metrics without generation)."""
    from tunelab import likelihood

    start = time.time()
    tokens_scored = 0  # tokens this call ran through the model (the study's efficiency figures)
    if is_base and base is not None:
        scores = base.scores()  # the base pass just computed (or cached) these
    else:
        scores, _ = sample_likelihoods(model, dataset, tokenizer, args, base=None if is_base else base,
                                       prompt_cache=prompt_cache)
        scores = scores.with_zero_kl() if is_base else scores
        tokens_scored = scored_tokens(dataset)
    agg = likelihood.aggregate(scores)
    seconds = round(time.time() - start, 3)
    metrics: dict[str, Any] = {"loss": agg["nll"], **agg,
                               "kl_topk_mass": None if base is None else round(base.covered_mass(), 6),
                               "tokens_scored": tokens_scored, "scoring_runtime": seconds,
                               "samples": len(dataset)}
    scored = Scored(metrics, likelihood.records(scores))
    _set_runtime(scored, seconds)
    return scored


def generate_answers(model, tokenizer, sets: list[tuple[Scored, Any, Args, Any]]) -> None:
    """Generate the --max_generate_samples subset of each (scored, dataset, args, prompt_cache) in one
    generation over all their prompts, and add the answers and their BLEU/ROUGE to each Scored. Several sets
    (joinable: the same model and generation options) decode side by side: a decoding step on a CPU costs about
    the same for 6 rows as for 12 (it reads every weight either way), so two sets of a study row take little
    more than one. Each set's generation_runtime is its share of the joint time by answers."""
    from tunelab.metrics import score_corpus
    from tunelab.prefill import ChainedPromptCaches

    start = time.time()
    subsets, caches = [], []
    for scored, dataset, args, cache in sets:
        scored.indices = generation_subset(len(dataset), args.generation.max_generate_samples)
        subsets.append(dataset.select(scored.indices) if len(scored.indices) < len(dataset) else dataset)
        caches.append((None if cache is None else cache.view(scored.indices), len(scored.indices)))
    prompts = [ids for subset in subsets for ids in subset["input_ids"]]
    chained = None if all(c is None for c, _ in caches) else ChainedPromptCaches(caches)
    stats: dict[str, Any] = {}
    answers = predict(model, tokenizer, prompts, sets[0][2], chained, stats)
    seconds, total, offset = time.time() - start, max(len(prompts), 1), 0
    for (scored, _, _, _), subset in zip(sets, subsets):
        n, metrics = len(subset), scored.metrics
        scored.predictions = answers[offset:offset + n]
        metrics["generation_runtime"] = round(seconds * n / total, 3)
        if len(sets) > 1:  # the set's share: this whole generation decoded every set's answers together
            metrics["generation_joint_sets"], metrics["generation_joint_runtime"] = len(sets), round(seconds, 3)
        # prompt tokens generation ran itself (the rest came from the likelihood pass's keys/values)
        metrics["generation_prompt_tokens"] = sum(stats["prompt_tokens_each"][offset:offset + n])
        # new tokens, counted by re-encoding the answers (the end token is not in them)
        metrics["tokens_generated"] = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"])
                                          for p in scored.predictions)
        metric_start = time.time()
        metrics.update(score_corpus(scored.predictions, list(subset["label"])))
        metrics["generated_samples"] = n
        _set_runtime(scored, metrics["scoring_runtime"] + metrics["generation_runtime"] + time.time() - metric_start)
        offset += n


def _set_runtime(scored: Scored, seconds: float) -> None:
    metrics = scored.metrics
    metrics["runtime"] = round(seconds, 3)
    metrics["samples_per_second"] = round(metrics["samples"] / max(seconds, 1e-9), 3)


def write_predictions(path: Path, dataset, preds: list[str], indices: list[int]) -> None:
    """generated_predictions.jsonl: {"index", "prompt", "predict", "label"} per generated sample."""
    from tunelab.integrity import atomic_open

    with atomic_open(path) as f:  # a temp file renamed when complete
        for i, pred in zip(indices, preds):
            row = dataset[i]
            line = {"index": i, "prompt": row["prompt"], "predict": pred, "label": row["label"]}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


def write_scored(out: Path, stage: str, scored: Scored, dataset) -> None:
    """likelihood.jsonl, and generated_predictions.jsonl for predict."""
    from tunelab.likelihood import write_records

    write_records(out / LIKELIHOOD_FILE, scored.likelihood)
    if scored.predictions is not None and stage == "predict":
        write_predictions(out / PREDICTIONS_FILE, dataset, scored.predictions, scored.indices)


def run_eval(args: Args, stage: str) -> dict[str, Any]:
    """Score the model (see the module docstring) with run_status.json saying how it went: "running" once
    the model has loaded, then "done", "failed" or "interrupted" (a signal stops eval at once: it has no
    step to finish and nothing to resume)."""
    return run_evals([args], stage)[0]


def run_evals(args_list: list[Args], stage: str) -> list[dict[str, Any]]:
    """run_eval of several data sets on one model (a study row's eval sets), their metrics in order. Sets that
    differ only in their data options and output dirs (`joinable`) share one model load and one generation
    (generate_answers: their answers decode side by side); others run one run_eval after another."""
    from tunelab import integrity, runinfo, signals

    if len(args_list) > 1 and not joinable(args_list):
        return [result for args in args_list for result in run_evals([args], stage)]
    first = args_list[0]
    check_model_options(first.model)
    outs = [runinfo.check_output_dir(args) for args in args_list]
    training, device = distributed.setup(resolve_precision(first))
    distributed.barrier()  # every rank has checked output_dir before rank 0 writes into it
    with signals.graceful(at_once=True):
        loaded = setup_base(dataclasses.replace(first, training=training), stage)
        with contextlib.ExitStack() as recorded:
            for out in outs:
                recorded.enter_context(integrity.recorded(out, main=distributed.is_main()))
            targets = [(loaded.args, outs[0])] + [(_set_args(args, training, loaded.checkpoints), out)
                                                   for args, out in zip(args_list[1:], outs[1:])]
            return _evaluate(loaded, stage, targets, device)


def joinable(args_list: list[Args]) -> bool:
    """Whether these runs differ only in their data options (which data, how many samples scored and
    generated) and output dirs, and compare with no base model: then one model serves them all (run_evals)."""
    def key(args: Args):
        training = {k: v for k, v in args.training.to_dict().items() if k not in ("output_dir", "logging_dir")}
        return (args.model, args.finetune, dataclasses.replace(args.generation, max_generate_samples=None),
                args.run, training)

    first = key(args_list[0])
    return not args_list[0].generation.compare_base and all(key(args) == first for args in args_list[1:])


def _set_args(args: Args, training, checkpoints: list[str]) -> Args:
    """A further set's options as setup_base makes the first's: the distributed set-up's training options with
    the set's own output dir, and the checkpoint's prompt options where the set does not set them."""
    import copy

    from tunelab.setup import inherit_from_checkpoint

    own = copy.copy(training)
    own.output_dir = args.training.output_dir
    return dataclasses.replace(args, training=own, data=inherit_from_checkpoint(args, checkpoints))


@dataclasses.dataclass
class _EvalSet:
    """One data set of an eval run, through its stages (_evaluate)."""

    args: Args
    out: Path
    dataset: Any
    shared: Any = None           # tunelab.prefill.PromptCache for generation, or None
    base: Any = None             # the base model's BaseTopK on the set, or None
    records: dict[str, Any] = dataclasses.field(default_factory=dict)  # base pass and lower-layer cache records
    scored: Scored | None = None


def _evaluate(loaded, stage: str, targets: list[tuple[Args, Path]], device) -> list[dict[str, Any]]:
    """Each set's base pass -> checkpoints applied -> each set's likelihood pass -> generation of all sets
    together -> each set's result files."""
    from tunelab.layer_cache import lower_layer_cache

    tokenizer, checkpoints = loaded.tokenizer, loaded.checkpoints
    generate = stage == "predict" or loaded.args.training.predict_with_generate
    sets = [_base_side(loaded, args, out, generate, device) for args, out in targets]
    loaded = apply_checkpoints(loaded)
    # nothing trains here: frozen weights also let the lower-layer cache apply to every method's checkpoint
    # (a loaded Freeze checkpoint's layers would otherwise keep requires_grad from from_pretrained)
    model = loaded.model.to(device).eval().requires_grad_(False)
    for s in sets:
        with lower_layer_cache(model, loaded.method, s.args) as store:  # the likelihood pass reuses cached lower
            # layers (cheaper than sharing the prompts' forward with generation, which runs them all)
            if store is None and checkpoints:
                s.shared = shared_prompts(model, s.dataset, tokenizer, s.args, generate)
            s.scored = score_likelihood(model, tokenizer, s.dataset, s.args, base=s.base, is_base=not checkpoints,
                                        prompt_cache=s.shared)
            if store is not None and s.scored.metrics["tokens_scored"]:  # the pass ran on cached lower layers
                s.records.update(store.records())
    if generate:
        generate_answers(model, tokenizer, [(s.scored, s.dataset, s.args, s.shared) for s in sets])
    if len(sets) == 1 and sets[0].args.generation.compare_base and generate and checkpoints:
        base_path = loaded.base_path
        del model, loaded  # free the tuned model before the base model loads
        s = sets[0]
        return [_write_set(s, stage, _compare_base(s.out, s.scored, s.args, base_path, s.dataset, s.base))]
    return [_write_set(s, stage) for s in sets]


def _base_side(loaded, args: Args, out: Path, generate: bool, device) -> _EvalSet:
    """A set's data, and the base model's pass over it (before the checkpoints apply; on the base model itself it
    is the likelihood pass, and keeps the prompts' keys/values for generation)."""
    from tunelab.preprocess import build_dataset

    with args.training.main_process_first(desc="tokenize"):  # one rank per node tokenizes; the rest hit its cache
        dataset = build_dataset(args.data, loaded.tokenizer, "eval")
    s = _EvalSet(args, out, dataset)
    s.shared = None if loaded.checkpoints else shared_prompts(loaded.model, dataset, loaded.tokenizer, args, generate)
    start, ran = time.time(), {}
    s.base = base_pass(args, loaded.model, loaded.tokenizer, loaded.base_path, loaded.checkpoints, dataset, device,
                       s.shared, ran)
    s.records = {"base_pass_runtime": round(time.time() - start, 3),  # ~0 on a cache hit; bench/predict.py reads it
                 "base_pass_tokens": ran.get("tokens", 0)}  # tokens the base pass ran through the model: 0 on a hit
    return s


def _write_set(s: _EvalSet, stage: str, table: dict | None = None) -> dict[str, Any]:
    """A set's files (run files, likelihood.jsonl, predictions, {stage}_results.json); its results, printed."""
    from tunelab import runinfo

    results = {f"{stage}_{k}": v for k, v in {**s.scored.metrics, **s.records}.items()}
    if distributed.is_main():
        runinfo.write_run_files(s.out, s.args, {"decoding.json": decoding_record(s.args)})
        write_scored(s.out, stage, s.scored, s.dataset)
        _save_results(s.out, stage, results)
        for key, value in results.items():
            print(f"  {key:<28} = {value}")
        if table is not None:
            from tunelab.retention import format_retention

            print(format_retention(table, len(s.dataset)), flush=True)
    return results


def _compare_base(out: Path, scored: Scored, args: Args, base_path: str, dataset, base_top) -> dict | None:
    """retention.json from rank 0 (returned); the other ranks still score their shards of the base model
    (the scoring is collective), leaving only the shared base-predictions cache behind."""
    from tunelab.retention import base_metrics, write_retention

    if distributed.is_main():
        return write_retention(out, scored, args, base_path, dataset, score, base_top)
    base_metrics(args, base_path, dataset, score)
    return None


def _save_results(out: Path, stage: str, results: dict[str, Any]) -> None:
    from tunelab.runinfo import write_json

    write_json(out / f"{stage}_results.json", results)
    all_path = out / "all_results.json"
    merged = json.loads(all_path.read_text(encoding="utf-8")) if all_path.is_file() else {}
    write_json(all_path, {**merged, **results})
