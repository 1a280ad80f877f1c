"""Training throughput of every tunelab method next to a plain transformers Trainer + peft baseline.

    python -m bench.train                 # the method table + baseline, ~4 min on 2 idle CPU cores
    python -m bench.train --quick         # smoke run: 2 methods + baseline, 1 + 2 steps each, ~1 min
    python -m bench.train --ab            # speed-up candidates one by one on LoRA q,v (all layers), ~10 min
    python -m bench.train --repeats 3 --only lora_qv_all,baseline     # a tighter A/B of two rows
    python -m bench.train --workload full256                          # rows of exactly 256 tokens

Workload (bench.common.Workload): SmolLM2-135M-Instruct, batch 8, alpaca_gpt4_en rows through the model's
chat template (prompt masked) cut at 256 tokens and padded per batch, bf16 autocast on CPUs with fast
bf16, learning rate 1e-4, seed 0; each configuration trains `warmup + steps` optimizer steps in its own
subprocess and the first `warmup` steps are not measured. Printed per row: tokens/s (real non-pad
tokens), samples/s, model GFLOP/s and MFU against the bf16 and the fp32 matmul peak measured at the
start and end of the same run (bench.matmul; FLOP formula in bench.common), peak RSS of the process, the
ratios to the baseline row, and the row's speed probe. Per-step rates are pooled over repeats and the
median is printed; all raw numbers go to runs/bench/train-<time>.json.

tunelab rows run through tunelab's own pieces, in run_train's order: parse_args -> setup.training_args
-> setup.load_base -> methods.prepare_model -> TunelabTrainer (data building and saving are left out: the
rows are tokenized once for every configuration). tunelab rows use tcmalloc when it is installed (what
the `tunelab` console entry does, tunelab/allocator.py); the baseline runs with the system
allocator as a plain script would, and `*_system` / `baseline_tcmalloc` rows show both sides of that.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any

from bench.common import (DEFAULT_OUT, Workload, build_rows, emit, load_rows, machine, make_step_meter, median,
                          peak_rss_mb, run_worker, speed_probe, write_json)

METHODS: dict[str, list[str]] = {
    "lora_qv_all": ["--finetuning_type", "lora", "--lora_target", "q_proj,v_proj"],
    "lora_qkv_last3": ["--finetuning_type", "lora", "--lora_target", "qkv", "--target_layers", "last:3"],
    "freeze_last3_mlp": ["--finetuning_type", "freeze", "--num_layer_trainable", "3", "--name_module_trainable", "mlp"],
    "p_tuning_v2": ["--finetuning_type", "p_tuning", "--pre_seq_len", "16"],
    "full": ["--finetuning_type", "full"],
}
TARGET = "lora_qv_all"  # the configuration the targets are about; the A/B candidates vary it

# --ab: one candidate per row, each a change to the tunelab default on TARGET (flags and/or a variant).
CANDIDATES: dict[str, dict[str, Any]] = {
    "no_packing": {"variant": {"no_packing": True}, "why": "padded batches instead of padding-free ones"},
    "full_logits": {"variant": {"full_logits": True}, "why": "logits at every position (HF's model(labels=))"},
    "system_malloc": {"allocator": "system", "why": "glibc malloc instead of tcmalloc"},
    "glibc_tuned": {"allocator": "glibc", "why": "glibc keeping freed memory (tunelab's fallback) instead of tcmalloc"},
    "fp32": {"flags": ["--bf16", "false"], "why": "no bf16 autocast"},
    "adamw_foreach": {"flags": ["--optim", "adamw_torch"], "why": "foreach AdamW instead of the fused default"},
    "sdpa_segments": {"variant": {"sdpa_segments": True},
                      "why": "packed samples through SDPA's CPU flash kernel instead of matmul attention"},
    "unfused_ce": {"variant": {"unfused_ce": True},
                   "why": "F.cross_entropy on an fp32 copy of the logits instead of the chunked loss"},
    "rand_dropout": {"variant": {"rand_dropout": True},
                     "why": "dropout masks from one torch.rand draw per element instead of 16-bit lanes"},
    "sliced_attention": {"variant": {"sliced_attention": True},
                         "why": "packed samples sliced out, scores scaled and masked by separate ops"},
    "per_sample_attention": {"variant": {"per_sample_attention": True},
                             "why": "one attention call per packed sample instead of per run of equal lengths"},
    "fp32_softmax": {"variant": {"fp32_softmax": True},
                     "why": "attention softmax to an fp32 tensor and a cast back instead of in the scores' dtype"},
    "per_call_casts": {"variant": {"per_call_casts": True},
                       "why": "autocast re-casts the frozen fp32 weights at every forward (no cast-once)"},
    "torch_dropout": {"variant": {"torch_dropout": True},
                      "why": "nn.Dropout's bernoulli_ masks instead of torch.rand ones (LoRA dropout)"},
    "loader_worker": {"flags": ["--dataloader_num_workers", "1"], "why": "collate in a worker process"},
    "no_lora_dropout": {"flags": ["--lora_dropout", "0"], "why": "lora_dropout 0 (changes the method!)"},
    "torch_compile": {"flags": ["--torch_compile", "true"], "why": "torch.compile (inductor), padded batches"},
    "group_by_length": {"flags": ["--train_sampling_strategy", "group_by_length"],
                        "why": "length-grouped batches (opt-in: changes which samples share a batch)"},
}


# ---------------------------------------------------------------- worker (one configuration, own process)

def tunelab_args(cfg: dict[str, Any], out: str):
    from tunelab.hparams import parse_args

    argv = ["--do_train", "--output_dir", out, "--per_device_train_batch_size", str(cfg["batch"]),
            "--max_steps", str(cfg["warmup"] + cfg["steps"]), "--learning_rate", "1e-4", "--seed", "0",
            "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
            "--train_sampling_strategy", "sequential", *cfg["flags"]]  # the baseline's batches, in file order
    return parse_args(argv)


def variant_options(variant: dict[str, Any]):
    """The SpeedupOptions of a row's variant ({switch name: True, ...}): tunelab's defaults with the named
    speed-ups switched off. The options travel as arguments (trainer, attention, dropout), so nothing of
    tunelab's is rebound and every variant can run next to the default in one process (bench.ab_step)."""
    import torch

    from tunelab.attention import DEFAULT_OPTIONS, packed_attention

    changes = {
        "no_packing": {"packing": False},
        "dense_sdpa": {"pack_dense": False},
        "full_logits": {"supervised_logits": False},
        "sdpa_segments": {"matmul_attention": False},
        "unfused_ce": {"chunked_cross_entropy": False},
        "rand_dropout": {"dropout_masks": "rand"},
        "torch_dropout": {"dropout_masks": "torch"},
        "nn_dropout": {"dropout_masks": "torch"},
        "per_sample_attention": {"group_equal_lengths": False},
        "fp32_softmax": {"softmax_dtype": torch.float32},
        "sliced_attention": {"attention": functools.partial(sliced_packed_attention, packed_attention)},
        "per_call_casts": {"cast_frozen_weights": False},
    }
    unknown = sorted(set(variant) - set(changes))
    if unknown:
        raise ValueError(f"unknown variant {unknown}; valid: {', '.join(changes)}")
    fields = {k: v for name, on in variant.items() if on for k, v in changes[name].items()}
    return dataclasses.replace(DEFAULT_OPTIONS, **fields)


