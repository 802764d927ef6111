"""Tiny random diffusers families for the tests: transformer configs, and whole pipeline folders (transformer, text
encoders with word-level tokenizers, VAE, scheduler) written by the diffusers pipelines' own save_pretrained. Latents
have 3 channels, so that the captioned digits (1 or 3 channels) stand in for them in end-to-end runs."""
from __future__ import annotations

import json
from pathlib import Path

import gin
import torch

from sprint_mm.configs import parse_gin

WORDS = ("a an the of red blue cat dog digit zero one two three four five six seven eight nine handwritten number "
         "written by hand image picture drawing").split()
TABLE = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "family_configs.json").read_text())
# family -> the published transformer config (of the GPU suite's real shapes)
PUBLISHED = {entry["family"]: entry["config"] for entry in TABLE.values()}
# family -> the tiny diffusers transformer config (4 blocks, hidden 16 or 24) and sample the GPU suite's --tiny uses too
TINY = {entry["family"]: entry["tiny"] for entry in TABLE.values()}
CONFIGS = {family: tiny["config"] for family, tiny in TINY.items()}
# family -> the tiny sample options (input_size, text_length and, for flux, its fixed guidance)
SAMPLES = {family: dict(tiny["sample"], input_size=tuple(tiny["sample"]["input_size"]))
           for family, tiny in TINY.items()}
CLASSES = {"wan": "WanTransformer3DModel", "ltx_video": "LTXVideoTransformer3DModel", "sd3": "SD3Transformer2DModel",
           "flux": "FluxTransformer2DModel", "hunyuan_video": "HunyuanVideoTransformer3DModel"}
SD3_CLIP_LENGTH, SD3_T5_LENGTH = 77, 6
FLUX_T5_LENGTH = 6
FLUX_VAE_FACTORS = dict(scaling_factor=0.3611, shift_factor=0.1159)  # the FLUX.1 VAE's
HUNYUAN_LLAMA_LENGTH = 6  # Llama tokens after the template's crop
HUNYUAN_MARKS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")  # the template's


def without_folder(gin_files: list[str]) -> list[str]:
    """Bindings that build a configuration of a diffusers family without its folder (not on this machine): the
    published transformer config with random weights; none for the other backbones."""
    parse_gin(gin_files, [])
    try:
        backbone = gin.query_parameter("build_model.backbone")
    except ValueError:
        return []
    finally:
        gin.clear_config()
    return [f"{backbone}.path = None", f"{backbone}.config = {PUBLISHED[backbone]!r}"] if backbone in PUBLISHED else []


def transformer(family: str, seed: int = 0) -> torch.nn.Module:
    """The tiny diffusers transformer of `family`, its weights drawn from `seed` and perturbed so that no
    zero-initialised output layer hides anything."""
    import diffusers

    torch.manual_seed(seed)
    model = getattr(diffusers, CLASSES[family]).from_config(CONFIGS[family])
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def tokenizer(max_length: int, eos: str = "</s>", bos: str | None = None, extra_specials: tuple[str, ...] = ()):
    """A word-level fast tokenizer over WORDS that ends every caption with `eos` (and starts it with `bos`);
    `extra_specials` are further special tokens (a prompt template's marks), each one token wherever it appears."""
    import tokenizers
    import transformers

    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    specials = ["<pad>", eos, "<unk>"] + ([bos] if bos else []) + [s for s in extra_specials if s not in (bos, eos)]
    model.train_from_iterator([" ".join(WORDS)], tokenizers.trainers.WordLevelTrainer(special_tokens=specials))
    template = f"{bos} $A {eos}" if bos else f"$A {eos}"
    marks = [(mark, model.token_to_id(mark)) for mark in (bos, eos) if mark]
    model.post_processor = tokenizers.processors.TemplateProcessing(single=template, special_tokens=marks)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token=eos,
                                                unk_token="<unk>", model_max_length=max_length,
                                                **({"bos_token": bos} if bos else {}))


def llama_tokenizer():
    """HunyuanVideo's Llama tokenizer in small: words, the prompt template's marks as single tokens, a begin-of-text
    token in front (and an end-of-text token behind)."""
    return tokenizer(256, eos="<|end_of_text|>", bos=HUNYUAN_MARKS[0], extra_specials=HUNYUAN_MARKS)


def hunyuan_video_crop() -> int:
    """The tokens of HunyuanVideoPipeline's prompt template before the caption (begin-of-text included) under the tiny
    tokenizer: the crop of the tiny folder (95 under Llama 3's tokenizer)."""
    from sprint_mm.families.text import HUNYUAN_VIDEO_TEMPLATE

    return len(llama_tokenizer()(HUNYUAN_VIDEO_TEMPLATE.split("{}")[0]).input_ids) - 1  # without the end of text


