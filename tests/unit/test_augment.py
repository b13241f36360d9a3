"""Caption-safe paired augmentation: parameters drawn per triplet, applied to whole batches."""

import random

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

from fashion_search.data.pixels import PixelPipeline
from fashion_search.training.augment import PARAMS, PairAugment, augment_pixels, working_size


def _row(**values) -> torch.Tensor:
    neutral = dict(flip=0.0, scale=1.0, tx=0.0, ty=0.0, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0)
    return torch.tensor([[{**neutral, **values}[name] for name in PARAMS]])


def _picture(size: int = 32) -> torch.Tensor:
    # A light background, a dark square off-centre (so a flip or a shift moves it) and some texture.
    g = torch.Generator().manual_seed(0)
    x = torch.full((1, 3, size, size), 220.0)
    x[:, :, 8:16, 4:12] = torch.tensor([30.0, 60.0, 200.0]).view(1, 3, 1, 1)
    x[:, :, 20:28, 16:28] += torch.randint(-40, 40, (1, 3, 8, 12), generator=g).float()
    return x.clamp(0, 255).to(torch.uint8)


def test_neutral_parameters_give_the_image_back_and_a_flip_mirrors_it():
    x = _picture()
    torch.testing.assert_close(augment_pixels(x, _row()), x.float(), atol=0.01, rtol=0)
    torch.testing.assert_close(augment_pixels(x, _row(flip=1.0)), x.float().flip(-1), atol=0.01, rtol=0)


def test_the_shift_and_zoom_are_pillows_and_the_border_is_the_background_not_black():
    x = _picture()
    got = augment_pixels(x, _row(tx=0.125, ty=-0.0625, scale=1.05))
    # Pillow's affine (nearest pixel) with the background as fill, pixel for pixel, border included.
    pil = TF.affine(
        Image.fromarray(x[0].permute(1, 2, 0).numpy()),
        angle=0.0,
        translate=[4, -2],  # 0.125 and -0.0625 of 32 px
        scale=1.05,
        shear=[0.0],
        interpolation=TF.InterpolationMode.NEAREST,
        fill=(220, 220, 220),
    )
    torch.testing.assert_close(got[0], TF.pil_to_tensor(pil).float(), atol=0.01, rtol=0)
    shifted = augment_pixels(x, _row(tx=0.25))  # 8 px to the right: the left 8 columns are uncovered
    assert torch.allclose(shifted[..., :8], torch.tensor(220.0), atol=0.01)
    torch.testing.assert_close(shifted[..., 8:], x.float()[..., :24], atol=0.01, rtol=0)


