"""The target's language model over a preallocated KV cache written by slot, for the GPU loop.

`Target.forward` runs transformers' Llama with a growing `DynamicCache`: right for correctness on any
device, but each step allocates, concatenates and launches hundreds of small kernels from Python.
`StaticTarget` computes the same function (the same weights, RoPE table and SDPA attention) with:

- one KV cache tensor per kind, [layers, kv_heads, capacity, head_dim], written at given slots, so a
  tree's nodes go to the slots after the prefix and `keep_path` moves the accepted ones down;
- q/k/v and gate/up projections packed into one matrix each (the transformers module's parameters
  are re-pointed at slices of the packed ones, so no weight is held twice);
- token counts and attention widths rounded up to buckets and each (count, width) shape replayed
  from a CUDA graph (`lmms_msd.speculative.fast.graphs`), a tree's slots and mask made inside it from the
  prefix and the count (`_forward_padded`); a prompt padded to a multiple of PROMPT_STEP
  positions (`graphs.prompt_rows`) and replayed from a graph per padded length (`prefill`; eagerly where
  the padding does not fit);
- the matrix products through `row_product.linear`: a Triton kernel for plain decoding's one row on CUDA (cuBLAS
  reached less of the bandwidth there), the library's product otherwise, written so that a residual add stays
  out of it and, compiled, joins the next RMSNorm's kernel.

The target's vision tower runs from CUDA graphs too (`replay_vision`, one graph per number of images), so
that a prompt's image costs its kernels' time rather than their launches.

Padding rows (a bucket is larger than the tree) read slot 0 and write a scratch slot (the last one),
which no real row ever sees; a prompt's padding rows come after it and write the slots after it, which the
next forward writes again before any row reads them. Norms use `torch.nn.functional.rms_norm` (one fused kernel), so results
equal transformers' to rounding, not bit for bit: the loop compares speculative decoding against
plain decoding through this same class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmms_msd.models.target import Target
from lmms_msd.speculative.fast.graphs import GraphedFunction, bucket, compiled, prompt_rows, varying_shapes, width_bucket
from lmms_msd.speculative.fast.row_product import linear
from lmms_msd.speculative.verify import greedy_outcome

TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256)
# compiled: the query rows per sequence (least, most) for which `eager_attention` replaces SDPA: a tree's
EAGER_ATTENTION_ROWS = (2, 64)


@dataclass
class _Layer:
    input_norm: torch.Tensor  # [H]
    qkv: torch.Tensor  # [(heads + 2 kv_heads) * D, H]
    o: torch.Tensor  # [H, heads * D]
    post_norm: torch.Tensor  # [H]
    gate_up: torch.Tensor  # [2 I, H]
    down: torch.Tensor  # [H, I]


def _pack(*linears: torch.nn.Linear) -> torch.Tensor:
    """Concatenate the weights of several bias-free Linear layers along the output dimension and
    re-point each layer's weight at its slice of the result (no copy kept twice)."""
    for layer in linears:
        if layer.bias is not None:
            raise ValueError(f"StaticTarget supports bias-free projections; {layer} has a bias")
    packed = torch.cat([layer.weight.data for layer in linears])
    start = 0
    for layer in linears:
        rows = layer.weight.shape[0]
        layer.weight.data = packed[start : start + rows]
        start += rows
    return packed


