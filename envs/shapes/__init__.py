"""The shapes world: a procedural text-to-image task with a verifier, for flow-model RL
fine-tuning without a model hub.

Flat circles, squares, triangles and diamonds in four colours on a dark grey background,
rendered at any size (32 x 32 by default). Captions follow GenEval's six categories
(single_object, two_object, counting, colors, position, color_attr); each caption is a set of
constraints that ``flowrl.rewards.verifier.ShapesVerifier`` checks on an image.

| module | what |
|---|---|
| scene.py | palette, ``Scene`` / ``SceneObject``, the batched renderer ``render`` |
| captions.py | the caption grammar, ``Caption.constraints``, the train / held-out split |
| sampling.py | ``sample_scene(caption)``, pretraining pairs ``sample_pairs`` |
| tokenizer.py | word-level ``Tokenizer`` for a caption encoder |
"""

from envs.shapes.captions import (
    CATEGORIES,
    HELD_OUT,
    Caption,
    all_captions,
    heldout_prompts,
    parse_caption,
    train_prompts,
)
from envs.shapes.sampling import CaptionedImages, sample_captions, sample_pairs, sample_scene
from envs.shapes.scene import BACKGROUND, COLOURS, PALETTE, SHAPES, Scene, SceneObject, render
from envs.shapes.tokenizer import MAX_TOKENS, Tokenizer

__all__ = [
    "BACKGROUND",
    "CATEGORIES",
    "COLOURS",
    "HELD_OUT",
    "MAX_TOKENS",
    "PALETTE",
    "SHAPES",
    "Caption",
    "CaptionedImages",
    "Scene",
    "SceneObject",
    "Tokenizer",
    "all_captions",
    "heldout_prompts",
    "parse_caption",
    "render",
    "sample_captions",
    "sample_pairs",
    "sample_scene",
    "train_prompts",
]
