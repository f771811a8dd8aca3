"""The MSD draft head: its module, its KV cache, and its checkpoint format (DESIGN 4.1).

The head is one LLaMA decoder layer without the input RMSNorm, fed at text position t with
fc([embed(x_{t+1}); f_t]) (embedding first; f_t is the target's last hidden state after its final
norm) and at image positions with the projected image embedding itself. It has no final norm and no
lm_head: logits are target.lm_head(h). Checkpoints are a folder with a LLaMA-style `config.json` and
`model.safetensors` or `pytorch_model.bin` (or shards of either with their `*.index.json`, as
transformers writes them), keys without prefix (`embed_tokens.weight`, `fc.weight`, `fc.bias`,
`layers.0.self_attn.q_proj.weight`, ...), as released for `lucylyn/MSD-LLaVA1.5-7B`. The embedding is
a frozen copy of the target's and is stored, as MSD (DeepSpeed's save_16bit_model, frozen parameters
included) and EAGLE-1/2 store it; EAGLE-3 heads leave it out but carry an lm_head of their own.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmms_msd.models.checkpoints import (
    WEIGHT_FILES,
    find_weight_files,
    load_weight_file,
    read_json,
    resolve_folder,
    save_safetensors,
)

logger = logging.getLogger(__name__)

# what a hub download of a draft fetches: the config and any of WEIGHT_FILES, shards included
DOWNLOAD_PATTERNS = ["config.json", *WEIGHT_FILES, "model-*-of-*.safetensors", "pytorch_model-*-of-*.bin"]


@dataclass(frozen=True)
class DraftConfig:
    """The LLaMA-style keys of an MSD checkpoint's config.json that the head needs."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    num_hidden_layers: int = 1
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    bias: bool = True  # of fc
    hidden_act: str = "silu"
    # The leading heads whose attention the visual intensity averages (None: every head). Not a released
    # key: `lmms_msd.testbed.inflate` sets it to the small head's count, since the zero heads it adds attend
    # uniformly and would otherwise dilute the calibrator's visual feature.
    visual_heads: int | None = None

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> DraftConfig:
        """Read a released config (it carries many other LLaMA keys, which are ignored)."""
        required = ["hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"]
        missing = [k for k in required if k not in raw]
        if missing:
            raise ValueError(f"{source} lacks the draft keys {missing}")
        if raw.get("rope_scaling"):
            raise ValueError(f"{source} sets rope_scaling={raw['rope_scaling']!r}; the MSD head supports plain RoPE only")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source} sets hidden_act={act!r}; the MSD head is a LLaMA layer with SiLU")
        rope_theta = raw.get("rope_theta", (raw.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        return cls(
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_attention_heads=int(raw["num_attention_heads"]),
            num_key_value_heads=int(raw.get("num_key_value_heads") or raw["num_attention_heads"]),
            vocab_size=int(raw["vocab_size"]),
            num_hidden_layers=int(raw.get("num_hidden_layers", 1)),
            head_dim=raw.get("head_dim"),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            bias=bool(raw.get("bias", True)),
        )

    def to_dict(self) -> dict[str, Any]:
        fields = {k: v for k, v in asdict(self).items() if not (k == "visual_heads" and v is None)}
        return {"model_type": "llava", "architectures": ["MSDDraftHead"], **fields}

    @classmethod
    def like_target(cls, text_config: Any, vocab_size: int) -> DraftConfig:
        """The head for a target: one layer shaped as the target's (transformers LlamaConfig) layers."""
        rope = getattr(text_config, "rope_theta", None) or (getattr(text_config, "rope_parameters", None) or {}).get("rope_theta")
        return cls(
            hidden_size=text_config.hidden_size,
            intermediate_size=text_config.intermediate_size,
            num_attention_heads=text_config.num_attention_heads,
            num_key_value_heads=text_config.num_key_value_heads,
            vocab_size=vocab_size,
            head_dim=getattr(text_config, "head_dim", None),
            rms_norm_eps=text_config.rms_norm_eps,
            rope_theta=float(rope or 10000.0),
        )


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class DraftAttention(nn.Module):
    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        d = config.resolved_head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.visual_heads = config.visual_heads or self.n_heads
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, config.hidden_size, bias=False)
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at the positions, computed once for q and k: positions [R, T] -> two [R, 1, T, D]"""
        freqs = positions.float()[..., None] * self.inv_freq  # [R, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [R, 1, T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [R, heads, T, D]; cos, sin: [R, 1, T, D] (`rope_tables`)"""
        return x * cos + rotate_half(x) * sin

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        layer_cache: DraftLayerCache,
        slots: torch.Tensor,
        visible: torch.Tensor,
        image_slots: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """R rows at once, row r against cache row r: x: [R, T, H]; positions, slots: [R, T]; visible:
        [R, T, S] bool over the row's cache slots 0..S-1.

        image_slots: [R, S] bool, the slots holding image positions, or None.
        returns the attention output [R, T, H] and, when image_slots is given, the head-averaged
        attention mass of each query on its row's image slots [R, T] (float32; else None).
        """
        r, t = x.shape[:2]
        q = self.q_proj(x).view(r, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(r, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(r, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.rope_tables(positions, q.dtype)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        keys, values = layer_cache.write(slots, k, v, visible.shape[2])  # [R, kv_heads, S, D]
        mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(~visible, torch.finfo(q.dtype).min)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask[:, None], enable_gqa=self.n_kv_heads != self.n_heads
        )
        mass = None if image_slots is None else self.image_mass(q, keys, visible, image_slots)
        return self.o_proj(out.transpose(1, 2).reshape(r, t, -1)), mass

    def image_mass(self, q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, image_slots: torch.Tensor) -> torch.Tensor:
        """The share of each query's attention that falls on its row's image slots, averaged over heads
        (the leading `visual_heads` of them: every head but in an inflated testbed head).

        Recomputes the attention probabilities next to SDPA (which does not return them), so the
        layer's output is the same bit for bit whether or not the mass is asked for.
        q: [R, heads, T, D]; keys: [R, kv_heads, S, D]; visible: [R, T, S]; image_slots: [R, S] -> [R, T] float32
        """
        assert image_slots.shape == (keys.shape[0], keys.shape[2]), (
            f"image_slots {tuple(image_slots.shape)} for {keys.shape[0]} rows of {keys.shape[2]} slots"
        )
        v, group = self.visual_heads, self.n_heads // self.n_kv_heads
        keys = (keys if group == 1 else keys.repeat_interleave(group, dim=1))[:, :v]  # [R, v, S, D]
        # few kernels: a tree level runs this once per level, and at a 7B draft's size each kernel counts
        logits = (q[:, :v].float() @ keys.float().transpose(-1, -2)) * self.head_dim**-0.5  # [R, v, T, S]
        probs = torch.where(visible[:, None], logits, float("-inf")).softmax(dim=-1)
        return (probs @ image_slots[:, None, :, None].float()).squeeze(-1).mean(dim=1)  # [R, v, T, 1] -> [R, T]


class DraftMLP(nn.Module):
    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    """A LLaMA decoder layer without the input RMSNorm (the fused input is already normalised)."""

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.self_attn = DraftAttention(config)
        self.mlp = DraftMLP(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, positions, layer_cache, slots, visible, image_slots=None):
        """-> (output [R, T, H], attention mass on image slots [R, T] or None); see DraftAttention."""
        attended, mass = self.self_attn(x, positions, layer_cache, slots, visible, image_slots)
        h = x + attended
        return h + self.mlp(self.post_attention_layernorm(h)), mass


class DraftLayerCache:
    """Preallocated keys and values of one layer, written by slot: [rows, kv_heads, capacity, D], a row
    per sequence (one, for a single generation).

    Slots past the committed prefix hold tree nodes of the current step; the next step simply
    overwrites them, so nothing is ever rolled back.
    """

    def __init__(
        self, n_kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype, device: torch.device, rows: int = 1
    ) -> None:
        self.keys = torch.zeros(rows, n_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)

    @classmethod
    def of_row(cls, layer_cache: DraftLayerCache, row: int) -> DraftLayerCache:
        """Row `row` of a many-row cache as a one-row cache: views, so writes land in the shared tensors."""
        view = cls.__new__(cls)
        view.keys, view.values = layer_cache.keys[row : row + 1], layer_cache.values[row : row + 1]
        return view

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` slots, at least doubling so growth stays rare."""
        if capacity <= self.capacity:
            return
        pad = self.keys.new_zeros(*self.keys.shape[:2], max(capacity, 2 * self.capacity) - self.capacity, self.keys.shape[3])
        self.keys = torch.cat([self.keys, pad], dim=2)
        self.values = torch.cat([self.values, torch.zeros_like(pad)], dim=2)

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, used: int):
        """Row r of the inputs writes cache row r: slots: [R, T] (all < used <= capacity); k, v:
        [R, kv_heads, T, D] -> keys, values of rows 0..R-1, slots [0, used) (views, no copy)."""
        assert used <= self.capacity, f"draft cache holds {self.capacity} slots, {used} asked; reserve first"
        r, t = slots.shape
        assert r <= self.keys.shape[0], f"{r} rows of inputs for a draft cache of {self.keys.shape[0]} rows"
        rows = torch.arange(r, device=slots.device)[:, None].expand(r, t)
        self.keys[rows, :, slots] = k.transpose(1, 2)  # [R, T, kv_heads, D] at (row, slot)
        self.values[rows, :, slots] = v.transpose(1, 2)
        return self.keys[:r, :, :used], self.values[:r, :, :used]


class MSDDraft(nn.Module):
    """The MSD draft head. Key names match the released checkpoints."""

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        if config.num_hidden_layers != 1:
            logger.warning("the draft config says num_hidden_layers=%d; MSD heads have 1", config.num_hidden_layers)
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=config.bias)
        self.layers = nn.ModuleList(DraftLayer(config) for _ in range(config.num_hidden_layers))

    def new_cache(self, capacity: int, rows: int = 1) -> list[DraftLayerCache]:
        """Empty keys and values for every layer: `rows` rows (one per sequence) of `capacity` slots."""
        p = self.fc.weight
        return [
            DraftLayerCache(self.config.num_key_value_heads, self.config.resolved_head_dim, capacity, p.dtype, p.device, rows)
            for _ in self.layers
        ]

    def fuse(self, next_embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The layer input at text positions: fc([embed(x_{t+1}); f_t]).

        next_embeds, features: [1, T, H] -> [1, T, H]
        """
        assert next_embeds.shape == features.shape, f"{tuple(next_embeds.shape)} != {tuple(features.shape)}"
        return self.fc(torch.cat([next_embeds, features.to(next_embeds.dtype)], dim=-1))

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: list[DraftLayerCache], slots: torch.Tensor, visible: torch.Tensor
    ) -> torch.Tensor:
        """One pass of the head over T layer inputs of one sequence, or of R sequences at once.

        One sequence: x: [1, T, H] layer inputs; positions: [T] RoPE positions; slots: [T] cache slots
        to write; visible: [T, S] bool, which of cache slots 0..S-1 each input attends to (itself
        included); the cache's row 0 is read and written.
        R sequences: x: [R, T, H]; positions, slots: [R, T]; visible: [R, T, S]; input row r reads and
        writes only cache row r (the cache has at least R rows). Rows shorter than T are padded: a
        padding input writes a slot no row ever reads and sees one slot (slot 0), so it changes nothing.
        Example: rows of 2 and 1 new inputs after 5 and 3 committed slots, a cache of capacity C: slots
        [[5, 6], [3, C - 1]], visible [2, 2, 7] with row 1's second input seeing slot 0 only.
        returns the output hidden states [1, T, H] or [R, T, H] (fed to target.lm_head for logits).
        """
        return self._run(x, positions, cache, slots, visible, None)[0]

    def forward_with_visual(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: list[DraftLayerCache],
        slots: torch.Tensor,
        visible: torch.Tensor,
        image_slots: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`, plus each query row's visual attention intensity.

        image_slots: [S] (one sequence) or [R, S] (R sequences) bool, True at cache slots that hold
        image positions
        returns the output hidden states (the same as `forward`'s) and, per input, the share of its
        attention mass on its row's image slots, averaged over heads (and over layers, should a head
        have several): [T] or [R, T] float32 in [0, 1].
        """
        hidden, mass = self._run(x, positions, cache, slots, visible, image_slots)
        return hidden, mass

    def _run(self, x, positions, cache, slots, visible, image_slots):
        one = positions.dim() == 1  # one sequence: the [R, ...] layout with R = 1
        if one:
            assert x.dim() == 3 and x.shape[0] == 1, f"x must be [1, T, H] with positions [T], got {tuple(x.shape)}"
            positions, slots, visible = positions[None], slots[None], visible[None]
            image_slots = None if image_slots is None else image_slots[None]
        r, t = x.shape[:2]
        assert x.dim() == 3, f"x must be [R, T, H], got {tuple(x.shape)}"
        assert positions.shape == (r, t) and slots.shape == (r, t), (
            f"positions {tuple(positions.shape)} and slots {tuple(slots.shape)} must be [{r}, {t}] for x {tuple(x.shape)}"
        )
        assert visible.dim() == 3 and visible.shape[:2] == (r, t), f"visible must be [{r}, {t}, S], got {tuple(visible.shape)}"
        masses = []
        for layer, layer_cache in zip(self.layers, cache):
            x, mass = layer(x, positions, layer_cache, slots, visible, image_slots)
            masses.append(mass)
        mass = None if image_slots is None else masses[0] if len(masses) == 1 else torch.stack(masses).mean(dim=0)
        return x, (mass[0] if one and mass is not None else mass)


# ---- checkpoint format ---------------------------------------------------------------------------


def expected_keys(config: DraftConfig) -> set[str]:
    return set(MSDDraft(config).to(device="meta").state_dict().keys())


def read_state_dict(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The draft's tensors in `folder` (one weight file, or the shards its index names) and the files'
    names for messages; an unreadable file is an error naming it."""
    try:
        files = find_weight_files(folder)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"no draft weights in {folder}: {error}") from error
    state: dict[str, torch.Tensor] = {}
    for file in files:
        part = load_weight_file(file)
        repeated = sorted(state.keys() & part.keys())
        if repeated:
            raise ValueError(f"draft weights {file} repeat keys of an earlier shard in {folder}: {repeated[:10]}")
        state.update(part)
    return state, str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"


def load_draft(path_or_id: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> MSDDraft:
    """Load an MSD checkpoint strictly: every key present, none unexpected, every shape right."""
    folder = resolve_folder(path_or_id, "draft checkpoint", allow_patterns=DOWNLOAD_PATTERNS)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in draft folder {folder}")
    config = DraftConfig.from_dict(read_json(config_file), source=str(config_file))
    state, weights_file = read_state_dict(folder)
    want = expected_keys(config)
    missing, unexpected = sorted(want - state.keys()), sorted(state.keys() - want)
    if missing or unexpected:
        raise ValueError(
            f"draft weights {weights_file} do not match an MSD head: missing keys {missing}, unexpected keys {unexpected}"
        )
    draft = MSDDraft(config)
    reference = draft.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} in file, {tuple(reference[k].shape)} expected" for k, v in state.items() if v.shape != reference[k].shape]
    if wrong:
        raise ValueError(f"draft weights {weights_file} have shapes that disagree with {config_file}: {wrong}")
    draft.load_state_dict(state, strict=True)
    return draft.to(device=device, dtype=dtype).eval()


def save_draft(
    draft: MSDDraft, folder: str | Path, dtype: torch.dtype | None = None, max_shard_size: int | str | None = None
) -> Path:
    """Write config.json and model.safetensors in the released format.

    dtype: of the saved weights [the draft's]
    max_shard_size: None writes one file, as released heads are; else shards of at most this size
        (bytes, or "15MB" = 15 * 10**6 bytes) with model.safetensors.index.json (`save_safetensors`)
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(draft.config.to_dict(), indent=2) + "\n")
    state = {k: v if dtype is None else v.to(dtype) for k, v in draft.state_dict().items()}
    save_safetensors(state, folder, max_shard_size)
    return folder


def check_draft_fits(draft: MSDDraft, hidden_size: int, vocab_size: int) -> None:
    """The draft reads the target's hidden states and shares its lm_head: sizes must agree."""
    problems = []
    if draft.config.hidden_size != hidden_size:
        problems.append(f"hidden size: draft {draft.config.hidden_size}, target {hidden_size}")
    if draft.config.vocab_size != vocab_size:
        problems.append(f"vocabulary: draft {draft.config.vocab_size}, target {vocab_size}")
    if problems:
        raise ValueError(
            "the draft does not fit the target (" + "; ".join(problems) + "); use the MSD head trained for this target"
        )


def new_random_draft(config: DraftConfig, seed: int, std: float = 0.02) -> MSDDraft:
    """A randomly initialised head (tests, and the start of training)."""
    generator = torch.Generator().manual_seed(seed)
    draft = MSDDraft(config)
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    return draft.eval()

