"""Test helpers for chat/serve/webui/export: tunelab checkpoints built directly on a tiny model, written
exactly as training writes them (tunelab_method.json via methods.save_trainable, tunelab_args.json), so
these tests do not depend on a training run. Weights are random and non-zero, so every checkpoint
changes the model's output.
"""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path

import torch

LORA_TARGETS = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
                "model.layers.2.mlp.down_proj"]
FREEZE_TARGETS = ["model.layers.3.mlp.down_proj", "model.layers.3.mlp.up_proj"]


def _base(base_dir: Path, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)


def write_run_args(out: Path, **values) -> None:
    """The options a checkpoint's run recorded (what inherit_from_checkpoint reads)."""
    (out / "tunelab_args.json").write_text(json.dumps({"template": "auto", **values}), encoding="utf-8")


def make_lora(base_dir: Path, out: Path, seed: int = 1, **run_args) -> Path:
    from peft import LoraConfig, get_peft_model

    from tunelab.methods import MethodInfo, save_trainable

    model = get_peft_model(_base(base_dir, seed), LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS,
                                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at 0 (a no-op adapter); make it count
                param.normal_(0.0, 0.5)
    save_trainable(model, out, MethodInfo("lora", LORA_TARGETS, [1, 2]), base_model=str(base_dir))
    write_run_args(out, **run_args)
    return out


def make_freeze(base_dir: Path, out: Path, seed: int = 2, **run_args) -> Path:
    from tunelab.methods import MethodInfo, save_trainable

    model = _base(base_dir, seed).requires_grad_(False)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in FREEZE_TARGETS:
            modules[name].requires_grad_(True)
            modules[name].weight.add_(torch.randn_like(modules[name].weight) * 0.5)
    save_trainable(model, out, MethodInfo("freeze", FREEZE_TARGETS, [3]), base_model=str(base_dir))
    write_run_args(out, **run_args)
    return out


def make_p_tuning(base_dir: Path, out: Path, seed: int = 3, **run_args) -> Path:
    from tunelab.methods import MethodInfo, save_trainable
    from tunelab.prefix import PrefixModel

    model = PrefixModel(_base(base_dir, seed), pre_seq_len=4)
    with torch.no_grad():
        model.encoder.embedding.weight.normal_(0.0, 1.0)
    info = MethodInfo("p_tuning", [], [0, 1, 2, 3], extra={"pre_seq_len": 4, "prefix_projection": False})
    save_trainable(model, out, info, base_model=str(base_dir))
    write_run_args(out, **run_args)
    return out


def make_full(base_dir: Path, out: Path, seed: int = 4, **run_args) -> Path:
    """A full fine-tuning checkpoint: the whole model (every weight nudged) plus its tokenizer."""
    from transformers import AutoTokenizer

    from tunelab.methods import MethodInfo, save_trainable

    model = _base(base_dir, seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    save_trainable(model, out, MethodInfo("full", [], [0, 1, 2, 3]), base_model=str(base_dir))
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    write_run_args(out, **run_args)
    return out


def free_port() -> socket.socket:
    """A listening-ready socket bound to a free loopback port (hand it to the server: no race)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def serving(app, timeout: float = 120):
    """`app` served by uvicorn in a thread on a free loopback port; yields its base url."""
    import threading
    import time

    import uvicorn

    sock = free_port()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + timeout
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "server did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def wait_for(predicate, seconds: float) -> bool:
    """Whether `predicate()` becomes true within `seconds` (polled)."""
    import time

    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False
