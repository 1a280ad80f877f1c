"""The baseline: a plain transformers Trainer + peft LoRA script, as a user would write it.

    python -m bench.baseline --rows runs/bench/rows_alpaca_gpt4_en_full256_256.json --steps 8

Same model (SmolLM2-135M-Instruct, fp32 weights), same token rows (bench.common.build_rows: alpaca_gpt4_en
through the model's chat template, prompt masked with -100), same LoRA (r 8, alpha 32, dropout 0.1 on
q_proj and v_proj of every layer), same batch (8), learning rate, schedule and seed as the tunelab rows,
bf16 autocast (`bf16=True`: the baseline's best precision on a CPU with fast bf16). Everything else is the
Trainer's default: loss from `model(labels=...)` over every position, the default optimizer and data
loader — except that rows go in file order (`train_sampling_strategy="sequential"`, in the tunelab rows
too), so both sides train on the very same batches and their first-step losses can be compared. Its allocator is whatever the process gets (glibc unless the orchestrator preloads tcmalloc).
bench.train runs it as a worker next to the tunelab configurations.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from bench.common import emit, load_rows, make_step_meter, peak_rss_mb, speed_probe

LORA = {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}


def train(rows_path: str, steps: int, warmup: int, batch: int = 8, learning_rate: float = 1e-4,
          bf16: bool = True) -> dict:
    start = time.perf_counter()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments)

    from tunelab.model import resolve_model_path  # only to find the converted default model on disk

    path = resolve_model_path(None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    dataset = load_rows(rows_path, steps * batch)
    meter = make_step_meter(model, model.config.vocab_size, warmup)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch, max_steps=steps,
                                 learning_rate=learning_rate, bf16=bf16, use_cpu=not torch.cuda.is_available(),
                                 save_strategy="no", report_to=[], train_sampling_strategy="sequential",
                                 logging_steps=1, seed=0, disable_tqdm=True)
        collate = meter.counting(DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True))
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate, callbacks=[meter])
        setup_s = time.perf_counter() - start
        trainer.train()
    return {**meter.summary(), "setup_s": setup_s, "peak_rss_mb": peak_rss_mb()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", help="token rows JSON written by bench.common.build_rows")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # bench.train's subprocess call: JSON config
    args = parser.parse_args(argv)
    if args.worker:
        from bench.allocator import active_allocator, reexec_under_allocator

        reexec_under_allocator()  # a no-op under TUNELAB_ALLOCATOR=system (the orchestrator decides)
        cfg = json.loads(args.worker)
        before = speed_probe()
        from tunelab.cpu import cpu_has_fast_bf16  # fp32 on CPUs without fast bf16 (and under --emulate avx2)

        result = train(cfg["rows"], cfg["steps"], cfg["warmup"], bf16=cfg.get("bf16", cpu_has_fast_bf16()))
        emit({**cfg, **result, "allocator": active_allocator(), "probe_gflops": [before, speed_probe()]})
        return 0
    result = train(args.rows, args.steps, args.warmup)
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
