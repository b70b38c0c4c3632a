"""Per-method fake-quant cost (forward + backward of one 768x3072 weight, CPU) and zero fraction at init.

Run: OMP_NUM_THREADS=1 python benchmarks/bench_weight_methods.py  (timings depend on machine load).
"""
import time, torch
from tbt.config import QuantConfig
from tbt.quant.weight_learned import make_weight_quantizer
torch.manual_seed(0)
w0 = torch.randn(768, 3072) * 0.02
rows = []
for method, bits, extra in [("tbt",2,{}),("absmean",2,{}),("trilm",2,{}),("bitnet-binary",1,{}),("lsq",2,{}),("seq",2,{}),("seq-int2",2,{}),("dlt",2,{}),("dlt",2,{"granularity":"group"}),("dlt-centred",2,{}),("tequila",2,{})]:
    b = f"fp-{bits}-fp"
    q = make_weight_quantizer(QuantConfig(bits=b, method=method, **extra), bits, w0)
    w = w0.clone().requires_grad_()
    g = torch.randn_like(w)
    def step():
        y = q(w); y.backward(g)
        bo = q.output_bias(w)
        if bo is not None: bo.sum().backward()
    for _ in range(3): step()
    t = time.perf_counter(); n = 20
    for _ in range(n): step()
    dt = (time.perf_counter() - t) / n * 1e3
    with torch.no_grad():
        codes = q.codes_and_scale(w0).codes
    z = (codes == 0).float().mean().item()
    rows.append((method + ("/group" if extra else ""), dt, z))
for r in rows: print(f"{r[0]:16s} fwd+bwd {r[1]:7.2f} ms   zeros {100*r[2]:5.1f} %")
