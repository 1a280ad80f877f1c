"""tunelab/cpu.py: CPU class from /proc/cpuinfo flags, the AVX2 emulation and its effect on precision."""

import pytest

from tunelab import cpu
from tunelab.errors import TunelabError

ZEN5 = "processor : 0\nflags : fpu sse avx2 avx512f avx512_bf16 avx512vl\n"
ZEN3 = "processor : 0\nflags : fpu sse avx avx2 fma\n"
SAPPHIRE = "flags : avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


@pytest.mark.parametrize("cpuinfo, flags, klass", [
    (ZEN5, ["avx2", "avx512f", "avx512_bf16"], "AVX-512 BF16"),
    (ZEN3, ["avx2"], "AVX2"),
    (SAPPHIRE, ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"], "AVX-512 BF16 + AMX"),
    ("flags : avx2 avx512f\n", ["avx2", "avx512f"], "AVX-512"),
    ("flags : sse4_2\n", [], "older than AVX2"),
])
def test_flags_and_class(cpuinfo, flags, klass):
    assert cpu.cpu_flags(cpuinfo) == flags
    assert cpu.cpu_class(flags) == klass


def test_emulation_is_read_from_the_environment(monkeypatch):
    for key in cpu.EMULATIONS["avx2"]:
        monkeypatch.delenv(key, raising=False)
    assert cpu.emulated() is None
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert cpu.emulated() is None  # only part of it: not the emulation
    for key, value in cpu.emulation_env("avx2").items():
        monkeypatch.setenv(key, value)
    assert cpu.emulated() == "avx2"
    assert cpu.cpu_class(["avx2", "avx512f", "avx512_bf16"], emulation=cpu.emulated()) == "AVX2 (emulated)"
    assert cpu.cpu_has_fast_bf16() is False  # tunelab then trains in fp32, as on a real AVX2 CPU


def test_unknown_emulation_names_the_valid_ones():
    with pytest.raises(TunelabError, match="avx2"):
        cpu.emulation_env("avx3")


def test_setup_precision_follows_the_emulation(monkeypatch):
    from tunelab.hparams import parse_args
    from tunelab.setup import resolve_precision

    for key, value in cpu.emulation_env("avx2").items():
        monkeypatch.setenv(key, value)
    args = parse_args(["--do_train", "--output_dir", "x", "--dataset", "d"])
    assert resolve_precision(args).bf16 is False
