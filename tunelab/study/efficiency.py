"""Study-level efficiency: the model FLOPs a study does, its MFU against the machine's measured matmul
peak, each row's time split into train / likelihood scoring / generation, and the ETA the progress
view gives before the first row ends. Pure over numbers and files; the measurements that need torch
(peak, model shape, token counts of the data) are in tunelab/study/calibrate.py.

FLOP formula (model FLOPs; the convention of bench/common.py, summed per matrix instead of per module):
    N_body      parameters of the transformer layers (plus the final norm): every token's matmuls
    N_head      hidden x vocab, the output projection (the embedding lookup costs no matmul FLOPs)
    N_active    parameters of the layers at and above the lowest trainable layer: backward has to
                pass input gradients down to it, and no further (LoRA/Freeze on the last layers stop
                there; P-Tuning v2, LoRA on all layers and full fine-tuning reach layer 0)
    N_trainable trainable parameters (trainable.json): their weight gradients
  training, per (non-pad) token:  2 N_body forward + 2 N_active input grads + 2 N_trainable weight grads
      (= 6 N for full fine-tuning of the body), plus 4 N_head (forward and input grads) per supervised
      position, the only ones tunelab sends through the head (`train_supervised_tokens`; rows recorded
      before it leave the head out); on
      cached layer-k inputs (tunelab/layer_cache.py) the layers below k count only for the tokens they
      ran over (`train_cached_layer`, `train_lower_layer_tokens`: once per sample, 0 when read from disk)
  likelihood scoring:  2 N_body x tokens scored (prompt + reference) + 2 N_head x reference tokens, the
      layers below a cached layer likewise (`{stage}_cached_layer`, `{stage}_lower_layer_tokens`), plus the
      base model's pass where a stage ran it (`{stage}_base_pass_tokens`; 0 on a cache hit)
  generation:          2 N_body x (prompt + generated tokens) + 2 N_head x generated tokens, where prompt
      counts the prompt tokens generation ran itself (`{stage}_generation_prompt_tokens`: one per answer
      whose prompt keys/values came from the likelihood pass, tunelab/prefill.py)
Not counted, as in bench: attention's T^2 products, norms, activations, the optimizer.

Study MFU = model FLOPs done / (study wall time x measured peak x devices). Wall time: the summed
duration of the `tunelab study` sessions that ran it (efficiency.json), or the summed row times. Peak: the
highest of the measures at the start (calibration) and end (`peak_gflops_end`) of the sessions.

Token counts a stage records are used when present (`{stage}_tokens_scored`: prompt + reference tokens
through the likelihood pass; `{stage}_tokens_generated`: new tokens generated; trainer_state.json's
`num_input_tokens_seen` for training); otherwise the planned counts from the tokenized data
(calibrate.py), which for training are exact (data tokens x epochs) and for generation an upper bound
(max_new_tokens per generated sample). Time split: `{stage}_scoring_runtime` (+ `{stage}_base_pass_runtime`) and
`{stage}_generation_runtime` when a stage records them, the rest of a stage's time is "other"
(model loading, tokenizing); an eval stage without them counts as scoring when it did not generate,
else as "eval_unsplit".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.study.files import number, read_json_object, stage_results

EFFICIENCY_FILE = "efficiency.json"
# Planned model FLOPs / (wall time x measured peak) of whole studies (2026-11-30, `bash scripts/run_main.sh`, 2-core
# AMD EPYC): 42% for the quick scale and 37% for --budget 15m in bf16 (AVX-512 BF16 class), 47-48% for --budget 27m
# in fp32 (AVX2 class, emulated). With 2 s per stage on top (a stage's time beyond its own runtime: model load,
# tokenizing, writing results, 0.3-1.2 s) the estimates came within the budget: 13.4 of 15 and 24.6 of 27 minutes.
# The constants below are those budget runs' measurements (their rows are smaller than the quick scale's, so a
# larger share of their time is generation), so a budget is planned with what such a run achieves. Those figures
# left the output projection out of training; counted (efficiency.train_flops) the same runs plan 5% more FLOPs in
# the same time (replanned 2026-12-01): 38% and 49%. With a row's eval sets in one call (one model load, one
# generation) --budget 15m in bf16 did its planned FLOPs at 43% (done FLOPs: 41%) in 10.6 min (2026-12-01 02:54,
# bf16 peak 428 GFLOP/s), and --budget 27m in fp32 (AVX2 class, emulated) at 57-62% (done FLOPs: 54-59%; the peak
# measured 196 GFLOP/s when it was planned, 180 at its start) in 21.5 min, estimated 26: planned at 40% and 52% they
# keep a margin for these hosts' drift.
EXPECTED_MFU = 0.40  # any other precision
EXPECTED_MFU_BY_PRECISION = {"bf16": 0.40, "fp32": 0.52}
LONG_STUDY_S = 30 * 60  # a start ETA above this names --budget
PARTS = ("train", "scoring", "generation", "eval_unsplit", "other")


# ---- the FLOP formula ----

@dataclass(frozen=True)
class ModelShape:
    """Parameter counts the FLOP formula needs (calibrate.model_shape measures them)."""

    layers: tuple[int, ...]   # parameters of each transformer layer, bottom up
    other_body: int = 0       # final norm and other non-embedding, non-head parameters
    head: int = 0             # hidden x vocab

    @property
    def body(self) -> int:
        return sum(self.layers) + self.other_body

    def active(self, lowest_trainable_layer: int) -> int:
        """N_active: the layers backward passes input gradients through."""
        return sum(self.layers[max(lowest_trainable_layer, 0):]) + self.other_body

    def below(self, k: int) -> int:
        """The parameters of layers 0..k-1: what cached layer-k inputs (tunelab/layer_cache.py) spare."""
        return self.body - self.active(k)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelShape:
        return cls(tuple(data["layers"]), data.get("other_body", 0), data.get("head", 0))

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "other_body": self.other_body, "head": self.head}


def train_flops(shape: ModelShape, tokens: float, lowest_trainable_layer: int, trainable: int,
                supervised: float = 0.0) -> float:
    return 2.0 * tokens * (shape.body + shape.active(lowest_trainable_layer) + trainable) \
        + 4.0 * shape.head * supervised


def scoring_flops(shape: ModelShape, tokens: float, reference_tokens: float) -> float:
    return 2.0 * (shape.body * tokens + shape.head * reference_tokens)


def generation_flops(shape: ModelShape, prompt_tokens: float, new_tokens: float) -> float:
    return 2.0 * (shape.body * (prompt_tokens + new_tokens) + shape.head * new_tokens)


def lowest_trainable_layer(finetuning_type: str, layers: list[int] | None) -> int:
    """Where backward stops: the lowest trained layer; 0 for methods that train below every layer."""
    if finetuning_type in ("full", "p_tuning") or not layers:
        return 0
    return min(layers)


# ---- planned work (the ETA) ----

@dataclass
class EvalTokens:
    """Token counts of one eval set as tokenized: what scoring and generation will process."""

    samples: int
    scored: int        # prompt + reference tokens, every sample
    reference: int     # reference tokens, every sample
    prompt: int        # prompt tokens, every sample
    generated_samples: int
    max_new_tokens: int

    def flops(self, shape: ModelShape, generate: bool) -> tuple[float, float]:
        """(scoring, generation) FLOPs; generation assumes every answer runs to max_new_tokens."""
        score = scoring_flops(shape, self.scored, self.reference)
        if not generate or self.samples == 0:
            return score, 0.0
        prompt = self.prompt * self.generated_samples / self.samples
        return score, generation_flops(shape, prompt, self.generated_samples * self.max_new_tokens)


def planned_row_flops(shape: ModelShape, train_tokens: float | None, lowest_layer: int, trainable: int,
                      evals: list[tuple[EvalTokens, bool]], trajectory_points: int = 0,
                      supervised: float = 0.0) -> dict[str, float]:
    """{train, scoring, generation} FLOPs of one row: its training (None for the base row; `supervised`
    positions over all epochs), each eval set (with or without generation) and `trajectory_points`
    likelihood-only evals of each set."""
    out = {"train": train_flops(shape, train_tokens, lowest_layer, trainable, supervised) if train_tokens else 0.0,
           "scoring": 0.0, "generation": 0.0}
    for tokens, generate in evals:
        score, gen = tokens.flops(shape, generate)
        out["scoring"] += score * (1 + trajectory_points)
        out["generation"] += gen
    return out


def with_lower_layer_cache(flops: dict[str, float], shape: ModelShape, k: int, train: tuple[float, float, bool],
                           evals: list[tuple[EvalTokens, bool]], trajectory_points: int = 0) -> dict[str, float]:
    """A row's planned FLOPs when tunelab/layer_cache.py serves the inputs of layer k (LoRA/Freeze on layers
    >= k): layers 0..k-1 run once over the training data (not every epoch) and not at all for data an
    earlier row of the study already cached; the likelihood passes likewise. Generation runs every layer.
    train = (tokens over all epochs, epochs, whether this row computes the lower layers itself);
    evals = [(eval set tokens, whether this row computes their lower layers itself)]."""
    lower = shape.below(k)
    tokens, epochs, first = train
    out = dict(flops)
    out["train"] -= 2.0 * tokens * lower * (1.0 - (1.0 / max(epochs, 1.0) if first else 0.0))
    for set_tokens, first_set in evals:
        out["scoring"] -= 2.0 * set_tokens.scored * lower * (1 + trajectory_points - (1 if first_set else 0))
    return out


def train_steps(samples: int, batch: int, epochs: float) -> int:
    """Optimizer steps of a training run (the Trainer rounds each epoch up, then scales fractional epochs)."""
    per_epoch = math.ceil(samples / max(batch, 1))
    return math.ceil(per_epoch * epochs)


def expected_mfu(precision: str) -> float:
    """The study-level MFU a study in `precision` (bf16 / fp32) is planned with: --budget's estimate and the
    progress view's first ETA."""
    return EXPECTED_MFU_BY_PRECISION.get(precision, EXPECTED_MFU)


