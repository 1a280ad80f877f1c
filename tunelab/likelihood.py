"""Per-sample likelihood of the reference answers: one teacher-forced forward per sample, no generation.

For every eval sample, over its response positions (the tokens whose label is not -100):
- `tokens`: how many response tokens were scored;
- `nll`: mean negative log-likelihood of the reference response under the evaluated model (nats/token);
- `kl`: mean per-token KL(base || evaluated), the drift of the next-token distribution from the base model.

Logits are computed only at the positions that predict a response token (`logits_to_keep` as a boolean
mask, as in trainer.supervised_loss) and go through an fp32 log-softmax; the forward itself runs under
the caller's autocast (evaluate.autocast).

KL needs the base model's distribution at every response position. The full distributions are too large
to keep (vocab ~49k x every position), so the base pass keeps, per position, its top-k log-probs and the
log of the mass outside them (`BaseTopK`), and the KL reported is that of the *coarse-grained*
distributions: the base's k most likely tokens one by one plus one "rest" bucket, both models grouped alike:

    KL_k = sum_{i in top-k} p_i log(p_i / q_i) + p_rest log(p_rest / q_rest)

Grouping outcomes never increases a KL divergence (log-sum inequality), so KL_k is a lower bound of the full
KL(base || evaluated); it is exact when the top-k holds all of the base's mass (k = vocab size) and 0 when
the evaluated model is the base model. How much mass the top-k covered is reported beside it. Measured on
the default model (SmolLM2-135M-Instruct, 16 samples each of persona_chat_en_test / alpaca_gpt4_en, fp32),
the top-k holds on average 96.2% / 95.5% of the mass at k = 64, 98.6% / 98.1% at 256 and 99.2% / 98.9% at
512, the default of --likelihood_topk (8 bytes per kept log-prob in the cache: ~50 MB for 100 samples of
128 response tokens).

    scores, top = score_rows(model, rows, tokenizer, batch_size, base=None, topk=64)  # base pass
    scores, _ = score_rows(tuned, rows, tokenizer, batch_size, base=top)               # nll + kl
    records(scores)     # -> likelihood.jsonl lines;  aggregate(scores) -> nll, perplexity, kl, ...

`score_in_shards` runs the same pass data-parallel (each rank its shard, gathered in data-set order): what
`tunelab eval` (tunelab/evaluate.py) and the evaluations during training (tunelab/eval_likelihood.py) call.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from tunelab.cross_entropy import CHUNK_ELEMENTS


@dataclass
class Scores:
    """Per-sample sums over response positions (samples in the order they were scored)."""

    tokens: torch.Tensor  # [n] int64: response positions per sample
    nll_sum: torch.Tensor  # [n] float64: summed -log q(target)
    kl_sum: torch.Tensor | None  # [n] float64: summed coarse KL(base || evaluated); None without base log-probs

    @staticmethod
    def cat(parts: list[Scores]) -> Scores:
        kl = None if any(p.kl_sum is None for p in parts) else torch.cat([p.kl_sum for p in parts])
        return Scores(torch.cat([p.tokens for p in parts]), torch.cat([p.nll_sum for p in parts]), kl)

    def select(self, indices: torch.Tensor) -> Scores:
        kl = None if self.kl_sum is None else self.kl_sum[indices]
        return Scores(self.tokens[indices], self.nll_sum[indices], kl)

    def with_zero_kl(self) -> Scores:
        """The scores of the base model itself: its KL against itself is 0 by definition."""
        return Scores(self.tokens, self.nll_sum, torch.zeros_like(self.nll_sum))


@dataclass
class BaseTopK:
    """The base model's side of the KL, per response position (all samples' positions back to back, in
    sample order) plus its per-sample NLL. Saved as safetensors (`save` / `load`)."""

    tokens: torch.Tensor  # [n] int64
    nll_sum: torch.Tensor  # [n] float64
    logprobs: torch.Tensor  # [P, k] float32: the k largest log-probs at each position
    ids: torch.Tensor  # [P, k] int64: their token ids
    rest: torch.Tensor  # [P] float32: log of the mass outside the top-k (-inf when there is none)
    targets: torch.Tensor  # [P] int64: the reference token at each position (checks the samples match)

    @property
    def k(self) -> int:
        return self.logprobs.shape[1]

    def scores(self) -> Scores:
        """The base model's own scores (KL 0 against itself)."""
        return Scores(self.tokens, self.nll_sum, None).with_zero_kl()

    def covered_mass(self) -> float:
        """Mean over positions of the probability mass the top-k holds."""
        return float(self.logprobs.double().exp().sum(1).mean()) if len(self.logprobs) else 1.0

    def select(self, indices: torch.Tensor | list[int]) -> BaseTopK:
        """The samples `indices` (in that order) with their positions."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        pos = sample_positions(self.tokens, indices)
        return BaseTopK(self.tokens[indices], self.nll_sum[indices], self.logprobs[pos], self.ids[pos], self.rest[pos],
                        self.targets[pos])

    @staticmethod
    def cat(parts: list[BaseTopK]) -> BaseTopK:
        return BaseTopK(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(BaseTopK)))

    def save(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file

        tensors = {"tokens": self.tokens, "nll_sum": self.nll_sum, "logprobs": self.logprobs.contiguous(),
                   "ids": self.ids.to(torch.int32).contiguous(), "rest": self.rest,
                   "targets": self.targets.to(torch.int32)}
        save_file(tensors, str(path), metadata={"topk": str(self.k), **(metadata or {})})

    @staticmethod
    def load(path: Path) -> BaseTopK:
        from safetensors.torch import load_file

        t = load_file(str(path))
        return BaseTopK(t["tokens"], t["nll_sum"], t["logprobs"], t["ids"].long(), t["rest"], t["targets"].long())


def sample_positions(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Flat position indices of samples `indices`, in that order, where sample i owns tokens[i] consecutive
    positions after those of samples 0..i-1 (vectorized: no Python loop over samples)."""
    starts = torch.cumsum(tokens, 0) - tokens
    lens = tokens[indices]
    first = torch.repeat_interleave(starts[indices], lens)
    offset_in_sample = torch.arange(int(lens.sum())) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
    return first + offset_in_sample


