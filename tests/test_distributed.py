"""Multi-process runs on this CPU (gloo): 2-process DDP training follows the 1-process loss curve at the
same global batch, 2-process predict writes the same predictions and scores as 1 process, only rank 0
writes files, eval shards round-trip in order, and every shipped DeepSpeed / accelerate config loads
the way DeepSpeed's HF integration and `accelerate launch` read it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab import distributed
from tunelab.hparams import parse_args
from tunelab.train import run

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


# ---- sharding: pure ----

@pytest.mark.parametrize("n", [0, 1, 2, 5, 8])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_every_sample_once_and_merge_back_in_order(n, world):
    shards = [distributed.shard_indices(n, r, world) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
    answers = [[f"answer {i}" for i in s] for s in shards]  # each rank answers its own samples in its order
    assert distributed.merge_shards(answers, n) == [f"answer {i}" for i in range(n)]


def test_a_rank_with_missing_results_is_an_error():
    with pytest.raises(ValueError, match="rank 1 returned 1 results for 2 samples"):
        distributed.merge_shards([["a", "c"], ["b"]], 4)


def test_one_process_is_rank_0_of_1():
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.my_shard(3) == [0, 1, 2]
    assert distributed.gather_in_order(["x", "y"], 2) == ["x", "y"]


# ---- launched runs ----

@pytest.fixture
def one_thread():
    """In-process runs on one thread, like each launched process (OMP_NUM_THREADS=1): on a busy 2-core
    machine two spinning OpenMP threads per step slow a tiny model down ~10x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_same_answer_dataset(data_dir: Path, n: int = 16) -> Path:
    """Prompts of different lengths, one answer: every sample has the same number of supervised tokens.

    Why: tunelab's loss is a mean over one micro-batch's response tokens and DDP averages the ranks'
    gradients, so 2 x batch 2 equals 1 x batch 4 exactly only when the micro-batches weigh the same."""
    data_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": f"Say hello number {i}." + " Please." * (i % 4), "input": "",
             "output": "Hello! I am fine, thank you."} for i in range(n)]
    (data_dir / "same.json").write_text(json.dumps(rows), encoding="utf-8")
    columns = {"prompt": "instruction", "query": "input", "response": "output"}
    info = {"same": {"file_name": "same.json", "columns": columns}}
    (data_dir / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return data_dir


def train_argv(model_dir, data_dir, out, batch: int) -> list[str]:
    return ["--do_train", "--model_name_or_path", str(model_dir), "--dataset", "same", "--dataset_dir", str(data_dir),
            "--finetuning_type", "lora", "--lora_target", "qkv", "--lora_dropout", "0", "--learning_rate", "2e-2",
            "--output_dir", str(out), "--per_device_train_batch_size", str(batch), "--max_steps", "6",
            "--logging_steps", "1", "--save_steps", "3", "--lr_scheduler_type", "constant", "--seed", "0",
            "--bf16", "false", "--plot_loss"]


def launch(cmd: list[str]) -> None:
    """Run a launcher as a user would, from the repo root; show its output when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 processes share this machine's cores
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def test_two_process_ddp_follows_the_one_process_loss_curve(tiny_llama_dir, tmp_path, one_thread):
    """torchrun, 2 gloo processes x batch 2 == 1 process x batch 4: same samples per step (accelerate's
    seedable sampler deals the same permutation, each rank takes every other batch of 2), same LoRA init
    (seeded), no dropout: the curves agree to float noise, and the run dirs hold the same files."""
    data = write_same_answer_dataset(tmp_path / "data")
    one, two = tmp_path / "one", tmp_path / "two"
    run(parse_args(train_argv(tiny_llama_dir, data, one, batch=4)))
    launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "tunelab", "train", *train_argv(tiny_llama_dir, data, two, batch=2), "--ddp_backend", "gloo"])
    assert len(losses(one)) == 6
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    files = {p.name for p in one.iterdir() if p.is_file()}
    assert {"tunelab_args.json", "env.json", "trainable.json", "training_loss.png", "train_results.json"} <= files
    assert {p.name for p in two.iterdir() if p.is_file()} == files
    assert not list(two.rglob("*.tmp"))
    from safetensors.torch import load_file

    a, b = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-4 for k in a)


def predict_argv(model_dir, data_dir, out) -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--dataset", "tiny", "--dataset_dir", str(data_dir),
            "--output_dir", str(out), "--max_samples", "5", "--per_device_eval_batch_size", "2",
            "--max_new_tokens", "6", "--bf16", "false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_predict_writes_what_one_process_writes(tiny_llama_dir, tiny_data_dir, tmp_path, one_thread,
                                                            monkeypatch):
    """accelerate launch with the shipped DDP config, 2 processes on 5 samples (3 + 2): the gathered
    predictions are the 1-process ones in the same order, and so are the scores and the per-sample
    likelihoods (each rank computes its shard of the base pass: the launch gets an empty cache)."""
    one, two = tmp_path / "one", tmp_path / "two"
    from tunelab.cli import main

    assert main(["predict", *predict_argv(tiny_llama_dir, tiny_data_dir, one)]) == 0
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "launch_cache"))
    launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(EXAMPLES / "accelerate/ddp.yaml"),
            "--num_processes", "2", "--main_process_port", str(free_port()),
            "-m", "tunelab", "predict", *predict_argv(tiny_llama_dir, tiny_data_dir, two)])
    lines = (one / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5
    assert (two / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines() == lines
    r1, r2 = (json.loads((d / "predict_results.json").read_text()) for d in (one, two))
    for key in ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_samples"):
        assert r2[key] == r1[key], key
    assert r2["predict_loss"] == pytest.approx(r1["predict_loss"], rel=1e-5)  # summed in another order
    l1, l2 = ([json.loads(x) for x in (d / "likelihood.jsonl").read_text().splitlines()] for d in (one, two))
    assert [x["index"] for x in l2] == list(range(5)) and [x["tokens"] for x in l2] == [x["tokens"] for x in l1]
    assert [x["nll"] for x in l2] == pytest.approx([x["nll"] for x in l1], abs=1e-5)
    assert len(list((tmp_path / "launch_cache/likelihood").glob("*.safetensors"))) == 1  # rank 0 cached it
    assert {p.name for p in two.iterdir()} == {p.name for p in one.iterdir()}


def test_only_rank_0_writes(tiny_llama_dir, tiny_data_dir, tmp_path, monkeypatch, one_thread):
    """As a rank other than 0 a run writes nothing of its own: no run files, results, plot or predictions.
    (What the HF Trainer saves, weights and their tunelab_args.json included, it gates by its own rank.)"""
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    out = tmp_path / "train"
    argv = ["--do_train", "--model_name_or_path", str(tiny_llama_dir), "--dataset", "tiny", "--dataset_dir",
            str(tiny_data_dir), "--output_dir", str(out), "--max_steps", "1", "--bf16", "false", "--plot_loss"]
    run(parse_args(argv))
    assert not {"env.json", "trainable.json", "training_loss.png"} & {p.name for p in out.iterdir()}
    pred = tmp_path / "pred"
    results = run(parse_args(["--do_predict", *predict_argv(tiny_llama_dir, tiny_data_dir, pred)]))
    assert results["predict_samples"] == 5 and not pred.exists()


# ---- shipped configs ----

# DeepSpeed keys HF's integration fills from TrainingArguments when they say "auto"
# (transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig.trainer_config_process / _finalize)
HF_AUTO_KEYS = {
    "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping",
    "fp16.enabled", "bf16.enabled", "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.stage3_param_persistence_threshold",
}


def _auto_keys(node: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in node.items():
        if isinstance(value, dict):
            out |= _auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            out.add(prefix + key)
    return out


@pytest.mark.parametrize("name, stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_configs_load_as_the_hf_integration_reads_them(name, stage):
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    path = EXAMPLES / f"deepspeed/{name}.json"
    config = json.loads(path.read_text())
    assert _auto_keys(config) <= HF_AUTO_KEYS  # any other "auto" would reach DeepSpeed unfilled
    assert "optimizer" not in config and "scheduler" not in config  # the Trainer's AdamW and schedule, as without DS
    ds = HfDeepSpeedConfig(str(path))
    assert ds.get_value("zero_optimization.stage") == stage and not ds.is_offload()
    if stage == 3:  # save_model needs the full 16-bit weights gathered from the shards
        assert ds.get_value("zero_optimization.stage3_gather_16bit_weights_on_model_save") is True
    assert DeepSpeedPlugin(hf_ds_config=str(path)).zero_stage == stage


def test_deepspeed_flag_reaches_training_arguments():
    from tunelab.hparams import option_names

    assert "deepspeed" in option_names()
    argv = ["--do_train", "--output_dir", "x", "--deepspeed", str(EXAMPLES / "deepspeed/zero2.json")]
    try:
        import deepspeed  # noqa: F401
    except ImportError:  # HF names the missing package when it builds its DeepSpeed config
        with pytest.raises(ImportError, match="deepspeed"):
            parse_args(argv)
        return
    assert parse_args(argv).training.deepspeed.endswith("zero2.json")


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP")])
def test_accelerate_configs_load_as_accelerate_launch_reads_them(name, kind, monkeypatch):
    """accelerate's own loader and launcher turn each file into the environment the Trainer reads."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = EXAMPLES / f"accelerate/{name}.yaml"
    config = ClusterConfig.from_yaml_file(str(path))  # unknown top-level keys fail here
    assert str(config.distributed_type).endswith(kind) and config.mixed_precision == "no"  # precision: tunelab flags
    launcher_flags = {a.dest for a in launch_command_parser()._actions}
    assert set(config.fsdp_config) <= launcher_flags
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "tunelab", "train"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    if kind == "FSDP":
        from accelerate.utils import FullyShardedDataParallelPlugin

        for key, value in env.items():
            monkeypatch.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher set
        assert plugin.fsdp_version == 2 and "FULL_STATE_DICT" in str(plugin.state_dict_type)
        assert env["ACCELERATE_USE_FSDP"] == "true"


def test_leave_destroys_this_processs_group_and_is_a_no_op_without_one(tmp_path):
    import torch.distributed as dist

    from tunelab import distributed

    distributed.leave()  # no group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert distributed.world_size() == 1 and dist.is_initialized()
    distributed.leave()
    assert not dist.is_initialized()
