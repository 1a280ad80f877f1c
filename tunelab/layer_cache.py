"""Cached lower-layer activations: run only layers k.. when nothing below layer k trains.

A LoRA or Freeze run whose trainable weights all sit in layers >= k (the 2023 grid's "last 3" rows) feeds
layer k exactly what the base model computes from the same tokens: embeddings and layers 0..k-1 are frozen
and (checked) free of dropout. So the layer-k input of every sample is computed once — on the first batch
that holds the sample, with the model's own lower layers, in the batch's own layout — stored, and reused by
every later epoch, by the eval loss pass and, through the disk cache, by every run of a study on the same
base model. Layers k.. then run on it as before: same attention masks, rotary embeddings and position ids
(the model still computes them from position_ids / attention_mask), so losses and gradients equal the full
model's up to float rounding (tests/test_layer_cache.py).

    k = lowest_trainable_layer(model, info)                 # None: the method or model does not allow it
    with cached_lower_layers(model, k, LayerInputStore(...)) as store: trainer.train()
    with lower_layer_cache(model, info, args): trainer.train()   # both in one, what train/evaluate call

How: layers 0..k-1 are swapped for pass-through modules that share their parameters (so every parameter
name — what LoRA/Freeze save, what the optimizer sees — is unchanged); a forward pre-hook on the decoder
replaces input_ids by the samples' cached layer-k inputs, and a pre-hook on layer k hands those to it (so
anything the decoder does between its embeddings and its first layer is skipped too). Everything is put
back when the block ends, also on error. Samples are found by their token ids: right-padded rows [B, T]
(each row one sample, padding gets zeros) and packed padding-free rows [1, N] whose position_ids restart
at 0 per sample. Any other layout, and any call that uses a KV cache or asks for hidden states
(generation), runs the full model unchanged: decoding needs the lower layers' KV cache for the prompt too.

Disk cache: `<cache>/layer_inputs/<key>/*.safetensors`, key = hash(lower-layer weights + config, k,
autocast precision); one tensor per sample named by the hash of its token ids (so data rows, template
and tokenizer are covered), in the dtype the full forward has there (the fp32 residual stream under
autocast). Each file's header repeats fingerprint, k and precision; a file that disagrees is refused.
Delete the folder to reclaim the space.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.errors import TunelabError

logger = logging.getLogger(__name__)

FORMAT = "tunelab-layer-inputs-1"
# Decoders that run embed -> layers[i](hidden, mask, position_embeddings, ...) with nothing per layer derived
# from input_ids (checked against transformers 5.24's modeling files); others keep the full model.
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "glm", "olmo2", "smollm3", "granite", "gemma", "gemma2",
                 "phi3", "starcoder2")
CACHED_METHODS = ("lora", "freeze")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_logged: set[str] = set()


def _log_once(message: str, *args: Any) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message, *args)


# ---- when it applies ----

def decoder_of(model: nn.Module) -> nn.Module | None:
    """The decoder stack (`model.model` with embed_tokens and layers) of a plain or peft-wrapped transformers
    causal LM of a supported architecture; None otherwise."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(hf, "config", None)
    decoder = getattr(hf, "model", None)
    if config is None or not type(hf).__module__.startswith("transformers."):
        return None
    if config.model_type not in ARCHITECTURES:
        _log_once("lower-layer cache: not for model type %s (supported: %s); the full model runs",
                  config.model_type, ", ".join(ARCHITECTURES))
        return None
    if not isinstance(getattr(decoder, "embed_tokens", None), nn.Module) \
            or not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        return None
    return decoder


def _method_fields(method: Any) -> tuple[str, list[str]]:
    """(finetuning_type, resolved module names) of a MethodInfo or a checkpoint's tunelab_method.json dict."""
    if isinstance(method, dict):
        return method.get("finetuning_type", "none"), list(method.get("modules") or [])
    return method.finetuning_type, list(method.modules)


def lowest_trainable_layer(model: nn.Module, method: Any) -> int | None:
    """k such that every weight the method trains sits in layers >= k and the lower part is frozen and
    dropout-free, so layers 0..k-1 compute exactly what the base model does; None when that does not hold
    (P-Tuning, full, none, targets outside the layer stack, k == 0, unsupported architectures)."""
    kind, modules = _method_fields(method)
    if kind not in CACHED_METHODS or not modules:
        return None
    layers = [_LAYER.match(name) for name in modules]
    if not all(layers):
        return None  # e.g. lm_head or embeddings train
    k = min(int(m.group(1)) for m in layers)
    decoder = decoder_of(model) if k > 0 else None
    if decoder is None:
        return None
    lower = [decoder.embed_tokens, *decoder.layers[:k]]
    if any(p.requires_grad for part in lower for p in part.parameters()):
        return None
    if _has_dropout(decoder.config, lower):
        _log_once("lower-layer cache: the model's lower layers use dropout; the full model runs")
        return None
    return k


