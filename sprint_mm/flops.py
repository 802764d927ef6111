"""Forward FLOP accounting for dense and SPRINT diffusion transformers (SPEC.md section 5).

FLOPs are 2 x multiply-accumulates of the matrix products; norms, softmax, RoPE, activations and
other elementwise work are ignored, and label/caption lookups are free. Everything is a function of
numbers, so a model can be costed without building it. All counts are for one sample.
"""

from __future__ import annotations

from dataclasses import dataclass

TIMESTEP_FEATURES = 256  # width of the sinusoidal timestep features fed to the timestep MLP
GUIDANCE_MODES = ("none", "cfg", "pdg", "sparse")


@dataclass(frozen=True)
class TransformerShape:
    """The sizes that decide a diffusion transformer's cost.

    A dense model is depth (0, blocks, 0) with no fusion; a SPRINT model is (E, M, L) with fusion. A backbone with
    long skips (U-ViT) counts, per stack, the blocks that project [x, skip] 2D -> D before they run.
    """

    hidden: int  # D
    depth: tuple[int, int, int]  # (encoder E, middle M, decoder L)
    mlp_hidden: int  # H_mlp (4 D for GELU ratio 4)
    gated_mlp: bool = False  # SwiGLU: 3 matrices instead of 2
    patch_dim: int = 16  # input features per token: C * prod(patch)
    out_patch_dim: int | None = None  # output features per token; defaults to patch_dim
    context_tokens: int = 0  # text tokens read by cross-attention (0 = no cross-attention)
    context_dim: int = 0  # text embedding width (input of the cross-attention K/V projections)
    joint_tokens: int = 0  # tokens of a second stream that every block updates beside these (MMDiT's text, SD3): their
    # own projections, adaLN and MLP, one attention over both streams; never dropped, so the middle keeps them all
    fusion: bool = True  # SPRINT concat-linear fusion present (only counted when E + L > 0)
    skip_projections: tuple[int, int, int] = (0, 0, 0)  # long-skip Linear(2D, D) per stack (encoder, middle, decoder)

    def __post_init__(self) -> None:
        for name in ("depth", "skip_projections"):
            value = tuple(getattr(self, name))  # gin and JSON may hand over a list
            object.__setattr__(self, name, value)
            if len(value) != 3 or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in value):
                raise ValueError(f"{name} must be three non-negative ints (encoder, middle, decoder), got {value!r}")
        if any(skips > blocks for skips, blocks in zip(self.skip_projections, self.depth)):
            raise ValueError(
                f"skip_projections {self.skip_projections!r} puts more projections in a stack than it has blocks "
                f"(depth {self.depth!r}); each projection sits in front of one block"
            )
        if sum(self.depth) == 0:
            raise ValueError(f"depth must contain at least one block, got {self.depth!r}")
        for name in ("hidden", "mlp_hidden", "patch_dim"):
            _require_int(name, getattr(self, name), minimum=1)
        if self.out_patch_dim is not None:
            _require_int("out_patch_dim", self.out_patch_dim, minimum=1)
        _require_int("context_tokens", self.context_tokens, minimum=0)
        _require_int("context_dim", self.context_dim, minimum=0)
        _require_int("joint_tokens", self.joint_tokens, minimum=0)
        if self.context_tokens > 0 and self.context_dim == 0:
            raise ValueError(
                f"context_tokens={self.context_tokens} needs a positive context_dim (the text "
                "embedding width), got 0"
            )

    @property
    def output_dim(self) -> int:
        """Output features per token."""
        return self.patch_dim if self.out_patch_dim is None else self.out_patch_dim

    @property
    def has_fusion(self) -> bool:
        """Whether the concat-linear fusion runs: it needs a dense path (encoder or decoder)."""
        encoder, _, decoder = self.depth
        return self.fusion and encoder + decoder > 0


def block_flops(shape: TransformerShape, tokens: int) -> float:
    """FLOPs of one block at `tokens` tokens.

    With a GELU MLP of ratio 4 and no cross-attention this is F(N) = 24 N D^2 + 4 N^2 D + 12 D^2. A joint stream of
    L tokens adds the same per-token work for its L tokens, its own adaLN, and attention over N + L tokens.
    """
    _require_int("tokens", tokens, minimum=1)
    n, d = tokens, shape.hidden
    both = n + shape.joint_tokens  # every token of both streams is projected and goes through an MLP
    mlp_matrices = 3 if shape.gated_mlp else 2
    self_attention = 8 * both * d * d + 4 * both * both * d  # qkv + proj, then QK^T and AV
    mlp = 2 * mlp_matrices * both * d * shape.mlp_hidden
    ada_ln = 12 * d * d * (2 if shape.joint_tokens else 1)  # Linear(D, 6D) on the conditioning vector, per stream
    total = self_attention + mlp + ada_ln
    if shape.context_tokens > 0:
        lc, dc = shape.context_tokens, shape.context_dim
        total += 4 * n * d * d + 4 * lc * dc * d + 4 * n * lc * d  # q + out, k + v, QK^T + AV
    return float(total)


