"""Which modules LoRA and Freeze train: one pure resolver from user target strings to module names.

Both methods take a comma list of targets and, optionally, a layer spec. A target is a group
(qkv, o, mlp_in, mlp_out, attn, mlp, all), a 2023 ChatGLM name (query_key_value, dense, dense_h_to_4h,
dense_4h_to_h, attention.query_key_value, ...) or a raw module name (q_proj, self_attn.q_proj, lm_head),
optionally prefixed by a layer index ("25.attention.query_key_value"). Groups map to each
architecture's own module names through ARCH_GROUPS, so the 2023 ChatGLM commands run on any HF causal LM.

    from tunelab.targets import resolve_targets, parse_layer_spec
    names = resolve_targets(leaf_names, "llama", 28, "qkv", layers=parse_layer_spec("last:3", 28))
    # ['model.layers.25.self_attn.k_proj', 'model.layers.25.self_attn.q_proj', ...]

Everything here works on lists of module names (this file never touches torch), so it is unit-tested without a model.
"""

from __future__ import annotations

import re

from tunelab.errors import TunelabError

TARGET_MATCH_MODES = ("strict", "legacy")  # strict: '2.x' is layer 2; legacy: 2023 PEFT suffix matching

BASE_GROUPS = ("qkv", "o", "mlp_in", "mlp_out")

# Every name a user may give for a set of base groups (the base groups stand for themselves).
COMPOSITE_GROUPS: dict[str, tuple[str, ...]] = {
    **{g: (g,) for g in BASE_GROUPS},
    "attn": ("qkv", "o"),
    "mlp": ("mlp_in", "mlp_out"),
    "all": BASE_GROUPS,
}

# ChatGLM-6B (v1: layers.N.attention.*, v2: encoder.layers.N.self_attention.*) module names used by the
# 2023 commands, mapped to the group they denote, so `--lora_target query_key_value` means q/k/v anywhere.
ALIASES: dict[str, str] = {
    "query_key_value": "qkv", "attention.query_key_value": "qkv", "self_attention.query_key_value": "qkv",
    "dense": "o", "attention.dense": "o", "self_attention.dense": "o",
    "dense_h_to_4h": "mlp_in", "mlp.dense_h_to_4h": "mlp_in",
    "dense_4h_to_h": "mlp_out", "mlp.dense_4h_to_h": "mlp_out",
}