def _has_dropout(config, modules: list[nn.Module]) -> bool:
    text = config.get_text_config()
    rates = [v for name, v in vars(text).items() if ("dropout" in name or "pdrop" in name) and isinstance(v, float)]
    dropouts = [m.p for part in modules for m in part.modules() if isinstance(m, nn.Dropout)]
    return any(r > 0 for r in rates + dropouts)


def cache_switched_on(cache_lower_layers: bool, torch_compile: Any, deepspeed: Any, fsdp: Any) -> bool:
    """Whether the options let the cache run at all (--cache_lower_layers, and no torch.compile, DeepSpeed or
    FSDP, whose engines own the parameters and graphs); the study's planning asks the same question."""
    return bool(cache_lower_layers) and not (torch_compile or deepspeed or fsdp)


def lower_layer_cache(model: nn.Module, method: Any, args) -> contextlib.AbstractContextManager:
    """The call site's one line: cached lower layers for this model and method when they apply and
    `--cache_lower_layers` is on (not under torch.compile, DeepSpeed or FSDP, whose engines own the
    parameters and graphs); otherwise a no-op. Yields the store or None."""
    training = args.training
    if not cache_switched_on(args.finetune.cache_lower_layers, training.torch_compile, training.deepspeed,
                             training.fsdp):
        return contextlib.nullcontext()
    k = lowest_trainable_layer(model, method)
    if k is None:
        return contextlib.nullcontext()
    from tunelab.paths import cache_dir

    store = LayerInputStore(lower_layers_fingerprint(decoder_of(model), k), k, cache_dir("layer_inputs"))
    return cached_lower_layers(model, k, store)


# ---- the store ----

def lower_layers_fingerprint(decoder: nn.Module, k: int) -> str:
    """Hash of everything layers 0..k-1 compute from: the config and the embeddings', lower layers' and
    rotary tables' tensors (names, dtypes, shapes, bytes) — merged checkpoints and other bases differ."""
    h = hashlib.blake2b(digest_size=16)
    config = {key: v for key, v in decoder.config.to_dict().items() if not key.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    skip = tuple(f"layers.{i}." for i in range(k, len(decoder.layers))) + ("norm.",)
    tensors = [*decoder.named_parameters(), *decoder.named_buffers()]
    for name, t in sorted(tensors, key=lambda item: item[0]):
        if name.startswith(skip):
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sample_key(ids: torch.Tensor) -> str:
    """Identity of a sample: the hash of its token ids."""
    return hashlib.blake2b(ids.to(torch.int64).cpu().numpy().tobytes(), digest_size=16).hexdigest()


class LayerInputStore:
    """Layer-k inputs by sample key: in memory for the run, and on disk (root None: memory only) under
    <root>/<hash of fingerprint, k, precision>/ for every run on the same lower layers. Counts the samples
    it computed, reused (served to a batch) and read from disk, and the tokens layers 0..k-1 ran over
    (`computed_tokens`: what the study's FLOP count takes from records(), tunelab/study/efficiency.py)."""

    def __init__(self, fingerprint: str, k: int, root: Path | None):
        self.fingerprint, self.k, self.root = fingerprint, k, root
        self.precision: str | None = None
        self.memory: dict[str, torch.Tensor] = {}
        self.new: dict[str, torch.Tensor] = {}
        self.on_disk: dict[str, Path] = {}
        self.computed = self.reused = self.read = self.computed_tokens = 0

    def records(self) -> dict[str, int]:
        """What a run records of the cache in its results: the layer it fed (`cached_layer`) and the tokens
        its layers below ran over (`lower_layer_tokens`; 0 when every sample came from disk)."""
        return {"cached_layer": self.k, "lower_layer_tokens": self.computed_tokens}

    def header(self) -> dict[str, str]:
        return {"format": "pt", "tunelab": FORMAT, "fingerprint": self.fingerprint, "k": str(self.k),
                "precision": str(self.precision)}

    @property
    def directory(self) -> Path | None:
        if self.root is None:
            return None
        key = hashlib.blake2b(json.dumps(self.header(), sort_keys=True).encode(), digest_size=12).hexdigest()
        return Path(self.root) / key

    def bind(self, precision: str) -> None:
        """Fix the autocast precision (known at the first forward) and index the disk cache for it."""
        if precision == self.precision:
            return
        self.save()
        self.precision, self.memory, self.on_disk = precision, {}, {}
        directory = self.directory
        if directory is None or not directory.is_dir():
            return
        from safetensors import safe_open

        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}) != self.header():
                    raise TunelabError(f"layer-input cache file {path} belongs to another model, layer or precision "
                                       f"({f.metadata()}); delete {directory}")
                self.on_disk.update(dict.fromkeys(f.keys(), path))

    def get(self, key: str) -> torch.Tensor | None:
        if key not in self.memory and key in self.on_disk:
            from safetensors.torch import load_file

            shard = load_file(str(self.on_disk[key]))
            self.read += sum(name not in self.memory for name in shard)
            self.memory.update(shard)
        return self.memory.get(key)

    def put(self, key: str, value: torch.Tensor) -> None:
        if key in self.memory:
            return
        with torch.inference_mode(False):  # a normal tensor, usable by training after an eval pass
            value = value.detach().to("cpu", copy=True)
        self.memory[key] = self.new[key] = value
        self.computed += 1

    def save(self) -> None:
        """Write this run's new samples as one shard (atomically: other runs may be reading the folder)."""
        directory = self.directory
        if not self.new or directory is None:
            self.new = {}
            return
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = directory / f"{name}.tmp"
        save_file(self.new, str(tmp), metadata=self.header())
        tmp.replace(directory / f"{name}.safetensors")
        self.on_disk.update(dict.fromkeys(self.new, directory / f"{name}.safetensors"))
        self.new = {}


