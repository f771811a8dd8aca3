"""Where a batch-1 step's device time goes (scratch probe). modes: profile | attn | level"""
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

import lmms_msd.speculative.fast.graphs as G

mode = sys.argv[1]
GraphedOrig = G.GraphedFunction


def timeit(fn, n=100):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n


def load(compile_, graphs=True):
    from lmms_msd.pipeline import PairSettings, RuntimeSettings, TreeSettings, build_decoder, build_tree, inflation_shape, load_pair, resolve_pair
    if not graphs:
        orig = G.GraphedFunction.__init__

        def init(self, fn, enabled, device=None, warmup=2):
            orig(self, fn, False, device, warmup)

        G.GraphedFunction.__init__ = init
    paths = resolve_pair(None, None)
    pair = load_pair(PairSettings(paths.pretrained, paths.msd_model_path, "cuda", "float16", inflate=inflation_shape("7b")))
    dec = build_decoder(pair, RuntimeSettings("static", 1024, compile=compile_))
    tree = build_tree(TreeSettings(kind="opt", stop_delta=0.6), dec)
    return dec, tree


def prompts(target, n):
    from lmms_msd.commands.bench import requests_from_task
    reqs, config = requests_from_task("msd_chartqa_synth_long", Path("tasks"), n)
    return [target.prepare(r.context, r.images) for r in reqs], config


if mode == "profile":
    compile_ = "compile" in sys.argv
    dec, tree = load(compile_, graphs=False)
    from lmms_msd.pipeline import decode
    ps, config = prompts(dec.target, 2)
    rt = dec.runtime
    for name in ("prefill", "forward_next", "prefill_draft", "draft_tree", "verify", "commit"):
        fn = getattr(rt, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            with record_function("phase::" + _name):
                return _fn(*a, **k)

        setattr(rt, name, wrapped)
    for p in ps:
        decode(dec, p, config)
        decode(dec, p, config, tree=tree.builder)
    torch.cuda.synchronize()
    for label, t in (("plain", None), ("opt", tree.builder)):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            r = decode(dec, ps[0], config, tree=t)
            torch.cuda.synchronize()
        steps = r.stats.steps
        print(f"\n===== {label} compile={compile_}: {r.stats.new_tokens} tokens, {steps} steps", flush=True)
        phases = {}
        for e in prof.events():
            if e.name.startswith("phase::"):
                d = phases.setdefault(e.name, [0, 0.0])
                d[0] += 1
                d[1] += e.device_time_total
        for n, (c, us) in sorted(phases.items()):
            print(f"  {n:24s} calls {c:4d}  device {us / 1000:8.2f} ms  per step {us / max(steps, 1):8.1f} us")
        total = sum(e.self_device_time_total for e in prof.key_averages())
        print(f"  all kernels {total / 1000:.2f} ms, per step {total / max(steps, 1):.1f} us")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90))