def eta_seconds(remaining_flops: float, peak_flops: float, mfu: float) -> float:
    """Seconds left at `mfu` of the peak (FLOP/s, all devices together)."""
    return remaining_flops / max(peak_flops * mfu, 1e-9)


MODEL_PARTS = ("train", "scoring", "generation")  # the parts the plan has FLOPs for


@dataclass
class Budget:
    """The study's planned FLOPs per row dir and part, and the machine's peak: what the progress view's ETA uses.

    Before a row ends, every part runs at the precision's expected MFU. Then each part's rate is the planned
    FLOPs of that part in the rows finished this session over the seconds they spent on it (a part no row has
    timed yet keeps the expected MFU), so a formula that over- or under-counts some work -- generation is
    planned at max_new_tokens per answer, and answers stop earlier -- cancels out of the ETA, part by part: a
    base row that only scores and generates says little about how fast training goes. The rows' seconds
    beyond those parts (loading, tokenizing) and several rows running at once enter as elapsed time over the
    finished rows' part seconds."""

    planned: dict[str, dict[str, float]]  # row dir -> {train, scoring, generation} planned FLOPs
    peak_gflops: float                    # one device
    precision: str
    devices: int = 1
    done: dict[str, dict[str, float]] = field(default_factory=dict)  # row dir -> seconds per part

    @property
    def peak_flops(self) -> float:
        return self.peak_gflops * 1e9 * self.devices

    @property
    def expected_mfu(self) -> float:
        return expected_mfu(self.precision)

    def _planned(self, rows, part: str | None = None) -> float:
        return sum(v for d in rows for p, v in self.planned.get(d, {}).items() if part in (None, p))

    def start_line(self, todo: list[str], sized: bool = False) -> str:
        """What the study will cost here, before any row ran; a long one not `sized` to a time by --budget
        names the option."""
        total = self._planned(todo)
        eta = eta_seconds(total, self.peak_flops, self.expected_mfu)
        line = (f"planned ≈ {total / 1e12:.1f} TFLOP; this machine's peak {self.peak_gflops:.0f} GFLOP/s "
                f"({self.precision}{f' x {self.devices} devices' if self.devices > 1 else ''}); "
                f"ETA ≈ {eta / 60:.0f} min (at an assumed {self.expected_mfu:.0%} MFU)")
        if eta > LONG_STUDY_S and not sized:
            line += "; --budget 30m would size the study to 30 minutes on this machine (smaller samples)"
        return line

    def finished(self, row_dir: str, seconds: dict[str, float] | None = None) -> None:
        """Row `row_dir` ended, having spent `seconds` per part (row_split; None or {} when unknown)."""
        self.done[row_dir] = {p: float(seconds.get(p) or 0.0) for p in MODEL_PARTS} if seconds else {}

    def eta(self, todo: list[str], elapsed: float) -> tuple[float, float]:
        """(seconds left, measured efficiency: the finished rows' planned FLOPs over elapsed x peak) with the
        rows not yet finished in `todo`."""
        left = [d for d in todo if d not in self.done]
        done_flops = self._planned(self.done)
        mfu = done_flops / max(elapsed * self.peak_flops, 1e-9) if done_flops and elapsed > 0 else self.expected_mfu
        timed = [d for d, seconds in self.done.items() if sum(seconds.values()) > 0]
        part_seconds = sum(sum(self.done[d].values()) for d in timed)
        if not part_seconds or elapsed <= 0:
            return eta_seconds(self._planned(left), self.peak_flops, mfu), mfu
        seconds = 0.0
        for part in MODEL_PARTS:
            flops, spent = self._planned(timed, part), sum(self.done[d][part] for d in timed)
            rate = flops / spent if flops > 0 and spent > 0 else self.peak_flops * self.expected_mfu
            seconds += self._planned(left, part) / rate
        return seconds * elapsed / part_seconds, mfu


