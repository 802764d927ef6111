"""Context parallelism: the tokens of each sample spread over the processes of a context group.

Every process of the group holds the whole input (the latents are small beside the activations), embeds it, and keeps
one box of the token grid (`sequence_split`): its tokens, their true positions and, under a SPRINT mask, its own kept
tokens. Blocks run on the local tokens; per-token work (adaLN, MLP, norms, RoPE, cross-attention to the text, which
every process holds whole) needs nothing from the others. Self-attention gathers what it needs with two all-to-alls
(Ulysses): before it, each process trades its tokens of every head for every token of 1/p of the heads; after it,
the reverse. The backbone unembeds its box; `SequenceShard.join` gathers the boxes into the whole output, so every
process of the group returns the same prediction, and the loss and the sampler run unchanged.

Why Ulysses and no ring attention: per layer each process sends 4 n D (p - 1) / p values (q, k, v and the output of
its n = N / p tokens), independent of p at a fixed n, where a ring sends its keys and values around all p - 1 others
(2 N D (p - 1) / p, growing with the sequence); attention itself stays one local SDPA call (flash on GPUs) over the
whole sequence for its heads, so factorised space/time attention and SPRINT's kept tokens need no special kernel. Its
limit is heads divisible by p (Wan-14B's 40 heads: p = 2, 4, 5, 8), which ring attention would lift at the price of
more traffic for long clips; within a node, where all-to-all is cheap, Ulysses serves long clips better.

Gradients: the adjoint of gathering the boxes sums the gradient over the group, so each process's parameter
gradient is p times its share; averaging over all data x context processes (DDP, or FSDP sharded over all of them)
gives the gradient of the mean loss over the data groups, as without context parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sprint_mm.masking import Grid
from sprint_mm.sequence_split import SequenceSplit, choose


# torch 2.14 renames the single-tensor collectives (the old names warn); earlier versions have only the old ones
all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def group_size(group: Any) -> int:
    return dist.get_world_size(group)


def group_rank(group: Any) -> int:
    return dist.get_rank(group)


# ----------------------------------------------------------------------------------------------------------------
# Collectives that autograd differentiates
# ----------------------------------------------------------------------------------------------------------------


class AllToAll(torch.autograd.Function):
    """Chunk j of dim 0 goes to process j, chunk i of the result came from process i. It is its own adjoint."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return exchange(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return exchange(grad, ctx.group), None


def exchange(x: torch.Tensor, group: Any) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel():  # every process has the same shape: all skip alike
        dist.all_to_all_single(out, x.contiguous(), group=group)
    return out


