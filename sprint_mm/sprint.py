"""SPRINT: dense shallow blocks on every token, sparse deep blocks on the kept tokens, a residual fusion of the two.

One forward serves training (token drop, path drop), dense fine-tuning and inference, CFG and PDG: samples flagged in
`skip_middle` never run the middle blocks and get the mask token as their whole sparse-path output.

A backbone's long skips (U-ViT) run across the split: the middle reads an encoder block's output at its kept tokens
(gathered with their true positions), middle blocks feed middle blocks, encoder blocks feed decoder blocks. A middle
block cannot feed a decoder block (the tokens and rows the middle drops have no value there): `Sprint` refuses such a
split, and for skips mirrored as i -> depth-1-i (U-ViT) the legal splits are encoder_depth >= decoder_depth.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional, Sequence

import gin
import torch
from torch import nn

from sprint_mm.backbone import Backbone, Embedded, run_stack, skip_sources
from sprint_mm.flops import TransformerShape
from sprint_mm.masking import TokenMask

FUSIONS = ("concat_linear", "none")


def middle_rows(batch: int, skip_middle: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Indices of the batch rows that run the middle blocks: those not flagged in skip_middle (B,) bool."""
    rows = torch.arange(batch, device=device)
    if skip_middle is None:
        return rows
    if skip_middle.shape != (batch,):
        raise ValueError(f"skip_middle must have shape ({batch},), got {tuple(skip_middle.shape)}")
    return rows[~skip_middle.to(device)]


def check_split(backbone: Backbone, encoder_depth: int, decoder_depth: int) -> None:
    """One clear error for a split whose long skip runs from a middle block into a decoder block."""
    depth = len(backbone.blocks)
    decoder_start = depth - decoder_depth
    into_decoder = {target: source for target, source in skip_sources(backbone).items() if target >= decoder_start}
    for target, source in sorted(into_decoder.items()):
        if source >= encoder_depth:
            needed = max(into_decoder.values()) + 1
            legal = (f"with decoder_depth {decoder_depth}, encoder_depth >= {needed}" if needed + decoder_depth < depth
                     else f"no encoder_depth leaves a middle block with decoder_depth {decoder_depth}; lower it")
            raise ValueError(
                f"Sprint cannot split {type(backbone).__name__}'s {depth} blocks as encoder_depth {encoder_depth} / "
                f"decoder_depth {decoder_depth}: its long skip {source} -> {target} runs from a middle block into a "
                f"decoder block, where the tokens and rows the middle drops have no value. Legal splits feed every "
                f"decoder block's long skip from an encoder block: {legal} (for skips i -> depth-1-i, as U-ViT's: "
                f"encoder_depth >= decoder_depth)"
            )


