"""The public reward models (CLIP score, PickScore-style, LAION-style aesthetic MLP) on a tiny random-
weight CLIP built here, each against a computation with transformers' CLIPModel directly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from flowrl.errors import FlowRLError  # noqa: E402
from flowrl.rewards import ImageBatch  # noqa: E402
from flowrl.rewards.registry import build_reward, check_reward  # noqa: E402
from tests.sd3_setup import _clip_tokenizer  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "two green triangles"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    root = tmp_path_factory.mktemp("clip")
    tokenizer = _clip_tokenizer(root / "vocab", max_length=48)
    text = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            **text,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 48,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={**text, "image_size": 16, "patch_size": 4},
        projection_dim=24,
        logit_scale_init_value=2.0,
    )
    folder = root / "tiny-clip"
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _batch() -> ImageBatch:
    # 8-bit values: the processor's uint8 round trip is exact
    levels = torch.randint(0, 256, (3, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    return ImageBatch(levels.float() / 255.0, PROMPTS)


def _direct_logits(folder: Path, batch: ImageBatch) -> tuple[torch.Tensor, float]:
    """diag(logits_per_image) and exp(logit_scale) from CLIPModel's own forward."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    images = list((batch.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    inputs = processor(text=batch.prompts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    return out.logits_per_image.diagonal(), float(model.logit_scale.detach().exp())


def test_clip_score_is_the_scaled_cosine_of_clipmodel(clip_folder):
    batch = _batch()
    logits, scale = _direct_logits(clip_folder, batch)
    reward = build_reward({"type": "clip_score", "path": str(clip_folder), "scale": 2.5, "device": "cpu"})
    scores = reward(batch).scores
    torch.testing.assert_close(scores, 2.5 * logits / scale, atol=1e-5, rtol=1e-5)
    assert scores.std() > 0  # the prompts matter


def test_pickscore_is_logit_scale_times_cosine(clip_folder):
    batch = _batch()
    logits, scale = _direct_logits(clip_folder, batch)
    assert scale == pytest.approx(torch.tensor(2.0).exp().item(), rel=1e-5)
    reward = build_reward({"type": "pickscore", "path": str(clip_folder), "device": "cpu"})
    torch.testing.assert_close(reward(batch).scores, logits, atol=1e-5, rtol=1e-5)


def _mlp_state(dim: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sizes = [(0, dim, 1024), (2, 1024, 128), (4, 128, 64), (6, 64, 16), (7, 16, 1)]
    state = {}
    for i, n_in, n_out in sizes:
        state[f"layers.{i}.weight"] = torch.randn(n_out, n_in, generator=g) / n_in**0.5
        state[f"layers.{i}.bias"] = torch.randn(n_out, generator=g)
    return state


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_aesthetic_mlp_on_normalised_clip_embeddings(clip_folder, tmp_path, suffix):
    from safetensors.torch import save_file
    from transformers import CLIPModel, CLIPProcessor

    state = _mlp_state(24)
    path = tmp_path / f"mlp{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    batch = _batch()
    model, processor = CLIPModel.from_pretrained(clip_folder).eval(), CLIPProcessor.from_pretrained(clip_folder)
    images = list((batch.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    with torch.no_grad():
        out = model(**processor(text=PROMPTS, images=images, return_tensors="pt", padding=True))
    x = out.image_embeds  # CLIPModel's normalised image embeddings
    for i in (0, 2, 4, 6, 7):  # LAION's MLP: linear layers only (dropout is off in evaluation)
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    reward = build_reward({"type": "aesthetic", "clip": str(clip_folder), "mlp": str(path), "device": "cpu"})
    torch.testing.assert_close(reward(batch).scores, x.squeeze(-1), atol=1e-4, rtol=1e-5)


def test_missing_or_foreign_models_are_one_line(clip_folder, tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    wrong_mlp = tmp_path / "wrong.pth"
    torch.save(_mlp_state(768), wrong_mlp)  # an MLP for ViT-L/14's 768-d embeddings
    cases = [
        ({"type": "clip_score", "path": str(tmp_path / "nowhere")}, "CLIP model folder not found"),
        ({"type": "pickscore", "path": str(bert)}, "holds a 'bert' model, not a CLIP model"),
        ({"type": "pickscore", "path": str(clip_folder), "processor": str(tmp_path)}, "holds no CLIP processor"),
        ({"type": "aesthetic", "clip": str(clip_folder), "mlp": str(tmp_path / "none.pth")}, "MLP file not found"),
    ]
    for spec, message in cases:
        with pytest.raises(FlowRLError, match=message) as err:
            check_reward(spec)
        assert "\n" not in str(err.value)
    with pytest.raises(FlowRLError, match="embeddings of size 768, the CLIP model's are 24") as err:
        build_reward({"type": "aesthetic", "clip": str(clip_folder), "mlp": str(wrong_mlp), "device": "cpu"})
    assert "\n" not in str(err.value)