def _arch(qkv: tuple[str, ...], o: tuple[str, ...], mlp_in: tuple[str, ...],
          mlp_out: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    return {"qkv": qkv, "o": o, "mlp_in": mlp_in, "mlp_out": mlp_out}


_LLAMA = _arch(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
               ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
# GPT-2 style: c_proj is both the attention output and the MLP output, hence the dotted suffixes.
_GPT2 = _arch(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",))


def _neox(*attention: str) -> dict[str, tuple[str, ...]]:
    """GPT-NeoX / BLOOM / Falcon / ChatGLM names under the given attention module name(s)."""
    return _arch(tuple(f"{a}.query_key_value" for a in attention), tuple(f"{a}.dense" for a in attention),
                 ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",))


# model_type -> base group -> module-name suffixes relative to the layer (checked against transformers
# 5.24 by tests/test_targets.py). Adding an architecture is one entry plus one test row.
ARCH_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    **dict.fromkeys(("llama", "mistral", "ministral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                     "olmo", "olmo2", "granite", "stablelm", "cohere", "smollm3", "helium"), _LLAMA),
    **dict.fromkeys(("glm", "glm4"), _arch(_LLAMA["qkv"], _LLAMA["o"], ("mlp.gate_up_proj",), ("mlp.down_proj",))),
    "phi3": _arch(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    "phi": _arch(_LLAMA["qkv"], ("self_attn.dense",), ("mlp.fc1",), ("mlp.fc2",)),
    "starcoder2": _arch(_LLAMA["qkv"], _LLAMA["o"], ("mlp.c_fc",), ("mlp.c_proj",)),
    "gpt2": _GPT2,
    "gpt_bigcode": _GPT2,
    "gpt_neox": _neox("attention"),
    **dict.fromkeys(("falcon", "bloom"), _neox("self_attention")),
    "chatglm": _neox("attention", "self_attention"),  # remote code: ChatGLM-6B v1 and ChatGLM2/3-6B
    "opt": _arch(_LLAMA["qkv"], ("self_attn.out_proj",), ("fc1",), ("fc2",)),
    "gptj": _arch(("attn.q_proj", "attn.k_proj", "attn.v_proj"), ("attn.out_proj",), ("mlp.fc_in",), ("mlp.fc_out",)),
    "codegen": _arch(("attn.qkv_proj",), ("attn.out_proj",), ("mlp.fc_in",), ("mlp.fc_out",)),
    "mpt": _arch(("attn.Wqkv",), ("attn.out_proj",), ("ffn.up_proj",), ("ffn.down_proj",)),
    "baichuan": _arch(("self_attn.W_pack",), _LLAMA["o"], _LLAMA["mlp_in"], _LLAMA["mlp_out"]),  # remote code
}

# For model types not in the table: common projection names across HF causal LMs. Only the ones a model
# actually has are used (see arch_groups), so one table serves every unknown architecture.
HEURISTIC_GROUPS: dict[str, tuple[str, ...]] = _arch(
    ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack", "in_proj",
     "att_proj", "query", "key", "value"),
    ("o_proj", "out_proj", "dense", "attn.c_proj", "attn_out"),
    ("gate_proj", "up_proj", "gate_up_proj", "fc1", "fc_in", "c_fc", "w1", "w3", "dense_h_to_4h", "ff_proj"),
    ("down_proj", "fc2", "fc_out", "w2", "dense_4h_to_h", "mlp.c_proj", "ff_out"),
)

LAYER_SPEC_FORMS = "25-27, 0,5,9, first:3, last:3, all, -1 (the last layer), -3--1, or combinations like 0,25-27"


# ---- module names ----

def _split(name: str) -> tuple[int | None, str]:
    """(layer index, name relative to the layer) for a module name; (None, name) outside the layer stack.

    The layer index is the first all-digit component: model.layers.25.self_attn.q_proj -> (25, self_attn.q_proj),
    transformer.h.3.attn.c_attn -> (3, attn.c_attn), lm_head -> (None, lm_head).
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[i + 1:])
    return None, name


def layer_of(module_name: str) -> int | None:
    """Layer index of a module name, or None outside the layer stack (embeddings, final norm, lm_head)."""
    return _split(module_name)[0]


def _ends_with(name: str, suffix: str) -> bool:
    # Dotted-suffix match: ".q_proj" matches "self_attn.q_proj", never "self_attn.xq_proj".
    return name == suffix or name.endswith("." + suffix)


def _layer_label(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> 'layers 0-2,5'; [3] -> 'layer 3'."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    text = ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
    return f"layers {text}" if len(layers) > 1 else f"layer {text}"


def _compress(rels: list[str]) -> str:
    """['self_attn.q_proj', 'self_attn.k_proj', 'mlp.fc1'] -> 'self_attn.{q,k}_proj, mlp.fc1'."""
    heads: dict[tuple[str, str], list[str]] = {}  # (parent., _tail) -> heads, in model order
    for rel in rels:
        parent, dot, leaf = rel.rpartition(".")
        head, sep, tail = leaf.partition("_")
        key = (parent + dot, sep + tail) if tail else (parent + dot + leaf, "")
        heads.setdefault(key, []).append(head if tail else "")
    out = []
    for (parent, tail), hs in heads.items():
        out.append(f"{parent}{{{','.join(hs)}}}{tail}" if len(hs) > 1 else f"{parent}{hs[0]}{tail}")
    return ", ".join(out)


def describe_modules(module_names: list[str], max_outside: int = 12) -> str:
    """One line naming a model's modules, identical layers grouped, for error messages:
    'layers 0-27 each: self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj; outside layers: model.embed_tokens, lm_head'.
    """
    per_layer: dict[int, list[str]] = {}
    outside: list[str] = []
    for name in module_names:
        layer, rel = _split(name)
        if layer is None:
            outside.append(name)
        else:
            per_layer.setdefault(layer, []).append(rel)
    by_set: dict[tuple[str, ...], list[int]] = {}
    for layer in sorted(per_layer):
        by_set.setdefault(tuple(per_layer[layer]), []).append(layer)
    parts = [f"{_layer_label(ls)}{' each' if len(ls) > 1 else ''}: {_compress(list(rels))}"
             for rels, ls in by_set.items()]
    if outside:
        more = f", ... (+{len(outside) - max_outside} more)" if len(outside) > max_outside else ""
        parts.append("outside layers: " + ", ".join(outside[:max_outside]) + more)
    return "; ".join(parts) or "(no modules)"


def num_layers(config) -> int:
    """Decoder layer count under any of the common config names (Llama/Qwen2/GLM, GPT-2, ChatGLM)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise TunelabError(f"cannot tell the layer count of model type '{getattr(config, 'model_type', '?')}'")


def format_target_table(selected: list[str], num_layers: int) -> str:
    """The chosen modules as a small table printed before training, consecutive identical layers merged:

        12 target modules in 3 of 28 layers
        layers 25-27   | self_attn.k_proj, self_attn.q_proj, self_attn.v_proj
        outside layers | lm_head
    """
    per_layer: dict[int, list[str]] = {}
    outside: list[str] = []
    for name in selected:
        layer, rel = _split(name)
        (outside if layer is None else per_layer.setdefault(layer, [])).append(name if layer is None else rel)
    rows: list[tuple[list[int], list[str]]] = []  # runs of consecutive layers with the same module set
    for layer in sorted(per_layer):
        rels = sorted(per_layer[layer])
        if rows and rows[-1][1] == rels and rows[-1][0][-1] == layer - 1:
            rows[-1][0].append(layer)
        else:
            rows.append(([layer], rels))
    table = [(_layer_label(ls), ", ".join(rels)) for ls, rels in rows]
    if outside:
        table.append(("outside layers", ", ".join(sorted(outside))))
    width = max((len(label) for label, _ in table), default=0)
    head = f"{len(selected)} target modules in {len(per_layer)} of {num_layers} layers"
    return "\n".join([head] + [f"{label.ljust(width)} | {mods}" for label, mods in table])


# ---- layer specs ----

def _out_of_range(i: int | str, num_layers: int) -> str:
    return f"layer {i} out of range: the model has {num_layers} layers (0-{num_layers - 1})"


def _index(i: int, num_layers: int) -> int:
    """A layer index, negatives counting from the end (-1 = last)."""
    if not -num_layers <= i < num_layers:
        raise TunelabError(_out_of_range(i, num_layers))
    return i % num_layers


_INT = r"-?\d+"
_RANGE_RE = re.compile(rf"({_INT})-({_INT})")
_WINDOW_RE = re.compile(r"(first|last):(\d+)")


def _parse_token(token: str, num_layers: int, spec: str) -> range | list[int]:
    if token == "all":
        return range(num_layers)
    if m := _WINDOW_RE.fullmatch(token):
        n = int(m[2])
        if not 1 <= n <= num_layers:
            raise TunelabError(f"layer spec '{token}' asks for {n} layers: the model has {num_layers} layers")
        return range(n) if m[1] == "first" else range(num_layers - n, num_layers)
    if re.fullmatch(_INT, token):
        return [_index(int(token), num_layers)]
    if m := _RANGE_RE.fullmatch(token):
        start, end = _index(int(m[1]), num_layers), _index(int(m[2]), num_layers)
        if start > end:
            raise TunelabError(f"layer range '{token}' is empty (layer {start} comes after layer {end})")
        return range(start, end + 1)
    raise TunelabError(f"bad layer spec '{spec}' at '{token}': valid forms are {LAYER_SPEC_FORMS}")


def parse_layer_spec(spec: str, num_layers: int) -> list[int]:
    """'25-27', '0,5,9', 'first:3', 'last:3', 'all', '-1', '-3--1', '0,25-27' -> sorted unique layer indices."""
    if num_layers < 1:
        raise TunelabError(f"the model has no layers (num_layers={num_layers})")
    tokens = spec.replace(" ", "").lower().split(",")
    if not all(tokens):
        raise TunelabError(f"bad layer spec '{spec}': empty entry; valid forms are {LAYER_SPEC_FORMS}")
    return sorted({i for token in tokens for i in _parse_token(token, num_layers, spec)})


def freeze_layers(num_layer_trainable: int, num_layers: int) -> list[int]:
    """The 2023 Freeze choice: n > 0 trains the last n layers, n < 0 the first -n layers."""
    n = num_layer_trainable
    if n == 0 or abs(n) > num_layers:
        raise TunelabError(f"--num_layer_trainable {n} must be 1..{num_layers} (last layers) or "
                           f"-1..-{num_layers} (first layers): the model has {num_layers} layers")
    return sorted(num_layers - 1 - k for k in range(n)) if n > 0 else list(range(-n))


# ---- targets ----

def arch_groups(module_names: list[str], model_type: str) -> dict[str, tuple[str, ...]]:
    """Base group -> relative suffixes for this model: its ARCH_GROUPS entry, else the heuristic table.

    The table entry is used only if the model has at least one of its names, because remote-code forks
    reuse model_type strings with other module names; the heuristic keeps only the names the model has.
    """
    rels = {rel for layer, rel in map(_split, module_names) if layer is not None}

    def has(suffix: str) -> bool:
        return any(_ends_with(rel, suffix) for rel in rels)

    table = ARCH_GROUPS.get(model_type)
    if table and any(has(s) for suffixes in table.values() for s in suffixes):
        return table
    return {g: tuple(s for s in suffixes if has(s)) for g, suffixes in HEURISTIC_GROUPS.items()}


def _group_suffixes(body: str, groups: dict[str, tuple[str, ...]]) -> tuple[str, ...] | None:
    """Suffixes a group or ChatGLM alias stands for on this model; None when body is a raw module name."""
    bases = COMPOSITE_GROUPS.get(ALIASES.get(body, body))
    return None if bases is None else tuple(s for g in bases for s in groups.get(g, ()))


def _prefix_layers(prefix: str, num_layers: int, mode: str) -> set[int]:
    """Layers a layer-prefixed entry 'N.x' applies to.

    strict: layer N only. legacy: what 2023 PEFT's `key.endswith(target)` selected, i.e. every layer whose
    index ends with the digits N ('0.x' on 28 layers hits 0, 10 and 20).
    """
    if mode == "legacy":
        hits = {i for i in range(num_layers) if str(i).endswith(prefix)}
    else:
        hits = {int(prefix)} if int(prefix) < num_layers else set()
    if not hits:
        raise TunelabError(_out_of_range(prefix, num_layers))
    return hits


_PREFIXED_RE = re.compile(r"(\d+)\.(.+)")


def _match_entry(entry: str, parsed: list[tuple[int | None, str, str]], groups: dict[str, tuple[str, ...]],
                 num_layers: int, layers: set[int] | None, mode: str) -> set[str]:
    """Full names one target entry selects; `parsed` holds (layer, relative name, full name) per module."""
    m = _PREFIXED_RE.fullmatch(entry)
    body = m[2] if m else entry
    allowed = _prefix_layers(m[1], num_layers, mode) if m else layers  # None = every layer
    suffixes = _group_suffixes(body, groups)
    if suffixes is not None:  # a group: only modules inside the layer stack
        return {name for layer, rel, name in parsed if layer is not None
                and (allowed is None or layer in allowed) and any(_ends_with(rel, s) for s in suffixes)}
    # A raw name. Unprefixed, it may name a module outside the layers (lm_head) or pin a layer itself
    # (layers.3.mlp.fc1); either way the user asked for that module, so the layer filter does not apply.
    pinned = m is None and layer_of(body) is not None
    hits = set()
    for layer, rel, name in parsed:
        if layer is None:
            hit = m is None and _ends_with(name, body)
        else:
            hit = _ends_with(rel if m else name, body) and (pinned or allowed is None or layer in allowed)
        if hit:
            hits.add(name)
    return hits


def _no_match(entry: str, model_type: str, layers: set[int] | None, module_names: list[str]) -> TunelabError:
    where = f" in {_layer_label(sorted(layers))}" if layers is not None else ""
    return TunelabError(
        f"target '{entry}' matches no module{where} of this {model_type} model. Its modules: "
        f"{describe_modules(module_names)}. Groups: {', '.join(COMPOSITE_GROUPS)}; "
        f"ChatGLM names: {', '.join(sorted(set(a.rpartition('.')[2] for a in ALIASES)))}")


def resolve_targets(module_names: list[str], model_type: str, num_layers: int, targets: str,
                    layers: list[int] | None = None, mode: str = "strict") -> list[str]:
    """Full names of the modules `targets` selects, sorted by layer then name (non-layer modules last).

    module_names: the model's leaf modules that can carry a target (Linear, Conv1D, Embedding).
    targets: comma list of groups, ChatGLM aliases or raw names, each optionally prefixed 'N.' (layer N).
    layers: layers for unprefixed entries (None = all). mode: strict or legacy (see _prefix_layers); it only
    changes what a layer prefix selects, unprefixed names always match as dotted suffixes.
    Raises TunelabError for an unknown mode, an out-of-range layer, or an entry that matches nothing.
    """
    if mode not in TARGET_MATCH_MODES:
        raise TunelabError(f"unknown target match mode '{mode}': valid: {', '.join(TARGET_MATCH_MODES)}")
    entries = [e.strip() for e in targets.split(",") if e.strip()]
    if not entries:
        raise TunelabError(f"no target modules given: use groups ({', '.join(COMPOSITE_GROUPS)}) or module names")
    if layers is not None and not layers:
        raise TunelabError(f"no layers selected for targets '{targets}' (the model has {num_layers} layers)")
    for i in layers or ():
        if not 0 <= i < num_layers:
            raise TunelabError(_out_of_range(i, num_layers))
    allowed = set(layers) if layers is not None else None
    parsed = [(layer, rel, name) for name in module_names for layer, rel in [_split(name)]]
    groups = arch_groups(module_names, model_type)
    picked: set[str] = set()
    for entry in entries:
        hits = _match_entry(entry, parsed, groups, num_layers, allowed, mode)
        if not hits:
            raise _no_match(entry, model_type, allowed if not _PREFIXED_RE.fullmatch(entry) else None, module_names)
        picked |= hits

    def order(name: str) -> tuple[int, int, str]:
        layer = layer_of(name)
        return (1, 0, name) if layer is None else (0, layer, name)

    return sorted(picked, key=order)