@gin.configurable
class Sprint(nn.Module):
    """Wraps any `Backbone`: blocks[:E] encoder, blocks[E:-L] middle, blocks[-L:] decoder."""

    def __init__(
        self,
        backbone: Backbone,
        encoder_depth: int = 2,
        decoder_depth: int = 2,
        fusion: str = "concat_linear",
        learnable_mask_token: bool = False,
    ) -> None:
        super().__init__()
        depth = len(backbone.blocks)
        if encoder_depth < 0 or decoder_depth < 0 or encoder_depth + decoder_depth >= depth:
            raise ValueError(
                f"encoder_depth {encoder_depth} + decoder_depth {decoder_depth} must leave at least one middle block "
                f"of the backbone's {depth} blocks"
            )
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; allowed: {', '.join(FUSIONS)}")
        check_split(backbone, encoder_depth, decoder_depth)
        self.backbone = backbone
        self.encoder_depth = encoder_depth
        self.decoder_depth = decoder_depth
        dim = backbone.hidden_size
        # The reference keeps the mask token frozen at its random initialisation; learnable is opt-in.
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02, requires_grad=learnable_mask_token)
        self.fusion = nn.Linear(2 * dim, dim) if fusion == "concat_linear" else None
        if self.fusion is not None:
            nn.init.xavier_uniform_(self.fusion.weight)
            nn.init.zeros_(self.fusion.bias)

    @property
    def encoder_blocks(self) -> list[nn.Module]:
        return list(self.backbone.blocks[: self.encoder_depth])

    @property
    def middle_blocks(self) -> list[nn.Module]:
        return list(self.backbone.blocks[self.encoder_depth : self.decoder_start])

    @property
    def decoder_blocks(self) -> list[nn.Module]:
        return list(self.backbone.blocks[self.decoder_start :])

    @property
    def decoder_start(self) -> int:
        """Index of the first decoder block."""
        return len(self.backbone.blocks) - self.decoder_depth

    def flop_shape(self) -> TransformerShape:
        """The backbone's dense cost shape with SPRINT's split and fusion; the long skips' projections counted in the
        stack of the block they feed."""
        dense = self.backbone.flop_shape()
        skips = self.backbone.long_skips
        if sum(dense.skip_projections) not in (0, len(skips)):
            raise ValueError(
                f"{type(self.backbone).__name__}.flop_shape() counts {sum(dense.skip_projections)} skip projections "
                f"for {len(skips)} long skips; count one per long skip (or none)"
            )
        projections = [0, 0, 0]  # encoder, middle, decoder
        if sum(dense.skip_projections):
            for _, target in skips:
                projections[(target >= self.encoder_depth) + (target >= self.decoder_start)] += 1
        middle = self.decoder_start - self.encoder_depth
        return replace(dense, depth=(self.encoder_depth, middle, self.decoder_depth), fusion=self.fusion is not None,
                       skip_projections=tuple(projections))

    # --------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: Any,
        mask: Optional[TokenMask] = None,
        skip_middle: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """mask: tokens the middle sees (None = all); skip_middle (B,) bool: rows whose middle output is the mask token."""
        emb = self.backbone.embed(x, t, cond)
        encoded = run_stack(self.backbone, emb, 0, self.encoder_depth)  # tokens (B, N, D), encoder skip states
        return self._decode(emb, encoded, mask, skip_middle)

    def branches(self, x: torch.Tensor, t: torch.Tensor, cond: Any,
                 masks: Sequence[Optional[TokenMask]]) -> list[torch.Tensor]:
        """The outputs for one input under several middle masks (None = all tokens), each equal to
        `forward(x, t, cond, mask)`: the embedding and the encoder, which no mask reaches, run once for all of them
        (sparse guidance's two branches share them)."""
        emb = self.backbone.embed(x, t, cond)
        encoded = run_stack(self.backbone, emb, 0, self.encoder_depth)
        return [self._decode(emb, encoded, mask, None) for mask in masks]

    def _decode(self, emb: Embedded, encoded: Embedded, mask: Optional[TokenMask],
                skip_middle: Optional[torch.Tensor]) -> torch.Tensor:
        """Middle, fusion, decoder and unembedding after the encoder's output `encoded`."""
        b, n, _ = emb.tokens.shape
        if mask is not None and (mask.ids_keep.shape[0] != b or mask.num_tokens != n):
            raise ValueError(
                f"token mask is for batch {mask.ids_keep.shape[0]} x {mask.num_tokens} tokens, "
                f"but the input has batch {b} x {n} tokens (grid {emb.grid})"
            )
        dense = encoded.tokens
        sparse = self._middle(encoded, mask, skip_middle)  # (B, N, D)
        h = sparse if self.fusion is None else self.fusion(torch.cat([sparse, dense], dim=-1))
        h = run_stack(self.backbone, encoded.with_tokens(h), self.decoder_start).tokens  # (B, N, D)
        return self.backbone.unembed(h, emb)

    def _middle(self, encoded: Embedded, mask: Optional[TokenMask], skip_middle: Optional[torch.Tensor]) -> torch.Tensor:
        """Run the middle blocks on the kept tokens of the rows that do not skip; mask token everywhere else.

        There is no shortcut for "no row runs the middle" or "every row keeps every token": the blocks then run on an
        empty batch and the mask token is overwritten, so every parameter is in every graph (with a zero gradient
        where it did nothing) and DDP needs no scan for unused parameters."""
        dense = encoded.tokens
        b, n, d = dense.shape
        canvas = self.mask_token.to(dense.dtype).expand(b, n, d)
        rows = middle_rows(b, skip_middle, dense.device)
        ids_keep = None if mask is None else mask.ids_keep.to(dense.device)[rows]  # (b_run, M)
        # each kept token keeps its true position and the encoder's skip states at its place
        sparse = encoded.subset(dense, rows, ids_keep)
        h = run_stack(self.backbone, sparse, self.encoder_depth, self.decoder_start).tokens
        if ids_keep is not None:
            h = canvas[: rows.numel()].scatter(1, ids_keep[..., None].expand(-1, -1, d), h)  # (b_run, N, D)
        return canvas.index_copy(0, rows, h)