def rope_tables(inv_freq: torch.Tensor, scaling: float, capacity: int, dtype: torch.dtype):
    """cos and signed sin per position, as transformers computes them (float32, then cast).

    returns cos [capacity, D] and sin [capacity, D] with the first half negated, so that
    rotate_half(x) * sin == x.roll(D/2, -1) * signed_sin.
    """
    positions = torch.arange(capacity, dtype=torch.float32, device=inv_freq.device)
    freqs = positions[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos() * scaling, emb.sin() * scaling
    half = sin.shape[-1] // 2
    signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
    return cos.to(dtype), signed.to(dtype)


def attention_inputs(x, input_norm, qkv, cos, sin, eps: float, heads: int, kv_heads: int):
    """A LLaMA layer up to its attention: the input RMSNorm, the packed q/k/v projection and RoPE (with
    `rope_tables`' signed sin). x: [..., T, H]; cos, sin: [..., T, 1, D] -> q [..., T, heads, D], k and v
    [..., T, kv_heads, D]. Pure (no cache write), so that it can be compiled (`StaticTarget(compile=True)`)."""
    d = cos.shape[-1]
    h = F.rms_norm(x, (x.shape[-1],), input_norm, eps)
    packed = linear(h, qkv).unflatten(-1, (heads + 2 * kv_heads, d))
    qk = packed[..., : heads + kv_heads, :]
    qk = torch.addcmul(qk * cos, qk.roll(d // 2, dims=-1), sin)
    return qk[..., :heads, :], qk[..., heads:, :], packed[..., heads + kv_heads :, :]


def cached_attention_inputs(x, delta, input_norm, qkv, cos, sin, eps: float, heads: int, kv_heads: int, keys, values, slots):
    """The residual stream plus the last layer's MLP output (`layer_output`), then `attention_inputs` for one
    sequence with k and v written to the layer's cache at `slots`: in one function, so that compiled, the
    add joins the RMSNorm's kernel and the RoPE kernel writes k and v (no kernels of their own). x, delta:
    [T, H]; keys, values: [kv_heads, S, D] (one layer's cache); slots: [T] long -> q [T, heads, D], x + delta"""
    x = x + delta
    q, k, v = attention_inputs(x, input_norm, qkv, cos, sin, eps, heads, kv_heads)
    keys.index_copy_(1, slots, k.transpose(0, 1))
    values.index_copy_(1, slots, v.transpose(0, 1))
    return q, x


def eager_attention(query, key, value, attn_mask, enable_gqa: bool = False):
    """`F.scaled_dot_product_attention(query, key, value, attn_mask, enable_gqa=...)` spelled out as
    transformers' eager attention computes it: scores in the inputs' dtype, softmax in float32 or wider (after the
    scale and the additive mask), probabilities back in the inputs' dtype times the values. What compiled
    layers run for a tree's rows: on the H200 (`scripts/kernel_probes.py attention`, 32 heads of 128 over
    768-1024 slots), compiled as the engine compiles it, it took 13.3-14.0 us where SDPA took 21.5-26.6 for
    16 query rows, 21.0-21.9 against 22.5-27.9 for 64, and 11.4-13.8 against 9.8-10.9 for one row.
    query: [..., heads, T, D]; key, value: [..., kv_heads, S, D]; attn_mask: broadcastable to [..., heads, T, S]
    -> [..., heads, T, D]"""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)
    scores = query @ key.transpose(-1, -2)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * query.shape[-1] ** -0.5 + attn_mask
    return scores.softmax(dim=-1).to(query.dtype) @ value


def layer_output(x, attention, o, post_norm, gate_up, down, eps: float):
    """A LLaMA layer after its attention: the output projection added to the residual, then the MLP block
    (RMSNorm, SiLU-gated packed gate/up, down), whose output is returned apart for the next layer's input norm
    (`cached_attention_inputs`) or the final norm to add. x, attention: [..., T, H] -> the residual stream
    after the attention's add [..., T, H] and the MLP's output [..., T, H] (the layer's output is their sum)."""
    x = x + linear(attention, o)
    h = F.rms_norm(x, (x.shape[-1],), post_norm, eps)
    gate, up = linear(h, gate_up).chunk(2, dim=-1)
    return x, linear(F.silu(gate) * up, down)


def replay_vision(target: Target, enabled: bool) -> None:
    """From here on, `target.image_features` (outside autograd) runs the vision tower and projector
    (`Target.vision_forward`) through a `GraphedFunction`: from CUDA graphs, one per number of images, when
    `enabled`; the same kernels
    as eager, so the same features. On the H200 7B testbed a prompt's device stage with one 336-px image
    took 7.4-14.4 ms with the tower eager (its kernel launches, more than their work; it varied with the
    machine's host) and 2.4-2.7 ms from graphs (`scripts/kernel_probes.py vision`)."""
    runner = target.vision_runner
    if runner is None or (enabled and not runner.enabled):  # disabled (CPU), it runs the same code eagerly
        target.vision_runner = GraphedFunction(lambda pixel_values: (target.vision_forward(pixel_values),), enabled, target.device)


class StaticTarget:
    """A `Target`'s language model with a static KV cache; one generation at a time.

    capacity: slots in the cache (prompt + new tokens + one tree + 1 scratch slot must fit)
    cuda_graphs: replay fixed-shape forwards (and the vision tower, `replay_vision`) from CUDA graphs (None: when the
    model is on CUDA)
    compile: run each layer's parts, `cached_attention_inputs` (the cache writes included), the attention
    of steps and trees (`eager_attention` in place of SDPA, `attend`) and `layer_output`, through
    torch.compile (`lmms_msd.speculative.fast.graphs.compiled`: fused norms, RoPE with the cache writes, the
    softmax with its scale and mask, SiLU gating; one compilation per input shape shared by all layers)
    """

    # the layer up to its attention, cache writes included (a subclass with cache rows has its own)
    attention_inputs = staticmethod(cached_attention_inputs)

    def __init__(self, target: Target, capacity: int, cuda_graphs: bool | None = None, compile: bool = False) -> None:
        lm = target.model.model.language_model
        cfg = target.model.config.text_config
        if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
            raise ValueError("StaticTarget supports LLaMA layers without attention/MLP biases (LLaVA-1.5's)")
        rotary = lm.rotary_emb
        if getattr(rotary, "rope_type", "default") not in ("default", "linear"):
            raise ValueError(f"StaticTarget supports default or linear RoPE, not {rotary.rope_type!r}")
        capacity = min(capacity, target.max_length)
        self.target = target
        self.capacity = capacity
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden_size = cfg.hidden_size
        self.eps = float(cfg.rms_norm_eps)
        self.layers = [
            _Layer(
                input_norm=layer.input_layernorm.weight.data,
                qkv=_pack(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                o=layer.self_attn.o_proj.weight.data,
                post_norm=layer.post_attention_layernorm.weight.data,
                gate_up=_pack(layer.mlp.gate_proj, layer.mlp.up_proj),
                down=layer.mlp.down_proj.weight.data,
            )
            for layer in lm.layers
        ]
        self.final_norm = lm.norm.weight.data
        self.embed = target.model.get_input_embeddings().weight.data
        self.lm_head = target.lm_head.weight.data
        device, dtype = self.lm_head.device, self.lm_head.dtype
        self.cos, self.sin = rope_tables(rotary.inv_freq.to(device), float(rotary.attention_scaling), capacity, dtype)
        shape = self.cache_shape(capacity)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.scratch = capacity - 1
        self.slots = torch.arange(capacity, device=device)
        enabled = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        replay_vision(target, enabled)
        self.compile = compile
        self._attention_inputs = compiled(self.attention_inputs) if compile else self.attention_inputs
        self._layer_output = compiled(layer_output) if compile else layer_output
        self._eager_attention = compiled(eager_attention) if compile else None
        self._graphed = GraphedFunction(self._forward_padded, enabled, device)
        self._graphed_greedy = GraphedFunction(self._forward_padded_greedy, enabled, device)
        self._graphed_next = GraphedFunction(self._forward_next, enabled, device)
        self._graphed_prompt = GraphedFunction(self._forward_prompt, enabled, device)

    def cache_shape(self, capacity: int) -> tuple[int, ...]:
        """The shape of each KV cache tensor: [layers, kv_heads, capacity, head_dim] (a subclass with rows
        of sequences adds its own dimension)."""
        return (len(self.layers), self.n_kv_heads, capacity, self.head_dim)

    @property
    def device(self) -> torch.device:
        return self.lm_head.device

    @property
    def cuda_graphs(self) -> bool:
        """Whether fixed-shape forwards replay CUDA graphs."""
        return self._graphed.enabled

    @property
    def usable(self) -> int:
        """Slots a generation may fill (the last one is the padding rows' scratch slot)."""
        return self.capacity - 1

    def width(self, used: int) -> int:
        """The attention width (a bucket) that covers `used` slots."""
        return width_bucket(used, self.capacity)

    # ---- the forward ------------------------------------------------------------------------------
    def _forward_embeds(self, x, positions, slots, mask):
        """x: [T, H]; positions, slots: [T] long; mask: [T, S] additive -> hidden [T, H], logits [T, V] f32"""
        hidden = self._run_layers(x, positions, slots, mask)
        return hidden, linear(hidden, self.lm_head).float()

    def _run_layers(self, x, positions, slots, mask):
        """The language model up to its final norm. x: [T, H]; positions, slots: [T] long; mask: [T, S]
        additive, or None for a prompt at slots 0..T-1 (causal over them, SDPA's own causal kernels) -> hidden [T, H]"""
        width = x.shape[0] if mask is None else mask.shape[1]
        heads, kv = self.n_heads, self.n_kv_heads
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [T, 1, D]
        attn_mask = None if mask is None else mask[None, None]
        delta = torch.zeros_like(x)  # what the last layer's MLP adds to the stream (`layer_output`)
        for index, w in enumerate(self.layers):
            q, x = self._attention_inputs(
                x, delta, w.input_norm, w.qkv, cos, sin, self.eps, heads, kv, self.keys[index], self.values[index], slots
            )
            out = self.attend(
                q.transpose(0, 1)[None],
                self.keys[index, :, :width][None],
                self.values[index, :, :width][None],
                attn_mask=attn_mask,
                enable_gqa=kv != heads,
            )  # [1, heads, T, D]
            x, delta = self._layer_output(x, out[0].transpose(0, 1).flatten(-2), w.o, w.post_norm, w.gate_up, w.down, self.eps)
        return F.rms_norm(x + delta, (self.hidden_size,), self.final_norm, self.eps)

    def attend(self, query, key, value, attn_mask, enable_gqa: bool):
        """A layer's attention (`F.scaled_dot_product_attention`'s arguments): SDPA, or, compiled, `eager_attention`
        for EAGER_ATTENTION_ROWS query rows (a tree's), whose scores it materialises; prompts keep SDPA's fused
        kernels, and so does plain decoding's one row, where SDPA's kernel was about as fast (`eager_attention`).
        attn_mask None: causal (a prompt's queries over its own keys), SDPA's is_causal."""
        if attn_mask is None:
            return F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=enable_gqa)
        least, most = EAGER_ATTENTION_ROWS
        if self._eager_attention is not None and least <= query.shape[-2] <= most:
            # the width compiles as a constant, once per width bucket: with it symbolic (torch.compile makes a dimension
            # dynamic once it changes) inductor's softmax loops over the row instead of holding it, on the H200 346.5
            # us of a 1024-slot tree verification against 98.9 for the 768 slots compiled first
            # (`benchmarks/h200_7b_b1_step_host/`, r36's kernels); the rows may still go dynamic
            for tensor in (key, value, attn_mask):
                torch._dynamo.mark_static(tensor, tensor.dim() - 1 if tensor is attn_mask else tensor.dim() - 2)
            return self._eager_attention(query, key, value, attn_mask, enable_gqa)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, enable_gqa=enable_gqa)

    def _forward_tokens(self, tokens, positions, slots, mask):
        return self._forward_embeds(F.embedding(tokens, self.embed), positions, slots, mask)

    def _forward_next(self, token, position, window):
        """Plain decoding's step, with its mask built inside the graph: token, position [1] long;
        window: slots 0..S-1 [S] (its length picks the attention width) -> hidden [1, H], logits [1, V]."""
        mask = torch.zeros(1, window.shape[0], dtype=self.lm_head.dtype, device=window.device)
        mask.masked_fill_(window[None, :] > position[:, None], torch.finfo(self.lm_head.dtype).min)
        return self._forward_tokens(token, position, position, mask)

    # ---- what the loops call -----------------------------------------------------------------------
    def mask(self, visible: torch.Tensor) -> torch.Tensor:
        """[T, S] bool -> additive float mask in the model's dtype."""
        return torch.zeros(visible.shape, dtype=self.lm_head.dtype, device=self.device).masked_fill_(
            ~visible, torch.finfo(self.lm_head.dtype).min
        )

    @torch.inference_mode()
    def prefill(self, inputs_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt at slots 0..L-1, causal over them (SDPA's causal kernels). Padded with zero rows to a
        multiple of PROMPT_STEP and replayed from a graph per padded length (`_forward_prompt`): the padding
        rows come after the prompt, so causally no prompt row sees them, and the slots they write (L and on)
        are written again by the next forward before any row reads them. A prompt whose padding would not fit
        the cache runs eagerly at its own length (without cuDNN's attention, `varying_shapes`: its plans
        are built once per shape). inputs_embeds: [L, H] -> hidden [L, H] and the logits at the last
        position [1, V] (what choosing the next token needs; the head over every position would be L times
        the work and the memory)"""
        length = inputs_embeds.shape[0]
        self._check_room(length)
        x = inputs_embeds.to(self.lm_head.dtype)
        last = self.slots[length - 1 : length]
        padded = prompt_rows(length)
        if padded > self.usable:
            return varying_shapes(self._forward_prompt)(x, last)
        hidden, logits = self._graphed_prompt(F.pad(x, (0, 0, 0, padded - length)), last)
        return hidden[:length], logits

    def _forward_prompt(self, x, last):
        """x: [T, H], a prompt (and padding) at slots 0..T-1, causal; last: [1] long, the prompt's last
        position -> hidden [T, H], logits [1, V] float32 there."""
        positions = self.slots[: x.shape[0]]
        hidden = self._run_layers(x, positions, positions, None)
        return hidden, linear(hidden.index_select(0, last), self.lm_head).float()

    @torch.inference_mode()
    def forward_tokens(
        self, tokens: torch.Tensor, positions: torch.Tensor, prefix_len: int, tree_visible: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """n new tokens after `prefix_len` committed slots, written to the slots that follow.

        tokens, positions: [n] long on the device
        tree_visible: [n, n] bool, which new tokens each one sees (a tree's ancestor mask, itself
        included); None is causal
        returns hidden [n, H] and logits [n, V] float32, valid until the next call

        Outside the graph the inputs are only padded to the row bucket (three pads); the slots and the mask
        are made inside it from the prefix and the count (`_forward_padded`), since a step's few dozen
        small operations, issued from Python, took longer than the device took to run them.
        """
        hidden, logits = self._padded(self._forward_padded, self._graphed, tokens, positions, prefix_len, tree_visible)
        return hidden[: tokens.shape[0]], logits[: tokens.shape[0]]

    @torch.inference_mode()
    def forward_tree_greedy(
        self, tokens: torch.Tensor, parents: torch.Tensor, positions: torch.Tensor, prefix_len: int, tree_visible: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward_tokens` over a tree with greedy acceptance in the same graph (`verify.greedy_outcome` over the
        padded rows), so that a greedy step's acceptance costs no kernel launches of its own and its one read
        waits for one graph. tokens, parents, positions: [n]; tree_visible: [n, n] (`Tree.ancestor_mask`)
        -> hidden [n, H], logits [n, V], the outcome [2 + 2T] (T >= n, the padded rows) and the hidden at the
        path's nodes [T, H] (its first a + 1 rows), valid until the next call."""
        hidden, logits, outcome, path_hidden = self._padded(
            self._forward_padded_greedy, self._graphed_greedy, tokens, positions, prefix_len, tree_visible, parents
        )  # fmt: skip
        return hidden[: tokens.shape[0]], logits[: tokens.shape[0]], outcome, path_hidden

    def _padded(self, function, graphed, tokens, positions, prefix_len, tree_visible, *extra):
        """Run `function` (a `_forward_padded*`) over the rows padded to their bucket: from its graph (`graphed`)
        up to the largest bucket, eagerly past it. extra: [n] long inputs after the tree mask, padded with 0."""
        n = tokens.shape[0]
        self._check_room(prefix_len + n)
        rows = bucket(n, TOKEN_BUCKETS) if n <= TOKEN_BUCKETS[-1] else n
        width = self.width(prefix_len + n)
        if tree_visible is None:
            tree_visible = torch.ones(n, n, dtype=torch.bool, device=self.device).tril_()
        pad = rows - n
        # the prefix and the count go in as views of the slot numbers (slot i holds i): on the device with no copy
        run = graphed if rows <= TOKEN_BUCKETS[-1] else varying_shapes(function)
        padded = [F.pad(t, (0, pad)) for t in (tokens, positions)] + [F.pad(tree_visible, (0, pad, 0, pad))]
        padded += [F.pad(t, (0, pad)) for t in extra]
        return run(*padded, self.slots[prefix_len : prefix_len + 1], self.slots[n : n + 1], self.slots[:width])

    def _forward_padded_greedy(self, tokens, positions, tree_visible, parents, prefix, count, window):
        """`_forward_padded`, then greedy acceptance over its T rows: depths are positions - P (negative on the
        padding rows, which see no tree node), so no padding row is ever on the path. -> hidden, logits,
        the outcome [2 + 2T] and the hidden at the path's T places."""
        hidden, logits = self._forward_padded(tokens, positions, tree_visible, prefix, count, window)
        outcome = greedy_outcome(tokens, parents, positions - prefix, tree_visible, logits.argmax(dim=-1))
        rows = tokens.shape[0]
        return hidden, logits, outcome, hidden.index_select(0, outcome[2 : 2 + rows])

    def _forward_padded(self, tokens, positions, tree_visible, prefix, count, window):
        """`forward_tokens` inside its graph. tokens, positions: [T] long, n real rows then padding; tree_visible:
        [T, T] bool, the real rows' [n, n] then False; prefix, count: [1] long, P and n; window: [S] slots 0..S-1.
        Row i < n writes slot P + i and sees slots 0..P-1 and the tree slots P + j it sees in tree_visible; a
        padding row (token 0 at position 0) writes the scratch slot and sees slot 0 only.
        Example: P = 5, n = 2 in T = 4 rows, S = 256: slots [5, 6, C - 1, C - 1]; row 1 sees 0..4 and 5 + j for j
        with tree_visible[1, j]; rows 2, 3 see slot 0."""
        rows = tokens.shape[0]
        place = self.slots[:rows]
        real = place < count  # [T]
        slots = (prefix + place).masked_fill(~real, self.scratch)
        offset = window - prefix  # [S]: a slot's place in the tree, negative in the prefix
        in_tree = (offset >= 0) & (offset < rows)
        tree = tree_visible.gather(1, offset.clamp(0, rows - 1)[None, :].expand(rows, -1)) & in_tree  # [T, S]
        visible = torch.where(real[:, None], (window < prefix)[None, :] | tree, (window == 0)[None, :])
        return self._forward_tokens(tokens, positions, slots, self.mask(visible))

    @torch.inference_mode()
    def forward_next(self, token: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One token of plain decoding at `position` (its slot too), after `position` committed slots.

        token: [1] long on the device -> hidden [1, H], logits [1, V] float32, valid until the next call
        """
        self._check_room(position + 1)
        positions = torch.full((1,), position, device=self.device)
        return self._graphed_next(token, positions, self.slots[: self.width(position + 1)])

    @torch.inference_mode()
    def keep_path(self, prefix_len: int, path: torch.Tensor) -> None:
        """Move the accepted nodes' keys and values down to the slots after the prefix.

        path: [a + 1] tree node indices, root first (node i sits at slot prefix_len + i)
        Example: prefix_len 5, path [0, 2] -> slots 5, 7 are copied to 5, 6.
        """
        source = prefix_len + path
        target = self.slots[prefix_len : prefix_len + path.shape[0]]
        self.keys.index_copy_(2, target, self.keys.index_select(2, source))
        self.values.index_copy_(2, target, self.values.index_select(2, source))

    def _check_room(self, used: int) -> None:
        if used > self.usable:
            raise ValueError(
                f"the generation needs {used} cache slots but the static cache holds {self.usable}; "
                f"raise max_length (at most the target's {self.target.max_length})"
            )
