"""`lmms-msd bench` with parts of the previous release (56c6eac) put back, named in the environment's PREV:
  loop     plain decoding reads each token before queuing the next forward; path_on_device synchronises
  layers   the residual adds inside the matrix products (inductor's addmm); needs prefill too
  prefill  the prompt forwards (target and draft) eager at their own length, the target's logits at every position
usage: PREV=loop,layers,prefill python bench_prev.py bench-args...   (written for main at the commit after 499346e)"""
import sys
import time

import torch

import lmms_msd.pipeline as pipeline
import lmms_msd.speculative.decoding as D
from lmms_msd.commands.cli import main
from lmms_msd.speculative.decoding import DecodeStats, GenerationResult, Stopper, _check_prompt, _PhaseClock, _synchronize
from lmms_msd.speculative.sampling import GenerationConfig, next_token
from lmms_msd.speculative.runtime import Runtime
from lmms_msd.models.target import EmbeddedPrompt


@torch.inference_mode()
def plain_generate(
    runtime: Runtime,
    prompt: EmbeddedPrompt,
    config: GenerationConfig,
    generator: torch.Generator | None = None,
    profile: bool = False,
) -> GenerationResult:
    """One target forward per token: the baseline, and the reference speculative decoding must equal.

    runtime: where the forwards run (`EagerRuntime(target)`: transformers' forward; a `StaticEngine`)
    profile: split the loop's time into `DecodeStats.verify_s` (the forwards) and `other_s` (choosing
    the token, stop checks), synchronising the device between them; the output is the same.
    """
    target = runtime.target
    _check_prompt(target, prompt)
    device = target.device
    stopper = Stopper(target.tokenizer, target.eos_token_id, config.max_new_tokens, config.until)
    start = time.perf_counter()
    sequence, _, logits = runtime.prefill(prompt, config.max_new_tokens)
    try:
        token = next_token(logits[-1], config, generator)
        _synchronize(device)
        stats = DecodeStats(prefill_s=time.perf_counter() - start)
        clock = _PhaseClock(device, profile)
        tokens = [token]
        while stopper.first_stop(tokens, len(tokens) - 1) is None:
            stats.other_s += clock.lap()
            logits = runtime.forward_next(sequence, torch.full((1,), token, device=device))
            stats.verify_s += clock.lap()
            token = next_token(logits[-1], config, generator)
            tokens.append(token)
            stats.steps += 1
            stats.accepted.append(0)
    finally:
        runtime.release(sequence)
    stats.other_s += clock.lap()
    _synchronize(device)
    stats.wall_s = time.perf_counter() - start
    stats.new_tokens = len(tokens)
    return GenerationResult(stopper.text(tokens), tokens, stats)


def path_on_device(result, device):
    on_device = torch.tensor(result.path + result.path_tokens + [result.bonus], device=device)
    return on_device[: len(result.path)], on_device[len(result.path) :]



# PREV=loop,layers: the previous release's layer functions too (residual adds inside the products: addmm)
import os  # noqa: E402

import torch.nn.functional as F  # noqa: E402

import lmms_msd.speculative.fast.static_target as ST  # noqa: E402
from lmms_msd.speculative.fast.static_target import attention_inputs  # noqa: E402,F401

def cached_attention_inputs(x, input_norm, qkv, cos, sin, eps: float, heads: int, kv_heads: int, keys, values, slots):
    """`attention_inputs` for one sequence with k and v written to the layer's cache at `slots`: in one
    function, so that compiled, the RoPE kernel writes them (no copy kernels of their own). x: [T, H];
    keys, values: [kv_heads, S, D] (one layer's cache); slots: [T] long -> q [T, heads, D]"""
    q, k, v = attention_inputs(x, input_norm, qkv, cos, sin, eps, heads, kv_heads)
    keys.index_copy_(1, slots, k.transpose(0, 1))
    values.index_copy_(1, slots, v.transpose(0, 1))
    return q


def layer_output(x, attention, o, post_norm, gate_up, down, eps: float):
    """A LLaMA layer after its attention: the output projection added to the residual, then the MLP
    block (RMSNorm, SiLU-gated packed gate/up, down) added in turn. x, attention: [..., T, H] -> [..., T, H]."""
    x = x + attention @ o.T
    h = F.rms_norm(x, (x.shape[-1],), post_norm, eps)
    gate, up = (h @ gate_up.T).chunk(2, dim=-1)
    return x + (F.silu(gate) * up) @ down.T



class _Old:
    def _forward_embeds(self, x, positions, slots, mask):
        """x: [T, H]; positions, slots: [T] long; mask: [T, S] additive, or None for a prompt at slots 0..T-1
        (causal over them, SDPA's own causal kernels) -> hidden [T, H], logits [T, V] f32"""
        width = x.shape[0] if mask is None else mask.shape[1]
        heads, kv = self.n_heads, self.n_kv_heads
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [T, 1, D]
        attn_mask = None if mask is None else mask[None, None]
        for index, w in enumerate(self.layers):
            q = self._attention_inputs(x, w.input_norm, w.qkv, cos, sin, self.eps, heads, kv, self.keys[index], self.values[index], slots)
            out = self.attend(
                q.transpose(0, 1)[None],
                self.keys[index, :, :width][None],
                self.values[index, :, :width][None],
                attn_mask=attn_mask,
                enable_gqa=kv != heads,
            )  # [1, heads, T, D]
            x = self._layer_output(x, out[0].transpose(0, 1).flatten(-2), w.o, w.post_norm, w.gate_up, w.down, self.eps)
        hidden = F.rms_norm(x, (self.hidden_size,), self.final_norm, self.eps)
        return hidden, (hidden @ self.lm_head.T).float()



PREV = os.environ.get("PREV", "loop").split(",")
if "prefill" in PREV or "layers" in PREV:  # the prompt eager at its own length, logits everywhere
    from lmms_msd.speculative.fast.graphs import varying_shapes

    @torch.inference_mode()
    @varying_shapes
    def prefill(self, inputs_embeds):
        length = inputs_embeds.shape[0]
        self._check_room(length)
        positions = self.slots[:length]
        return self._forward_embeds(inputs_embeds.to(self.lm_head.dtype), positions, positions, None)

    ST.StaticTarget.prefill = prefill
    import lmms_msd.speculative.fast.engine as E
    from lmms_msd.speculative.fast.static_drafter import StaticDrafter

    class EagerPrompts(StaticDrafter):  # the draft's prompt eager at its own length too
        def __init__(self, *args, **kwargs):
            kwargs["graph_prompts"] = False
            super().__init__(*args, **kwargs)

    E.StaticDrafter = EagerPrompts
if "layers" in PREV:
    ST.StaticTarget.attention_inputs = staticmethod(cached_attention_inputs)
    ST.layer_output = layer_output
    ST.StaticTarget._forward_embeds = _Old._forward_embeds

if "loop" in PREV:
    D.plain_generate = pipeline.plain_generate = plain_generate
    D.path_on_device = path_on_device
print(f"previous release's {PREV} put back", flush=True)
sys.exit(main(sys.argv[1:]))