# ---- the swap ----

class _Reached(Exception):
    """Raised at layer k's input while computing lower layers: the rest of the model is not needed."""


class _Mode:
    """Shared switch: while `full` is set the skipped layers run their original layers."""

    full = False


class SkippedLayer(nn.Module):
    """Stands in for a lower decoder layer: returns its input unchanged, or runs the original layer while
    the mode says so. Holds the original's parameters, buffers and children under the same names."""

    def __init__(self, layer: nn.Module, mode: _Mode):
        super().__init__()
        for name, child in layer.named_children():
            self.add_module(name, child)
        for name, param in layer.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in layer.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in layer._non_persistent_buffers_set)
        self.mode = mode
        object.__setattr__(self, "original", layer)  # not a child: names stay those of the layer

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "original":
                raise
            return getattr(self.original, name)  # e.g. attention_type, read by some decoders

    def forward(self, *args, **kwargs):
        if self.mode.full:
            return self.original(*args, **kwargs)
        return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def cached_lower_layers(model: nn.Module, k: int, store: LayerInputStore) -> Iterator[LayerInputStore]:
    """Within the block `model` runs layers k.. on the samples' cached layer-k inputs (see the module
    docstring); yields the store. Everything is put back on exit, also on error; new samples go to disk."""
    decoder = decoder_of(model)
    if decoder is None or not 0 < k < len(decoder.layers):
        raise TunelabError(f"cannot cache the layers below {k} of this model")
    run = _CachedRun(decoder, k, store)
    originals = list(decoder.layers[:k])
    handles = []
    try:
        for i, layer in enumerate(originals):
            decoder.layers[i] = SkippedLayer(layer, run.mode)
        handles = [decoder.register_forward_pre_hook(run.before_decoder, with_kwargs=True),
                   decoder.register_forward_hook(run.after_decoder, always_call=True),
                   decoder.layers[k].register_forward_pre_hook(run.before_layer_k, with_kwargs=True)]
        logger.info("lower-layer cache: layers 0-%d run once per sample, layers %d-%d every step",
                    k - 1, k, len(decoder.layers) - 1)
        yield store
    finally:
        for handle in handles:
            handle.remove()
        for i, layer in enumerate(originals):
            decoder.layers[i] = layer
        store.save()
        logger.info("lower-layer cache (k=%d): %d samples computed, %d reused (%d read from disk)",
                    k, store.computed, store.reused, store.read)


