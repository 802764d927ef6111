"""The diffusers families (wan, ltx_video, sd3, flux, hunyuan_video) against diffusers itself, on tiny random pipelines
saved to folders: the dense forward equals the diffusers model's forward, SPRINT with an identity fusion equals it too,
kept tokens run the diffusers blocks at their true positions (the rotary rows of the diffusers model sliced at the
kept tokens), and the text encoders and time shifts give what the pipelines give."""
from __future__ import annotations

import math

import gin
import pytest
import torch
from safetensors.torch import load_file, save_file

from registry import BACKBONES
from sprint_mm.configs import parse_gin
from sprint_mm.errors import mistake_message
from sprint_mm.families.text import (HUNYUAN_VIDEO_CROP, HUNYUAN_VIDEO_TEMPLATE, FluxTextEncoder,
                                     HunyuanVideoTextEncoder, SD3TextEncoder)
from sprint_mm.flow import ConstantShift, SequenceShift
from sprint_mm.latents import VideoVAECodec
from sprint_mm.lora import LoRA
from sprint_mm.masking import random_mask
from sprint_mm.sprint import FILLS, Sprint
from sprint_mm.testing import randomize
from sprint_mm.text import TextEncoder
from tests.families import (CLASSES, CONFIGS, FLUX_T5_LENGTH, HUNYUAN_LLAMA_LENGTH, SAMPLES, SD3_T5_LENGTH,
                            hunyuan_video_crop, transformer, write_pipeline)

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

FAMILIES = ("wan", "ltx_video", "sd3", "flux", "hunyuan_video")
VIDEO = ("wan", "ltx_video", "hunyuan_video")  # the families that take clips (and images as one-frame clips)
CONTEXT_STREAM = ("sd3", "flux", "hunyuan_video")  # the families whose blocks update a text stream
LTX_ROPE_SCALE = (8 / 25, 32, 32)  # LTXPipeline's at its default frame rate, 25
EXACT = 1e-5  # largest deviation relative to the largest value


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """One tiny pipeline folder per family, written by the diffusers pipeline's save_pretrained."""
    return {family: write_pipeline(family, tmp_path_factory.mktemp(family)) for family in FAMILIES}


def backbone(family: str, folders: dict):
    return BACKBONES.build(family, path=str(folders[family]), **SAMPLES[family])


def reference(family: str, folders: dict):
    """The diffusers model of the folder, loaded by diffusers on its own (a second copy of the weights)."""
    return getattr(diffusers, CLASSES[family]).from_pretrained(folders[family] / "transformer").eval()


def inputs(model, seed: int = 0, batch: int = 3):
    g = torch.Generator().manual_seed(seed)
    spec = model.backbone.condition
    x = torch.randn(batch, *model.backbone.sample_shape, generator=g)
    lengths = torch.tensor([[2], [spec.text_length], [4]])[:batch]
    cond = {"text_tokens": torch.randn(batch, spec.text_length, spec.text_dim, generator=g),
            "text_mask": torch.arange(spec.text_length)[None] < lengths}
    if spec.pooled_dim:
        cond["pooled"] = torch.randn(batch, spec.pooled_dim, generator=g)
    return x, torch.rand(batch, generator=g), cond