elif mode == "attn":
    dev = "cuda"
    torch.manual_seed(0)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    H, D, used = 32, 128, 700
    rows = []
    for T in (1, 16, 64):
        for W in (768, 1024):
            q = torch.randn(1, H, T, D, device=dev, dtype=torch.float16)
            k = torch.randn(1, H, W, D, device=dev, dtype=torch.float16)
            v = torch.randn(1, H, W, D, device=dev, dtype=torch.float16)
            vis = torch.arange(W, device=dev)[None, :] < used + torch.arange(T, device=dev)[:, None] + 1
            mask = torch.zeros(T, W, device=dev, dtype=torch.float16).masked_fill_(~vis, torch.finfo(torch.float16).min)[None, None]
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float())

            def manual(q, k, v, mask):
                s = (q @ k.transpose(-1, -2)).float() * D**-0.5 + mask
                return (s.softmax(-1).to(q.dtype) @ v)

            cm = torch.compile(manual, fullgraph=True, dynamic=False)

            def reduce_form(q, k, v, mask):
                s = (q[:, :, :, None, :].float() * k[:, :, None, :, :].float()).sum(-1) * D**-0.5 + mask
                p = s.softmax(-1)
                return (p[..., None] * v[:, :, None, :, :].float()).sum(-2).to(q.dtype)

            cr = torch.compile(reduce_form, fullgraph=True, dynamic=False)
            variants = {
                "default": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                "efficient": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                "cudnn": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                "math": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                "flash_nomask_sliced": lambda: F.scaled_dot_product_attention(q, k[:, :, : used + T], v[:, :, : used + T], is_causal=False),
                "manual_eager": lambda: manual(q, k, v, mask),
                "manual_compiled": lambda: cm(q, k, v, mask),
                **({"reduce_compiled": lambda: cr(q, k, v, mask)} if T == 1 else {}),
            }
            backends = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH,
                        "flash_nomask_sliced": SDPBackend.FLASH_ATTENTION}
            for name, fn in variants.items():
                try:
                    if name in backends:
                        with sdpa_kernel([backends[name]]):
                            out = fn()
                            g = GraphedOrig(lambda fn=fn: (fn(),), True, torch.device(dev))
                            ms = timeit(lambda: g(), 200)
                    else:
                        out = fn()
                        g = GraphedOrig(lambda fn=fn: (fn(),), True, torch.device(dev))
                        ms = timeit(lambda: g(), 200)
                    err = (out.float() - ref).abs().max().item() if name != "flash_nomask_sliced" or T == 1 else float("nan")
                    rows.append(f"attn T={T:3d} W={W:5d} {name:22s} {ms * 1000:8.1f} us  maxerr {err:.1e}")
                except Exception as ex:  # noqa: BLE001
                    rows.append(f"attn T={T:3d} W={W:5d} {name:22s} FAILED {type(ex).__name__}: {str(ex)[:150]}")
                print(rows[-1], flush=True)

elif mode == "level":
    dec, tree = load(False)
    from lmms_msd.speculative.fast.static_drafter import StaticDrafter
    st = dec.runtime.static_target
    dev = st.device
    k, L, W = 10, 700, 1024
    Hs = st.hidden_size
    torch.manual_seed(0)
    draft = dec.draft
    lm_w = dec.target.lm_head.weight
    print("lm_head weight", lm_w.shape, lm_w.dtype, lm_w.is_contiguous(), lm_w._base is not None, type(lm_w))
    dins = (torch.randint(0, lm_w.shape[0], (k,), device=dev), torch.randn(k, Hs, device=dev, dtype=torch.float16),
            torch.full((k,), L, device=dev), L + torch.arange(k, device=dev), torch.arange(W, device=dev)[None, :].expand(k, -1) <= L)
    for variant in ("eager", "head_compiled", "level_compiled_weight_arg", "level_compiled"):
        torch._dynamo.reset()
        drafter = StaticDrafter(draft, dec.target.lm_head, 1024, False, True, compile=variant != "eager")
        head = drafter.head

        def level(tokens, hidden, positions, slots, visible, w):
            x = draft.fuse(draft.embed_tokens(tokens)[None], hidden[None])[0]
            out = head(x, positions, slots, visible)[0]
            logp = torch.log_softmax((out.to(w.dtype) @ w.T).float(), dim=-1)
            top = logp.topk(k)
            return top.values, top.indices, out

        fn = level
        if variant.startswith("level_compiled"):
            drafter = StaticDrafter(draft, dec.target.lm_head, 1024, False, True, compile=False)
            head = drafter.head
            fn = torch.compile(level, fullgraph=True, dynamic=False)
        w = lm_w.detach() if variant == "level_compiled_weight_arg" else lm_w
        try:
            with torch.inference_mode():
                start = time.perf_counter()
                fn(*dins, w)
                torch.cuda.synchronize()
                first = time.perf_counter() - start
                g = GraphedOrig(lambda *a: fn(*a), True, dev)
                ms = timeit(lambda: g(*dins, w), 200)
            print(f"draft level {variant:28s} {ms:.3f} ms (first call {first:.1f} s)", flush=True)
        except Exception as ex:  # noqa: BLE001
            print(f"draft level {variant:28s} FAILED {type(ex).__name__}: {str(ex)[:300]}", flush=True)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        drafter = StaticDrafter(draft, dec.target.lm_head, 1024, False, False, compile=False)
        head = drafter.head
        level(*dins, lm_w)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90))

