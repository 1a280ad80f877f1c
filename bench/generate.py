"""Generation throughput: greedy answers to 100 alpaca_gpt4_en prompts, fixed batches against tunelab's default.

    python -m bench.generate                  # 100 prompts, <= 64 new tokens, batch 8 vs auto (~2 min, 2 cores)
    python -m bench.generate --ab             # also: auto with one prefill forward; autocast per call; SDPA decode
    python -m bench.generate --quick          # 16 prompts, 32 new tokens
    python -m bench.generate --batch-sizes 1,8,16,auto --max-new-tokens 128 --emulate avx2 --fp32

`auto` is tunelab's default generation batch (--generation_batch_tokens: as many prompts as keep the
batch's KV cache within budget, prompts prefilled in chunks, tunelab/prefill.py); a number is that many
prompts per batch (--generation_batch_tokens 0 --per_device_eval_batch_size N).

Each batch size runs in its own subprocess through tunelab's own eval path: prompts from
`tunelab.preprocess.build_dataset(..., "eval")` (the model's chat template), `tunelab.generation` greedy
kwargs, `generate_batched` (length-sorted, left-padded batches with a KV cache) under the precision
`tunelab eval` resolves (bf16 autocast on CPUs with fast bf16). Printed per batch size: samples/s, new
tokens/s (each answer re-tokenized, eos excluded), peak RSS, the speed-up over the first row, and how many
answers are identical to the first row's (bf16 answers can differ by float noise of the padded batch).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_OUT, REPO, emit, machine, peak_rss_mb, run_worker, speed_probe, write_json


def generate(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from tunelab.attention import DEFAULT_OPTIONS
    from tunelab.generation import batch_tokens, generate_batched, generation_kwargs
    from tunelab.hparams import parse_args
    from tunelab.model import load_model_and_tokenizer
    from tunelab.preprocess import build_dataset
    from tunelab.setup import autocast, resolve_precision

    args = parse_args(["--do_predict", "--output_dir", str(REPO / "runs" / "bench" / "unused"), "--dataset",
                       "alpaca_gpt4_en", "--dataset_dir", str(REPO / "data"), "--max_samples", str(cfg["samples"]),
                       "--max_new_tokens", str(cfg["max_new_tokens"]), "--use_cpu", str(not torch.cuda.is_available()),
                       *(["--bf16", "false"] if cfg.get("fp32") else [])])
    args = dataclasses.replace(args, training=resolve_precision(args))
    model, tokenizer, _ = load_model_and_tokenizer(args.model)
    model.eval()
    tokenizer.padding_side = "left"
    prompts = list(build_dataset(args.data, tokenizer, "eval")["input_ids"])
    kwargs = generation_kwargs(args.generation, tokenizer)
    auto = cfg["batch"] == "auto"
    start = time.perf_counter()
    with autocast(args):
        answers = generate_batched(model, tokenizer, prompts, kwargs, batch_size=1 if auto else cfg["batch"],
                                   progress=False, cast_weights_once=cfg.get("cast_weights_once", True),
                                   max_batch_tokens=batch_tokens(model, None) if auto else None,
                                   speedups=dataclasses.replace(DEFAULT_OPTIONS,
                                                                matmul_decode=cfg.get("matmul_decode", True)),
                                   **({} if cfg.get("chunked_prefill", True) else {"prefill_chunk_tokens": None}))
    seconds = time.perf_counter() - start
    new_tokens = sum(len(tokenizer.encode(a, add_special_tokens=False)) for a in answers)
    return {"seconds": seconds, "samples": len(prompts), "new_tokens": new_tokens, "answers": answers,
            "prompt_tokens": sum(map(len, prompts)), "bf16": args.training.bf16, "peak_rss_mb": peak_rss_mb()}


def worker(cfg: dict[str, Any]) -> None:
    from bench.allocator import active_allocator, reexec_under_allocator

    reexec_under_allocator()
    before = speed_probe()
    result = generate(cfg)
    emit({**cfg, **result, "allocator": active_allocator(), "probe_gflops": [before, speed_probe()]})


def print_table(results: list[dict[str, Any]], info: dict[str, Any]) -> None:
    print(f"\n{info['date']}  {info['cpu']} ({info['cpu_class']}), {info['cores']} cores, torch {info['torch']}; greedy, "
          f"{results[0]['samples']} alpaca_gpt4_en prompts, <= {results[0]['max_new_tokens']} new tokens")
    head = f"{'batch':>6}{'prefill':>9}{'cast':>6}{'decode':>8}{'seconds':>9}{'samples/s':>11}{'new tok/s':>11}" \
           f"{'x row 1':>9}{'same as 1':>11}{'RSS MB':>8}{'probe':>7}"
    print(head + "\n" + "-" * len(head))
    one = next((r for r in results if "error" not in r), None)
    for r in results:
        if "error" in r:
            print(f"{r['batch']:>6} ERROR {r['error']}\n{r['log_tail']}")
            continue
        same = sum(a == b for a, b in zip(r["answers"], one["answers"])) if one else 0
        speed = (r["new_tokens"] / r["seconds"]) / (one["new_tokens"] / one["seconds"]) if one else float("nan")
        same_text = f"{same}/{r['samples']}"
        cast = "once" if r["cast_weights_once"] else "call"
        prefill = "chunks" if r["batch"] == "auto" and r.get("chunked_prefill", True) else "one"
        decode = "matmul" if r.get("matmul_decode", True) else "sdpa"
        print(f"{r['batch']:>6}{prefill:>9}{cast:>6}{decode:>8}{r['seconds']:>9.1f}"
              f"{r['samples'] / r['seconds']:>11.2f}{r['new_tokens'] / r['seconds']:>11.1f}{speed:>9.2f}{same_text:>11}"
              f"{r['peak_rss_mb']:>8.0f}{sum(r['probe_gflops']) / 2:>7.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 prompts, 32 new tokens")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="8,auto",
                        help="comma list of prompts per batch, or auto: tunelab's default (KV-cache budget)")
    parser.add_argument("--ab", action="store_true", help="also run auto with one prefill forward per batch, and "
                        "every batch size without casting the weights once (autocast per call) and with SDPA's "
                        "kernel for decoding steps instead of tunelab's matmul attention")
    parser.add_argument("--fp32", action="store_true", help="fp32 instead of the resolved precision (bf16 autocast)")
    parser.add_argument("--emulate", help="measure as a CPU of this class on a bigger one: avx2 (tunelab/cpu.py)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.emulate:  # before any worker starts: they load torch under these kernel limits
        from tunelab.cpu import emulation_env

        os.environ.update(emulation_env(args.emulate))
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if args.quick:
        args.samples, args.max_new_tokens = min(args.samples, 16), min(args.max_new_tokens, 32)
    info = machine()
    results = []
    for batch in (b if b == "auto" else int(b) for b in args.batch_sizes.split(",")):
        variants = [(True, True, True)] + ([(True, False, True)] if args.ab and batch == "auto" else []) \
            + ([(False, True, True), (True, True, False)] if args.ab else [])
        for once, chunked, matmul_decode in variants:
            cfg = {"batch": batch, "samples": args.samples, "max_new_tokens": args.max_new_tokens,
                   "cast_weights_once": once, "chunked_prefill": chunked, "matmul_decode": matmul_decode,
                   "fp32": args.fp32}
            results.append(run_worker("bench.generate", cfg, env={"TUNELAB_ALLOCATOR": "tcmalloc"}))
            r = results[-1]
            print(f"  batch {batch}{'' if once else ' (autocast per call)'}{'' if chunked else ' (one prefill)'}"
                  f"{'' if matmul_decode else ' (SDPA decode)'}: "
                  + (f"{r['seconds']:.1f} s" if "error" not in r else r["error"]), flush=True)
    print_table(results, info)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_json(args.out / f"generate-{stamp}.json", {"machine": info, "results": results, "argv": argv})
    print(f"\nraw results: {args.out / f'generate-{stamp}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
