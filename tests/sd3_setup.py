"""A tiny random-weight Stable Diffusion 3 diffusers folder, built locally (no downloads): a one-
layer SD3Transformer2DModel, a two-level AutoencoderKL (factor 2), two tiny CLIP text encoders
with projection and a tiny T5 encoder, with tokenizers made from vocabularies written here.
Sizes follow diffusers' own SD3 pipeline tests (``get_dummy_components``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Every word of the shapes world's captions, spelled in letters the tiny CLIP vocabulary holds.
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _clip_tokenizer(folder: Path, max_length: int):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _LETTERS:
        vocab[c] = len(vocab)
    for c in _LETTERS:
        vocab[c + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length, pad_token="<|endoftext|>"
    )


def _t5_tokenizer():
    from transformers import T5Tokenizer

    from envs.shapes.tokenizer import VOCABULARY

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in VOCABULARY[1:]] + [(c, -5.0) for c in _LETTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def build_tiny_sd3(folder: Path, seed: int = 0) -> Path:
    """Writes a tiny SD3 pipeline to ``folder`` (StableDiffusion3Pipeline.save_pretrained) and
    returns it. 16 px images -> 4 x 8 x 8 latents."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = _clip_tokenizer(folder.parent / f"{folder.name}-vocab", max_length=48)
    t5_tokenizer = _t5_tokenizer()
    clip = {
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": 2 + 2 * len(_LETTERS),
        "projection_dim": 32,
        "max_position_embeddings": 48,
    }
    t5 = T5Config(
        vocab_size=t5_tokenizer.vocab_size, d_model=64, d_kv=8, d_ff=64, num_layers=1, num_heads=2, pad_token_id=0
    )
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=8,
            patch_size=1,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=64,
            pooled_projection_dim=64,
            out_channels=4,
        ),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL(
            sample_size=16,
            in_channels=3,
            out_channels=3,
            block_out_channels=(4, 8),
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=1,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        ),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**clip)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**clip)),
        tokenizer_2=tokenizer,
        text_encoder_3=T5EncoderModel(t5),
        tokenizer_3=t5_tokenizer,
    )
    pipe.save_pretrained(folder)
    return folder
