"""The text-conditioned image velocity field: shapes, padding-invariance of the caption,
classifier-free guidance against separate conditional / unconditional passes, caption dropout."""

from __future__ import annotations

import pytest
import torch

from flowrl.models.text_image import PAD, GuidedVelocity, TextImageVelocity, drop_captions

VOCAB, MAX_LEN = 20, 10


def _model(image_size: int = 16) -> TextImageVelocity:
    torch.manual_seed(0)
    model = TextImageVelocity(VOCAB, MAX_LEN, image_size=image_size, channels=(16, 16, 16), text_dim=16, time_dim=16)
    with torch.no_grad():  # the zero-initialised output layers would make every output 0
        for name, p in model.named_parameters():
            if torch.count_nonzero(p) == 0 and "null" not in name:
                p.normal_(0.0, 0.1)
    return model.eval()


def _captions(batch: int, length: int) -> torch.Tensor:
    ids = torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))
    ids[0, 3:] = PAD  # a shorter caption
    return ids


@pytest.mark.parametrize("size", [16, 32])
def test_output_has_the_image_shape(size):
    model = _model(size)
    x = torch.randn(3, 3, size, size)
    out = model(_captions(3, 6), x, torch.rand(3))
    assert out.shape == x.shape and model.event_shape == (3, size, size)
    assert torch.isfinite(out).all()


def test_trailing_padding_does_not_change_the_field():
    model = _model()
    ids, x, t = _captions(4, 6), torch.randn(4, 3, 16, 16), torch.rand(4)
    padded = torch.cat([ids, torch.full((4, 4), PAD)], dim=1)
    torch.testing.assert_close(model(ids, x, t), model(padded, x, t), atol=1e-5, rtol=1e-5)


def test_the_caption_and_the_time_change_the_field():
    model = _model()
    ids, x, t = _captions(2, 6), torch.randn(2, 3, 16, 16), torch.rand(2)
    other = ids.clone()
    other[:, 1] = (other[:, 1] % (VOCAB - 1)) + 1
    base = model(ids, x, t)
    assert (model(other, x, t) - base).abs().max() > 1e-4
    assert (model(ids, x, t * 0.5) - base).abs().max() > 1e-4


def test_empty_captions_all_give_the_unconditional_field():
    model = _model()
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    short, long = torch.full((2, 3), PAD), torch.full((2, MAX_LEN), PAD)
    torch.testing.assert_close(model(short, x, t), model(long, x, t), atol=1e-5, rtol=1e-5)


def test_classifier_free_guidance_matches_separate_passes():
    model = _model()
    ids, x, t = _captions(3, 6), torch.randn(3, 3, 16, 16), torch.rand(3)
    v_cond = model(ids, x, t)
    v_uncond = model(torch.full_like(ids, PAD), x, t)
    for scale in (1.0, 0.0, 4.5):
        want = v_uncond + scale * (v_cond - v_uncond)
        torch.testing.assert_close(GuidedVelocity(model, scale)(ids, x, t), want, atol=1e-5, rtol=1e-4)


def test_caption_dropout_rate_is_p():
    ids = torch.randint(1, VOCAB, (20000, 5))
    dropped = drop_captions(ids, 0.1, torch.Generator().manual_seed(0))
    empty = (dropped == PAD).all(dim=1)
    assert torch.equal(dropped[~empty], ids[~empty])
    rate, sigma = empty.float().mean().item(), (0.1 * 0.9 / 20000) ** 0.5
    assert abs(rate - 0.1) < 4 * sigma


def test_bad_sizes_are_one_line_errors():
    with pytest.raises(ValueError, match="divisible by 4 \\* patch"):
        TextImageVelocity(VOCAB, MAX_LEN, image_size=20)
    with pytest.raises(ValueError, match="token ids must be"):
        _model()(torch.ones(2, MAX_LEN + 1, dtype=torch.long), torch.randn(2, 3, 16, 16), 0.5)
