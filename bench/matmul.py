"""The machine's matmul peak in fp32 and bf16, the denominator of every MFU figure.

    python -m bench.matmul            # peak over square sizes + SmolLM2-135M's own shapes, ~30 s on 2 cores
    python -m bench.matmul --quick

Peak = the best, over square sizes 1024..4096, of the median GFLOP/s of repeated `torch.mm(a, b, out=c)`
(2 * n^3 FLOPs each; `out=` keeps the allocator out of it). The model's shapes are printed for reference:
a batch of 8 x 256 tokens through an MLP projection (2048 x 576 @ 576 x 1536) and through the output
projection (2048 x 576 @ 576 x 49152). bench.train runs this in a subprocess at the start of its run.
"""

from __future__ import annotations

import argparse

from bench.common import emit

SQUARE = (1024, 2048, 4096)
MODEL_SHAPES = {"mlp 2048x576x1536": (2048, 576, 1536), "head 2048x576x49152": (2048, 576, 49152)}


def gflops(m: int, k: int, n: int, dtype, seconds: float) -> float:
    """Median GFLOP/s of (m x k) @ (k x n) over repeats filling about `seconds` (the study's calibration
    measures with the same function)."""
    from tunelab.study.calibrate import matmul_gflops

    return matmul_gflops(m, k, n, dtype, seconds)


def measure(quick: bool = False) -> dict:
    import torch

    seconds = 0.6 if quick else 2.0
    out: dict = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        square = {n: gflops(n, n, n, dtype, seconds) for n in (SQUARE[:2] if quick else SQUARE)}
        shapes = {label: gflops(*shape, dtype, seconds) for label, shape in MODEL_SHAPES.items()}
        out[name] = {"peak_gflops": max(square.values()), "square": square, "model_shapes": shapes}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter repeats, sizes up to 2048")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # bench.train's subprocess call: JSON config
    args = parser.parse_args(argv)
    if args.worker:
        import json

        emit(measure(bool(json.loads(args.worker).get("quick"))))
        return 0
    result = measure(args.quick)
    for name, r in result.items():
        sizes = ", ".join(f"{n}: {v:.0f}" for n, v in r["square"].items())
        shapes = ", ".join(f"{k}: {v:.0f}" for k, v in r["model_shapes"].items())
        print(f"{name}: peak {r['peak_gflops']:.0f} GFLOP/s  (square {sizes}; {shapes})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
