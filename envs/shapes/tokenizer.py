"""A word-level tokenizer over the shapes world's vocabulary, for a caption encoder.

Every caption of the grammar fits in ``MAX_TOKENS`` words; id 0 is padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from envs.shapes.captions import NUMBER_WORDS, RELATION_WORDS
from envs.shapes.scene import COLOURS, SHAPES

PAD = "<pad>"
VOCABULARY: tuple[str, ...] = (
    PAD,
    "a",
    "and",
    *dict.fromkeys(word for words in RELATION_WORDS.values() for word in words.split()),
    *COLOURS,
    *SHAPES,
    *(f"{s}s" for s in SHAPES),
    *NUMBER_WORDS.values(),
)
MAX_TOKENS = 8  # "a circle to the left of a square"


class Tokenizer:
    """Words -> ids. ``encode`` pads every caption to ``max_length`` tokens."""

    def __init__(self, max_length: int = MAX_TOKENS) -> None:
        self.max_length = max_length
        self.vocabulary = VOCABULARY
        self.ids = {word: i for i, word in enumerate(VOCABULARY)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[B, L]`` (long, 0 = padding) and mask ``[B, L]`` (bool, True on words).

        Raises ValueError naming the word that is not in the vocabulary, or the prompt that
        is longer than ``max_length`` words.
        """
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = prompt.lower().split()
            if len(words) > self.max_length:
                raise ValueError(f"prompt {prompt!r} has {len(words)} words; the tokenizer takes {self.max_length}")
            for col, word in enumerate(words):
                if word not in self.ids or word == PAD:
                    raise ValueError(
                        f"unknown word {word!r} in prompt {prompt!r}; the shapes vocabulary is {VOCABULARY[1:]}"
                    )
                ids[row, col] = self.ids[word]
        return ids, ids != 0

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Captions of ``ids`` ``[B, L]`` (padding dropped)."""
        return [" ".join(self.vocabulary[i] for i in row.tolist() if i != 0) for row in ids]


__all__ = ["MAX_TOKENS", "PAD", "VOCABULARY", "Tokenizer"]