# ---- what was done (the report) ----



def stage_split(stage: str, info: dict[str, Any], results: dict[str, Any]) -> dict[str, float]:
    """One stage's seconds split into PARTS (module docstring)."""
    seconds = number(info.get("seconds")) or 0.0
    if stage == "train":
        return {"train": seconds}
    if stage == "trajectory":
        return {"scoring": seconds}
    prefix = _prefix(results)
    scoring, generation = (number(results.get(f"{prefix}_{k}")) for k in ("scoring_runtime", "generation_runtime"))
    if scoring is None and generation is None:
        generated = prefix == "predict" or number(results.get(f"{prefix}_generated_samples"))
        return {"eval_unsplit": seconds} if generated else {"scoring": seconds}
    scoring = (scoring or 0.0) + (number(results.get(f"{prefix}_base_pass_runtime")) or 0.0)  # the base pass scores too
    generation = generation or 0.0
    return {"scoring": scoring, "generation": generation, "other": max(seconds - scoring - generation, 0.0)}


def _prefix(results: dict[str, Any]) -> str:
    return "predict" if any(k.startswith("predict_") for k in results) else "eval"


def row_split(row_dir: Path, record: dict[str, Any]) -> dict[str, float]:
    """A row's seconds per PART, summed over its stages (row.json and each eval stage's results)."""
    out = dict.fromkeys(PARTS, 0.0)
    for stage, info in record.get("stages", {}).items():
        results = {} if stage in ("train", "trajectory") else (
            stage_results(row_dir / stage))
        for part, seconds in stage_split(stage, info, results).items():
            out[part] += seconds
    return out


