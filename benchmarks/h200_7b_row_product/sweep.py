"""The sweep behind `row_product`s blocks (r41): one-row products over 32 layers by cuBLAS, inductor's reduction, a Triton GEMV at
every (BLOCK_N, BLOCK_K, warps, stages) and a split-K variant; then (argument `attention`) a Triton split-KV decode attention
against SDPA. usage: python sweep.py o|down|qkv|gate_up ... ; python sweep.py attention"""
import itertools
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, "scripts")
from kernel_probes import replayed_us  # noqa: E402


@triton.jit
def gemv_kernel(w_ptr, x_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :])
        x = tl.load(x_ptr + cols)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(out_ptr + rows, tl.sum(acc, axis=1).to(tl.float16))


@triton.jit
def gemv_splitk_kernel(w_ptr, x_ptr, out_ptr, N, K, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    per = K // SPLIT
    for k0 in range(split * per, (split + 1) * per, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :])
        x = tl.load(x_ptr + cols)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.atomic_add(out_ptr + rows, tl.sum(acc, axis=1))


def main():
    device = torch.device("cuda")
    layers, hidden, inner = 32, 4096, 11008
    half = dict(device=device, dtype=torch.float16)
    torch.manual_seed(0)
    import torch._inductor.config as ic

    shapes = {"o": (hidden, hidden), "down": (hidden, inner), "qkv": (3 * hidden, hidden), "gate_up": (2 * inner, hidden)}
    for name in sys.argv[1:]:
        rows, cols = shapes[name]
        weights = [torch.randn(rows, cols, **half) * 0.02 for _ in range(layers)]
        x = torch.randn(1, cols, **half)

        def report(form, fn):
            try:
                out = fn()
                us = replayed_us(fn, device, calls=50) / layers
                diff = (out.float().reshape(layers, -1) - ref).abs().max().item()
                print(f"{name:8s} {form:46s} {us:8.2f} us {rows * cols * 2 / us / 1e6:5.2f} TB/s  diff {diff:.1e}", flush=True)
                return us
            except Exception as e:  # noqa: BLE001
                print(f"{name:8s} {form:46s} failed {type(e).__name__}: {str(e)[:200]}", flush=True)
                return 1e9

        ref = torch.stack([(x @ w.T)[0] for w in weights]).float()
        report("cuBLAS x @ W.T", lambda: torch.stack([x @ w.T for w in weights]))
        red = torch.compile(lambda x, w: (x.float() * w.float()).sum(-1).half(), fullgraph=True)
        report("inductor (x*w).sum(-1)", lambda: torch.stack([red(x, w) for w in weights]))
        ic.coordinate_descent_tuning = True
        red2 = torch.compile(lambda x, w: (x.float() * w.float()).sum(-1).to(torch.float16) + 0, fullgraph=True)
        report("inductor (x*w).sum(-1), coordinate descent", lambda: torch.stack([red2(x, w) for w in weights]))
        ic.coordinate_descent_tuning = False
        best = (1e9, None)
        for bn, bk, warps, stages in itertools.product((2, 4, 8, 16), (256, 512, 1024), (4, 8), (1, 2, 3)):
            if bn * bk > 16384 or cols % bk or rows % bn:
                continue

            def fn(bn=bn, bk=bk, warps=warps, stages=stages):
                outs = []
                for w in weights:
                    o = torch.empty(rows, **half)
                    gemv_kernel[(rows // bn,)](w, x, o, rows, cols, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
                    outs.append(o)
                return torch.stack(outs)

            try:
                fn()
                us = replayed_us(fn, device, calls=20) / layers
            except Exception as e:  # noqa: BLE001
                print("config failed", bn, bk, warps, stages, type(e).__name__, str(e)[:100])
                continue
            if us < best[0]:
                best = (us, (bn, bk, warps, stages))
        us, (bn, bk, warps, stages) = best
        report(f"triton gemv BN={bn} BK={bk} w={warps} s={stages}",
               lambda: torch.stack([_run(gemv_kernel, w, x, rows, cols, bn, bk, warps, stages) for w in weights]))
        best = (1e9, None)
        for split, bn, bk, warps in itertools.product((2, 4, 8), (4, 8, 16, 32), (128, 256, 512), (4, 8)):
            if bn * bk > 16384 or (cols // split) % bk or cols % split or rows % bn:
                continue

            def fn(split=split, bn=bn, bk=bk, warps=warps):
                outs = []
                for w in weights:
                    o = torch.zeros(rows, device=device, dtype=torch.float32)
                    gemv_splitk_kernel[(rows // bn, split)](w, x, o, rows, cols, SPLIT=split, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
                    outs.append(o.half())
                return torch.stack(outs)

            try:
                fn()
                us = replayed_us(fn, device, calls=20) / layers
            except Exception as e:  # noqa: BLE001
                print("splitk config failed", split, bn, bk, warps, type(e).__name__, str(e)[:100])
                continue
            if us < best[0]:
                best = (us, (split, bn, bk, warps), fn)
        if best[1] is not None:
            report(f"triton split-K gemv S,BN,BK,w={best[1]}", best[2])


def _run(kernel, w, x, rows, cols, bn, bk, warps, stages):
    o = torch.empty(rows, device=w.device, dtype=torch.float16)
    kernel[(rows // bn,)](w, x, o, rows, cols, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return o


if __name__ == "__main__" and sys.argv[1] not in ("attention", "rows"):
    with torch.inference_mode():
        main()


@triton.jit
def decode_partial(q_ptr, k_ptr, v_ptr, pos_ptr, m_ptr, den_ptr, acc_ptr, stride_h, CHUNK: tl.constexpr, SPLITS: tl.constexpr,
                   D: tl.constexpr, BLOCK_S: tl.constexpr, scale):
    h = tl.program_id(0)
    s = tl.program_id(1)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + h * D + d).to(tl.float32) * scale
    position = tl.load(pos_ptr)
    m = tl.full((), -1.0e30, tl.float32)
    den = tl.zeros((), tl.float32)
    acc = tl.zeros((D,), tl.float32)
    for start in range(s * CHUNK, (s + 1) * CHUNK, BLOCK_S):
        idx = start + tl.arange(0, BLOCK_S)
        k = tl.load(k_ptr + h * stride_h + idx[:, None] * D + d[None, :]).to(tl.float32)
        scores = tl.sum(k * q[None, :], axis=1)
        scores = tl.where(idx <= position, scores, -1.0e30)
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new)
        p = tl.where(idx <= position, p, 0.0)
        v = tl.load(v_ptr + h * stride_h + idx[:, None] * D + d[None, :]).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        den = den * alpha + tl.sum(p, axis=0)
        m = m_new
    tl.store(m_ptr + h * SPLITS + s, m)
    tl.store(den_ptr + h * SPLITS + s, den)
    tl.store(acc_ptr + (h * SPLITS + s) * D + d, acc)


@triton.jit
def decode_combine(m_ptr, den_ptr, acc_ptr, out_ptr, SPLITS: tl.constexpr, D: tl.constexpr):
    h = tl.program_id(0)
    sp = tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    m = tl.load(m_ptr + h * SPLITS + sp)
    den = tl.load(den_ptr + h * SPLITS + sp)
    acc = tl.load(acc_ptr + (h * SPLITS + sp[:, None]) * D + d[None, :])
    top = tl.max(m, axis=0)
    w = tl.exp(m - top)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(den * w, axis=0)
    tl.store(out_ptr + h * D + d, out.to(tl.float16))


def decode_attention(q, k, v, position, splits, block_s, warps):
    """q [H, D]; k, v [H, S, D] views of a contiguous cache (stride over heads k.stride(0)); position [1] int."""
    heads, width, dim = k.shape
    m = torch.empty(heads, splits, device=q.device, dtype=torch.float32)
    den = torch.empty_like(m)
    acc = torch.empty(heads, splits, dim, device=q.device, dtype=torch.float32)
    out = torch.empty(heads, dim, device=q.device, dtype=torch.float16)
    decode_partial[(heads, splits)](q, k, v, position, m, den, acc, k.stride(0), CHUNK=width // splits, SPLITS=splits, D=dim,
                                    BLOCK_S=block_s, scale=dim ** -0.5, num_warps=warps)
    decode_combine[(heads,)](m, den, acc, out, SPLITS=splits, D=dim)
    return out


def attention_main():
    import torch.nn.functional as F
    device = torch.device("cuda")
    layers, heads, dim, capacity = 32, 32, 128, 2048
    half = dict(device=device, dtype=torch.float16)
    keys = torch.randn(layers, heads, capacity, dim, **half)
    values = torch.randn(layers, heads, capacity, dim, **half)
    q = torch.randn(heads, dim, **half)
    for width, used in ((768, 700), (1024, 950)):
        mask = torch.zeros(1, width, **half).masked_fill_(torch.arange(width, device=device)[None] >= used, torch.finfo(torch.float16).min)[None, None]
        position = torch.full((1,), used - 1, device=device, dtype=torch.int32)

        def sdpa():
            return torch.stack([F.scaled_dot_product_attention(q[None, :, None], keys[i, :, :width][None], values[i, :, :width][None], attn_mask=mask)[0, :, 0] for i in range(layers)])

        ref = sdpa().float()
        print(f"width {width}: SDPA masked {replayed_us(sdpa, device, 50) / layers:.2f} us/layer", flush=True)
        results = []
        for splits, block_s, warps in itertools.product((4, 8, 16), (16, 32, 64), (2, 4, 8)):
            if (width // splits) % block_s:
                continue

            def fn(splits=splits, block_s=block_s, warps=warps):
                return torch.stack([decode_attention(q, keys[i, :, :width], values[i, :, :width], position, splits, block_s, warps) for i in range(layers)])

            try:
                diff = (fn().float() - ref).abs().max().item()
                us = replayed_us(fn, device, 30) / layers
                results.append((us, splits, block_s, warps, diff))
            except Exception as e:  # noqa: BLE001
                print("failed", splits, block_s, warps, type(e).__name__, str(e)[:150], flush=True)
        for us, splits, block_s, warps, diff in sorted(results)[:6]:
            print(f"  triton decode splits {splits} block {block_s} warps {warps}: {us:.2f} us/layer, diff {diff:.1e}", flush=True)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "attention":
    with torch.inference_mode():
        attention_main()


@triton.jit
def rows_kernel(x_ptr, w_ptr, out_ptr, M, N: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """A few rows (M <= BLOCK_M) times a row-major [N, K] weight by tensor-core tiles, float32 sums."""
    outs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=rows[:, None] < M, other=0.0)
        w = tl.load(w_ptr + outs[:, None] * K + cols[None, :])
        acc += tl.dot(x, tl.trans(w))
    tl.store(out_ptr + rows[:, None] * N + outs[None, :], acc.to(out_ptr.dtype.element_ty), mask=rows[:, None] < M)


def rows_main(m: int, names):
    """`python sweep.py rows M o down ...`: M rows (10: a draft level's frontier; 64: a tree's verification) by cuBLAS
    and by `rows_kernel` at each (BLOCK_N, BLOCK_K, stages) of 12, 32 layers of distinct weights from a CUDA graph."""
    device = torch.device("cuda")
    layers, hidden, inner = 32, 4096, 11008
    half = dict(device=device, dtype=torch.float16)
    shapes = {"o": (hidden, hidden), "down": (hidden, inner), "qkv": (3 * hidden, hidden), "gate_up": (2 * inner, hidden), "lm_head": (32000, hidden)}
    block_m = max(16, 1 << (m - 1).bit_length())
    for name in names:
        n, k = shapes[name]
        weights = [torch.randn(n, k, **half) * 0.02 for _ in range(layers)]
        x = torch.randn(m, k, **half)

        def library():
            return torch.stack([(x[None] @ w.T)[0] for w in weights])

        ref = library().float()
        cublas = replayed_us(library, device, calls=30) / layers
        results = []
        for bn, bk, stages, warps in itertools.product((16, 32, 64), (64, 128), (3, 4), (4,)):
            if n % bn or k % bk:
                continue

            def fn(bn=bn, bk=bk, stages=stages, warps=warps):
                outs = []
                for w in weights:
                    o = torch.empty(m, n, **half)
                    rows_kernel[(n // bn,)](x, w, o, m, N=n, K=k, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
                    outs.append(o)
                return torch.stack(outs)

            try:
                diff = (fn().float() - ref).abs().max().item()
                results.append((replayed_us(fn, device, calls=20) / layers, bn, bk, stages, warps, diff))
            except Exception as e:  # noqa: BLE001
                print("failed", bn, bk, stages, warps, type(e).__name__, str(e)[:120], flush=True)
        print(f"{name:8s} {m} rows x [{n}, {k}]: cuBLAS {cublas:.2f} us/layer ({n * k * 2 / cublas / 1e6:.2f} TB/s)", flush=True)
        for us, bn, bk, stages, warps, diff in sorted(results)[:4]:
            print(f"    rows_kernel BN={bn} BK={bk} stages={stages} warps={warps}: {us:.2f} us ({n * k * 2 / us / 1e6:.2f} TB/s), diff {diff:.1e}", flush=True)


if __name__ == "__main__" and sys.argv[1] == "rows":
    with torch.inference_mode():
        rows_main(int(sys.argv[2]), sys.argv[3:])