def diffusers_forward(family: str, model, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """The diffusers model's forward on our inputs, called as its pipeline calls it (timestep = 1000 t)."""
    timestep, tokens, mask = 1000 * t, cond["text_tokens"], cond["text_mask"]
    if family == "wan":  # WanPipeline zeroes the caption's padding and passes no mask
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=tokens * mask[..., None],
                     return_dict=False)[0]
    if family == "ltx_video":  # LTXPipeline packs the latents into tokens and passes the mask
        frames, height, width = x.shape[2:]
        packed = diffusers.LTXPipeline._pack_latents(x, 1, 1)
        out = model(hidden_states=packed, encoder_hidden_states=tokens, timestep=timestep,
                    encoder_attention_mask=mask, num_frames=frames, height=height, width=width,
                    rope_interpolation_scale=LTX_ROPE_SCALE, return_dict=False)[0]
        return diffusers.LTXPipeline._unpack_latents(out, frames, height, width, 1, 1)
    if family == "flux":  # FluxPipeline packs 2x2 patches, passes t (the model scales it by 1000), ids and guidance
        rows, channels, height, width = x.shape
        packed = diffusers.FluxPipeline._pack_latents(x, rows, channels, height, width)
        out = model(hidden_states=packed, timestep=t, guidance=torch.full([rows], SAMPLES["flux"]["guidance"]),
                    pooled_projections=cond["pooled"], encoder_hidden_states=tokens, txt_ids=flux_ids(x, tokens)[0],
                    img_ids=flux_ids(x, tokens)[1], return_dict=False)[0]
        return diffusers.FluxPipeline._unpack_latents(out, 2 * height, 2 * width, 2)  # its VAE's factor: 2
    if family == "hunyuan_video":  # HunyuanVideoPipeline: 1000 sigma, the mask in the model's dtype, 1000 x guidance
        guidance = torch.full([x.shape[0]], SAMPLES["hunyuan_video"]["guidance"]) * 1000.0
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=tokens,
                     encoder_attention_mask=mask.float(), pooled_projections=cond["pooled"], guidance=guidance,
                     return_dict=False)[0]
    return model(hidden_states=x, encoder_hidden_states=tokens, pooled_projections=cond["pooled"], timestep=timestep,
                 return_dict=False)[0]


