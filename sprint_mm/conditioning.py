"""What a model is conditioned on: class labels or captions, from a training batch or from a sampling request."""
from __future__ import annotations

from typing import Optional, Sequence

import gin
import torch

from sprint_mm.backbone import check_condition_kind
from sprint_mm.text import POOLED, TextConditioner, condition_keys


class ClassConditioning:
    """Class ids: the batch's `label`; sampling takes labels. Once prepared for a model, batch labels are checked
    against its classes."""

    kind = "class"

    def __init__(self) -> None:
        self.num_classes: Optional[int] = None

    def from_batch(self, batch: dict, device: torch.device) -> torch.Tensor:
        if "label" not in batch:
            raise KeyError(f"class conditioning needs a 'label' in each item; the batch has {sorted(batch)}")
        labels = torch.as_tensor(batch["label"]).long()
        if self.num_classes is not None:
            check_labels(labels, self.num_classes, "dataset label")
        return labels.to(device)

    def from_request(self, labels: Optional[Sequence[int]], prompts: Optional[Sequence[str]], device: torch.device) -> torch.Tensor:
        if prompts:
            raise ValueError("this run is class-conditional: pass --labels, not --prompt/--prompts")
        if not labels:
            raise ValueError("a class-conditional run needs labels to sample")
        return torch.tensor(list(labels), device=device, dtype=torch.long)

    def prepare(self, model: torch.nn.Module) -> None:
        """Check that the backbone is class-conditional and keep its number of classes."""
        check_kind(model, self.kind)
        self.num_classes = model.backbone.condition.num_classes


class TextConditioning:
    """Captions through a text encoder (or the batch's cached embeddings); the null is the empty caption."""

    kind = "text"

    def __init__(self) -> None:
        self.conditioner = TextConditioner()

    def from_batch(self, batch: dict, device: torch.device) -> dict:
        if "text_tokens" in batch:  # cached embeddings (and the pooled vector of encoders that give one)
            return {key: batch[key].to(device).bool() if key == "text_mask" else batch[key].to(device)
                    for key in condition_keys(batch)}
        if "caption" not in batch:
            raise KeyError(f"text conditioning needs a 'caption' in each item; the batch has {sorted(batch)}")
        return self.conditioner(list(batch["caption"]), device=device)

    def from_request(self, labels: Optional[Sequence[int]], prompts: Optional[Sequence[str]], device: torch.device) -> dict:
        if labels:
            raise ValueError("this run is text-conditional: pass --prompt/--prompts, not --labels")
        if not prompts:
            raise ValueError("a text-conditional run needs prompts to sample")
        return self.conditioner(list(prompts), device=device)

    def prepare(self, model: torch.nn.Module) -> None:
        """Give the backbone the empty-caption embedding as its null condition (unless it learns its own)."""
        check_kind(model, self.kind)
        backbone, spec = model.backbone, model.backbone.condition
        if not spec.learned_null:
            empty = self.conditioner.null(1, device=next(backbone.parameters()).device)
            given = tuple(empty["text_tokens"].shape[1:])
            if given != (spec.text_length, spec.text_dim):
                raise ValueError(f"the text encoder ({self.conditioner.encoder.identity}) gives captions of {given[0]} "
                                 f"tokens of width {given[1]}, but {type(backbone).__name__} reads {spec.text_length} "
                                 f"tokens of width {spec.text_dim}: use the encoder it was trained with and its "
                                 f"length (max_length {spec.text_length})")
            pooled = {"pooled": empty[POOLED][0]} if spec.pooled_dim else {}
            backbone.set_null_text(empty["text_tokens"][0], empty["text_mask"][0], **pooled)


def check_labels(labels: torch.Tensor, num_classes: int, source: str) -> None:
    """Class ids must lie in [0, num_classes): id num_classes is the null class of label dropout and guidance, so a
    label equal to it would train or sample unconditionally without a word."""
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.numel():
        raise ValueError(f"{source} {int(outside[0])} is outside [0, {num_classes}): the model has {num_classes} "
                         f"classes, 0..{num_classes - 1} (id {num_classes} is the null class)")


def check_kind(model: torch.nn.Module, kind: str) -> None:
    """The backbone's declared conditioning must be the configured one."""
    declared = model.backbone.condition.kind
    if declared != kind:
        example = {"class": "'sit' or 'video_dit'", "text": "'text_dit'"}[kind]
        raise ValueError(f"{kind} conditioning (build_conditioning.kind = {kind!r}) needs a {kind}-conditioned backbone "
                         f"(e.g. {example}), but {type(model.backbone).__name__} is conditioned on {declared}")


@gin.configurable
def build_conditioning(kind: str = "class") -> ClassConditioning | TextConditioning:
    """The conditioning of a run: `kind` is one of sprint_mm.backbone.CONDITION_KINDS."""
    check_condition_kind(kind)
    return ClassConditioning() if kind == "class" else TextConditioning()
