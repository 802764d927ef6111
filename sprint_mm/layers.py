"""Shared transformer parts: embedders, N-d patchify and RoPE, attention, MLPs, the adaLN-Zero block, the final layer."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (1 or B, N, head_dim)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens (B, N, D) by per-sample shift/scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                          Conditioning embedders                               #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t in [0, 1] (cos first, no x1000), then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def features(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = t.float()[:, None] * freqs[None]  # (B, half)
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class table with one extra row, index `num_classes`, for the null class."""

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"class labels must be an integer tensor, got {labels.dtype}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise ValueError(
                f"class labels must lie in [0, {self.num_classes}] ({self.num_classes} is the null class), "
                f"got values in [{int(labels.min())}, {int(labels.max())}]"
            )
        return self.embedding_table(labels)


#################################################################################
#                          Patches and positions                                #
#################################################################################


def token_grid(spatial: tuple[int, ...], patch: tuple[int, ...]) -> tuple[int, ...]:
    """Token counts per axis; every axis must be divisible by its patch size."""
    if len(spatial) != len(patch):
        raise ValueError(f"input has {len(spatial)} spatial axes {tuple(spatial)} but the patch has {len(patch)} {patch}")
    for size, p in zip(spatial, patch):
        if size % p:
            raise ValueError(f"input size {tuple(spatial)} is not divisible by the patch size {patch}")
    return tuple(s // p for s, p in zip(spatial, patch))


def patchify(x: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """(B, C, *S) -> (B, N, C * prod(patch)); tokens in raster order, features channel-major as a flattened Conv kernel."""
    b, c, *spatial = x.shape
    grid = token_grid(tuple(spatial), patch)
    n = len(patch)
    shape = [b, c]
    for g, p in zip(grid, patch):
        shape += [g, p]
    x = x.reshape(shape)
    grid_axes = [2 + 2 * i for i in range(n)]
    patch_axes = [3 + 2 * i for i in range(n)]
    x = x.permute(0, *grid_axes, 1, *patch_axes)  # (B, *grid, C, *patch)
    return x.reshape(b, math.prod(grid), c * math.prod(patch))


def unpatchify(tokens: torch.Tensor, patch: tuple[int, ...], grid: tuple[int, ...], channels: int) -> torch.Tensor:
    """Inverse of `patchify`: (B, N, C * prod(patch)) -> (B, C, *S)."""
    b = tokens.shape[0]
    n = len(patch)
    x = tokens.reshape(b, *grid, channels, *patch)
    order = [0, n + 1]
    for i in range(n):
        order += [1 + i, n + 2 + i]
    x = x.permute(*order)  # (B, C, g0, p0, g1, p1, ...)
    return x.reshape(b, channels, *(g * p for g, p in zip(grid, patch)))


class PatchEmbed(nn.Module):
    """A Linear on flattened patches (equivalent to a strided Conv over any number of axes)."""

    def __init__(self, patch: tuple[int, ...], in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.patch = tuple(patch)
        self.proj = nn.Linear(in_channels * math.prod(self.patch), hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(patchify(x, self.patch))


def grid_coordinates(grid: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    """(N, len(grid)) integer coordinates of every token in raster order (last axis fastest)."""
    axes = [torch.arange(g, device=device) for g in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))


class RotaryEmbedding(nn.Module):
    """N-d RoPE: each axis owns `axis_dims[i]` channels of a head; pairs (2j, 2j+1) rotate together."""

    def __init__(self, head_dim: int, axis_dims: tuple[int, ...], theta: float = 10000.0) -> None:
        super().__init__()
        if sum(axis_dims) != head_dim or any(a <= 0 or a % 2 for a in axis_dims):
            raise ValueError(
                f"RoPE axis channel split {tuple(axis_dims)} must be positive even numbers summing to the head dim {head_dim}"
            )
        self.axis_dims = tuple(axis_dims)
        self.theta = theta

    def forward(self, coords: torch.Tensor) -> Rope:
        """coords (N, n_axes) -> cos, sin of shape (1, N, head_dim)."""
        if coords.shape[-1] != len(self.axis_dims):
            raise ValueError(f"RoPE has {len(self.axis_dims)} axes but got coordinates with {coords.shape[-1]}")
        angles = []
        for axis, dim in enumerate(self.axis_dims):
            freqs = self.theta ** (-torch.arange(0, dim, 2, device=coords.device, dtype=torch.float64) / dim)
            angle = coords[:, axis].double()[:, None] * freqs[None]  # (N, dim/2)
            angles.append(angle.repeat_interleave(2, dim=-1))
        angle = torch.cat(angles, dim=-1).float()[None]
        return angle.cos(), angle.sin()


def wan_axis_split(head_dim: int) -> tuple[int, int, int]:
    """The (t, h, w) channel split used by Wan: h and w get 2*floor(d/6) each, t the rest."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate (B, heads, N, d) by cos/sin (1 or B, N, d) with interleaved pairs."""
    cos, sin = (r.unsqueeze(1).to(x.dtype) for r in rope)
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


def sincos_position_embedding(hidden_size: int, coords: torch.Tensor) -> torch.Tensor:
    """Fixed absolute sin-cos embedding (N, D): channels split evenly between axes, [sin | cos] per axis.

    Axes fill the channels last axis first: for images the column half comes before the row half, which is the
    table of MAE's `get_2d_sincos_pos_embed` that SiT and REPA store as `pos_embed` (their meshgrid puts w first)."""
    n_axes = coords.shape[-1]
    if hidden_size % (2 * n_axes):
        raise ValueError(f"hidden size {hidden_size} must be divisible by {2 * n_axes} for a {n_axes}-axis sin-cos embedding")
    per_axis = hidden_size // n_axes
    omega = 1.0 / 10000 ** (torch.arange(per_axis // 2, dtype=torch.float64) / (per_axis / 2.0))
    parts = []
    for axis in reversed(range(n_axes)):
        angle = coords[:, axis].double()[:, None] * omega[None].to(coords.device)
        parts.append(torch.cat([angle.sin(), angle.cos()], dim=-1))
    return torch.cat(parts, dim=-1).float()


#################################################################################
#                          Attention and MLP                                    #
#################################################################################

ATTENTION_BACKENDS = ("sdpa", "xformers")
QK_NORMS = ("rmsnorm", "layernorm", "none")


def check_attention_backend(backend: str) -> None:
    """Fail early for an unknown backend or an xformers that cannot be imported."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; allowed: {', '.join(ATTENTION_BACKENDS)}")
    if backend == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except Exception as err:  # the wheel can fail to load beside a newer torch, not only be absent
            raise ImportError(
                "attention backend 'xformers' was asked for but xformers cannot be imported "
                f"({err}); install it with `pip install 'sprint-mm[gpu]'` on a CUDA machine or use 'sdpa'"
            ) from err


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor] = None, backend: str = "sdpa"
) -> torch.Tensor:
    """Scaled dot-product attention over (B, heads, N, d); key_mask (B, Nk) True = attend."""
    if backend == "xformers":
        if not q.is_cuda:
            raise RuntimeError("attention backend 'xformers' runs only on CUDA tensors; use 'sdpa' on the CPU")
        import xformers.ops as xops

        bias = None
        if key_mask is not None:
            bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~key_mask, float("-inf"))
            bias = bias[:, None, None, :].expand(-1, q.shape[1], q.shape[2], -1)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
        return out.transpose(1, 2)
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def checked_head_dim(dim: int, num_heads: int, backend: str) -> int:
    """The per-head width, after checking the split and the attention backend."""
    if dim % num_heads:
        raise ValueError(f"hidden size {dim} is not divisible by the number of heads {num_heads}")
    check_attention_backend(backend)
    return dim // num_heads


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def make_qk_norm(kind: str, head_dim: int) -> nn.Module:
    if kind not in QK_NORMS:
        raise ValueError(f"unknown qk_norm {kind!r}; allowed: {', '.join(QK_NORMS)}")
    if kind == "rmsnorm":
        return RMSNorm(head_dim)
    if kind == "layernorm":
        return nn.LayerNorm(head_dim)  # eps 1e-5 as timm's Attention(qk_norm=True) in REPA checkpoints
    return nn.Identity()


class Attention(nn.Module):
    """Self-attention with fused qkv, per-head q/k norm and RoPE applied after the norm."""

    def __init__(self, dim: int, num_heads: int, qk_norm: str = "rmsnorm", backend: str = "sdpa") -> None:
        super().__init__()
        head_dim = checked_head_dim(dim, num_heads, backend)
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = make_qk_norm(qk_norm, head_dim)
        self.k_norm = make_qk_norm(qk_norm, head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Optional[Rope] = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)  # (B, h, N, d_head)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = attention(q, k, v, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


MLP_KINDS = ("gelu", "swiglu")


class Mlp(nn.Module):
    """GELU(tanh) MLP, or SwiGLU where fc1 emits the gate and the value side by side."""

    def __init__(self, dim: int, hidden: int, kind: str = "gelu") -> None:
        super().__init__()
        if kind not in MLP_KINDS:
            raise ValueError(f"unknown mlp {kind!r}; allowed: {', '.join(MLP_KINDS)}")
        self.kind = kind
        self.fc1 = nn.Linear(dim, hidden * (2 if kind == "swiglu" else 1))
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.kind == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h, approximate="tanh")
        return self.fc2(h)


def mlp_hidden_size(dim: int, ratio: float, kind: str) -> int:
    """SwiGLU keeps the parameter count of a GELU MLP of the same ratio (2/3 of the width)."""
    hidden = int(dim * ratio)
    return int(2 * hidden / 3) if kind == "swiglu" else hidden


#################################################################################
#                          Blocks                                               #
#################################################################################


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += gate * Attn(mod(LN(x))); x += gate * MLP(mod(LN(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        mlp: str = "gelu",
        qk_norm: str = "rmsnorm",
        attention_backend: str = "sdpa",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm, attention_backend)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden_size(dim, mlp_ratio, mlp), mlp)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, pos: Optional[Rope] = None, context=None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), pos)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """Non-affine LayerNorm, adaLN shift/scale, Linear to patch values."""

    def __init__(self, dim: int, out_features: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def initialize_dit_weights(module: nn.Module) -> None:
    """DiT initialisation: Xavier Linears with zero bias, N(0, 0.02) embedders, zeroed adaLN and output (adaLN-Zero)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, TimestepEmbedder):
            nn.init.normal_(m.mlp[0].weight, std=0.02)
            nn.init.normal_(m.mlp[2].weight, std=0.02)
        elif isinstance(m, LabelEmbedder):
            nn.init.normal_(m.embedding_table.weight, std=0.02)
        elif hasattr(m, "adaLN_modulation"):
            nn.init.zeros_(m.adaLN_modulation[-1].weight)
            nn.init.zeros_(m.adaLN_modulation[-1].bias)
        if isinstance(m, FinalLayer):
            nn.init.zeros_(m.linear.weight)
            nn.init.zeros_(m.linear.bias)


class CrossAttention(nn.Module):
    """Attention from tokens to a context of the same width (e.g. projected text tokens); no RoPE on either side.

    `context_mask` (B, L) True marks real context tokens; padded ones get no attention.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: str = "rmsnorm", backend: str = "sdpa") -> None:
        super().__init__()
        head_dim = checked_head_dim(dim, num_heads, backend)
        self.num_heads = num_heads
        self.backend = backend
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = make_qk_norm(qk_norm, head_dim)
        self.k_norm = make_qk_norm(qk_norm, head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        b, n, d = x.shape
        head_dim = d // self.num_heads
        q = self.q_norm(self.q(x).reshape(b, n, self.num_heads, head_dim).transpose(1, 2))  # (B, h, N, d_head)
        k, v = self.kv(context).reshape(b, context.shape[1], 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = attention(q, self.k_norm(k), v, key_mask=context_mask, backend=self.backend)  # (B, h, N, d_head)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))