class GatherParts(torch.autograd.Function):
    """(...) on each process -> (p, ...) stacked in process order; the adjoint sums the gradients over the group and
    returns each process its own part."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return gather_parts(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        part = torch.empty(grad.shape[1:], dtype=grad.dtype, device=grad.device).flatten()
        reduce_scatter_single(part, grad.contiguous().flatten(), group=ctx.group)
        return part.view(grad.shape[1:]), None


def gather_parts(x: torch.Tensor, group: Any) -> torch.Tensor:
    """(...) on each process -> (p, ...) in process order (no gradient)."""
    p = group_size(group)
    out = torch.empty(p * x.numel(), dtype=x.dtype, device=x.device)
    all_gather_single(out, x.contiguous().flatten(), group=group)
    return out.view(p, *x.shape)


def heads_to_tokens(x: torch.Tensor, group: Any) -> torch.Tensor:
    """(B, h, n, d) every head of the local tokens -> (B, h / p, p n, d) every token of this process's heads (the
    tokens in process order)."""
    p = group_size(group)
    b, h, n, d = x.shape
    chunks = x.reshape(b, p, h // p, n, d).transpose(0, 1)  # (p, B, h/p, n, d): chunk j for process j
    received = AllToAll.apply(chunks, group)  # (p, B, h/p, n, d): the tokens of process i
    return received.permute(1, 2, 0, 3, 4).reshape(b, h // p, p * n, d)


def tokens_to_heads(x: torch.Tensor, group: Any) -> torch.Tensor:
    """The inverse of `heads_to_tokens`: (B, h / p, p n, d) -> (B, h, n, d)."""
    p = group_size(group)
    b, hp, pn, d = x.shape
    chunks = x.reshape(b, hp, p, pn // p, d).permute(2, 0, 1, 3, 4)  # (p, B, h/p, n, d): tokens of process j
    received = AllToAll.apply(chunks, group)  # (p, B, h/p, n, d): heads of process i
    return received.transpose(0, 1).reshape(b, p * hp, pn // p, d)


def heads_of(group: Any, heads: int) -> slice:
    """The heads this process attends with when a sequence is spread over `group` (all of them without a group)."""
    if group is None:
        return slice(None)
    share = heads // group_size(group)
    return slice(group_rank(group) * share, (group_rank(group) + 1) * share)


def attend_joint(image: Sequence[torch.Tensor], text: Optional[Sequence[torch.Tensor]], group: Any,
                 text_first: bool = False,
                 text_keys: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Attention over image tokens and a text stream together (MMDiT: SD3, Flux, HunyuanVideo), the image tokens spread
    over the processes of `group` (None: not spread). `image`: q, k, v (B, h, n, d) of this process's image tokens;
    `text`: q, k, v (B, h', L, d) of the whole text stream (every process holds it) for this process's heads
    (`heads_of`), or None (image tokens alone); `text_first`: the joint sequence is [text; image], else [image; text],
    as the family orders it; `text_keys`: (B, L) bool, the text tokens every query attends to (padding left out; every
    image token is attended), or None for all of them. Returns the outputs (B, h, n, d) of this process's image tokens
    and (B, h, L, d) of the text (None without text). Spread, the image tokens trade heads for tokens (Ulysses),
    attention runs over every image token and the text for this process's heads, the image output trades back, and the
    text output of all heads is gathered from the group (its adjoint sums each head's gradient over the processes that
    read it): every process gets the same text back."""
    spread = group is not None
    if spread:
        image = [heads_to_tokens(z, group) for z in image]
    if text is None:
        out = F.scaled_dot_product_attention(*image)
        return (tokens_to_heads(out, group) if spread else out), None
    tokens, length = image[0].shape[2], text[0].shape[2]
    keys = None
    if text_keys is not None:  # (B, 1, 1, n + L): every image token, the text tokens `text_keys` names
        parts = (text_keys.bool(), text_keys.new_ones(text_keys.shape[0], tokens, dtype=torch.bool))
        keys = torch.cat(parts if text_first else parts[::-1], dim=1)[:, None, None]
    joint = F.scaled_dot_product_attention(*(torch.cat(pair, dim=2)
                                             for pair in (zip(text, image) if text_first else zip(image, text))),
                                           attn_mask=keys)
    image_out, text_out = ((joint[:, :, length:], joint[:, :, :length]) if text_first
                           else (joint[:, :, :tokens], joint[:, :, tokens:]))
    if spread:
        image_out = tokens_to_heads(image_out, group)
        text_out = GatherParts.apply(text_out.contiguous(), group).transpose(0, 1).flatten(1, 2)
    return image_out, text_out


def attend_spread(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group: Any) -> torch.Tensor:
    """Self-attention over the whole sequence that the processes of `group` share, from this process's tokens:
    q, k, v (B, n, h, d) -> (B, n, h, d), in the layout of diffusers' processors (`attend_joint` without text)."""
    out, _ = attend_joint([z.transpose(1, 2) for z in (query, key, value)], None, group)
    return out.transpose(1, 2)


def gather_tokens_of(values: torch.Tensor, group: Any) -> torch.Tensor:
    """(1 or B, n, ...) per-token values without gradient (coordinates) -> (1 or B, p n, ...) in process order."""
    gathered = gather_parts(values, group)  # (p, 1 or B, n, ...)
    return gathered.transpose(0, 1).flatten(1, 2)


# ----------------------------------------------------------------------------------------------------------------
# A process's share of a sample
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceShard:
    """This process's box `part` of `split`; the other boxes live on the processes of `group` (rank = box)."""

    split: SequenceSplit
    part: int
    group: Any

    def token_ids(self, device: torch.device) -> torch.Tensor:
        return self.split.token_ids(self.part, device)

    def local_kept(self, ids_keep: torch.Tensor) -> torch.Tensor:
        """The kept tokens of ids_keep (B, M) (indices into the whole grid) in this box, as local indices."""
        return self.split.local_kept(ids_keep, self.part)

    def join(self, output: torch.Tensor, image: bool) -> torch.Tensor:
        """The whole output from this box's region of it (gathered from the group, differentiably)."""
        return self.split.assemble(GatherParts.apply(output, self.group), image)


def shard_for(group: Any, grid: Grid, ids_keep: Optional[torch.Tensor] = None) -> SequenceShard:
    """This process's share of a sample of token grid `grid` (the split balances the kept tokens `ids_keep`)."""
    return SequenceShard(choose(grid, group_size(group), ids_keep), group_rank(group), group)
