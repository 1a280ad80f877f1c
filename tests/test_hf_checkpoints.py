"""The pickle-free checkpoint workaround: a checkpoint holds every file its overrides write and no pickle
(so a transformers that renamed a private method would fail here), and optimizer and scaler state
round-trip exactly through safetensors + JSON."""

import json

import torch
from transformers import AutoModelForCausalLM

from tunelab.hf_checkpoints import (OPTIMIZER_FILE, SCALER_FILE, STATE_FILE, PickleFreeCheckpoints,
                                    _flatten_optimizer_state, _unflatten_optimizer_state)
from tunelab.hparams import FinetuningArguments
from tunelab.methods import prepare_model
from tunelab.trainer import TunelabTrainer

from test_speed import _rows, _train


def test_checkpoint_holds_safetensors_and_json_and_no_pickle(tiny_llama_dir, tiny_tokenizer, tmp_path):
    model, info = prepare_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                FinetuningArguments(lora_target="q_proj,v_proj"))
    _train(TunelabTrainer, model, tiny_tokenizer, _rows(len(tiny_tokenizer)), tmp_path,
           training={"save_strategy": "steps", "save_steps": 4}, processing_class=tiny_tokenizer,
           method_info=info, base_model=str(tiny_llama_dir), run_args={"seed": 0})
    files = {p.name for p in (tmp_path / "checkpoint-4").iterdir()}
    assert {OPTIMIZER_FILE, STATE_FILE, "rng_state.safetensors", "rng_state.json", "tunelab_args.json",
            "adapter_model.safetensors", "tunelab_method.json", "trainer_state.json"} <= files, files
    assert not [f for f in files if f.endswith((".pt", ".pth", ".bin", ".pkl"))], files


def test_optimizer_state_round_trip():
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    for _ in range(2):
        sum((p ** 2).sum() for p in params).backward()
        opt.step()
    state = opt.state_dict()
    tensors, skeleton = _flatten_optimizer_state(state)
    skeleton = json.loads(json.dumps(skeleton))  # must survive JSON
    restored = _unflatten_optimizer_state(tensors, skeleton)
    opt2 = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    opt2.load_state_dict(restored)
    for pid, per_param in state["state"].items():
        for key, value in per_param.items():
            assert torch.equal(torch.as_tensor(opt2.state_dict()["state"][pid][key]), torch.as_tensor(value))


def test_scaler_state_round_trips_through_json(tmp_path):
    """fp16's gradient scaler: what _save_scaler writes, _load_scaler reads back on resume."""
    class Host(PickleFreeCheckpoints):
        def __init__(self, scaler):
            self.accelerator = type("Accelerator", (), {"scaler": scaler})()
            self.args = type("Args", (), {"should_save": True})()

    saved = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    saved.scale(torch.ones(()))  # the scale tensor exists from the first scaled loss on
    saved.update(new_scale=256.0)
    Host(saved)._save_scaler(str(tmp_path))
    assert json.loads((tmp_path / SCALER_FILE).read_text())["scale"] == 256.0
    loaded = torch.amp.GradScaler("cpu")
    Host(loaded)._load_scaler(str(tmp_path))
    assert loaded.state_dict() == saved.state_dict()
    Host(loaded)._load_scaler(str(tmp_path / "missing"))  # no file: nothing to restore, no error