def flux_ids(x: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FluxPipeline's text ids (zeros) and image ids (0, row, column) of the packed grid."""
    _, _, height, width = x.shape
    return (torch.zeros(tokens.shape[1], 3),
            diffusers.FluxPipeline._prepare_latent_image_ids(x.shape[0], height // 2, width // 2, "cpu", torch.float32))


def deviation(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_the_dense_forward_and_an_identity_sprint_model_equal_the_diffusers_model(family, folders):
    model, ref = backbone(family, folders).eval(), reference(family, folders)
    assert model.state_dict().keys() == {f"transformer.{key}" for key in ref.state_dict()} | {
        key for key in model.state_dict() if key.startswith("caption.")}
    x, t, cond = inputs(model)
    expected = diffusers_forward(family, ref, x, t, cond)
    assert expected.shape == x.shape
    assert deviation(model(x, t, cond), expected) <= EXACT
    for fill in FILLS:  # a converted model computes the diffusers model while no token is dropped
        assert deviation(Sprint(model, 1, 1, fusion_init="identity", fill=fill)(x, t, cond), expected) <= EXACT
    if family in VIDEO:  # an image is a one-frame clip
        image = x[:, :, 0]
        assert deviation(model(image, t, cond), diffusers_forward(family, ref, image[:, :, None], t, cond)[:, :, 0]) \
            <= EXACT


def rotary(family: str, ref, x: torch.Tensor, cond: dict):
    """The diffusers model's own rotary embedding of the whole token grid (None: positions ride in the tokens; for
    flux, of the text tokens and then the grid)."""
    if family in ("wan", "hunyuan_video"):
        return ref.rope(x)  # (1, N, 1, head_dim) each for wan, (N, head_dim) for hunyuan_video
    if family == "ltx_video":
        frames, height, width = x.shape[2:]
        return ref.rope(ref.proj_in(diffusers.LTXPipeline._pack_latents(x[:1], 1, 1)), frames, height, width,
                        LTX_ROPE_SCALE)  # (1, N, D) each
    if family == "flux":
        return ref.pos_embed(torch.cat(flux_ids(x[:, :, 0], cond["text_tokens"])))  # (L + N, head_dim) each
    return None


def text_stream(family: str, embedded):
    """The text stream the encoder starts from (SD3's context is the stream; Flux's holds it beside its rotary rows,
    HunyuanVideo's beside its text keys)."""
    return embedded.context if family == "sd3" else embedded.context["text"]


def run_reference_block(family, block, h, embedded, row, rope, ids, text, text_mask):
    """A diffusers block on one row's tokens h (1, M, D) with the rotary rows of the tokens `ids` (None: all); for
    hunyuan_video the attention mask diffusers builds for [M video tokens; text] from the row's `text_mask`."""
    if family == "sd3":
        text_out, h = block(h, text, embedded.c[row:row + 1], None)
        return h, text if text_out is None else text_out
    if family == "flux":  # the rotary rows of the text, then those of the tokens `ids`
        length = text.shape[1]
        image = slice(length, None) if ids is None else ids + length
        table = tuple(torch.cat([part[:length], part[image]]) for part in rope)
        text, h = block(h, text, embedded.c[row:row + 1], table)
        return h, text
    if family == "hunyuan_video":  # [video; text]: every video token, the first sum(mask) text tokens
        table = rope if ids is None else (rope[0][ids], rope[1][ids])
        keys = torch.arange(h.shape[1] + text.shape[1]) < h.shape[1] + text_mask[row].sum()
        return block(h, text, embedded.c[row:row + 1], keys[None, None, None], table)
    cos, sin = rope if ids is None else (rope[0][:, ids], rope[1][:, ids])
    context, c = embedded.context, embedded.c[row:row + 1]
    if family == "wan":
        return block(h, context["text"][row:row + 1], c, (cos, sin)), text
    return block(h, context["text"][row:row + 1], c, (cos, sin), context["bias"][row:row + 1]), text


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_kept_tokens_run_the_diffusers_blocks_at_their_true_positions(family, folders):
    """SPRINT 1 / 2 / 1 with half the tokens dropped and one row skipping the middle, against the diffusers model's own
    blocks run row by row: encoder on every token, the middle on the kept tokens with the diffusers rotary table sliced
    at them, the mask token elsewhere, fusion, decoder (SD3's text stream through the middle, or around it for the
    skipping row)."""
    torch.manual_seed(0)
    model = randomize(Sprint(backbone(family, folders), 1, 1), seed=3).eval()
    ref = reference(family, folders)
    ref.load_state_dict({key.removeprefix("backbone.transformer."): value for key, value in model.state_dict().items()
                         if key.startswith("backbone.transformer.")})
    x, t, cond = inputs(model)
    embedded = model.backbone.embed(x, t, cond)
    mask = random_mask(3, embedded.grid, 0.5, generator=torch.Generator().manual_seed(4))
    skip = torch.tensor([False, True, False])
    names = model.backbone.blocks_attribute  # the diffusers model's own blocks, of each list in turn
    blocks = [block for name in ((names,) if isinstance(names, str) else names) for block in getattr(ref, name)]
    rope = rotary(family, ref, model.backbone.as_clip(x), cond)
    rows = []
    for row in range(3):
        text = text_stream(family, embedded)[row:row + 1] if family in CONTEXT_STREAM else None
        h, text = run_reference_block(family, blocks[0], embedded.tokens[row:row + 1], embedded, row, rope, None, text,
                                      cond["text_mask"])
        middle = model.mask_token.expand_as(h).clone()
        if not skip[row]:
            ids = mask.ids_keep[row]
            kept = h[:, ids]
            for block in blocks[1:3]:
                kept, text = run_reference_block(family, block, kept, embedded, row, rope, ids, text,
                                                 cond["text_mask"])
            middle[:, ids] = kept
        fused = model.fusion(torch.cat([middle, h], dim=-1))
        rows.append(run_reference_block(family, blocks[3], fused, embedded, row, rope, None, text,
                                        cond["text_mask"])[0])
    expected = model.backbone.unembed(torch.cat(rows), embedded)
    assert deviation(model(x, t, cond, mask=mask, skip_middle=skip), expected) <= EXACT


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_loads_its_pipeline_folder_or_its_transformer_folder_strictly(family, folders, tmp_path):
    whole = backbone(family, folders)
    alone = BACKBONES.build(family, path=str(folders[family] / "transformer"), **SAMPLES[family])
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(alone.state_dict()[key], value, rtol=0, atol=0)
    # the adapter's diffusers model saves as a diffusers folder again, which diffusers and the family load
    whole.transformer.save_pretrained(tmp_path)
    saved = getattr(diffusers, CLASSES[family]).from_pretrained(tmp_path).state_dict()
    assert saved.keys() == whole.transformer.state_dict().keys()
    for key, value in whole.transformer.state_dict().items():
        assert torch.equal(saved[key], value), key
    BACKBONES.build(family, path=str(tmp_path), **SAMPLES[family])


def test_time_shifts_are_the_diffusers_schedulers():
    """SD3's constant shift, LTX-Video's dynamic shift, and the Flux recipe's: FluxPipeline's `calculate_shift` of the
    image tokens, through the scheduler of a Flux pipeline folder."""
    sigmas = torch.linspace(1.0, 1 / 1000, 20, dtype=torch.float64)  # unshifted; the schedulers shift the ones given
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=sigmas.tolist())
    torch.testing.assert_close(ConstantShift(3.0)(sigmas, tokens=4096), scheduler.sigmas[:-1].double(), rtol=1e-5,
                               atol=1e-6)
    # LTX-Video's dynamic shifting: mu from the token count, sigma -> exp(mu) / (exp(mu) + 1 / sigma - 1)
    ltx = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=1024,
                                                    max_image_seq_len=4096, base_shift=0.95, max_shift=2.05)
    for tokens in (1024, 6144):
        mu = 0.95 + (2.05 - 0.95) / (4096 - 1024) * (tokens - 1024)
        ltx.set_timesteps(sigmas=sigmas.tolist(), mu=mu)
        torch.testing.assert_close(SequenceShift()(sigmas, tokens), ltx.sigmas[:-1].double(), rtol=1e-5, atol=1e-6)
        assert math.isclose(SequenceShift().factor(tokens), math.exp(mu))
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    flux = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                     base_image_seq_len=256, max_image_seq_len=4096)
    parse_gin(["gin/base/flux.gin"], [])
    try:
        recipe = SequenceShift()  # as gin/base/flux.gin binds it
    finally:
        gin.clear_config()
    for tokens in (256, 1024, 4096):  # 512, 1024 and 2048 px
        flux.set_timesteps(sigmas=sigmas.tolist(), mu=calculate_shift(tokens))
        torch.testing.assert_close(recipe(sigmas, tokens), flux.sigmas[:-1].double(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Conditions as each family's pipeline computes them
# ----------------------------------------------------------------------------------------------------------------

CAPTIONS = ["a red cat", "the handwritten digit seven written by hand", ""]


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_the_text_encoders_give_what_the_pipelines_give(family, folders):
    folder = str(folders[family])
    if family == "wan":  # umT5 with its mask, padding zeroed
        pipeline = diffusers.WanPipeline.from_pretrained(folder)
        got = TextEncoder(folder, max_length=6)(CAPTIONS)
        expected = pipeline._get_t5_prompt_embeds(CAPTIONS, max_sequence_length=6, device="cpu")
        torch.testing.assert_close(got["text_tokens"], expected, rtol=1e-5, atol=1e-6)
    elif family == "ltx_video":  # T5 run without its mask; the mask goes to the transformer
        pipeline = diffusers.LTXPipeline.from_pretrained(folder)
        got = TextEncoder(folder, max_length=6, attention_mask=False)(CAPTIONS)
        expected, mask = pipeline._get_t5_prompt_embeds(CAPTIONS, max_sequence_length=6, device="cpu")
        assert torch.equal(got["text_mask"], mask)
        torch.testing.assert_close(got["text_tokens"][mask], expected[mask], rtol=1e-5, atol=1e-6)
    elif family == "hunyuan_video":  # Llama's states in the template, cropped, with their mask; CLIP-L's pooler output
        hunyuan_video_text_encoder_gives_what_the_pipeline_gives(folders)
    elif family == "flux":  # T5's states, CLIP-L's pooler output
        pipeline = diffusers.FluxPipeline.from_pretrained(folder)
        got = FluxTextEncoder(folder, t5_length=FLUX_T5_LENGTH)(CAPTIONS)
        tokens, pooled, _ = pipeline.encode_prompt(CAPTIONS, None, device="cpu", max_sequence_length=FLUX_T5_LENGTH)
        assert got["text_tokens"].shape == (3, FLUX_T5_LENGTH, 24) and got["pooled"].shape == (3, 8)
        torch.testing.assert_close(got["text_tokens"], tokens, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["pooled"], pooled, rtol=1e-5, atol=1e-6)
        assert bool(got["text_mask"].all())
    else:  # CLIP-L + CLIP-G penultimate states, T5, the pooled CLIP vectors
        pipeline = diffusers.StableDiffusion3Pipeline.from_pretrained(folder)
        got = SD3TextEncoder(folder, t5_length=SD3_T5_LENGTH)(CAPTIONS)
        tokens, _, pooled, _ = pipeline.encode_prompt(CAPTIONS, None, None, device="cpu",
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=SD3_T5_LENGTH)
        torch.testing.assert_close(got["text_tokens"], tokens, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["pooled"], pooled, rtol=1e-5, atol=1e-6)
        assert bool(got["text_mask"].all())


def hunyuan_video_text_encoder_gives_what_the_pipeline_gives(folders: dict) -> None:
    """The pipeline's template and crop are the encoder's defaults; on the tiny folder (whose word-level tokenizer
    gives the template other tokens, so its crop is counted here) the encoder gives `encode_prompt`'s states at the
    real tokens, its mask and CLIP's pooled vector, and the transformer predicts the same from both conditions (the
    padding it zeroes is never read)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    assert DEFAULT_PROMPT_TEMPLATE == {"template": HUNYUAN_VIDEO_TEMPLATE, "crop_start": HUNYUAN_VIDEO_CROP}
    folder = str(folders["hunyuan_video"])
    pipeline = diffusers.HunyuanVideoPipeline.from_pretrained(folder)
    template = {"template": HUNYUAN_VIDEO_TEMPLATE, "crop_start": hunyuan_video_crop()}
    got = HunyuanVideoTextEncoder(folder, max_length=HUNYUAN_LLAMA_LENGTH, crop_start=template["crop_start"])(CAPTIONS)
    tokens, pooled, mask = pipeline.encode_prompt(CAPTIONS, prompt_template=template, device="cpu",
                                                  max_sequence_length=HUNYUAN_LLAMA_LENGTH)
    assert got["text_mask"].dtype == torch.bool and torch.equal(got["text_mask"], mask.bool())
    assert got["text_mask"].sum(1).tolist() == [5, HUNYUAN_LLAMA_LENGTH, 2]  # words, <|eot_id|>, end of text; cut
    torch.testing.assert_close(got["text_tokens"][mask.bool()], tokens[mask.bool()], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["pooled"], pooled, rtol=1e-5, atol=1e-6)
    model = backbone("hunyuan_video", folders).eval()
    x, t, _ = inputs(model)
    expected = model(x, t, {"text_tokens": tokens, "text_mask": mask.bool(), "pooled": pooled})
    assert deviation(model(x, t, got), expected) <= EXACT


# ----------------------------------------------------------------------------------------------------------------
# LoRA files: a diffusers LoRA of a family applies to the same module names here
# ----------------------------------------------------------------------------------------------------------------

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def diffusers_lora(family: str, folders: dict, folder) -> tuple:
    """A random LoRA on the diffusers model of `family`, saved as its pipeline saves LoRAs; (the adapted diffusers
    model, the file)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = reference(family, folders)
    torch.manual_seed(5)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False))
    pipelines = {"wan": diffusers.WanPipeline, "ltx_video": diffusers.LTXPipeline, "flux": diffusers.FluxPipeline}
    pipeline = pipelines[family]
    pipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(model))
    return model.eval(), folder / "pytorch_lora_weights.safetensors"


