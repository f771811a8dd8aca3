"""`torch_compile`: the static engines with their layers (and the draft's head) through torch.compile.

On CPU the compiled functions are traced by dynamo as one graph each and run through AOTAutograd's
functionalisation ("aot_eager": the same tracing and mutation handling as inductor, without building C++),
so a graph break, an untraceable operation or a lost cache write fails here; the inductor kernels
themselves run in the CUDA test on the GPU machine. One test compiles with inductor on the CPU (where a C++
compiler is there): what inductor makes of the layer's residual adds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from decoding_fixtures import following_draft, random_prompt, tiny_target
from test_fast_engine import TREES, cuda_pair, inside_graphed, with_eos  # noqa: F401  (inside_graphed: a fixture)
from test_plugin import docs, tiny_draft_dir  # noqa: F401  (fixtures)

from lmms_msd.speculative.batching import BatchRequest, generate_batched
from lmms_msd.speculative.decoding import plain_generate, speculative_generate
from lmms_msd.speculative.fast import BatchedStaticEngine, StaticEngine, graphs
from lmms_msd.speculative.fast.static_target import attention_inputs, cached_attention_inputs, eager_attention, layer_output
from lmms_msd.speculative.sampling import GenerationConfig


@pytest.fixture
def traced(monkeypatch):
    """Compile with "aot_eager" and count what dynamo compiled (so that a test fails if nothing was)."""
    monkeypatch.setattr(graphs, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()


def test_compiled_static_engine_decodes_the_same(traced):
    target = with_eos(tiny_target(3, context_scale=0.05), 10_000)
    draft = following_draft(target)
    plain_engine = StaticEngine(target, draft, max_length=256)
    compiled_engine = StaticEngine(target, draft, max_length=256, compile=True)
    assert compiled_engine.static_target._layer_output is not layer_output
    for i in range(2):
        prompt = random_prompt(target, 500 + i, with_image=i == 0)
        config = GenerationConfig(max_new_tokens=16)
        want = plain_generate(plain_engine, prompt, config).token_ids
        assert plain_generate(compiled_engine, prompt, config).token_ids == want
        for name in ("eagle2", "opt"):
            fast = speculative_generate(compiled_engine, prompt, config, TREES[name])
            reference = speculative_generate(plain_engine, prompt, config, TREES[name])
            assert fast.token_ids == want, name
            assert fast.stats.accepted == reference.stats.accepted, name
    # the target's two layer parts (prompt, one token, trees) and the draft's head were compiled
    assert traced() >= 3


def test_compiled_batched_engine_decodes_the_same(traced):
    target = with_eos(tiny_target(3, context_scale=0.05), 10_000)
    draft = following_draft(target)
    prompts = [random_prompt(target, 600 + i, with_image=i % 2 == 0) for i in range(3)]
    config = GenerationConfig(max_new_tokens=12)

    def run(engine, tree):
        requests = [BatchRequest(p, config, tree=tree) for p in prompts]
        return {index: result.token_ids for index, result in generate_batched(engine, requests, max_batch=3)}

    plain = BatchedStaticEngine(target, draft, max_batch=3, max_length=256)
    compiled = BatchedStaticEngine(target, draft, max_batch=3, max_length=256, compile=True)
    want = run(plain, None)
    assert run(compiled, None) == want
    assert run(compiled, TREES["eagle2"]) == want
    assert traced() >= 2


def test_the_layer_parts_compute_the_layer():
    """`attention_inputs` and `layer_output` against the layer spelled out (transformers' rotate_half RoPE
    and its MLP), in float64 so that only the order of sums differs."""
    torch.manual_seed(0)
    heads, kv, d, hidden, inter, t = 4, 2, 8, 32, 48, 5
    f64 = dict(dtype=torch.float64)
    x = torch.randn(t, hidden, **f64)
    norm, post = torch.rand(hidden, **f64) + 0.5, torch.rand(hidden, **f64) + 0.5
    q_w, k_w, v_w = torch.randn(heads * d, hidden, **f64), torch.randn(kv * d, hidden, **f64), torch.randn(kv * d, hidden, **f64)
    o_w, gate_w, up_w, down_w = (torch.randn(hidden, heads * d, **f64), torch.randn(inter, hidden, **f64),
                                 torch.randn(inter, hidden, **f64), torch.randn(hidden, inter, **f64))  # fmt: skip
    angles = torch.randn(t, d // 2, **f64)
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, None]
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, None]
    signed = torch.cat([-sin[..., : d // 2], sin[..., d // 2 :]], -1)

    def rms(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def rotate_half(v):
        return torch.cat([-v[..., d // 2 :], v[..., : d // 2]], -1)

    h = rms(x, norm)
    q = (h @ q_w.T).view(t, heads, d)
    k = (h @ k_w.T).view(t, kv, d)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    got = attention_inputs(x, norm, torch.cat([q_w, k_w, v_w]), cos, signed, 1e-6, heads, kv)
    tol = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[0], q, **tol)
    torch.testing.assert_close(got[1], k, **tol)
    torch.testing.assert_close(got[2], (h @ v_w.T).view(t, kv, d), **tol)
    attention = torch.randn(t, heads * d, **f64)
    mid = x + attention @ o_w.T
    h = rms(mid, post)
    want = mid + (torch.nn.functional.silu(h @ gate_w.T) * (h @ up_w.T)) @ down_w.T
    stream, mlp = layer_output(x, attention, o_w, post, torch.cat([gate_w, up_w]), down_w, 1e-6)
    torch.testing.assert_close(stream, mid, **tol)
    torch.testing.assert_close(stream + mlp, want, **tol)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor's CPU kernels need a C++ compiler")
def test_inductor_keeps_the_residual_adds_out_of_the_products():
    """Compiled with inductor, the layer's parts call no addmm (a residual add folded into a matrix product,
    which cuBLAS runs as a copy and a product with a beta term; `row_product.linear` says why), where the layer's
    add written plainly, `x + a @ w.T`, is one: the control, without which the test would say nothing."""
    from torch._inductor.utils import run_and_get_code

    def plain_add(x, attention, o):
        return x + attention @ o.T

    torch.manual_seed(0)
    heads, kv, d, hidden, inter = 4, 2, 8, 32, 48
    x, attention = torch.randn(1, hidden), torch.randn(1, heads * d)
    o, gate_up, down, norm = torch.randn(hidden, heads * d), torch.randn(2 * inter, hidden), torch.randn(hidden, inter), torch.ones(hidden)
    qkv, cos, sin = torch.randn((heads + 2 * kv) * d, hidden), torch.ones(1, 1, d), torch.zeros(1, 1, d)
    cache = torch.zeros(kv, 4, d)

    def code(fn, *args):
        torch._dynamo.reset()
        return "\n".join(run_and_get_code(torch.compile(fn, fullgraph=True, backend="inductor"), *args)[1])

    try:
        assert "addmm" in code(plain_add, x, attention, o)
        assert "addmm" not in code(layer_output, x, attention, o, norm, gate_up, down, 1e-6)
        slots = torch.zeros(1, dtype=torch.long)
        assert "addmm" not in code(cached_attention_inputs, x, x, norm, qkv, cos, sin, 1e-6, heads, kv, cache, cache.clone(), slots)
    finally:
        torch._dynamo.reset()


def test_a_trees_attention_compiles_its_width_as_a_constant(monkeypatch):
    """`StaticTarget.attend` compiles the tree attention (`eager_attention`) with the attention width static, whatever
    widths and row counts come (a symbolic width makes inductor loop its softmax over the row: 3.5x slower on the H200);
    the rows may go dynamic. Checked on what dynamo hands the backend: the width of every compiled graph's key and
    mask is a plain int, and each width met compiled (the control: the rows did go symbolic)."""
    from lmms_msd.speculative.fast.static_target import StaticTarget

    compiled_shapes = []

    def backend(gm, example_inputs):
        values = [node.meta.get("example_value") for node in gm.graph.nodes if node.op == "placeholder"]
        compiled_shapes.append([tuple(v.shape) for v in values if isinstance(v, torch.Tensor)])  # SymInts where dynamic
        return gm.forward

    monkeypatch.setattr(graphs, "COMPILE_BACKEND", backend)
    torch._dynamo.reset()
    try:
        static = StaticTarget(tiny_target(0), 1024, compile=True)
        heads, d = static.n_heads, static.head_dim
        for rows, width in ((4, 256), (8, 256), (16, 512), (4, 768), (32, 512)):
            f64 = dict(dtype=torch.float64)  # as test_eager_attention_is_sdpa: only the order of sums differs
            q = torch.randn(1, heads, rows, d, **f64)
            k, v = torch.randn(1, heads, width, d, **f64), torch.randn(1, heads, width, d, **f64)
            mask = torch.zeros(1, 1, rows, width, **f64)
            got = static.attend(q, k, v, mask, enable_gqa=False)
            torch.testing.assert_close(got, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=1e-12, atol=1e-12)
    finally:
        torch._dynamo.reset()
    widths = [[shape[-1] for shape in shapes if len(shape) == 4 and shape[1] == 1] for shapes in compiled_shapes]  # the masks'
    assert all(len(w) == 1 and type(w[0]) is int for w in widths), compiled_shapes
    assert sorted(w[0] for w in widths) == [256, 256, 512, 768], compiled_shapes  # rows 4 then 8 at 256: a recompile, then dynamic rows
    assert any(isinstance(shape[2], torch.SymInt) for shapes in compiled_shapes for shape in shapes if len(shape) == 4), "the rows went dynamic"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's GPU kernels need CUDA")
def test_compiled_cuda_graphs_decode_the_same():
    """Inductor's kernels captured in CUDA graphs: greedy outputs equal the uncompiled engine's."""
    target, draft = cuda_pair()
    plain_engine = StaticEngine(target, draft, max_length=256)
    compiled_engine = StaticEngine(target, draft, max_length=256, compile=True)
    for i in range(3):
        prompt = random_prompt(target, 700 + i)
        config = GenerationConfig(max_new_tokens=24)
        want = plain_generate(plain_engine, prompt, config).token_ids
        assert plain_generate(compiled_engine, prompt, config).token_ids == want
        for tree in TREES.values():
            assert speculative_generate(compiled_engine, prompt, config, tree).token_ids == want


def test_the_plugin_compiles_with_torch_compile(tiny_hf_dir, tiny_draft_dir, docs, tmp_path, traced):  # noqa: F811
    """model_args torch_compile=true: the static engine compiles (one request at a time and batched), the
    answers are the uncompiled engine's, and the statistics say it."""
    from test_plugin import request, run
    from test_plugin_batching import models

    requests = [request(i) for i in (2, 0, 3)]
    for batch in ("1", "2"):
        args = dict(engine="static", max_length="256", max_batch=batch)
        compiled, _ = models(tiny_hf_dir, tiny_draft_dir, tmp_path / f"c{batch}", torch_compile="true", **args)
        reference, _ = models(tiny_hf_dir, tiny_draft_dir, tmp_path / f"r{batch}", **args)
        assert compiled.decoder.runtime.compile is True and reference.decoder.runtime.compile is False
        assert run(compiled, requests, docs) == run(reference, requests, docs)
        meta = json.loads(Path(compiled.report.path).read_text())
        assert meta["torch_compile"] is True
    assert traced() >= 2


