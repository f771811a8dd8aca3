"""Residual adds inside cuBLAS (addmm, what inductor makes of `x + a @ w.T`) vs mm + the add fused into the next
norm: 32 layers' post-attention parts of a LLaMA-7B layer, compiled, replayed from one CUDA graph."""
import torch
import torch.nn.functional as F

torch.manual_seed(0)
dev, dt = "cuda", torch.float16
H, I, L, eps = 4096, 11008, 32, 1e-6
ws = [dict(o=torch.randn(H, H, device=dev, dtype=dt) / 64, post=torch.ones(H, device=dev, dtype=dt),
           gu=torch.randn(2 * I, H, device=dev, dtype=dt) / 64, down=torch.randn(H, I, device=dev, dtype=dt) / 100) for _ in range(L)]


def fused(x, attention, o, post_norm, gate_up, down):  # as static_target.layer_output
    x = x + attention @ o.T
    h = F.rms_norm(x, (x.shape[-1],), post_norm, eps)
    gate, up = (h @ gate_up.T).chunk(2, dim=-1)
    return x + (F.silu(gate) * up) @ down.T


def unfused(x, pending, attention, o, post_norm, gate_up, down):  # the residual adds outside the products
    x = x + pending
    out = (attention[None] @ o.T)[0]  # a view between the product and the add: no addmm
    x = x + out
    h = F.rms_norm(x, (x.shape[-1],), post_norm, eps)
    gate, up = (h @ gate_up.T).chunk(2, dim=-1)
    return x, ((F.silu(gate) * up)[None] @ down.T)[0]


cf, cu = torch.compile(fused, fullgraph=True), torch.compile(unfused, fullgraph=True)
for T in (1, 8, 64):
    x0 = torch.randn(T, H, device=dev, dtype=dt)
    att = torch.randn(T, H, device=dev, dtype=dt)

    def run_a():
        x = x0
        for w in ws:
            x = cf(x, att, w["o"], w["post"], w["gu"], w["down"])
        return x

    def run_b():
        x, p = x0, torch.zeros_like(x0)
        for w in ws:
            x, p = cu(x, p, att, w["o"], w["post"], w["gu"], w["down"])
        return x + p

    res = {}
    for name, fn in (("addmm", run_a), ("unfused", run_b)):
        for _ in range(3):
            out = fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fn()
        for _ in range(5):
            g.replay()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for rep in range(5):
            s.record()
            for _ in range(50):
                g.replay()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 50)
        res[name] = (sorted(times)[2], out.float())
    a, b = res["addmm"], res["unfused"]
    print(f"T={T}: 32 layers' post-attention parts: addmm {a[0]*1e3:.1f} us, unfused {b[0]*1e3:.1f} us "
          f"({(a[0]-b[0])/32*1e3:+.2f} us a layer); max |diff| {float((a[1]-b[1]).abs().max()):.3g}", flush=True)