def forward_flops(shape: TransformerShape, tokens: int, kept_tokens: int | None = None) -> float:
    """FLOPs of one forward pass; the middle blocks see `kept_tokens` (None = all tokens)."""
    return _outer_flops(shape, tokens) + _middle_flops(shape, tokens, kept_tokens)


def sprint_step_ratio(
    shape_dense: TransformerShape,
    shape_sprint: TransformerShape,
    tokens: int,
    kept_tokens: int,
) -> float:
    """How many times cheaper a SPRINT training forward is than the dense one (dense / sparse)."""
    return forward_flops(shape_dense, tokens) / forward_flops(shape_sprint, tokens, kept_tokens)


def guidance_flops(
    shape: TransformerShape,
    tokens: int,
    mode: str,
    kept_tokens: int | None = None,
    weak_kept_tokens: int | None = None,
) -> float:
    """FLOPs to advance one generated sample by one model evaluation under a guidance mode, the middle blocks on
    `kept_tokens` (None = all; a sampling-time density schedule).

    'cfg' runs the whole model on the conditional and the null half; 'pdg' runs everything but the middle on both
    halves and the middle only on the conditional half; 'sparse' runs the embedding and the encoder once (both
    branches see the same input and condition), the middle on `kept_tokens` for the strong branch and on
    `weak_kept_tokens` for the weak one, and fusion, decoder and final layer for each.
    """
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"unknown guidance mode {mode!r}; allowed: {', '.join(GUIDANCE_MODES)}")
    outer = _outer_flops(shape, tokens)
    middle = _middle_flops(shape, tokens, kept_tokens)
    if mode == "none":
        return outer + middle
    if mode == "cfg":
        return 2 * (outer + middle)
    encoder, _, decoder = shape.depth
    if encoder + decoder == 0:
        raise ValueError(
            f"guidance mode {mode!r} needs encoder or decoder blocks, got depth {shape.depth!r} "
            "(a dense model has no middle path to drop or thin)"
        )
    if mode == "pdg":
        return 2 * outer + middle
    if weak_kept_tokens is None:
        raise ValueError("guidance mode 'sparse' needs weak_kept_tokens: the tokens its weak branch's middle sees")
    weak_middle = _middle_flops(shape, tokens, weak_kept_tokens)
    return _encoder_side_flops(shape, tokens) + 2 * _decoder_side_flops(shape, tokens) + middle + weak_middle


def _outer_flops(shape: TransformerShape, tokens: int) -> float:
    """Everything that runs on all tokens: embeddings, encoder, fusion, decoder, final layer."""
    return _encoder_side_flops(shape, tokens) + _decoder_side_flops(shape, tokens)


def _encoder_side_flops(shape: TransformerShape, tokens: int) -> float:
    """What runs before the middle: patch and timestep embeddings, the encoder blocks and their skip projections."""
    _require_int("tokens", tokens, minimum=1)
    n, d = tokens, shape.hidden
    patch_embed = 2 * n * shape.patch_dim * d
    timestep_mlp = 2 * TIMESTEP_FEATURES * d + 2 * d * d
    encoder = shape.depth[0] * block_flops(shape, tokens)
    return patch_embed + timestep_mlp + encoder + shape.skip_projections[0] * skip_projection_flops(shape, tokens)


def _decoder_side_flops(shape: TransformerShape, tokens: int) -> float:
    """What runs after the middle: fusion, the decoder blocks and their skip projections, the final layer."""
    _require_int("tokens", tokens, minimum=1)
    n, d = tokens, shape.hidden
    final_layer = 4 * d * d + 2 * n * d * shape.output_dim  # adaLN Linear(D, 2D) + output Linear
    fusion = 4 * n * d * d if shape.has_fusion else 0  # Linear(2D, D)
    decoder = shape.depth[2] * block_flops(shape, tokens)
    return fusion + decoder + final_layer + shape.skip_projections[2] * skip_projection_flops(shape, tokens)


def _middle_flops(shape: TransformerShape, tokens: int, kept_tokens: int | None) -> float:
    """The middle blocks, run on the kept tokens."""
    if kept_tokens is None:
        kept_tokens = tokens
    _require_int("kept_tokens", kept_tokens, minimum=1)
    if kept_tokens > tokens:
        raise ValueError(f"kept_tokens must be at most tokens={tokens}, got {kept_tokens}")
    return shape.depth[1] * block_flops(shape, kept_tokens) + shape.skip_projections[1] * skip_projection_flops(
        shape, kept_tokens)


def skip_projection_flops(shape: TransformerShape, tokens: int) -> float:
    """FLOPs of one long skip's Linear(2D, D) over [x, skip] at `tokens` tokens: 4 N D^2."""
    return float(4 * tokens * shape.hidden**2)


def _require_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
