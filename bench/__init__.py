"""tunelab's benchmarks: training throughput against a plain transformers Trainer + peft baseline, batched
generation, and the machine's matmul peak — each measured side by side in one run.

    python -m bench.train            # every method + the baseline (~10 min on 2 CPU cores); --quick: smoke run
    python -m bench.train --ab       # the speed-up candidates, one at a time, against tunelab's default
    python -m bench.ab_step          # the same as a paired A/B in one process, on the same batches
    python -m bench.generate         # 100 alpaca_gpt4_en prompts, greedy, batch 1 vs the default batch
    python -m bench.matmul           # fp32 / bf16 matmul peak of this machine

Files: common.py (workload rows, FLOP formula, step timer, RSS, subprocess protocol), matmul.py (peak),
train.py (orchestrator + tunelab worker), ab_step.py (paired in-process A/B), baseline.py (the plain Trainer + peft script), generate.py,
allocator.py (re-exec of bench workers under the allocator the `tunelab` console entry picks).

Rules every figure follows: each configuration runs in its own subprocess (so peak RSS is its own, from
`resource.getrusage(RUSAGE_SELF).ru_maxrss`); configurations are interleaved within one run and repeated
with --repeats, and the medians are printed; ratios are only ever taken between rows of the same run,
because these machines are shared and absolute figures drift 10-35% between runs.
"""
