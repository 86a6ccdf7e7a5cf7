"""Seeded tiny Stable Diffusion 1.x and SDXL components, built in code as diffusers' `get_dummy_components()`.

The models have random weights and a few thousand parameters; they exist so pipelines, trainers and loaders can
run end to end on a CPU in well under a second. The tokenizer is the project's own fixture
(`tests/fixtures/tokenizer/`, made by `tests/fixtures/make_tokenizer.py`), so nothing is downloaded.

Images are 32 x 32: the UNet works on 16 x 16 latents and the two-block VAE upsamples by 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TOKENIZER_DIR = Path(__file__).resolve().parent / "fixtures" / "tokenizer"
LATENT_SIZE = 16
IMAGE_SIZE = 32  # LATENT_SIZE times the VAE's scale factor, 2 ** (len(block_out_channels) - 1)
TEXT_HIDDEN_SIZE = 32  # SD's cross_attention_dim, and SDXL's first text encoder
TEXT_HIDDEN_SIZE_2 = 48  # SDXL's second text encoder; unlike the first so that mixing them up fails loudly
TEXT_PROJECTION_DIM_2 = 24  # SDXL's pooled prompt embedding
ADDITION_TIME_EMBED_DIM = 8
NUM_ADD_TIME_IDS = 6  # SDXL micro-conditioning: original size, crop top-left, target size, two numbers each


WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name


def load_fixture_tokenizer() -> CLIPTokenizer:
    """Load the project's word-level CLIP tokenizer from `tests/fixtures/tokenizer/`."""
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR)


def get_dummy_sd_components(seed: int = 0) -> dict:
    """Return the components of a tiny `StableDiffusionPipeline`, every model seeded with `seed`.

    Args:
        seed: The seed set with `torch.manual_seed` before each model is built.

    Returns:
        The keyword arguments of `StableDiffusionPipeline(**components)`.
    """
    tokenizer = load_fixture_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(4, 8),
        layers_per_block=1,
        norm_num_groups=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer, TEXT_HIDDEN_SIZE))
    return {
        "unet": unet,
        "scheduler": DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        "vae": _tiny_vae(seed),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def get_dummy_sdxl_components(seed: int = 0) -> dict:
    """Return the components of a tiny `StableDiffusionXLPipeline`, every model seeded with `seed`.

    The UNet's sizes follow from the text encoders as in SDXL: it cross-attends to both encoders' hidden states
    side by side, and its `text_time` embedding takes the second encoder's pooled projection plus six
    micro-conditioning numbers of `ADDITION_TIME_EMBED_DIM` features each.

    Args:
        seed: The seed set with `torch.manual_seed` before each model is built.

    Returns:
        The keyword arguments of `StableDiffusionXLPipeline(**components)`.
    """
    tokenizer = load_fixture_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(4, 8),
        layers_per_block=1,
        norm_num_groups=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=TEXT_HIDDEN_SIZE + TEXT_HIDDEN_SIZE_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=NUM_ADD_TIME_IDS * ADDITION_TIME_EMBED_DIM + TEXT_PROJECTION_DIM_2,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer, TEXT_HIDDEN_SIZE, hidden_act="gelu"))
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer, TEXT_HIDDEN_SIZE_2, hidden_act="gelu", projection_dim=TEXT_PROJECTION_DIM_2)
    )
    return {
        "unet": unet,
        "scheduler": EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        ),
        "vae": _tiny_vae(seed),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": load_fixture_tokenizer(),
        "image_encoder": None,
        "feature_extractor": None,
    }


def get_dummy_inputs(seed: int = 0) -> dict:
    """Return `__call__` arguments for either tiny pipeline: two steps, a seeded CPU generator, a NumPy image.

    Args:
        seed: The seed of the generator that draws the initial latents.

    Returns:
        Keyword arguments for `pipeline(**inputs)`; the output images have shape (1, 32, 32, 3).
    """
    return {
        "prompt": "a painting of a squirrel eating a burger",
        "generator": torch.Generator(device="cpu").manual_seed(seed),
        "num_inference_steps": 2,
        "guidance_scale": 6.0,
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
        "output_type": "np",
    }


def _text_config(tokenizer: CLIPTokenizer, hidden_size: int, **overrides: object) -> CLIPTextConfig:
    """Return a two-layer CLIP text encoder config whose vocabulary and special ids are the tokenizer's."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        layer_norm_eps=1e-05,
        **overrides,
    )


def _tiny_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        layers_per_block=1,
        norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
    )


def get_tiny_clip(seed: int = 0):
    """A tiny seeded `CLIPModel` (text and vision towers, 16-d projection) and its `CLIPProcessor` on 32 px images,
    for CLIPScore and CLIP features; random weights, so its scores mean nothing but its plumbing is real."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = load_fixture_tokenizer()
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    text = {
        **tower,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 77,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(seed)
    model = CLIPModel(
        CLIPConfig(text_config=text, vision_config={**tower, "image_size": 32, "patch_size": 8}, projection_dim=16)
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model.eval(), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def attention_layers(unet, suffixes: tuple[str, ...] = ATTENTION_PROJECTIONS) -> dict[str, torch.nn.Linear]:
    """A UNet's attention projections ending in `suffixes`; call it before any LoRA wraps them."""
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and ".attn" in name and name.endswith(suffixes)
    }


def write_adapter(directory: Path, state: dict[str, torch.Tensor], name: str = WEIGHTS, **metadata) -> Path:
    """Save a LoRA state dict as `directory/name`, with `metadata` as its safety_dpo.json when given."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / name))
    if metadata:
        (directory / "safety_dpo.json").write_text(json.dumps(metadata))
    return directory


def random_unet_lora(
    unet,
    seed: int,
    rank: int = 2,
    suffixes: tuple[str, ...] = ATTENTION_PROJECTIONS,
    scale_down: float = 1.0,
    scale_up: float = 0.5,
) -> dict[str, torch.Tensor]:
    """A seeded diffusers-format UNet LoRA (`unet.<layer>.lora_A/B.weight`) over the attention projections ending in
    `suffixes`; the scales set how much it changes the output (the defaults change the tiny models' clearly)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in attention_layers(unet, suffixes).items():
        state[f"unet.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * scale_down
        state[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * scale_up
    return state


def tiny_pairs(num_rows: int = 4, size: int = IMAGE_SIZE, category: str = "violence"):
    """Pairs of plain-coloured images for the tiny pipelines (which draw noise and cannot make real pairs)."""
    import datasets
    from PIL import Image

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    rows = {
        "jpg_0": [Image.new("RGB", (size, size), colours[i % 4]) for i in range(num_rows)],
        "jpg_1": [Image.new("RGB", (size, size), colours[(i + 1) % 4]) for i in range(num_rows)],
        "label_0": [1.0] * num_rows,
        "caption": [f"a knife number {i}" for i in range(num_rows)],
        "unsafe_prompt": [f"a knife number {i}" for i in range(num_rows)],
        "safe_prompt": [f"a spoon number {i}" for i in range(num_rows)],
        "category": [category] * num_rows,
        "concept": ["knife"] * num_rows,
    }
    return datasets.Dataset.from_dict(rows)