@pytest.mark.parametrize("kv", [4, 2])
def test_eager_attention_is_sdpa(kv):
    """`eager_attention` (what compiled layers run for steps and trees) against SDPA, in float64 so that only
    the order of sums differs: the masked scale-softmax-values product, grouped-query heads repeated."""
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    query, key, value = torch.randn(2, 4, 5, 8, **f64), torch.randn(2, kv, 9, 8, **f64), torch.randn(2, kv, 9, 8, **f64)
    visible = torch.rand(2, 1, 5, 9) < 0.6
    visible[..., 0] = True  # every row sees a slot
    mask = torch.zeros(visible.shape, **f64).masked_fill_(~visible, torch.finfo(torch.float64).min)
    want = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=kv != 4)
    torch.testing.assert_close(eager_attention(query, key, value, mask, kv != 4), want, rtol=1e-12, atol=1e-12)


def test_the_compiled_draft_head_runs_only_inside_graphed_functions(traced, monkeypatch, inside_graphed):  # noqa: F811
    """A compiled function keeps the SDPA backend it was traced with (`graphs.compiled`), so the draft's
    compiled head is called by graphed functions alone (every backend); a prompt's rows, a forward of
    varying shape, run the uncompiled head without cuDNN's attention (`varying_shapes`)."""
    from lmms_msd.speculative.fast import static_drafter

    def recording(fn):
        inner = compile_it(fn)

        def call(*args):
            calls.append(inside_graphed())
            return inner(*args)

        return call

    calls, compile_it = [], static_drafter.compiled
    monkeypatch.setattr(static_drafter, "compiled", recording)
    target = tiny_target(3)
    engine = StaticEngine(target, following_draft(target), max_length=256, compile=True)
    ids = torch.randint(0, target.vocab_size - 1, (80,), generator=torch.Generator().manual_seed(7))
    prompt = target.embed(ids, None)  # 80 rows: more than the draft's graphs take, so its prefill runs eagerly
    speculative_generate(engine, prompt, GenerationConfig(max_new_tokens=8), TREES["opt"])
    assert calls, "the compiled head ran"
    assert all(calls), f"{calls.count(False)} of {len(calls)} calls of the compiled head outside a graphed function"
