"""Five timings behind choices of the static engine, on a CUDA device:

    python scripts/kernel_probes.py attention   # SDPA against the compiled `eager_attention`, per query rows and width
    python scripts/kernel_probes.py vision      # a prompt's device stage with the vision tower eager and from CUDA graphs
    python scripts/kernel_probes.py shapes      # SDPA's first and second call of each new shape, with and without cuDNN
    python scripts/kernel_probes.py decode      # plain decoding's products and attention over 32 layers, per formulation
    python scripts/kernel_probes.py topk        # a tree level's log-softmax and top-k over the vocabulary, library vs fused

`attention`: one layer's attention of the 7B shape (32 heads of 128, float16, an additive mask that hides
the slots past 700 + the row), for 1, 16 and 64 query rows (plain decoding's step, small and large trees)
over 768 and 1024 cache slots (the attention widths of a ~650-position prompt): SDPA as the engine calls
it (PyTorch picks the kernel), and `lmms_msd.speculative.fast.static_target.eager_attention` through
`torch.compile`, each replayed from a CUDA graph (microseconds per call, the mean of 200), with the
largest difference from SDPA in float32. Compiled layers use `eager_attention` for a tree's rows
(`EAGER_ATTENTION_ROWS`) from these figures.

`vision`: `Target.embed_inputs` (the tokenizer, the vision tower and projector, the embedding) over 16
long-answer chart requests on the bundled pair inflated to 7B's shape (CLIP ViT-L/14-336), with the
vision tower eager and replayed from CUDA graphs (`replay_vision`, what the static engines set), in
milliseconds per request, and whether the embedded prompts are identical.

`shapes`: SDPA (float16) called once with a shape it has not met and once again, for 8 new shapes each of
three kinds of eager forward whose shapes vary from call to call: a prompt (1 x 32 heads x L positions,
L from 600, causal by a boolean mask), 3 prompts padded together (3 x 32 x L x L, masked), and the batched
draft's advance over 64 rows (64 x 32 x 4 queries x S slots, S from 700, masked); with every backend
(PyTorch then picks cuDNN's on an H100/H200) and with `VARYING_SHAPE_BACKENDS` (all but cuDNN), milliseconds
per call, the mean over the shapes. The widths differ between the two runs so that neither meets a shape
of the other. The engine runs such forwards with `varying_shapes` from these figures.

`decode`: the pieces of a plain decoding step (one row) of the 7B shape as 32 layers meet them, each layer
with its own weights and KV cache so that nothing is served from L2: the four products (q/k/v packed, o,
gate/up packed, down) and the LM head by cuBLAS and by `row_product` (the Triton kernel `linear` runs for
one row on CUDA), and the attention of one query row over 768 and 1024 cache slots (700 and 950 used)
from the engine's cache layout, by several kernels; microseconds per layer from a CUDA graph over the 32
layers, and for the products the bandwidth that implies (weight bytes / time).

`topk`: what a graphed tree level does with the draft's LM-head logits (float16, V = 32000): the library's float32
log-softmax and top-k (`library_logprob_topk`) against the fused kernels (`logprob_topk`), for 1 row (the root)
and 10 (a level's frontier) at k = 10 and for 640 rows (a batch of 64 trees), from a CUDA graph (microseconds
per call, the mean of 200), with whether the token ids agree, whether their logits do (ties may be ordered
differently: the kernels put the smaller id first) and the largest difference of the values.

On one H200 (benchmarks/h200_7b_compile_v2, README "torch.compile"): SDPA 9.8-10.9 us at one row, 21.5-26.6 at
16 rows, 22.5-27.9 at 64; eager_attention 11.4-13.8, 13.3-14.0 and 21.0-21.9. embed_inputs 14.42 ms a request
eager, 2.38 ms graphed, identical prompts (an earlier machine: 7.35 and 2.66; the eager figure is host-bound).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmms_msd.speculative.fast.graphs import ALL_BACKENDS, VARYING_SHAPE_BACKENDS, GraphedFunction, compiled
from lmms_msd.speculative.fast.logprob_topk import library_logprob_topk, logprob_topk
from lmms_msd.speculative.fast.row_product import linear
from lmms_msd.speculative.fast.static_target import eager_attention


def replayed_us(fn, device: torch.device, calls: int = 200) -> float:
    """Microseconds per call of `fn()` (tensors in, a tensor out) replayed from a CUDA graph, after warm-up."""
    graphed = GraphedFunction(lambda: (fn(),), True, device)
    for _ in range(3):
        graphed()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        graphed()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / calls * 1000


def attention(device: torch.device) -> None:
    torch.manual_seed(0)
    heads, head_dim, used = 32, 128, 700
    compiled_attention = compiled(eager_attention)
    print("rows  width  SDPA us  eager_attention us  max |difference|")
    for rows in (1, 16, 64):
        for width in (768, 1024):
            q = torch.randn(1, heads, rows, head_dim, device=device, dtype=torch.float16)
            k, v = (torch.randn(1, heads, width, head_dim, device=device, dtype=torch.float16) for _ in range(2))
            visible = torch.arange(width, device=device)[None, :] <= used + torch.arange(rows, device=device)[:, None]
            mask = torch.zeros(rows, width, device=device, dtype=torch.float16).masked_fill_(~visible, torch.finfo(torch.float16).min)
            mask = mask[None, None]
            sdpa = replayed_us(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), device)
            eager = replayed_us(lambda: compiled_attention(q, k, v, mask), device)
            difference = (compiled_attention(q, k, v, mask).float() - F.scaled_dot_product_attention(q, k, v, attn_mask=mask).float())
            print(f"{rows:4d}  {width:5d}  {sdpa:7.1f}  {eager:18.1f}  {difference.abs().max().item():.1e}", flush=True)


def vision(device: torch.device) -> None:
    from lmms_msd.commands.bench import requests_from_task
    from lmms_msd.pipeline import PairSettings, inflation_shape, load_pair, resolve_pair
    from lmms_msd.speculative.fast.static_target import replay_vision

    paths = resolve_pair(None, None, need_draft=False)
    target = load_pair(PairSettings(paths.pretrained, None, str(device), "float16", inflate=inflation_shape("7b"))).target
    requests, _ = requests_from_task("msd_chartqa_synth_long", Path(__file__).resolve().parents[1] / "tasks", 16)
    inputs = [target.preprocess(r.context, r.images) for r in requests]
    replay_vision(target, True)
    graphed = target.vision_runner

    def per_request(runner):
        target.vision_runner = runner
        for i in inputs[:2]:  # warm-up (and the graphs' capture)
            target.embed_inputs(i)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        prompts = [target.embed_inputs(i) for i in inputs]
        torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / len(inputs) * 1000, [p.inputs_embeds for p in prompts]

    eager_ms, eager_prompts = per_request(None)
    graphed_ms, graphed_prompts = per_request(graphed)
    same = all(torch.equal(a, b) for a, b in zip(eager_prompts, graphed_prompts))
    print(f"embed_inputs over {len(inputs)} requests: {eager_ms:.2f} ms a request eager, {graphed_ms:.2f} ms from CUDA graphs; "
          f"identical prompts: {same}")  # fmt: skip


def shapes(device: torch.device) -> None:
    from torch.nn.attention import sdpa_kernel

    def synchronised_ms(fn) -> float:
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1000

    def inputs(kind: str, size: int):
        def randn(*shape):
            return torch.randn(*shape, device=device, dtype=torch.float16)

        if kind == "prompt":
            q = randn(1, 32, size, 128)
            return q, q, q, torch.ones(size, size, dtype=torch.bool, device=device).tril()[None, None]
        if kind == "3 prompts":
            q = randn(3, 32, size, 128)
            return q, q, q, torch.ones(size, size, dtype=torch.bool, device=device).tril()[None, None].expand(3, 1, size, size)
        k = randn(64, 32, size, 128)
        return randn(64, 32, 4, 128), k, k, torch.arange(size, device=device)[None, None, None] < size - 3 + torch.arange(4, device=device)[None, None, :, None]

    torch.manual_seed(0)
    F.scaled_dot_product_attention(*inputs("prompt", 16)[:3])  # the library's own first-call set-up, outside the figures
    print("forward                       backends         first call ms  second call ms")
    for offset, (name, backends) in enumerate((("every backend", ALL_BACKENDS), ("all but cuDNN", VARYING_SHAPE_BACKENDS))):
        for kind, start in (("prompt", 600), ("3 prompts", 620), ("draft advance, 64 rows", 700)):
            first, second = [], []
            with sdpa_kernel(list(backends)):
                for size in range(start + 40 * offset, start + 40 * offset + 8):
                    q, k, v, mask = inputs(kind, size)
                    first.append(synchronised_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
                    second.append(synchronised_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
            print(f"{kind:28s}  {name:15s}  {sum(first) / len(first):13.2f}  {sum(second) / len(second):14.3f}", flush=True)


def decode(device: torch.device) -> None:
    layers, hidden, inner, heads, head_dim = 32, 4096, 11008, 32, 128
    half = dict(device=device, dtype=torch.float16)
    torch.manual_seed(0)

    def per_layer_us(fn) -> float:
        return replayed_us(fn, device, calls=50) / layers

    print("product    rows x cols   cuBLAS us/layer  TB/s   row_product us/layer  TB/s   max |difference|")
    for name, rows, cols in (("qkv", 3 * hidden, hidden), ("o", hidden, hidden), ("gate_up", 2 * inner, hidden), ("down", hidden, inner), ("lm_head", 32000, hidden)):
        weights = [torch.randn(rows, cols, **half) * 0.02 for _ in range(layers)]
        x = torch.randn(1, cols, **half)

        def library(weights=weights, x=x):
            return torch.stack([(x[None] @ w.T)[0] for w in weights])

        def kernel(weights=weights, x=x):
            return torch.stack([linear(x, w) for w in weights])

        cublas_us, kernel_us = per_layer_us(library), per_layer_us(kernel)
        difference = (kernel().float() - library().float()).abs().max().item()
        tb = rows * cols * 2 / 1e6
        print(f"{name:8s}  {rows:5d} x {cols:5d}  {cublas_us:15.2f}  {tb / cublas_us:4.2f}   {kernel_us:20.2f}  {tb / kernel_us:4.2f}   {difference:.1e}", flush=True)

    capacity = 2048
    keys = [torch.randn(heads, capacity, head_dim, **half) for _ in range(layers)]
    values = [torch.randn(heads, capacity, head_dim, **half) for _ in range(layers)]
    query = torch.randn(1, heads, 1, head_dim, **half)
    print("attention, one query row over the cache's first `width` slots, `used` of them visible: us/layer")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for width, used in ((768, 700), (1024, 950)):
        mask = torch.zeros(1, width, **half).masked_fill_(torch.arange(width, device=device)[None] >= used, torch.finfo(torch.float16).min)[None, None]
        position = torch.full((1,), used - 1, device=device, dtype=torch.int32)

        def sdpa(backend=None, masked=True, length=width):
            def run():
                outs = []
                for k, v in zip(keys, values):
                    args = (query, k[None, :, :length], v[None, :, :length])
                    if backend is None:
                        outs.append(F.scaled_dot_product_attention(*args, attn_mask=mask if masked else None))
                    else:
                        with sdpa_kernel([backend]):
                            outs.append(F.scaled_dot_product_attention(*args, attn_mask=mask if masked else None))
                return torch.cat(outs)
            return run

        compiled_attention = compiled(eager_attention)
        forms = {
            "SDPA, masked (the engine's)": sdpa(),
            "SDPA cuDNN, masked": sdpa(SDPBackend.CUDNN_ATTENTION),
            "SDPA efficient, masked": sdpa(SDPBackend.EFFICIENT_ATTENTION),
            "SDPA flash, no mask, `used` slots": sdpa(SDPBackend.FLASH_ATTENTION, masked=False, length=used),
            "SDPA cuDNN, no mask, `used` slots": sdpa(SDPBackend.CUDNN_ATTENTION, masked=False, length=used),
            "compiled eager_attention": lambda: torch.cat([compiled_attention(query, k[None, :, :width], v[None, :, :width], mask) for k, v in zip(keys, values)]),
        }
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            flex = torch.compile(flex_attention, fullgraph=True)
            block = create_block_mask(lambda b, h, q, kv: kv <= position[0], None, None, 1, width, device=device)
            forms["flex_attention, mask_mod kv <= position"] = lambda: torch.cat(
                [flex(query, k[None, :, :width], v[None, :, :width], block_mask=block) for k, v in zip(keys, values)]
            )
        except Exception as error:  # noqa: BLE001
            print(f"flex_attention unavailable: {type(error).__name__}: {str(error)[:160]}")
        reference = None
        for form, fn in forms.items():
            try:
                out = fn().float()
                us = per_layer_us(fn)
            except Exception as error:  # noqa: BLE001
                print(f"  width {width} used {used}  {form:40s}  failed: {type(error).__name__}: {str(error)[:160]}", flush=True)
                continue
            reference = out if reference is None else reference
            print(f"  width {width} used {used}  {form:40s}  {us:7.2f}   max |diff| {(out - reference).abs().max().item():.1e}", flush=True)


def topk(device: torch.device) -> None:
    torch.manual_seed(0)
    print("rows   k  library us  fused us  ids equal  same logits  max |value difference|")
    for rows, k in ((1, 10), (10, 10), (10, 4), (640, 10)):
        logits = (torch.randn(rows, 32000, device=device) * 3).half()
        library, fused = library_logprob_topk(logits, k), logprob_topk(logits, k)
        same = torch.equal(library.indices, fused.indices)
        # where ids differ, only the order of equal logits may (float16 logits tie often): the same logits, in order
        tied = torch.equal(logits.gather(1, library.indices), logits.gather(1, fused.indices))
        difference = (library.values - fused.values).abs().max().item()
        library_us = replayed_us(lambda: library_logprob_topk(logits, k).values, device)
        fused_us = replayed_us(lambda: logprob_topk(logits, k).values, device)
        print(f"{rows:4d}  {k:2d}  {library_us:10.2f}  {fused_us:8.2f}  {str(same):9s}  {str(tied):11s}  {difference:.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=("attention", "vision", "shapes", "decode", "topk"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernel_probes.py times CUDA kernels and graphs: run it on a machine with a CUDA device")
    device = torch.device("cuda")
    with torch.inference_mode():
        probes = {"attention": attention, "vision": vision, "shapes": shapes, "decode": decode, "topk": topk}
        probes[args.probe](device)


if __name__ == "__main__":
    main()