def sliced_packed_attention(own, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """tunelab's previous packed attention, for the A/B (SpeedupOptions.attention): samples cut out by slicing
    (each slice's backward fills a full-size zero gradient), scores scaled and masked by separate ops
    (masked_fill with a fresh triu). Unpacked batches go to `own` (tunelab's packed_attention)."""
    import torch

    from transformers.integrations.sdpa_attention import repeat_kv

    if kwargs.get("cu_seq_lens_q") is None:  # an unpacked batch: tunelab's own (SDPA) path
        return own(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    bounds = kwargs["cu_seq_lens_q"].tolist()
    outputs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        q, k, v = query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]
        k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])
        scores = torch.matmul(q, k.transpose(2, 3)) * (q.shape[-1] ** -0.5 if scaling is None else scaling)
        future = torch.ones(e - s, e - s, dtype=torch.bool).triu(1)
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
        outputs.append(torch.matmul(probs, v))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def train_tunelab(cfg: dict[str, Any]) -> dict[str, Any]:
    import tempfile

    from transformers import DataCollatorForSeq2Seq

    start = time.perf_counter()
    from tunelab import methods
    from tunelab.setup import load_base, training_args
    from tunelab.trainer import TunelabTrainer

    with tempfile.TemporaryDirectory() as out:
        args = tunelab_args(cfg, out)
        args = dataclasses.replace(args, training=training_args(args))
        model, tokenizer, base_path = load_base(args.model, [])
        tokenizer.padding_side = "right"
        model, info = methods.prepare_model(model, args.finetune)
        dataset = load_rows(cfg["rows"], (cfg["warmup"] + cfg["steps"]) * cfg["batch"])
        meter = make_step_meter(model, model.config.vocab_size, cfg["warmup"])
        collate = meter.counting(DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True))
        trainer = TunelabTrainer(
            model=model, args=args.training, train_dataset=dataset, processing_class=tokenizer, data_collator=collate,
            method_info=info, base_model=base_path, run_args=args.to_dict(), callbacks=[meter],
            speedups=variant_options(cfg["variant"]))
        setup_s = time.perf_counter() - start
        trainer.train()
    return {**meter.summary(), "setup_s": setup_s, "peak_rss_mb": peak_rss_mb(), "bf16": args.training.bf16,
            "trainable_params": info.trainable_params}