# ---- pure math on one chunk of positions ----

def topk_summary(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k log-probs [P, k], their ids [P, k], log of the remaining mass [P]) of log-probs [P, V].
    The rest is a logsumexp over the other tokens, not log(1 - sum), so it stays exact when tiny."""
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return values, ids, _rest_logmass(logprobs, ids)


def _rest_logmass(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return logprobs.scatter(-1, ids, float("-inf")).logsumexp(-1)


def coarse_kl(base: tuple[torch.Tensor, torch.Tensor, torch.Tensor], logprobs: torch.Tensor) -> torch.Tensor:
    """KL(base || evaluated) per position [P] of the distributions grouped into the base's top-k tokens and
    one rest bucket. base = (top-k log-probs [P, k], ids [P, k], rest log-mass [P]); logprobs: the evaluated
    model's full log-probs [P, V] (fp32). Never above the full KL; equal to it when k = V."""
    p_log, ids, p_rest = base
    q_log = logprobs.gather(-1, ids)
    q_rest = _rest_logmass(logprobs, ids)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)
    rest = torch.where(torch.isfinite(p_rest), p_rest.exp() * (p_rest - q_rest), torch.zeros_like(p_rest))
    return (kl + rest).clamp_min(0.0)  # >= 0 in exact arithmetic; clamp float noise


# ---- the pass over a data set ----