def _trajectory_tokens(row_dir: Path) -> tuple[float, float]:
    """(tokens scored, reference tokens) over the row's trajectory points, from their results / likelihood."""
    scored = reference = 0.0
    for point in (row_dir / "trajectory").glob("*/step-*"):
        results = read_json_object(point / "eval_results.json")
        scored += number(results.get("eval_tokens_scored")) or 0.0
        reference += _likelihood_tokens(point)
    return scored, reference


def _likelihood_tokens(stage_dir: Path) -> float:
    try:
        lines = (stage_dir / "likelihood.jsonl").read_text(encoding="utf-8").splitlines()
        return float(sum(json.loads(line).get("tokens", 0) for line in lines if line.strip()))
    except (OSError, ValueError, AttributeError):
        return 0.0


def row_flops(row_dir: Path, record: dict[str, Any], shape: ModelShape, planned: dict[str, Any]) -> float | None:
    """Model FLOPs a finished row did (the sum of row_part_flops); None if unknown."""
    parts = row_part_flops(row_dir, record, shape, planned)
    return None if parts is None else sum(parts.values())


def row_part_flops(row_dir: Path, record: dict[str, Any], shape: ModelShape,
                   planned: dict[str, Any]) -> dict[str, float] | None:
    """Model FLOPs a finished row did, {train, scoring, generation}, from its files (recorded token counts) or
    its plan; None if unknown. `planned`: the row's entry of efficiency.json ({"flops": {...}, "train_tokens":
    ...}). Rows whose stages predate the lower-layer cache records (`*_cached_layer`, `*_base_pass_tokens`) take
    their training and scoring FLOPs from the plan, which counts that cache; their recorded token counts would
    count every layer."""
    if record.get("status") != "done":
        return None
    stages = record.get("stages", {})
    planned_flops = planned.get("flops") or {}
    out = {"train": 0.0, "scoring": 0.0, "generation": 0.0}
    if "train" in stages:
        train = _done_train_flops(row_dir / "train", shape, planned)
        if train is None:
            return None
        out["train"] = train
    recorded = _recorded_eval_flops(row_dir, [s for s in stages if s not in ("train", "trajectory")], shape)
    if recorded is None:
        if not planned_flops:
            return None
        return {**out, "scoring": planned_flops.get("scoring", 0.0), "generation": planned_flops.get("generation", 0.0)}
    scoring, generation, complete = recorded
    if not complete and "scoring" in planned_flops:
        scoring = planned_flops["scoring"]
    return {**out, "scoring": scoring, "generation": generation}