def _sharpness(x: torch.Tensor) -> float:
    # Mean absolute difference between neighbouring pixels: what a blur lowers.
    return ((x[..., 1:] - x[..., :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()).item()


def test_a_sub_pixel_shift_leaves_the_model_input_as_sharp_as_the_eval_transforms():
    """Training pixels must look like val and catalog pixels (an antialiased resize of the photo): a
    shift of a fraction of a pixel resampled at the input size would blur every training image."""
    g = torch.Generator().manual_seed(1)
    photo = torch.randint(0, 256, (1, 3, 48, 48), generator=g).float()  # fine texture: 2-px cells
    photo = torch.nn.functional.interpolate(photo, size=(96, 96), mode="nearest").to(torch.uint8)
    img = Image.fromarray(photo[0].permute(1, 2, 0).numpy())
    size = 64
    assert working_size(size) == 96
    bicubic = TF.InterpolationMode.BICUBIC
    pipeline = PixelPipeline(
        T.Compose([T.Resize(size, interpolation=bicubic), T.CenterCrop(size)]), (0,) * 3, (1,) * 3
    )
    evaluated = TF.pil_to_tensor(TF.resize(img, size, interpolation=bicubic)).float()[None]
    shifts = (0.004, 0.008, 0.012)  # 0.25-0.75 px at 64 px
    rows = torch.cat([_row(tx=t, ty=-t) for t in shifts])
    trained = augment_pixels(photo.expand(3, -1, -1, -1), rows, pipeline.resize_tensors)
    assert trained.shape == (3, 3, size, size)
    assert 0.9 * _sharpness(evaluated) < _sharpness(trained) < 1.1 * _sharpness(evaluated)
    # The same shifts resampled bilinearly at the input size: what this picture tells apart.
    theta = torch.tensor([[[1.0, 0.0, -2 * t], [0.0, 1.0, 2 * t]] for t in shifts])
    grid = torch.nn.functional.affine_grid(theta, [3, 3, size, size], align_corners=False)
    blurred = torch.nn.functional.grid_sample(
        evaluated.expand(3, -1, -1, -1), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    assert _sharpness(blurred) < 0.7 * _sharpness(evaluated)
    # Unshifted, the step's resize is the eval transform's, within rounding.
    same = augment_pixels(photo, _row(), pipeline.resize_tensors)
    assert (same - evaluated).abs().mean() < 0.5


def test_brightness_and_contrast_follow_pillow_within_its_rounding():
    img = Image.fromarray(_picture()[0].permute(1, 2, 0).numpy())
    pil = TF.adjust_contrast(TF.adjust_brightness(img, 1.08), 0.93)
    want = torch.from_numpy(__import__("numpy").asarray(pil).copy()).permute(2, 0, 1).float()
    got = augment_pixels(_picture(), _row(brightness=1.08, contrast=0.93))[0]
    assert (got - want).abs().max() <= 2.0  # Pillow truncates to integers after each step, its grey mean too


def test_each_row_gets_its_own_transform():
    x = _picture().repeat(2, 1, 1, 1)
    rows = torch.cat([_row(), _row(flip=1.0)])
    out = augment_pixels(x, rows)
    torch.testing.assert_close(out[0], x[0].float(), atol=0.01, rtol=0)
    torch.testing.assert_close(out[1], x[1].float().flip(-1), atol=0.01, rtol=0)


def test_the_default_draws_keep_colours_and_draw_no_more_than_six_numbers():
    red = torch.tensor([200, 20, 20], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 16, 16)
    for seed in range(8):
        rng = random.Random(seed)
        params = PairAugment().draw(rng)
        r, g, b = augment_pixels(red, params[None])[0, :, 8, 8].tolist()
        assert r > 3 * max(g, b)  # still red: "is red" stays true
        # The caption is drawn next from the same stream: color=0 must leave it where it was.
        twin = random.Random(seed)
        for _ in range(6):
            twin.random()
        assert rng.random() == twin.random()


def test_colour_jitter_changes_hue_and_saturation_when_asked_for():
    red = torch.tensor([200, 20, 20], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 16, 16)
    plain = [augment_pixels(red, PairAugment().draw(random.Random(s))[None]) for s in range(6)]
    jittered = [augment_pixels(red, PairAugment(color=1.0).draw(random.Random(s))[None]) for s in range(6)]
    hues = {round(TF.rgb_to_grayscale(j / 255).mean().item(), 3) for j in jittered}
    assert len(hues) > 1 and any(not torch.allclose(a, b, atol=1) for a, b in zip(plain, jittered))


def test_the_step_gives_each_triplets_transform_to_its_reference_target_and_negatives(micro_model):
    from fashion_search.training.step import _augmented

    size = micro_model.backbone.image_size
    x = torch.nn.functional.interpolate(_picture().float(), size=(size, size)).round().to(torch.uint8)
    rows = torch.cat([_row(), _row(flip=1.0)])  # triplet 0 as it is, triplet 1 mirrored
    negatives = x.repeat(4, 1, 1, 1)  # two per triplet, row-major: 0, 0, 1, 1
    got = _augmented(micro_model, negatives, rows, torch.device("cpu"))
    plain = micro_model.pixel_pipeline.normalise(x)[0]
    for i, flipped in enumerate((False, False, True, True)):
        torch.testing.assert_close(got[i], plain.flip(-1) if flipped else plain, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="uint8"):  # normalised floats are not pixels to augment
        _augmented(micro_model, negatives.float(), rows, torch.device("cpu"))