@torch.no_grad()
def test_a_diffusers_lora_of_the_family_applies_here_and_one_of_another_model_is_refused(folders, tmp_path):
    adapted, file = diffusers_lora("wan", folders, tmp_path / "wan")
    model = LoRA(rank=4, alpha=8.0, targets=tuple(LORA_TARGETS), weights=str(file)).apply(backbone("wan", folders))
    x, t, cond = inputs(model)
    expected = diffusers_forward("wan", adapted, x, t, cond)
    assert deviation(model.eval()(x, t, cond), expected) <= EXACT
    assert deviation(diffusers_forward("wan", reference("wan", folders), x, t, cond), expected) > 1e-3  # it adapts

    _, other = diffusers_lora("ltx_video", folders, tmp_path / "ltx")
    with pytest.raises(ValueError, match=r"is a LoRA of another model .*transformer\.transformer_blocks\.0\.") as err:
        LoRA(rank=4, alpha=8.0, targets=tuple(LORA_TARGETS), weights=str(other)).apply(backbone("wan", folders))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"lora_A is \(4, 24\) there and \(8, 24\) here \(LoRA.rank 8\)"):
        LoRA(rank=8, alpha=8.0, targets=tuple(LORA_TARGETS), weights=str(file)).apply(backbone("wan", folders))


