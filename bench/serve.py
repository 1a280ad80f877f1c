"""`tunelab serve` throughput: 8 concurrent clients against one client asking the same requests in turn.

    python -m bench.serve                        # 16 chat requests, 32 new tokens each, greedy (~1-2 min, 2 cores)
    python -m bench.serve --model path/to/model  # a real model directory (e.g. the default model's snapshot)
    python -m bench.serve --clients 4 --requests 32 --max-tokens 64
    python -m bench.serve --quick                # 8 requests, 16 new tokens, 6 layers (a busy machine)

The server is tunelab's own app (tunelab.serve_app.create_app, batching with its defaults) under uvicorn on a
loopback port in this process; the clients are the official `openai` client in threads. Without --model
the model is SmolLM2-135M's shape (30 layers, hidden 576, GQA 9/3 heads) with random weights and a small
byte-level tokenizer (vocab ~320 instead of 49152, so the output projection is cheaper than the real one's),
built offline in a temporary folder: throughput does not depend on the weights, and nothing downloads.
Printed: requests/s and completion tokens/s of each side, the speed-up (concurrent over sequential), the
batch sizes the server formed, and the machine (CPU model and its vector class from /proc/cpuinfo flags).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from bench.common import machine

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)


def cpu_class() -> str:
    """The CPU's widest vector / matrix extension, from /proc/cpuinfo flags."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    have = set(flags.split(":", 1)[1].split())
    for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX-512"),
                       ("avx2", "AVX2")):
        if flag in have:
            return name
    return "x86-64 baseline"


def random_model(out: Path, layers: int) -> Path:
    """SmolLM2-135M's shape, random weights, the tests' tiny byte-level tokenizer (ChatML template)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.conftest import build_tiny_tokenizer

    tok = build_tiny_tokenizer(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None, **{**SMOLLM2_135M, "num_hidden_layers": layers})
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    return out


def run_clients(client, prompts: list[str], clients: int, max_tokens: int) -> tuple[float, int]:
    """(seconds, completion tokens) for `clients` threads sharing the prompts round-robin."""
    tokens = [0] * clients

    def one(c: int) -> None:
        for prompt in prompts[c::clients]:
            out = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=max_tokens, temperature=0)
            tokens[c] += out.usage.completion_tokens

    threads = [threading.Thread(target=one, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, sum(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: random weights in SmolLM2-135M's shape)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=30, help="layers of the random model (SmolLM2-135M: 30)")
    parser.add_argument("--quick", action="store_true", help="--requests 8 --max-tokens 16 --layers 6")
    opts = parser.parse_args()
    if opts.quick:
        opts.requests, opts.max_tokens, opts.layers = 8, 16, 6

    import openai

    from tests.chat_helpers import serving
    from tunelab.engine import ChatEngine
    from tunelab.hparams import parse_args
    from tunelab.serve_app import create_app

    with tempfile.TemporaryDirectory() as tmp:
        path = opts.model or str(random_model(Path(tmp), opts.layers))
        engine = ChatEngine.from_args(parse_args(["--model_name_or_path", path]), name="bench")
        prompts = [f"Question {i}: give {i % 5 + 2} tips for staying healthy." for i in range(opts.requests)]
        with serving(create_app(engine, None, max_tokens_limit=opts.max_tokens)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=600)
            run_clients(client, prompts[:1], 1, 4)  # warm-up
            engine.scheduler.batch_sizes.clear()
            seq_s, seq_tokens = run_clients(client, prompts, 1, opts.max_tokens)
            print(f"1 client: {seq_s:.1f} s", flush=True)
            con_s, con_tokens = run_clients(client, prompts, opts.clients, opts.max_tokens)
            batches = list(engine.scheduler.batch_sizes)[opts.requests:]
    info = machine()
    print(f"machine: {info['cpu']} ({cpu_class()}), {info['cores']} cores, torch {info['torch']} "
          f"({info['torch_threads']} threads), load {tuple(round(x, 1) for x in info['load_avg'])}")
    shape = f"random SmolLM2-135M shape with {opts.layers} layers, tiny vocab"
    print(f"model: {opts.model or shape}, fp32, greedy, {opts.requests} requests x "
          f"<= {opts.max_tokens} new tokens")
    for label, secs, toks in (("1 client, in turn", seq_s, seq_tokens),
                              (f"{opts.clients} concurrent clients", con_s, con_tokens)):
        print(f"  {label:24s} {secs:7.1f} s  {opts.requests / secs:6.2f} req/s  {toks / secs:7.1f} tok/s")
    print(f"  speed-up (tok/s): {(con_tokens / con_s) / (seq_tokens / seq_s):.2f}x; concurrent batch sizes: {batches}")


if __name__ == "__main__":
    main()
