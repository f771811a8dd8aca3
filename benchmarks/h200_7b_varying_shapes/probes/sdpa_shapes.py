"""First-call vs repeated cost of SDPA per new shape, with and without the cuDNN backend (scratch probe)."""
import time
import torch
import torch.nn.functional as F

def t(fn):
    torch.cuda.synchronize(); s = time.perf_counter(); fn(); torch.cuda.synchronize(); return (time.perf_counter() - s) * 1000

dev = "cuda"
for cudnn in (True, False):
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    # prompts: causal, one sequence, new lengths
    firsts, agains = [], []
    for L in range(600 + (0 if cudnn else 50), 610 + (0 if cudnn else 50)):
        q = torch.randn(1, 32, L, 128, device=dev, dtype=torch.float16)
        firsts.append(t(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True)))
        agains.append(t(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True)))
    print(f"cudnn={cudnn} causal prompt: first {sum(firsts)/len(firsts):.2f} ms, again {sum(agains)/len(agains):.3f} ms", flush=True)
    # batched advance-like: [64, 32, 4, S] with a bool mask, new widths
    firsts, agains = [], []
    for S in range(700 + (0 if cudnn else 50), 710 + (0 if cudnn else 50)):
        q = torch.randn(64, 32, 4, 128, device=dev, dtype=torch.float16)
        k = torch.randn(64, 32, S, 128, device=dev, dtype=torch.float16)
        m = torch.rand(64, 1, 4, S, device=dev) > 0.1
        firsts.append(t(lambda: F.scaled_dot_product_attention(q, k, k, attn_mask=m)))
        agains.append(t(lambda: F.scaled_dot_product_attention(q, k, k, attn_mask=m)))
    print(f"cudnn={cudnn} masked [64,32,4,S]: first {sum(firsts)/len(firsts):.2f} ms, again {sum(agains)/len(agains):.3f} ms", flush=True)
    # a batch of prompts padded, masked [k, 32, L, L]
    firsts, agains = [], []
    for L in range(620 + (0 if cudnn else 50), 625 + (0 if cudnn else 50)):
        q = torch.randn(3, 32, L, 128, device=dev, dtype=torch.float16)
        m = torch.ones(L, L, device=dev, dtype=torch.bool).tril()[None, None].expand(3, 1, L, L)
        firsts.append(t(lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=m)))
        agains.append(t(lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=m)))
    print(f"cudnn={cudnn} masked prompts [3,32,L,L]: first {sum(firsts)/len(firsts):.2f} ms, again {sum(agains)/len(agains):.3f} ms", flush=True)
