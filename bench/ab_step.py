"""Paired A/B of tunelab's speed-ups inside one process: the same batches, each variant back to back.

    python -m bench.ab_step                       # every switch, natural workload, 3 batches x 5 rounds (~6 min)
    python -m bench.ab_step --only sliced_attention,rand_dropout --rounds 8
    python -m bench.ab_step --workload full256 --only dense_sdpa      # batches without padding

`python -m bench.train --ab` runs each variant in its own process: right for peak RSS and for switches
that act at start-up (allocator, precision), but a process-level row mixes the variant's effect with
everything else that drifts on a shared machine (which second it ran, where its memory landed), and
effects under ~5% drowned in that (bench/README.md). Here one process holds tunelab's LoRA q,v model
(all layers, bf16 autocast, frozen weights cast once, tcmalloc as the `tunelab` entry runs) and times
forward + backward of `supervised_loss` on each batch under every variant in turn, round after round.
Each variant's time is divided by the default's on the same batch in the same round, and the median of
those paired ratios is printed as the default's speed-up over the variant (1.05 = the speed-up saves 5%).
The optimizer step is left out (the same for every variant here). Raw times: runs/bench/ab_step-*.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

from bench.common import DEFAULT_OUT, Workload, build_rows, load_rows, machine, write_json
from bench.train import METHODS, TARGET, tunelab_args, variant_options

# variant -> what it switches off (each a context around one timed forward + backward)
SWITCHES = {
    "sliced_attention": "packed samples sliced out, K/V copied per query head, scale and mask as separate ops",
    "per_sample_attention": "one attention call per packed sample instead of one per run of equal lengths",
    "fp32_softmax": "attention softmax to an fp32 tensor and a cast back instead of in the scores' dtype",
    "unfused_ce": "F.cross_entropy on an fp32 copy of the logits instead of the chunked loss",
    "rand_dropout": "dropout masks from one torch.rand draw per element instead of 16-bit lanes",
    "nn_dropout": "nn.Dropout's bernoulli_ masks (no dropout swap at all)",
    "dense_sdpa": "batches without padding stay dense and go through SDPA instead of being packed",
    "no_packing": "padded batches through SDPA instead of padding-free packed rows",
    "full_logits": "logits at every position (HF's model(labels=...)) instead of supervised ones only",
    "per_call_casts": "autocast re-casts the frozen fp32 weights at every call (no cast-once)",
}


def variant_contexts(model) -> dict[str, Callable[[], contextlib.AbstractContextManager]]:
    """For each variant ("default": tunelab's own), a factory of the context that switches it on for one
    timed step and yields (its SpeedupOptions, whether batches are packed). The options reach tunelab as
    arguments (bench.train.variant_options); the context sets what acts on the model itself: its packed
    attention, its dropout modules and, for per_call_casts, fp32 frozen weights. Built once, inside the
    block where the frozen weights are held in bf16."""
    import torch

    from tunelab.attention import packed_attention_enabled
    from tunelab.speedups import cpu_dropout

    frozen_bf16 = [(m, n, p) for m in model.modules() if type(m) is torch.nn.Linear
                   for n, p in (("weight", m.weight), ("bias", m.bias)) if p is not None and not p.requires_grad]

    @contextlib.contextmanager
    def fp32_weights() -> Iterator[None]:  # fp32 frozen weights (autocast casts them back to these bf16 values)
        for module, attr, param in frozen_bf16:
            setattr(module, attr, torch.nn.Parameter(param.float(), requires_grad=False))
        try:
            yield
        finally:
            for module, attr, param in frozen_bf16:
                setattr(module, attr, param)

    @contextlib.contextmanager
    def switched(options) -> Iterator[tuple[Any, bool]]:
        weights = contextlib.nullcontext() if options.cast_frozen_weights else fp32_weights()
        with packed_attention_enabled(model, options) as packing, cpu_dropout(model, "cpu", options.dropout_masks), \
                weights:
            yield options, packing

    return {name: functools.partial(switched, variant_options({} if name == "default" else {name: True}))
            for name in ("default", *SWITCHES)}


def run(args) -> dict[str, Any]:
    import tempfile

    import torch
    from transformers import DataCollatorForSeq2Seq

    from tunelab import methods, speedups
    from tunelab.attention import enable_packed_attention, pack_batch
    from tunelab.setup import load_base, training_args
    from tunelab.trainer import supervised_loss

    cfg = {"batch": args.batch, "warmup": 0, "steps": 1, "flags": METHODS[TARGET]}
    rows = build_rows(Workload(args.workload), args.out)
    with tempfile.TemporaryDirectory() as out:
        targs = tunelab_args(cfg, out)
        targs = dataclasses.replace(targs, training=training_args(targs))
        model, tokenizer, _ = load_base(targs.model, [])
        tokenizer.padding_side = "right"
        model, _ = methods.prepare_model(model, targs.finetune)
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    data = load_rows(rows, args.batches * args.batch)
    batches = [collate([data[i] for i in range(b * args.batch, (b + 1) * args.batch)]) for b in range(args.batches)]
    enable_packed_attention(model)  # tunelab's default; a variant switches to its own for its step
    model.train()
    names = ["default", *(args.only.split(",") if args.only else SWITCHES)]
    unknown = [n for n in names if n not in ("default", *SWITCHES)]
    if unknown:
        raise SystemExit(f"unknown switch {unknown}; valid: {', '.join(SWITCHES)}")
    dtype = torch.bfloat16 if targs.training.bf16 else None
    times: dict[str, list[float]] = {n: [] for n in names}

    def step(name: str, batch) -> float:
        with contexts[name]() as (options, packing):
            packed = pack_batch(batch, options) if packing else None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                start = time.perf_counter()
                loss = supervised_loss(model, packed or batch, options)
                loss.backward()
                elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return elapsed

    with speedups.linear_weights_cast(model, dtype, frozen_only=True):
        contexts = variant_contexts(model)
        for round_ in range(args.rounds + 1):  # round 0 warms every variant up and is not kept
            for batch in batches:
                for name in names:
                    elapsed = step(name, batch)
                    if round_:
                        times[name].append(elapsed)
            print(f"  round {round_}/{args.rounds} done", flush=True)
    return {"names": names, "times": times, "workload": args.workload, "batches": args.batches, "rounds": args.rounds}


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    base = result["times"]["default"]
    lines = []
    for name in result["names"]:
        ratios = [t / d for d, t in zip(base, result["times"][name])]
        lines.append({"variant": name, "median_s": statistics.median(result["times"][name]),
                      "speedup_of_default": statistics.median(ratios), "min_ratio": min(ratios),
                      "max_ratio": max(ratios), "n": len(ratios), "what": SWITCHES.get(name, "tunelab's default")})
    return lines


def main(argv: list[str] | None = None) -> int:
    from bench.allocator import reexec_under_allocator

    parser = argparse.ArgumentParser(prog="python -m bench.ab_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help=f"comma-separated switches (default: all of {', '.join(SWITCHES)})")
    parser.add_argument("--workload", choices=["natural", "full256"], default="natural")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    reexec_under_allocator()
    from pathlib import Path

    args.out = Path(args.out)
    info = machine()
    result = run(args)
    lines = summarize(result)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}  {info.get('cpu', '')}, workload {args.workload}, "
          f"{args.batches} batches x {args.rounds} rounds, forward + backward of LoRA q,v (all layers)")
    print(f"{'variant':<18} {'median s':>9} {'default speed-up':>17} {'range':>13}  switched off")
    for line in lines:
        print(f"{line['variant']:<18} {line['median_s']:9.3f} {line['speedup_of_default']:17.3f} "
              f"{line['min_ratio']:6.2f}-{line['max_ratio']:<6.2f}  {line['what']}")
    path = args.out / f"ab_step-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(path, {"machine": info, "summary": lines, "result": result, "argv": argv})
    print(f"\nraw results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