def _done_train_flops(train_dir: Path, shape: ModelShape, planned: dict[str, Any]) -> float | None:
    """Training FLOPs from trainer_state.json / trainable.json / train_results.json; with the lower-layer cache
    (train_cached_layer = k) layers 0..k-1 count only for the tokens they ran over (train_lower_layer_tokens)."""
    state = read_json_object(train_dir / "trainer_state.json")
    trainable = read_json_object(train_dir / "trainable.json")
    results = read_json_object(train_dir / "train_results.json")
    recorded_tokens = number(state.get("num_input_tokens_seen"))
    cached = number(results.get("train_cached_layer")) is not None
    if not recorded_tokens and not cached and (planned.get("flops") or {}).get("train"):
        return planned["flops"]["train"]  # the plan's count (it counts the cache), as no run record says more
    tokens = recorded_tokens or number(planned.get("train_tokens"))
    if not tokens:
        return None
    lowest = lowest_trainable_layer(trainable.get("finetuning_type", "full"), trainable.get("layers"))
    supervised = number(results.get("train_supervised_tokens")) or 0.0  # 0 for runs that did not record it
    return train_flops(shape, tokens, lowest, int(trainable.get("trainable_params") or 0), supervised) \
        - _cache_spared(shape, results, "train", tokens)


def _cache_spared(shape: ModelShape, results: dict[str, Any], prefix: str, tokens: float) -> float:
    """The forward FLOPs of layers 0..k-1 that cached layer-k inputs spared a pass over `tokens`: those the
    lower layers did not run over (`{prefix}_cached_layer` = k, `{prefix}_lower_layer_tokens`); 0 without."""
    k = number(results.get(f"{prefix}_cached_layer"))
    if k is None:
        return 0.0
    lower_tokens = number(results.get(f"{prefix}_lower_layer_tokens")) or 0.0
    return 2.0 * shape.below(int(k)) * max(tokens - lower_tokens, 0.0)


def _recorded_eval_flops(row_dir: Path, stages: list[str], shape: ModelShape) -> tuple[float, float, bool] | None:
    """(scoring, generation) FLOPs from the token counts the stages recorded, and whether every stage also
    recorded its lower-layer cache and base pass (else its scoring counts every layer and no base pass);
    None when any stage did not record token counts."""
    scoring = generation = 0.0
    complete = True
    for stage in stages:
        results = stage_results(row_dir / stage)
        prefix = _prefix(results)
        scored = number(results.get(f"{prefix}_tokens_scored"))
        if scored is None:
            return None
        reference = _likelihood_tokens(row_dir / stage)
        scoring += scoring_flops(shape, scored, reference) - _cache_spared(shape, results, prefix, scored)
        base_tokens = number(results.get(f"{prefix}_base_pass_tokens"))
        complete = complete and base_tokens is not None
        scoring += scoring_flops(shape, base_tokens, reference) if base_tokens else 0.0
        new = number(results.get(f"{prefix}_tokens_generated")) or 0.0
        n, gen = number(results.get(f"{prefix}_likelihood_samples")), number(results.get(f"{prefix}_generated_samples"))
        prompt = number(results.get(f"{prefix}_generation_prompt_tokens"))  # older stages: every prompt's tokens
        if prompt is None:
            prompt = (scored - reference) * (gen / n) if n and gen is not None else 0.0
        generation += generation_flops(shape, prompt, new) if new else 0.0
    scored, reference = _trajectory_tokens(row_dir)
    return scoring + scoring_flops(shape, scored, reference), generation, complete


