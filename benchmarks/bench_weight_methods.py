"""Per-method fake-quantization cost (forward + backward of one weight matrix) and zero fraction.

For every weight quantizer of ``tbt.quant`` (``--method`` of ``tbt train``), one ``N × K``
latent weight (default 768 × 3072, N(0, 0.02²), seed 0) is fake-quantized and back-propagated
``--repeat`` times; the table gives the mean milliseconds per forward + backward step and the
fraction of zero codes at initialisation (ternary sparsity; 0 for binary and 4-level codes).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_weight_methods.py [--shape 768x3072] [--repeat 20]

Timings depend on machine load.
"""

from __future__ import annotations

import argparse
import time

# (method, weight bits, extra QuantConfig fields)
METHODS = [("tbt", 2, {}), ("absmean", 2, {}), ("trilm", 2, {}), ("bitnet-binary", 1, {}),
           ("lsq", 2, {}), ("seq", 2, {}), ("seq-int2", 2, {}), ("dlt", 2, {}),
           ("dlt", 2, {"granularity": "group"}), ("dlt-centred", 2, {}), ("tequila", 2, {})]


def _shape(s: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NxK such as 768x3072, got {s!r}") from None
    return n, k


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", type=_shape, default=(768, 3072), help="weight N x K (768x3072)")
    p.add_argument("--repeat", type=int, default=20, help="timed steps per method (20)")
    args = p.parse_args(argv)

    import torch

    from tbt.config import QuantConfig
    from tbt.quant.weight_learned import make_weight_quantizer

    torch.manual_seed(0)
    w0 = torch.randn(*args.shape) * 0.02
    print(f"weight {args.shape[0]}x{args.shape[1]}, {torch.get_num_threads()} torch threads, "
          f"{args.repeat} steps")
    for method, bits, extra in METHODS:
        q = make_weight_quantizer(QuantConfig(bits=f"fp-{bits}-fp", method=method, **extra),
                                  bits, w0)
        w = w0.clone().requires_grad_()
        g = torch.randn_like(w)

        def step(q=q, w=w, g=g):
            q(w).backward(g)
            bias = q.output_bias(w)
            if bias is not None:
                bias.sum().backward()

        for _ in range(3):
            step()
        t = time.perf_counter()
        for _ in range(args.repeat):
            step()
        ms = (time.perf_counter() - t) / args.repeat * 1e3
        with torch.no_grad():
            zeros = (q.codes_and_scale(w0).codes == 0).float().mean().item()
        name = method + ("/group" if extra else "")
        print(f"{name:16s} fwd+bwd {ms:7.2f} ms   zeros {100 * zeros:5.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