@torch.no_grad()
def test_a_diffusers_flux_lora_applies_to_both_kinds_of_blocks(folders, tmp_path):
    adapted, file = diffusers_lora("flux", folders, tmp_path / "flux")
    model = LoRA(rank=4, alpha=8.0, targets=tuple(LORA_TARGETS), weights=str(file)).apply(backbone("flux", folders))
    adapters = {name.split(".lora_")[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    assert any(".transformer_blocks." in name for name in adapters)
    assert any(".single_transformer_blocks." in name for name in adapters)
    x, t, cond = inputs(model)
    expected = diffusers_forward("flux", adapted, x, t, cond)
    assert deviation(model.eval()(x, t, cond), expected) <= EXACT
    assert deviation(diffusers_forward("flux", reference("flux", folders), x, t, cond), expected) > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line each
# ----------------------------------------------------------------------------------------------------------------


def one_line(err: pytest.ExceptionInfo) -> str:
    """The line the command lines print for the error (gin's call lines dropped): one line."""
    message = mistake_message(err.value)
    assert message is not None and "\n" not in message, message
    return message


def test_bad_folders_and_inputs_get_one_line_each(folders, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no transformer config") as err:
        BACKBONES.build("wan", path=str(tmp_path / "empty"))
    assert "diffusers pipeline folder" in one_line(err)
    with pytest.raises(ValueError, match=r"holds a LTXVideoTransformer3DModel .* use build_model.backbone = "
                                         r"'ltx_video'") as err:
        BACKBONES.build("wan", path=str(folders["ltx_video"]), **SAMPLES["wan"])
    one_line(err)
    with pytest.raises(ValueError, match="give `path`"):
        BACKBONES.build("sd3")
    transformer("wan").save_pretrained(tmp_path / "partial")  # diffusers itself only warns of a missing tensor
    weights = tmp_path / "partial" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state.pop("blocks.0.attn1.to_q.weight")
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"do not fill WanTransformer3DModel exactly: 1 missing keys \(e\.g\. "
                                         r"blocks\.0\.attn1\.to_q\.weight\)") as err:
        BACKBONES.build("wan", path=str(tmp_path / "partial"), **SAMPLES["wan"])
    one_line(err)

    model = backbone("wan", folders)
    x, t, cond = inputs(model)
    wide = dict(cond, text_tokens=torch.randn(3, 6, 24))  # another encoder's width
    with pytest.raises(ValueError, match=r"text_tokens must have shape \(B, 6, 16\)") as err:
        model(x, t, wide)
    one_line(err)
    with pytest.raises(ValueError, match=r"3 latent channels") as err:
        model(torch.randn(3, 4, 3, 8, 8), t, cond)
    one_line(err)
    sd3 = backbone("sd3", folders)
    with pytest.raises(ValueError, match=r"pooled caption vector, cond\['pooled'\] of shape \(3, 10\); got none"):
        sd3(*inputs(sd3)[:2], {k: v for k, v in inputs(sd3)[2].items() if k != "pooled"})
    with pytest.raises(ValueError, match=r"sd3 takes \(B, C, H, W\) images"):
        sd3(torch.randn(3, 3, 1, 8, 8), t, inputs(sd3)[2])

    with pytest.raises(ValueError, match=r"holds a SD3Transformer2DModel .* use build_model.backbone = 'sd3'") as err:
        BACKBONES.build("flux", path=str(folders["sd3"]), **SAMPLES["flux"])
    one_line(err)
    with pytest.raises(ValueError, match=r"flux.guidance is None, but this transformer embeds a distilled guidance "
                                         r"scale .* flux.guidance = 3.5") as err:
        BACKBONES.build("flux", path=str(folders["flux"]), **dict(SAMPLES["flux"], guidance=None))
    one_line(err)
    schnell = dict(CONFIGS["flux"], guidance_embeds=False)
    with pytest.raises(ValueError, match=r"flux.guidance = 3.5, but this transformer has no guidance embedding") as err:
        BACKBONES.build("flux", config=schnell, **SAMPLES["flux"])
    one_line(err)
    with pytest.raises(ValueError, match=r"flux.guidance must be a number >= 0, got -1.0"):
        BACKBONES.build("flux", config=CONFIGS["flux"], **dict(SAMPLES["flux"], guidance=-1.0))
    with pytest.raises(ValueError, match=r"FluxTextEncoder.path .* is a StableDiffusion3Pipeline folder .*not a Flux\* "
                                         r"pipeline's") as err:
        FluxTextEncoder(str(folders["sd3"]))
    one_line(err)
    with pytest.raises(ValueError, match=r"is a FluxPipeline folder .*not a StableDiffusion3\* pipeline's") as err:
        SD3TextEncoder(str(folders["flux"]))
    one_line(err)
    flux = backbone("flux", folders)
    with pytest.raises(ValueError, match=r"flux takes 3 latent channels .*got shape \(3, 12, 4, 4\)") as err:
        flux(torch.randn(3, 12, 4, 4), *inputs(flux)[1:])  # packed tokens' channels, not latents
    one_line(err)
    with pytest.raises(ValueError, match=r"patch \(1, 2, 2\) \(T, H, W\) does not divide the input's \(T, H, W\) "
                                         r"\(1, 7, 8\)"):
        flux(torch.randn(3, 3, 7, 8), *inputs(flux)[1:])

    codec = VideoVAECodec(str(folders["wan"]))  # the pipeline folder's vae/: 4x temporal
    with pytest.raises(ValueError, match=r"1 \+ 4k") as err:
        codec.encode(torch.zeros(1, 3, 6, 16, 16))
    one_line(err)


def test_hunyuan_video_refuses_other_folders_and_disagreeing_options_in_one_line(folders, tmp_path):
    with pytest.raises(ValueError, match=r"holds a FluxTransformer2DModel .* not the HunyuanVideoTransformer3DModel "
                                         r"that 'hunyuan_video' adapts; .* use build_model.backbone = 'flux'") as err:
        BACKBONES.build("hunyuan_video", path=str(folders["flux"]), **SAMPLES["hunyuan_video"])
    one_line(err)
    with pytest.raises(ValueError, match=r"holds a HunyuanVideoTransformer3DModel .* use build_model.backbone = "
                                         r"'hunyuan_video'") as err:
        BACKBONES.build("wan", path=str(folders["hunyuan_video"]), **SAMPLES["wan"])
    one_line(err)
    with pytest.raises(ValueError, match=r"hunyuan_video.guidance is None, but this transformer embeds a distilled "
                                         r"guidance scale .* hunyuan_video.guidance = 6.0") as err:
        BACKBONES.build("hunyuan_video", path=str(folders["hunyuan_video"]),
                        **dict(SAMPLES["hunyuan_video"], guidance=None))
    one_line(err)
    undistilled = dict(CONFIGS["hunyuan_video"], guidance_embeds=False)
    with pytest.raises(ValueError, match=r"hunyuan_video.guidance = 6.0, but this transformer has no guidance "
                                         r"embedding .* set hunyuan_video.guidance = None") as err:
        BACKBONES.build("hunyuan_video", config=undistilled, **SAMPLES["hunyuan_video"])
    one_line(err)
    BACKBONES.build("hunyuan_video", config=undistilled, **dict(SAMPLES["hunyuan_video"], guidance=None))
    with pytest.raises(ValueError, match=r"image-to-video one \(image_condition_type 'latent_concat'\)") as err:
        BACKBONES.build("hunyuan_video", config=dict(CONFIGS["hunyuan_video"], image_condition_type="latent_concat"),
                        **SAMPLES["hunyuan_video"])
    one_line(err)
    with pytest.raises(ValueError, match=r"HunyuanVideoTextEncoder.path .* is a FluxPipeline folder .*not a "
                                         r"HunyuanVideoPipeline\* pipeline's") as err:
        HunyuanVideoTextEncoder(str(folders["flux"]))
    one_line(err)
    with pytest.raises(ValueError, match=r"TextEncoder.template must hold the caption's place '\{\}' once .* "
                                         r"crop_start -1") as err:
        TextEncoder(str(folders["hunyuan_video"]), crop_start=-1)
    one_line(err)
    model = backbone("hunyuan_video", folders)
    x, t, cond = inputs(model)
    with pytest.raises(ValueError, match=r"pooled caption vector, cond\['pooled'\] of shape \(3, 8\); got none"):
        model(x, t, {key: value for key, value in cond.items() if key != "pooled"})
    with pytest.raises(ValueError, match=r"patch \(1, 2, 2\) \(T, H, W\) does not divide the input's \(T, H, W\) "
                                         r"\(3, 7, 8\)"):
        model(torch.randn(3, 3, 3, 7, 8), t, cond)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_spread_attention_computes_the_family_processor_on_a_one_process_group(family, folders):
    # Context parallelism swaps each block's self-attention processor for one written around the Ulysses exchange
    # (`SpreadSelfAttention`: the family's projections, norms and RoPE; SD3's `SpreadJointAttention`: its joint
    # attention with the text stream; Flux's `JointRotaryAttention` and HunyuanVideo's `VideoTextAttention`, which run
    # every seam call, with the group or without); over a group of one the exchange is the identity, so the prediction
    # and every gradient must be the diffusers processor's, with and without SPRINT.
    import torch.distributed as dist

    from sprint_mm.families.adapter import SpreadSelfAttention
    from sprint_mm.families.flux import JointRotaryAttention
    from sprint_mm.families.hunyuan_video import VideoTextAttention
    from sprint_mm.families.sd3 import SpreadJointAttention
    from sprint_mm.parallelize import ensure_process_group, spread_model
    from tests.test_fsdp import own_process_group

    model = Sprint(backbone(family, folders), 1, 1)
    x, t, cond = inputs(model)
    mask = random_mask(3, model.backbone.token_grid(tuple(x.shape)), 0.5, generator=torch.Generator().manual_seed(3))
    calls = []
    processor = {"sd3": SpreadJointAttention, "flux": JointRotaryAttention,
                 "hunyuan_video": VideoTextAttention}.get(family, SpreadSelfAttention)
    spread_call = processor.__call__

    def counted(self, *args, **kwargs):
        calls.append(self.group)
        return spread_call(self, *args, **kwargs)

    def run(group, **extra) -> tuple[torch.Tensor, dict]:
        model.zero_grad(set_to_none=True)
        spread_model(model, group, "context parallel")
        out = model(x, t, cond, **extra)
        out.square().mean().backward()
        return out.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    with own_process_group(), pytest.MonkeyPatch.context() as patch:
        ensure_process_group(torch.device("cpu"))
        patch.setattr(processor, "__call__", counted)
        for extra in ({}, {"mask": mask}):
            own, own_grads = run(None, **extra)
            assert all(group is None for group in calls)
            calls.clear()
            spread, spread_grads = run(dist.group.WORLD, **extra)
            assert len(calls) == len(model.backbone.blocks) and not any(group is None for group in calls)
            calls.clear()
            assert deviation(spread, own) <= EXACT
            assert spread_grads.keys() == own_grads.keys() and len(own_grads) > 20
            for name, grad in own_grads.items():
                assert torch.equal(spread_grads[name], grad) or deviation(spread_grads[name], grad) <= EXACT, name
    assert not any(isinstance(attention.processor, processor) for block in model.backbone.blocks
                   for attention in block.self_attentions().values())
