"""The shapes world: a procedural text-to-image task with a verifier, for flow-model RL
fine-tuning without a model hub.

Flat circles, squares, triangles and diamonds in four colours on a dark grey background,
rendered at any size (32 x 32 by default). Captions follow GenEval's six categories
(single_object, two_object, counting, colors, position, color_attr); each caption is a set of
constraints that ``flowrl.rewards.verifier.ShapesVerifier`` checks on an image.

| module | what |
|---|---|
| scene.py | palette, ``Scene`` / ``SceneObject``, the batched renderer ``render`` |
| captions.py | the caption grammar, ``Caption.constraints``, the two splits (geneval, zero_shot) |
| sampling.py | ``sample_scene(caption)``, pretraining pairs ``sample_pairs`` |
| tokenizer.py | word-level ``Tokenizer`` for a caption encoder |
"""

from envs.shapes.captions import (
    CATEGORIES,
    GENEVAL_MIX,
    HELD_OUT,
    SPLITS,
    Caption,
    all_captions,
    geneval_held_out,
    heldout_prompts,
    is_held_out,
    parse_caption,
    pretraining_prompts,
    train_prompts,
)
from envs.shapes.sampling import (
    CaptionedImages,
    category_weights,
    evaluation_captions,
    sample_captions,
    sample_pairs,
    sample_scene,
)
from envs.shapes.scene import BACKGROUND, COLOURS, PALETTE, SHAPES, Scene, SceneObject, render
from envs.shapes.tokenizer import MAX_TOKENS, Tokenizer

__all__ = [
    "BACKGROUND",
    "CATEGORIES",
    "COLOURS",
    "GENEVAL_MIX",
    "HELD_OUT",
    "MAX_TOKENS",
    "PALETTE",
    "SHAPES",
    "SPLITS",
    "Caption",
    "CaptionedImages",
    "Scene",
    "SceneObject",
    "Tokenizer",
    "all_captions",
    "category_weights",
    "evaluation_captions",
    "geneval_held_out",
    "heldout_prompts",
    "is_held_out",
    "parse_caption",
    "pretraining_prompts",
    "render",
    "sample_captions",
    "sample_pairs",
    "sample_scene",
    "train_prompts",
]