elif mode == "prep":
    dec, tree = load(False)
    target = dec.target
    from lmms_msd.commands.bench import requests_from_task
    reqs, config = requests_from_task("msd_chartqa_synth_long", Path("tasks"), 16)

    def wall(fn, n=1):
        torch.cuda.synchronize()
        s = time.perf_counter()
        for _ in range(n):
            out = fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - s) / n * 1000, out

    for r in reqs[:3]:
        target.prepare(r.context, r.images)
    pre = [wall(lambda r=r: target.preprocess(r.context, r.images)) for r in reqs]
    print(f"preprocess (CPU) ms: mean {sum(p[0] for p in pre) / len(pre):.2f}", flush=True)
    inputs = [p[1] for p in pre]
    tok = [wall(lambda i=i: target.prompt_format.tokenize(target.tokenizer, i.text, target.image_token_id))[0] for i in inputs]
    print(f"tokenize ms: mean {sum(tok) / len(tok):.2f}", flush=True)
    runner = target.vision_runner
    for label, r in (("graphed", runner), ("eager", None), ("graphed again", runner)):
        target.vision_runner = r
        emb = [wall(lambda i=i: target.embed_inputs(i)) for i in inputs]
        print(f"embed_inputs {label} ms: mean {sum(e[0] for e in emb) / len(emb):.2f}", flush=True)
        if label == "graphed":
            ref = [e[1].inputs_embeds.clone() for e in emb]
        else:
            print(f"  embeds identical to the graphed ones: {all(torch.equal(e[1].inputs_embeds, w) for e, w in zip(emb, ref))}")
    px = torch.cat([i.pixel_values for i in inputs])
    with torch.inference_mode():
        for b in (1, 4, 16):
            ms, _ = wall(lambda b=b: target.image_features(px[:b]), 5)
            print(f"image_features batch {b:3d}: {ms:.2f} ms ({ms / b:.2f} ms/image)", flush=True)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            target.embed_inputs(inputs[0])
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=80))

elif mode == "host":
    # host wall time per call of each piece of the speculative loop (graphs and compile on)
    import collections

    import lmms_msd.speculative.decoding as D
    from lmms_msd.speculative.stopping import Stopper
    dec, tree = load(True)
    ps, config = prompts(dec.target, 3)
    times = collections.defaultdict(float)
    counts = collections.Counter()

    def timed(name, fn):
        def wrapper(*a, **k):
            s = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times[name] += time.perf_counter() - s
                counts[name] += 1
        return wrapper

    for name in ("accept", "record_step", "path_on_device"):
        setattr(D, name, timed(name, getattr(D, name)))
    Stopper.first_stop = timed("  first_stop", Stopper.first_stop)
    rt = dec.runtime
    for name in ("draft_tree", "verify", "commit", "prefill", "prefill_draft"):
        setattr(rt, name, timed(name, getattr(rt, name)))
    from lmms_msd.speculative.fast import tree_growth as TG
    TG.GraphedTreeGrower._select_nodes
    for p in ps:
        D.speculative_generate(rt, p, config, tree.builder)
    torch.cuda.synchronize()
    times.clear(); counts.clear()
    steps = tokens = 0
    s = time.perf_counter()
    for p in ps:
        r = D.speculative_generate(rt, p, config, tree.builder)
        steps += r.stats.steps; tokens += r.stats.new_tokens
    torch.cuda.synchronize()
    total = time.perf_counter() - s
    print(f"host: {len(ps)} requests, {tokens} tokens, {steps} steps, {total * 1000:.1f} ms ({total / tokens * 1000:.3f} ms/token)")
    for name, t in sorted(times.items(), key=lambda kv: -kv[1]):
        print(f"  {name:16s} calls {counts[name]:5d}  {t * 1000:8.2f} ms  per step {t / steps * 1000:7.3f} ms")
