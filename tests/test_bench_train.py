"""bench.train's variants are SpeedupOptions passed as arguments: every A/B candidate maps to options that
differ from tunelab's defaults, and no bench module rebinds an attribute of a tunelab module."""

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from tunelab.attention import DEFAULT_OPTIONS

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_every_candidate_variant_is_options_off_the_default():
    from bench.ab_step import SWITCHES
    from bench.train import CANDIDATES, variant_options

    variants = [c["variant"] for c in CANDIDATES.values() if "variant" in c] + [{n: True} for n in SWITCHES]
    for variant in variants:
        assert variant_options(variant) != DEFAULT_OPTIONS, variant
    assert variant_options({}) == DEFAULT_OPTIONS
    assert variant_options({"fp32_softmax": True}).softmax_dtype == torch.float32
    both = variant_options({"no_packing": True, "per_call_casts": True})
    assert both == dataclasses.replace(DEFAULT_OPTIONS, packing=False, cast_frozen_weights=False)
    with pytest.raises(ValueError, match="unknown variant"):
        variant_options({"fast_mode": True})


def _is_tunelab_module(dotted: str) -> bool:
    """tunelab or a module / package inside it (by its file, nothing imported)."""
    path = BENCH.parent.joinpath(*dotted.split("."))
    return dotted.split(".")[0] == "tunelab" and (path.with_suffix(".py").is_file() or path.is_dir())


def module_rebinds(source: str) -> list[str]:
    """Uses of a tunelab module object other than reading one of its attributes: `mod.NAME = ...`,
    `del mod.NAME`, `setattr(mod, ...)`, or the module handed on as a value (to a swap list, a helper)."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # local name -> tunelab module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _is_tunelab_module(a.name):
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and _is_tunelab_module(node.module):
            for a in node.names:
                if _is_tunelab_module(f"{node.module}.{a.name}"):
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}

    def module_of(node) -> str | None:
        if isinstance(node, ast.Name):
            return aliases.get(node.id)
        if isinstance(node, ast.Attribute) and (base := module_of(node.value)):
            return f"{base}.{node.attr}" if _is_tunelab_module(f"{base}.{node.attr}") else None
        return None

    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Name, ast.Attribute)) or not module_of(node):
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.Attribute) and module_of(parent):
            continue  # tunelab.trainer inside tunelab.trainer.X: judged at the outer node
        if not (isinstance(parent, ast.Attribute) and isinstance(parent.ctx, ast.Load)):
            found.append((node.lineno, f"line {node.lineno}: {ast.unparse(parent or node)}"))
    return [text for _, text in sorted(found)]


def test_scan_finds_every_kind_of_rebinding():
    source = ("import tunelab.trainer\nimport tunelab.speedups as sp\nfrom tunelab import attention\n"
              "from tunelab.attention import pack_batch\n"
              "tunelab.trainer.SOFTMAX_DTYPE = 1\nsp.LANE_LEVELS += 1\nsetattr(attention, 'x', 2)\n"
              "swaps = [(tunelab.trainer, 'cross_entropy', None)]\ndel attention.pack_batch\n"
              "ok = tunelab.trainer.supervised_loss, sp.cpu_dropout, attention.pack_batch, pack_batch\n"
              "pack_batch = None\n")
    assert [f.split(":")[0] for f in module_rebinds(source)] == ["line 5", "line 6", "line 7", "line 8", "line 9"]


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_bench_never_rebinds_tunelab_module_attributes(path):
    assert module_rebinds(path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("name", ["sliced_attention", "per_sample_attention", "sdpa_segments", "fp32_softmax"])
def test_attention_variants_compute_tunelabs_packed_loss(tiny_llama_dir, name):
    """Each attention variant, passed as options, runs through the model's packed attention and gives the
    default's loss (they differ in speed and memory only)."""
    from transformers import AutoModelForCausalLM

    from bench.train import variant_options
    from test_attention import padded_batch
    from tunelab.attention import attention_name, pack_batch, packed_attention_enabled
    from tunelab.trainer import supervised_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    batch = pack_batch(padded_batch(model.config.vocab_size))
    losses = {}
    with torch.no_grad():
        for options in (DEFAULT_OPTIONS, variant_options({name: True})):
            with packed_attention_enabled(model, options):
                assert model.config._attn_implementation == attention_name(options)
                losses[options == DEFAULT_OPTIONS] = supervised_loss(model, batch, options)
    assert torch.allclose(losses[False], losses[True], atol=1e-5)
