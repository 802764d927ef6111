"""SPRINT: dense shallow blocks on every token, sparse deep blocks on the kept tokens, a residual fusion of the two.

One forward serves training (token drop, path drop), dense fine-tuning and inference, CFG and PDG: samples flagged in
`skip_middle` never run the middle blocks and get the mask token as their whole sparse-path output.

What a token the middle did not compute carries into the fusion is `fill`: 'mask' (SPRINT's), the mask token; 'route'
(TREAD's routing), its own encoder output, so it goes around the middle blocks unchanged. A row that skips the middle
(path drop, PDG's weak half) is a row whose every token was dropped: it gets the fill everywhere, the mask token under
'mask' and the encoder output under 'route' (its weak estimate is then the shallow network encoder -> decoder).

`fusion_init = 'identity'` starts the fusion as [I | 0] (the sparse path passed through, the dense one ignored): with no
token dropped and no row skipping, the middle then runs on the encoder's output of every token and the SPRINT model
computes exactly its dense backbone, whatever the backbone's weights. That is how a pretrained dense model becomes a
SPRINT model without changing what it computes. With long skips the statement holds as it is: the skips into the
decoder come from the encoder (the split guarantees it) and so see every token either way.

A backbone whose blocks update a context stream (`Backbone.updates_context`: SD3's MMDiT text tokens, which every block
updates beside the image tokens) passes it through the split as a per-sample state, never dropped as tokens: the
encoder updates it for every row; the middle updates it, attending to the kept tokens only, for the rows that run the
middle; a row that skips the middle (path drop, PDG's weak half) carries the encoder's context stream into the decoder
unchanged (it goes around the middle, as 'route' does for tokens). The fusion mixes image tokens only. With every
token kept and no row skipping, the decoder so reads the stream the middle computed, as in the dense forward.

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
from sprint_mm.tokens import assign_rows

FUSIONS = ("concat_linear", "none")
FUSION_INITS = ("xavier", "identity")  # xavier: SPRINT's; identity: [I | 0], the dense model exactly (conversion)
FILLS = ("mask", "route")  # what a token the middle did not compute carries: the mask token, or its encoder output


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
        fusion_init: str = "xavier",
        fill: str = "mask",
    ) -> None:
        super().__init__()
        depth = len(backbone.blocks)
        if encoder_depth < 0 or decoder_depth < 0 or encoder_depth + decoder_depth >= depth:
            raise ValueError(
                f"encoder_depth {encoder_depth} + decoder_depth {decoder_depth} must leave at least one middle block "
                f"of the backbone's {depth} blocks"
            )
        for name, value, allowed in (("fusion", fusion, FUSIONS), ("fusion_init", fusion_init, FUSION_INITS),
                                     ("fill", fill, FILLS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)} (Sprint.{name})")
        if fusion == "none" and fusion_init != "xavier":
            raise ValueError(f"Sprint.fusion_init = {fusion_init!r} initialises the fusion, but Sprint.fusion = 'none' "
                             "has none (it passes the sparse path through already)")
        if fill == "route" and learnable_mask_token:
            raise ValueError("Sprint.fill = 'route' never uses the mask token (dropped tokens carry their encoder "
                             "output), so it cannot learn: set Sprint.learnable_mask_token = False")
        check_split(backbone, encoder_depth, decoder_depth)
        self.backbone = backbone
        self.encoder_depth = encoder_depth
        self.decoder_depth = decoder_depth
        self.fill = fill
        dim = backbone.hidden_size
        # The reference keeps the mask token frozen at its random initialisation; learnable is opt-in.
        self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02, requires_grad=learnable_mask_token)
        self.fusion = nn.Linear(2 * dim, dim) if fusion == "concat_linear" else None
        if self.fusion is not None:
            if fusion_init == "identity":
                with torch.no_grad():
                    self.fusion.weight.copy_(torch.cat([torch.eye(dim), torch.zeros(dim, dim)], dim=1))
            else:
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
        check_mask(emb, mask)
        # under context parallelism: this process's box of the grid, keeping as many tokens as every other box
        emb = emb.spread(self.backbone.context_group, None if mask is None else mask.ids_keep.to(x.device))
        encoded = run_stack(self.backbone, emb, 0, self.encoder_depth)  # tokens (B, N, D), encoder skip states
        return self._decode(emb, encoded, mask, skip_middle)

    def branches(self, x: torch.Tensor, t: torch.Tensor, cond: Any,
                 masks: Sequence[Optional[TokenMask]]) -> list[torch.Tensor]:
        """The outputs for one input under several middle masks (None = all tokens), each equal to
        `forward(x, t, cond, mask)`: the embedding and the encoder, which no mask reaches, run once for all of them
        (sparse guidance's two branches share them)."""
        if self.backbone.context_group is not None:
            raise ValueError("sparse guidance's branches share one encoder pass, which context parallelism cannot "
                             "split by two masks: sample without --context-parallel, or use --guidance cfg or pdg")
        emb = self.backbone.embed(x, t, cond)
        for mask in masks:
            check_mask(emb, mask)
        encoded = run_stack(self.backbone, emb, 0, self.encoder_depth)
        return [self._decode(emb, encoded, mask, None) for mask in masks]

    def _decode(self, emb: Embedded, encoded: Embedded, mask: Optional[TokenMask],
                skip_middle: Optional[torch.Tensor]) -> torch.Tensor:
        """Middle, fusion, decoder and unembedding after the encoder's output `encoded`."""
        dense = encoded.tokens
        sparse, context = self._middle(encoded, mask, skip_middle)  # (B, N, D), the context after the middle
        h = sparse if self.fusion is None else self.fusion(torch.cat([sparse, dense], dim=-1))
        h = run_stack(self.backbone, encoded.with_tokens(h, context), self.decoder_start).tokens  # (B, N, D)
        return emb.join(self.backbone.unembed(h, emb))

    def _middle(self, encoded: Embedded, mask: Optional[TokenMask], skip_middle: Optional[torch.Tensor]
                ) -> tuple[torch.Tensor, Any]:
        """Run the middle blocks on the kept tokens of the rows that do not skip; the fill everywhere else. Returns
        the tokens (B, N, D) and the context the decoder reads: the encoder's, with the rows that ran the middle
        updated by it when the backbone `updates_context`.

        There is no shortcut for "no row runs the middle" or "every row keeps every token": the blocks then run on an
        empty batch and the mask token is overwritten, so every parameter is in every graph (with a zero gradient
        where it did nothing) and DDP needs no scan for unused parameters."""
        dense = encoded.tokens
        b, n, d = dense.shape
        canvas = dense if self.fill == "route" else self.mask_token.to(dense.dtype).expand(b, n, d)
        rows = middle_rows(b, skip_middle, dense.device)
        ids_keep = None if mask is None else mask.ids_keep.to(dense.device)[rows]  # (b_run, M)
        if ids_keep is not None and encoded.shard is not None:
            ids_keep = encoded.shard.local_kept(ids_keep)  # (b_run, M / p): this box's kept tokens, local indices
        # each kept token keeps its true position and the encoder's skip states at its place
        sparse = encoded.subset(dense, rows, ids_keep)
        ran = run_stack(self.backbone, sparse, self.encoder_depth, self.decoder_start)
        h = ran.tokens
        if ids_keep is not None:
            h = canvas[rows].scatter(1, ids_keep[..., None].expand(-1, -1, d), h)  # (b_run, N, D)
        context = assign_rows(encoded.context, rows, ran.context) if self.backbone.updates_context else encoded.context
        return canvas.index_copy(0, rows, h), context


def check_mask(emb: Embedded, mask: Optional[TokenMask]) -> None:
    """Refuse a token mask made for another batch or token count than the embedded input's."""
    b, n, _ = emb.tokens.shape
    if mask is not None and (mask.ids_keep.shape[0] != b or mask.num_tokens != n):
        raise ValueError(f"token mask is for batch {mask.ids_keep.shape[0]} x {mask.num_tokens} tokens, "
                         f"but the input has batch {b} x {n} tokens (grid {emb.grid})")
