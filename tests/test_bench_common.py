"""bench.common's step meter: per step, the real tokens and samples of the collated batch (what tunelab packs,
not the packed row) and the rows through the output projection."""

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, TrainingArguments

from tunelab.hparams import FinetuningArguments
from tunelab.methods import prepare_model
from tunelab.trainer import TunelabTrainer


def test_meter_counts_real_tokens_samples_and_head_rows(tiny_llama_dir, tiny_tokenizer, tmp_path):
    from bench.common import make_step_meter

    model, info = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                FinetuningArguments(finetuning_type="lora", lora_target="q_proj,v_proj"))
    g = torch.Generator().manual_seed(0)
    lengths = [9, 6, 11, 7, 5, 10]  # per batch of 3: 26 and 22 real tokens, padded to 33 and 30
    rows = []
    for length in lengths:
        ids = torch.randint(0, model.config.vocab_size, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    meter = make_step_meter(model, model.config.vocab_size, warmup=0)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=2, use_cpu=True,
                             save_strategy="no", report_to=[], logging_steps=1, disable_tqdm=True,
                             train_sampling_strategy="sequential", remove_unused_columns=False)
    trainer = TunelabTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             data_collator=meter.counting(DataCollatorForSeq2Seq(tiny_tokenizer, padding=True)),
                             callbacks=[meter], method_info=info, base_model=str(tiny_llama_dir), run_args={})
    trainer.train()
    steps = meter.summary()["steps"]
    assert [s["tokens"] for s in steps] == [26, 22]
    assert [s["samples"] for s in steps] == [3, 3]
    # supervised targets per sample: length - 2 (labels from position 2), the first token never predicted
    assert [s["head_rows"] for s in steps] == [26 - 6, 22 - 6]
    assert all(s["flops"] > 0 and s["time"] > 0 for s in steps)