def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """keep[b, t] = True when position t predicts a supervised token (labels[b, t + 1] != -100)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep


def score_rows(model, rows: list[dict], tokenizer, batch_size: int, base: BaseTopK | None = None,
               topk: int = 0, prompt_cache=None) -> tuple[Scores, BaseTopK | None]:
    """Teacher-forced scores of `rows` ({"input_ids", "labels"}; labels -100 outside the response).
    `base`: the base model's top-k for exactly these rows, in this order -> KL too. `topk` > 0: also return
    this model's own top-k per position (the base pass). Run it under torch.inference_mode and autocast.
    Rows are batched longest first (little padding; an out-of-memory shows on the first batch) and the
    results come back in the order given. `prompt_cache` (tunelab.prefill.PromptCache, positions = rows): keep
    the prompt keys/values of the rows it wants, for the generation that follows."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    if base is not None:
        if len(base.tokens) != len(rows):
            raise ValueError(_OTHER_SAMPLES)
        base = base.select(order)
    scores, top = _score_in_order(model, [rows[i] for i in order], tokenizer, batch_size, base, topk,
                                  None if prompt_cache is None else prompt_cache.view(order))
    back = torch.argsort(torch.tensor(order, dtype=torch.long))
    return scores.select(back), (top.select(back) if top is not None else None)


def _score_in_order(model, rows: list[dict], tokenizer, batch_size: int, base: BaseTopK | None,
                    topk: int, prompt_cache=None) -> tuple[Scores, BaseTopK | None]:
    from transformers import DataCollatorForSeq2Seq

    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "right"  # positions must start at 0 in every row
    scores, tops, pos = [], [], 0
    try:
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start:start + batch_size])
            keep = response_mask(batch["labels"])
            tokens, targets = keep.sum(1), batch["labels"][:, 1:][keep[:, :-1]]
            base_part = None if base is None else _base_slice(base, pos, targets)
            pos += len(targets)
            prompts = [None if prompt_cache is None else prompt_cache.prompt_len(start + b)
                       for b in range(len(tokens))]
            nll, kl, top, cache = _score_batch(model, {k: v.to(device) for k, v in batch.items()}, keep.to(device),
                                               base_part, topk, keep_cache=any(prompts))
            _keep_prompts(cache, prompts, start, prompt_cache)
            sample = torch.repeat_interleave(torch.arange(len(tokens)), tokens)  # sample of each kept position
            scores.append(Scores(tokens, _per_sample(nll, sample, len(tokens)),
                                 None if kl is None else _per_sample(kl, sample, len(tokens))))
            if top is not None:
                tops.append(BaseTopK(tokens, scores[-1].nll_sum, *top, targets))
    finally:
        tokenizer.padding_side = side
    if base is not None and pos != len(base.targets):
        raise ValueError(_OTHER_SAMPLES)
    return Scores.cat(scores), (BaseTopK.cat(tops) if topk else None)


_OTHER_SAMPLES = "the base model's log-probs were computed on other samples (the reference tokens differ)"