class _CachedRun:
    """The hooks of one cached block: look samples up or compute them before the decoder runs, hand the
    layer-k inputs to layer k, and let calls the cache cannot serve run the full model."""

    def __init__(self, decoder: nn.Module, k: int, store: LayerInputStore):
        self.decoder, self.k, self.store = decoder, k, store
        self.mode = _Mode()
        self.hidden: torch.Tensor | None = None  # the current call's layer-k input
        self.full_call = False

    def before_decoder(self, module, args, kwargs):
        if self.mode.full:
            return None  # computing lower layers (a nested call): run as is
        if args or not self._cacheable(kwargs):
            self.mode.full = self.full_call = True
            return None
        from tunelab.speedups import active_autocast_dtype

        ids = kwargs["input_ids"]
        self.store.bind(str(active_autocast_dtype(ids.device) or "none"))
        segments = sample_segments(ids, kwargs.get("attention_mask"), kwargs.get("position_ids"))
        self.hidden = self._lookup(ids, segments) if segments else None
        if self.hidden is None:
            self.hidden = self._compute(kwargs)
            self.store.computed_tokens += _real_tokens(ids, kwargs.get("attention_mask"), segments)
            for (row, start, length), key in zip(segments or [], _keys(ids, segments or [])):
                self.store.put(key, self.hidden[row, start:start + length])
        if getattr(module.layers[self.k], "gradient_checkpointing", False) and torch.is_grad_enabled():
            self.hidden = self.hidden.detach().requires_grad_(True)  # reentrant checkpointing needs an input with grad
        embeds = self.hidden.to(module.embed_tokens.weight.dtype)  # what the decoder builds masks and rotary from
        return args, {**kwargs, "input_ids": None, "inputs_embeds": embeds}

    def after_decoder(self, module, args, output):
        if self.full_call:
            self.mode.full = self.full_call = False
        self.hidden = None

    def before_layer_k(self, module, args, kwargs):
        if self.mode.full or self.hidden is None:
            return None
        if args:
            return (self.hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.hidden}

    def _cacheable(self, kwargs: dict) -> bool:
        """Input ids, no KV cache and no per-layer outputs asked for: a call the cache can serve exactly."""
        config = self.decoder.config
        use_cache = kwargs.get("use_cache")
        wants = [use_cache if use_cache is not None else config.use_cache]
        wants += [kwargs.get(name) if kwargs.get(name) is not None else getattr(config, name, False)
                  for name in ("output_hidden_states", "output_attentions")]
        caches = [kwargs.get(name) for name in ("cache", "past_key_values")]
        return (isinstance(kwargs.get("input_ids"), torch.Tensor) and kwargs.get("inputs_embeds") is None
                and not any(wants) and all(c is None for c in caches))

    def _lookup(self, ids: torch.Tensor, segments: list[tuple[int, int, int]]) -> torch.Tensor | None:
        """The batch's layer-k input assembled from stored samples (zeros at padding); None on any miss."""
        states = [self.store.get(key) for key in _keys(ids, segments)]
        if any(s is None for s in states):
            return None
        self.store.reused += len(states)
        out = torch.zeros(*ids.shape, states[0].shape[-1], dtype=states[0].dtype, device=ids.device)
        for (row, start, length), state in zip(segments, states):
            out[row, start:start + length] = state
        return out

    def _compute(self, kwargs: dict) -> torch.Tensor:
        """The batch's layer-k input as the model itself computes it: the decoder with its original lower
        layers, stopped at layer k's input."""
        captured: list[torch.Tensor] = []

        def grab(module, args, kw):
            captured.append(args[0] if args else kw["hidden_states"])
            raise _Reached

        handle = self.decoder.layers[self.k].register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
        self.mode.full = True
        try:
            with torch.no_grad():
                self.decoder(**kwargs)
        except _Reached:
            pass
        finally:
            handle.remove()
            self.mode.full = False
        if not captured:
            raise RuntimeError(f"layer {self.k} was never reached while computing its input")
        return captured[0].detach()


def _real_tokens(ids: torch.Tensor, attention_mask: torch.Tensor | None, segments) -> int:
    """The tokens of a batch that are not padding."""
    if segments:
        return sum(length for _, _, length in segments)
    return int(attention_mask.sum()) if attention_mask is not None and attention_mask.dim() == 2 else ids.numel()


def _keys(ids: torch.Tensor, segments: list[tuple[int, int, int]]) -> list[str]:
    ids = ids.cpu()
    return [sample_key(ids[row, start:start + length]) for row, start, length in segments]


def sample_segments(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    position_ids: torch.Tensor | None) -> list[tuple[int, int, int]] | None:
    """(row, start, length) of every sample in a batch whose samples each see positions 0..L-1 from their
    own tokens only: right-padded rows [B, T] (one sample per row) or packed rows whose position_ids
    restart at 0 per sample (no padding). None for any other layout (it then runs uncached)."""
    if input_ids.dim() != 2:
        return None
    rows, width = input_ids.shape
    if position_ids is None:
        if attention_mask is None:
            return [(row, 0, width) for row in range(rows)]
        mask = attention_mask.bool()
        if mask.dim() != 2:
            return None
        lengths = mask.sum(1)
        if not bool((mask == (torch.arange(width, device=mask.device) < lengths[:, None])).all()):
            return None  # left padding: positions would not start at 0
        return [(row, 0, int(n)) for row, n in enumerate(lengths.tolist()) if n]
    if position_ids.shape != input_ids.shape or (attention_mask is not None and not bool(attention_mask.bool().all())):
        return None
    segments = []
    for row, pos in enumerate(position_ids.cpu()):
        starts = [0] + (torch.nonzero(pos[1:] - pos[:-1] != 1).flatten() + 1).tolist()
        if any(int(pos[s]) != 0 for s in starts):
            return None
        segments += [(row, s, e - s) for s, e in zip(starts, starts[1:] + [width])]
    return segments
