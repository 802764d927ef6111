"""Shared transformer parts: embedders, N-d patchify and RoPE, attention (full or factorised, self or cross), MLPs,
the adaLN-Zero block, the final layer."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from sprint_mm.context_parallel import gather_tokens_of, heads_to_tokens, tokens_to_heads
from sprint_mm.tokens import Rope, TokenPositions


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
    """N-d RoPE: each axis owns `axis_dims[i]` channels of a head (0: the axis is not encoded); pairs (2j, 2j+1)
    rotate together."""

    def __init__(self, head_dim: int, axis_dims: tuple[int, ...], theta: float = 10000.0) -> None:
        super().__init__()
        if sum(axis_dims) != head_dim or any(a < 0 or a % 2 for a in axis_dims):
            raise ValueError(
                f"RoPE axis channel split {tuple(axis_dims)} must be non-negative even numbers summing to the head dim "
                f"{head_dim}"
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


# SDPA kernels a CUDA run may restrict itself to; the math kernel stays as the fallback of the fast ones.
ATTENTION_KERNELS = {
    "auto": None,
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "math": [SDPBackend.MATH],
}


def check_attention_kernel(kernel: str) -> None:
    """Fail early for an unknown SDPA kernel name."""
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; allowed: {', '.join(ATTENTION_KERNELS)}")


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor] = None, backend: str = "sdpa",
    kernel: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention over (B, heads, N, d); key_mask (B, Nk) True = attend. `kernel` restricts SDPA to
    one kernel family (see ATTENTION_KERNELS) on CUDA; elsewhere, and with 'auto', torch chooses."""
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
    if kernel == "auto" or not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    with sdpa_kernel(ATTENTION_KERNELS[kernel]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def checked_head_dim(dim: int, num_heads: int, backend: str, kernel: str) -> int:
    """The per-head width, after checking the split, the attention backend and the SDPA kernel."""
    if dim % num_heads:
        raise ValueError(f"hidden size {dim} is not divisible by the number of heads {num_heads}")
    check_attention_backend(backend)
    check_attention_kernel(kernel)
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


ATTENTION_SPANS = ("full", "spatial", "temporal")


def group_by_frame(coords: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Order tokens frame by frame, each frame by spatial cell: (order (1 or B, n), frames T, tokens per frame S).

    coords (1 or B, n, 3) are the tokens' (t, h, w). Factorised attention needs every frame to hold the same cells
    (a tube mask); anything else raises.
    """
    frame = coords[..., 0]
    cell = coords[..., 1] * (coords[..., 2].amax() + 1) + coords[..., 2]  # a unique id per spatial position
    order = cell.argsort(dim=1, stable=True)
    order = order.gather(1, frame.gather(1, order).argsort(dim=1, stable=True))  # (b, n): by frame, then by cell
    frame, cell = frame.gather(1, order), cell.gather(1, order)
    n = order.shape[1]
    frames = int((frame[0, 1:] != frame[0, :-1]).sum()) + 1
    per_frame = n // frames
    if n % frames == 0:
        frame, cell = frame.view(-1, frames, per_frame), cell.view(-1, frames, per_frame)
        one_frame_each = bool((frame == frame[..., :1]).all() and (frame[:, 1:, 0] != frame[:, :-1, 0]).all())
        if one_frame_each and bool((cell == cell[:, :1]).all()):
            return order, frames, per_frame
    raise ValueError(
        f"factorised attention needs the same token positions in every frame, but the {n} tokens it got do not "
        "form such frames; use a tube mask (TokenMasker kind 'tube') or attention='full'"
    )


class Attention(nn.Module):
    """Self-attention with fused qkv, per-head q/k norm and RoPE applied after the norm.

    `span` 'full' attends over all tokens; 'spatial' within each frame and 'temporal' across frames at each spatial
    position (factorised attention, as Latte), with the same parameters. When the tokens are a process's share of a
    sequence (`positions.group`, context parallelism), q, k and v trade heads for tokens with the other processes of
    the group before attention and back after it (Ulysses), so each process attends over every token for its heads.
    """

    def __init__(
        self, dim: int, num_heads: int, qk_norm: str = "rmsnorm", backend: str = "sdpa", span: str = "full",
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        if span not in ATTENTION_SPANS:
            raise ValueError(f"unknown attention span {span!r}; allowed: {', '.join(ATTENTION_SPANS)}")
        head_dim = checked_head_dim(dim, num_heads, backend, kernel)
        self.num_heads = num_heads
        self.backend, self.kernel = backend, kernel
        self.span = span
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = make_qk_norm(qk_norm, head_dim)
        self.k_norm = make_qk_norm(qk_norm, head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, positions: Optional[TokenPositions] = None) -> torch.Tensor:
        if self.span != "full" and positions is None:
            raise ValueError(f"{self.span} attention needs the tokens' positions (frames and cells)")
        group = None if positions is None else positions.group
        q, k, v = self.heads(x, None if positions is None else positions.rope)  # (B, h, n, d_head)
        if group is not None:
            q, k, v = (heads_to_tokens(z, group) for z in (q, k, v))  # (B, h / p, N, d_head)
        if self.span == "full":
            out = attention(q, k, v, backend=self.backend, kernel=self.kernel)
        else:
            coords = positions.coords if group is None else gather_tokens_of(positions.coords, group)
            out = self.factorised(q, k, v, coords)
        if group is not None:
            out = tokens_to_heads(out, group)  # (B, h, n, d_head)
        return self.proj(rearrange(out, "b h n c -> b n (h c)"))

    def heads(self, x: torch.Tensor, rope: Optional[Rope]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, h, N, d_head) of tokens x (B, N, D): normed, q and k rotated."""
        q, k, v = rearrange(self.qkv(x), "b n (three h c) -> three b h n c", three=3, h=self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    def factorised(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Attention within each frame ('spatial') or across frames at each cell ('temporal') of q, k, v
        (B, h, n, d_head) whose tokens sit at coords (1 or B, n, 3)."""
        b, h, n, c = q.shape
        order, frames, per_frame = group_by_frame(coords)
        index = order.expand(b, -1)[:, None, :, None].expand(-1, h, -1, c)  # (B, h, n, d_head)
        pattern = "b h (t s) c -> (b t) h s c" if self.span == "spatial" else "b h (t s) c -> (b s) h t c"
        grouped = [rearrange(z.gather(2, index), pattern, t=frames) for z in (q, k, v)]
        out = attention(*grouped, backend=self.backend, kernel=self.kernel)
        back = "(b t) h s c -> b h (t s) c" if self.span == "spatial" else "(b s) h t c -> b h (t s) c"
        return torch.empty_like(q).scatter(2, index, rearrange(out, back, b=b, t=frames, s=per_frame))  # b may be 0

    def attend(self, x: torch.Tensor, rope: Optional[Rope]) -> torch.Tensor:
        """Attention among all tokens of x (B, N, D)."""
        out = attention(*self.heads(x, rope), backend=self.backend, kernel=self.kernel)
        return self.proj(rearrange(out, "b h n c -> b n (h c)"))


class CrossAttention(nn.Module):
    """Attention from tokens to a context of the same width (e.g. projected text tokens); no RoPE on either side.

    `context_mask` (B, L) True marks real context tokens; padded ones get no attention.
    """

    def __init__(
        self, dim: int, num_heads: int, qk_norm: str = "rmsnorm", backend: str = "sdpa", kernel: str = "auto"
    ) -> None:
        super().__init__()
        head_dim = checked_head_dim(dim, num_heads, backend, kernel)
        self.num_heads = num_heads
        self.backend, self.kernel = backend, kernel
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = make_qk_norm(qk_norm, head_dim)
        self.k_norm = make_qk_norm(qk_norm, head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        q = self.q_norm(rearrange(self.q(x), "b n (h c) -> b h n c", h=self.num_heads))  # (B, h, N, d_head)
        k, v = rearrange(self.kv(context), "b l (two h c) -> two b h l c", two=2, h=self.num_heads)
        out = attention(q, self.k_norm(k), v, key_mask=context_mask, backend=self.backend, kernel=self.kernel)
        return self.proj(rearrange(out, "b h n c -> b n (h c)"))


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
    """adaLN-Zero block: x += gate * Attn(mod(LN(x))); [x += CrossAttn(LN(x), context)]; x += gate * MLP(mod(LN(x))).

    With `cross_attention` the block reads a context (tokens (B, L, D), mask (B, L)) between attention and MLP.
    `attention_kernel` ('auto' | 'flash' | 'efficient' | 'math') restricts the
    SDPA kernels of its attention on CUDA, the math kernel as fallback; it changes nothing on the CPU.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        mlp: str = "gelu",
        qk_norm: str = "rmsnorm",
        attention_backend: str = "sdpa",
        span: str = "full",
        cross_attention: bool = False,
        attention_kernel: str = "auto",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm, attention_backend, span, attention_kernel)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden_size(dim, mlp_ratio, mlp), mlp)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        if cross_attention:
            self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
            self.cross_attn = CrossAttention(dim, num_heads, qk_norm, attention_backend, attention_kernel)
        else:
            self.cross_attn = None

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        positions: Optional[TokenPositions] = None,
        context: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), positions)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), *context)
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
        elif isinstance(m, CrossAttention):  # every block starts as the identity, cross-attention included
            nn.init.zeros_(m.proj.weight)
            nn.init.zeros_(m.proj.bias)