def _base_slice(base: BaseTopK, pos: int, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The base's (top-k log-probs, ids, rest) at the next len(targets) positions, which must score the same
    reference tokens."""
    end = pos + len(targets)
    if not torch.equal(base.targets[pos:end], targets):
        raise ValueError(_OTHER_SAMPLES)
    return base.logprobs[pos:end], base.ids[pos:end], base.rest[pos:end]


def _keep_prompts(cache, prompt_lens: list[int | None], start: int, prompt_cache) -> None:
    """Each wanted row's keys/values at its prompt positions but the last (right padding: they come first)."""
    from tunelab.prefill import plain_dynamic, row_pieces

    if cache is None or not plain_dynamic(cache):
        return
    for row, length in enumerate(prompt_lens):
        if length:
            prompt_cache.add(start + row, row_pieces(cache, row, range(0, length - 1)))


def _per_sample(values: torch.Tensor, sample: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float64).index_add_(0, sample, values.double())


def _score_batch(model, batch: dict[str, torch.Tensor], keep: torch.Tensor, base, topk: int,
                 keep_cache: bool = False):
    """Per kept position: -log q(target) [P], coarse KL [P] (with base), top-k of q (with topk > 0), on CPU; and
    the forward's KV cache with `keep_cache` (else None)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    from tunelab.prefill import output_cache

    out = model(**inputs, logits_to_keep=keep, use_cache=keep_cache)
    cache = output_cache(out) if keep_cache else None
    logits = out.logits  # [P, V], P = keep.sum()
    logits = logits.reshape(-1, logits.shape[-1])
    targets = batch["labels"][:, 1:][keep[:, :-1]]
    # fp32 log-softmax in chunks of rows: cache-sized on a CPU (as cross_entropy does), 256 MB on an accelerator
    chunk = CHUNK_ELEMENTS if logits.device.type == "cpu" else CHUNK_ELEMENTS << 6
    rows = max(1, chunk // logits.shape[-1])
    nll, kl, top = [], [], []
    for s in range(0, len(logits), rows):
        logprobs = torch.log_softmax(logits[s:s + rows], dim=-1, dtype=torch.float32)
        nll.append(-logprobs.gather(1, targets[s:s + rows, None]).squeeze(1))
        if base is not None:
            kl.append(coarse_kl(tuple(b[s:s + rows].to(logprobs.device) for b in base), logprobs))
        if topk:
            top.append(topk_summary(logprobs, topk))
    top_out = tuple(torch.cat(parts).cpu() for parts in zip(*top)) if top else None
    if topk and top_out is None:  # a batch without response tokens
        k = min(topk, logits.shape[-1])
        top_out = (torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long), torch.zeros(0))
    return _to_cpu(nll), (_to_cpu(kl) if base is not None else None), top_out, cache


def _to_cpu(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts).cpu() if parts else torch.zeros(0)


# ---- per-sample records and aggregates ----

def records(scores: Scores, indices: list[int] | None = None) -> list[dict[str, Any]]:
    """likelihood.jsonl lines: {"index", "tokens", "nll" (mean nats/token), "kl" (mean, or null)};
    nll/kl are null for a sample without response tokens."""
    out = []
    for j, (n, nll) in enumerate(zip(scores.tokens.tolist(), scores.nll_sum.tolist())):
        kl = None if scores.kl_sum is None or n == 0 else round(float(scores.kl_sum[j]) / n, 6)
        out.append({"index": indices[j] if indices else j, "tokens": n,
                    "nll": round(nll / n, 6) if n else None, "kl": kl})
    return out


def aggregate(scores: Scores) -> dict[str, Any]:
    """Token-weighted means over all samples: nll (= the old loss), perplexity, kl (None without base)."""
    count = max(int(scores.tokens.sum()), 1)
    nll = float(scores.nll_sum.sum()) / count
    kl = None if scores.kl_sum is None else round(float(scores.kl_sum.sum()) / count, 6)
    return {"nll": round(nll, 6), "perplexity": round(math.exp(min(nll, 50.0)), 4), "kl": kl,
            "likelihood_samples": len(scores.tokens)}


def write_records(path: Path, lines: list[dict[str, Any]]) -> None:
    """likelihood.jsonl, through a temp file renamed when complete."""
    from tunelab.integrity import atomic_open

    with atomic_open(path) as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")


def merge_shards(parts: list, n: int):
    """Scores or BaseTopK of each rank's shard (tunelab/distributed.py's strided split of n samples) -> one
    object in data-set order."""
    from tunelab.distributed import shard_indices

    order = [i for r in range(len(parts)) for i in shard_indices(n, r, len(parts))]
    return type(parts[0]).cat(parts).select(torch.argsort(torch.tensor(order, dtype=torch.long)))


def score_in_shards(model, rows: list[dict], tokenizer, batch_size: int, context: contextlib.AbstractContextManager,
                    base: BaseTopK | None = None, topk: int = 0, prompt_cache=None) -> tuple[Scores, BaseTopK | None]:
    """score_rows of every row, in data-set order, each rank scoring its share (tunelab/distributed.py) under
    `context` (no grad or inference mode, autocast); `base` holds every row's base log-probs. Collective: every
    rank calls it."""
    from tunelab import distributed

    mine = distributed.my_shard(len(rows))
    with context:
        scores, top = score_rows(model, [rows[i] for i in mine], tokenizer, batch_size,
                                 base=None if base is None else base.select(mine), topk=topk,
                                 prompt_cache=None if prompt_cache is None else prompt_cache.view(mine))
    scores = merge_shards(distributed.all_gather(scores), len(rows))
    return scores, (merge_shards(distributed.all_gather(top), len(rows)) if topk else None)