@dataclass
class StudyEfficiency:
    """What the report states: totals, MFU and each row's time split."""

    flops: float | None
    wall_seconds: float
    peak_gflops: float | None
    precision: str | None
    devices: int
    rows: list[tuple[str, dict[str, float], float | None]]  # (row dir, seconds per part, FLOPs)
    part_flops: dict[str, float] = field(default_factory=dict)  # FLOPs per part over the finished rows
    peak_measures: list[float] = field(default_factory=list)  # every peak measured (peak_gflops: the highest)

    @property
    def mfu(self) -> float | None:
        if not self.flops or not self.peak_gflops or self.wall_seconds <= 0:
            return None
        return self.flops / (self.wall_seconds * self.peak_gflops * 1e9 * self.devices)

    def totals(self) -> dict[str, float]:
        return {part: sum(split[part] for _, split, _ in self.rows) for part in PARTS}

    def part_mfu(self) -> dict[str, float]:
        """{train, scoring, generation: that part's FLOPs / (its seconds x peak)} over the finished rows, for the
        parts with both (where the study's efficiency is lost: decoding at a few answers per set runs far below
        the matmul peak)."""
        if not self.peak_gflops or not self.part_flops:
            return {}
        done = {d for d, _, f in self.rows if f is not None}
        seconds = {part: sum(split[part] for d, split, _ in self.rows if d in done) for part in self.part_flops}
        if any(split["eval_unsplit"] for d, split, _ in self.rows if d in done):
            seconds["scoring"] = seconds["generation"] = 0.0  # eval time not split: only training's figure holds
        peak = self.peak_gflops * 1e9 * self.devices
        return {part: flops / (seconds[part] * peak) for part, flops in self.part_flops.items()
                if flops and seconds[part] > 0}


def read_efficiency(study_dir: Path, entries: list[dict[str, Any]]) -> StudyEfficiency | None:
    """The study's efficiency from efficiency.json and the row files; None when no row has run."""
    meta = read_json_object(study_dir / EFFICIENCY_FILE)
    calibration = meta.get("calibration") or {}
    shape = ModelShape.from_dict(calibration["model"]) if calibration.get("model") else None
    rows, known, parts = [], True, {"train": 0.0, "scoring": 0.0, "generation": 0.0}
    for entry in entries:
        record = read_json_object(study_dir / entry["dir"] / "row.json")
        if not record.get("stages"):
            continue
        row_dir = study_dir / entry["dir"]
        planned = (calibration.get("rows") or {}).get(entry["dir"], {})
        split = row_part_flops(row_dir, record, shape, planned) if shape else None
        f = None if split is None else sum(split.values())
        rows.append((entry["dir"], row_split(row_dir, record), f))
        if record.get("status") == "done":
            known = known and f is not None
            for part, value in (split or {}).items():
                parts[part] += value
    if not rows:
        return None
    sessions = [s.get("seconds", 0.0) for s in meta.get("sessions", [])]
    wall = sum(sessions) if sessions else sum(sum(split.values()) for _, split, _ in rows)
    peaks = study_peaks(meta)
    return StudyEfficiency(sum(parts.values()) if known and shape else None, wall, max(peaks, default=None),
                           calibration.get("precision"), int(calibration.get("devices") or 1), rows,
                           parts if known and shape else {}, peaks)


def study_peaks(meta: dict[str, Any]) -> list[float]:
    """Every matmul peak efficiency.json holds: the calibration's (a session's start) and each session's end
    measure (`peak_gflops_end`). The MFU takes the highest: on a shared host a slow moment lowers a measure."""
    found = [(meta.get("calibration") or {}).get("peak_gflops")]
    found += [s.get("peak_gflops_end") for s in meta.get("sessions", []) if isinstance(s, dict)]
    return [float(p) for p in found if number(p)]