def worker(cfg: dict[str, Any]) -> None:
    from bench.allocator import active_allocator, reexec_under_allocator

    reexec_under_allocator()  # a no-op under TUNELAB_ALLOCATOR=system (the orchestrator decides per row)
    before = speed_probe()
    result = train_tunelab(cfg)
    emit({**cfg, **result, "allocator": active_allocator(), "probe_gflops": [before, speed_probe()]})


# ---------------------------------------------------------------- orchestrator

def plan(args) -> list[dict[str, Any]]:
    """The rows of this run, in the order they run within one repeat (A/B pairs adjacent)."""
    base = {"batch": args.batch, "steps": args.steps, "warmup": args.warmup, "variant": {}, "flags": []}
    rows = [{**base, "name": "baseline", "kind": "baseline", "allocator": "system"}]
    if args.ab:
        rows.append({**base, "name": TARGET, "kind": "tunelab", "flags": METHODS[TARGET], "allocator": "tcmalloc"})
        for name, cand in CANDIDATES.items():
            rows.append({**base, "name": f"{TARGET}+{name}", "kind": "tunelab", "why": cand["why"],
                         "flags": METHODS[TARGET] + cand.get("flags", []), "variant": cand.get("variant", {}),
                         "allocator": cand.get("allocator", "tcmalloc")})
    else:
        for name, flags in METHODS.items():
            rows.append({**base, "name": name, "kind": "tunelab", "flags": flags, "allocator": "tcmalloc"})
        rows.insert(2, {**rows[1], "name": f"{TARGET}_system", "allocator": "system"})
        rows.insert(3, {**rows[0], "name": "baseline_tcmalloc", "allocator": "tcmalloc"})
    if args.quick and not args.only:
        rows = [r for r in rows if r["name"] in ("baseline", TARGET, "lora_qkv_last3")]
    if args.only:
        wanted = args.only.split(",")
        rows = [r for r in rows if r["name"] in wanted]
    return rows


def summarize(results: list[dict[str, Any]], peaks: dict[str, float]) -> list[dict[str, Any]]:
    """One line per configuration: medians of per-step rates pooled over its repeats."""
    by_name: dict[str, list[dict]] = {}
    for r in results:
        by_name.setdefault(r["name"], []).append(r)
    lines = []
    for name, runs in by_name.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            lines.append({"name": name, "error": runs[0]["error"], "log_tail": runs[0].get("log_tail", "")})
            continue
        steps = [s for r in ok for s in r["steps"][r["warmup"]:]]
        flops = median([s["flops"] / s["time"] for s in steps]) / 1e9
        lines.append({
            "name": name, "allocator": ok[0]["allocator"], "bf16": ok[0].get("bf16", True),
            "tokens_per_s": median([s["tokens"] / s["time"] for s in steps]),
            "samples_per_s": median([s["samples"] / s["time"] for s in steps]),
            "step_s": median([s["time"] for s in steps]), "first_step_s": median([r["steps"][0]["time"] for r in ok]),
            "model_gflops": flops, "mfu_bf16": flops / peaks["bf16"], "mfu_fp32": flops / peaks["fp32"],
            "peak_rss_mb": median([r["peak_rss_mb"] for r in ok]), "measured_steps": len(steps),
            "probe_gflops": median([p for r in ok for p in r["probe_gflops"]]),
            "loss_first_steps": ok[0]["losses"][:3], "why": ok[0].get("why", "")})
    base = next((x for x in lines if x["name"] == "baseline" and "error" not in x), None)
    for x in lines:
        if base and "error" not in x:
            x["speed_vs_baseline"] = x["tokens_per_s"] / base["tokens_per_s"]
            x["rss_vs_baseline"] = x["peak_rss_mb"] / base["peak_rss_mb"]
    return lines