def t5(kind: str, width: int, vocab: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(1)
    config = dict(vocab_size=vocab, d_model=width, d_kv=4, d_ff=2 * width, num_layers=2, num_heads=2, pad_token_id=0)
    if kind == "umt5":
        return transformers.UMT5EncoderModel(transformers.UMT5Config(**config)).eval()
    return transformers.T5EncoderModel(transformers.T5Config(**config)).eval()


def clip_text_model(width: int, projection: int, vocab: int, eos_id: int,
                    pooled_only: bool = False) -> torch.nn.Module:
    """A tiny CLIP text model with its projection (SD3), or without it (`pooled_only`: Flux reads the pooler output)."""
    import transformers

    torch.manual_seed(2)
    config = transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                         projection_dim=projection, pad_token_id=0, bos_token_id=eos_id,
                                         eos_token_id=eos_id)
    model_class = transformers.CLIPTextModel if pooled_only else transformers.CLIPTextModelWithProjection
    return model_class(config).eval()


def llama(width: int, vocab: int) -> torch.nn.Module:
    """A tiny Llama (HunyuanVideo's text encoder is a Llama 3 8B): 3 layers, so that the third hidden state from the
    end, which the pipeline reads, is a block's output."""
    import transformers

    torch.manual_seed(4)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                                      num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=256, pad_token_id=0)
    return transformers.LlamaModel(config).eval()


def vae(family: str) -> torch.nn.Module:
    """Tiny VAEs: Wan's (4x temporal, 4x spatial here), LTX's (8x, 8x), HunyuanVideo's (4x, 4x; its scaling factor
    0.476986 by default), SD3's and Flux's image AutoencoderKL (2x here; Flux's without the quant convolutions, with
    its scaling and shift factors)."""
    import diffusers

    torch.manual_seed(3)
    if family == "wan":
        return diffusers.AutoencoderKLWan(base_dim=8, z_dim=3, dim_mult=[1, 1, 1], num_res_blocks=1,
                                          temperal_downsample=[True, True], latents_mean=[0.1, -0.2, 0.3],
                                          latents_std=[1.2, 0.8, 1.5])
    if family == "ltx_video":
        return diffusers.AutoencoderKLLTXVideo(
            latent_channels=3, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
            layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5, patch_size=1, timestep_conditioning=True)
    image = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=3,
                 norm_num_groups=4)
    if family == "hunyuan_video":
        return diffusers.AutoencoderKLHunyuanVideo(
            latent_channels=3, block_out_channels=(8, 8, 8), down_block_types=("HunyuanVideoDownBlock3D",) * 3,
            up_block_types=("HunyuanVideoUpBlock3D",) * 3, layers_per_block=1, norm_num_groups=4,
            spatial_compression_ratio=4, temporal_compression_ratio=4)
    if family == "flux":
        return diffusers.AutoencoderKL(**image, **FLUX_VAE_FACTORS, use_quant_conv=False, use_post_quant_conv=False)
    return diffusers.AutoencoderKL(**image, scaling_factor=1.5305, shift_factor=0.0609)


def write_pipeline(family: str, folder: Path) -> Path:
    """A whole tiny pipeline folder of `family`, written by its diffusers pipeline's save_pretrained."""
    import diffusers

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    parts = dict(transformer=transformer(family), vae=vae(family), scheduler=scheduler)
    if family == "sd3":
        words = tokenizer(SD3_CLIP_LENGTH, eos="<|endoftext|>", bos="<|startoftext|>")
        eos = words.convert_tokens_to_ids("<|endoftext|>")
        pipeline = diffusers.StableDiffusion3Pipeline(
            tokenizer=words, text_encoder=clip_text_model(8, 4, len(words), eos), tokenizer_2=words,
            text_encoder_2=clip_text_model(12, 6, len(words), eos), tokenizer_3=tokenizer(SD3_T5_LENGTH),
            text_encoder_3=t5("t5", 24, len(words)), **parts)
    elif family == "flux":  # CLIP-L's pooled output and T5's states; the scheduler shifts by the image tokens
        words = tokenizer(SD3_CLIP_LENGTH, eos="<|endoftext|>", bos="<|startoftext|>")
        eos = words.convert_tokens_to_ids("<|endoftext|>")
        parts["scheduler"] = diffusers.FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096)
        pipeline = diffusers.FluxPipeline(
            tokenizer=words, text_encoder=clip_text_model(8, 4, len(words), eos, pooled_only=True),
            tokenizer_2=tokenizer(FLUX_T5_LENGTH), text_encoder_2=t5("t5", 24, len(words)), **parts)
    elif family == "hunyuan_video":  # Llama's states with its mask (a template's tokens), CLIP-L's pooled output
        words = tokenizer(SD3_CLIP_LENGTH, eos="<|endoftext|>", bos="<|startoftext|>")
        eos = words.convert_tokens_to_ids("<|endoftext|>")
        marked = llama_tokenizer()
        parts["scheduler"] = diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0)
        pipeline = diffusers.HunyuanVideoPipeline(
            tokenizer=marked, text_encoder=llama(16, len(marked)), tokenizer_2=words,
            text_encoder_2=clip_text_model(8, 8, len(words), eos, pooled_only=True), **parts)
    else:
        words = tokenizer(64)
        kind, width = ("umt5", 16) if family == "wan" else ("t5", 12)
        pipeline_class = diffusers.WanPipeline if family == "wan" else diffusers.LTXPipeline
        pipeline = pipeline_class(tokenizer=words, text_encoder=t5(kind, width, len(words)), **parts)
    pipeline.save_pretrained(folder)
    return folder