def print_table(lines: list[dict[str, Any]], peaks: dict[str, float], info: dict[str, Any]) -> None:
    print(f"\n{info['date']}  {info['cpu']} ({info['cpu_class']}), {info['cores']} cores, torch {info['torch']} "
          f"({info['torch_threads']} threads), load avg at start {info['load_avg'][0]:.2f}")
    print(f"matmul peak: bf16 {peaks['bf16']:.0f} GFLOP/s, fp32 {peaks['fp32']:.0f} GFLOP/s; probe = bf16 "
          "GFLOP/s of a 1024^3 matmul in the row's process before/after training (how much of the shared "
          "machine it got)")
    head = (f"{'config':<30}{'alloc':>9}{'tok/s':>8}{'samp/s':>8}{'step s':>8}{'GFLOP/s':>9}"
            f"{'MFU bf16':>9}{'MFU fp32':>9}{'RSS MB':>8}{'x base':>8}{'RSS/base':>9}{'probe':>7}")
    print(head + "\n" + "-" * len(head))
    for x in lines:
        if "error" in x:
            print(f"{x['name']:<30} ERROR {x['error']}\n{x['log_tail']}")
            continue
        print(f"{x['name']:<30}{x['allocator']:>9}{x['tokens_per_s']:>8.0f}{x['samples_per_s']:>8.2f}"
              f"{x['step_s']:>8.2f}{x['model_gflops']:>9.0f}{x['mfu_bf16']:>9.0%}{x['mfu_fp32']:>9.0%}"
              f"{x['peak_rss_mb']:>8.0f}{x.get('speed_vs_baseline', float('nan')):>8.2f}"
              f"{x.get('rss_vs_baseline', float('nan')):>9.2f}{x['probe_gflops']:>7.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rows, 1 warm-up + 2 measured steps")
    parser.add_argument("--ab", action="store_true", help="speed-up candidates on LoRA q,v all layers")
    parser.add_argument("--only", help="comma list of row names to run (see the printed table)")
    parser.add_argument("--repeats", type=int, default=1, help="run every row this many times, interleaved")
    parser.add_argument("--steps", type=int, default=6, help="measured optimizer steps per row and repeat")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps before them")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workload", choices=["natural", "full256"], default="natural",
                        help="natural: rows cut at 256 tokens, padded per batch; full256: only rows of 256 tokens")
    parser.add_argument("--emulate", help="measure as a CPU of this class on a bigger one: avx2 (tunelab/cpu.py)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where rows and result JSON go")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one configuration as JSON (subprocess call)
    args = parser.parse_args(argv)
    if args.emulate:  # before any worker starts: they load torch under these kernel limits
        from tunelab.cpu import emulation_env

        os.environ.update(emulation_env(args.emulate))
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if args.quick:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    info = machine()
    rows_path = str(build_rows(Workload(args.workload), args.out))
    matmul = [run_worker("bench.matmul", {"quick": args.quick})]
    rows = plan(args)
    results = []
    for repeat in range(args.repeats):
        for row in rows:
            result = run_worker("bench.baseline" if row["kind"] == "baseline" else "bench.train",
                                {**row, "rows": rows_path, "repeat": repeat},
                                env={"TUNELAB_ALLOCATOR": row["allocator"]})
            results.append(result)
            done = "error" not in result
            print(f"  [{repeat + 1}/{args.repeats}] {row['name']:<30} "
                  + (f"{median([s['time'] for s in result['steps'][result['warmup']:]]):.2f} s/step, "
                     f"{result['process_wall_s']:.0f} s" if done else result["error"]), flush=True)
    if not args.quick:
        matmul.append(run_worker("bench.matmul", {"quick": False}))  # the peak again: take the better one
    peaks = {k: max(m[k]["peak_gflops"] for m in matmul if k in m) for k in ("bf16", "fp32")}
    lines = summarize(results, peaks)
    print_table(lines, peaks, info)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_json(args.out / f"train-{stamp}.json", {"machine": info, "workload": args.workload, "peaks": peaks,
                                                  "matmul": matmul, "summary": lines, "results": results,
                                                  "argv": argv})
    print(f"\nraw results: {args.out / f'train-{stamp}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
