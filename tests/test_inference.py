"""Test-time augmentation (``m4oe eval --tta``, ``m4oe predict --tta``): mirrored views averaged into one prediction."""
from __future__ import annotations

import pytest
import torch

from m4oe_adapters.errors import ConfigError
from m4oe_adapters.evaluation import predict_mask
from m4oe_adapters.inference import flip_averaged


def lopsided_predictor() -> torch.nn.Module:
    """A convolution whose kernels favour one side and one direction: its output is not mirror-symmetric."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 2, 5, padding=2)
    with torch.no_grad():
        conv.weight[:, :, :, :2] += 1.0   # the left columns weigh more
        conv.weight[:, :, :2, :] -= 0.5   # the top rows weigh less
    return conv.eval()


def test_flips_make_any_predictor_mirror_equivariant():
    predictor = lopsided_predictor()
    image = torch.rand(1, 3, 48, 40)
    with torch.no_grad():
        plain = predictor
        assert not torch.allclose(plain(image.flip(-1)).flip(-1), plain(image), atol=1e-3)  # the premise
        averaged = flip_averaged(predictor, "flips")
        for dims in ((-1,), (-2,), (-2, -1)):
            torch.testing.assert_close(averaged(image.flip(dims)).flip(dims), averaged(image), rtol=1e-5, atol=1e-5)


def test_flip_is_left_right_only_and_none_is_the_predictor_itself():
    predictor = lopsided_predictor()
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        left_right = flip_averaged(predictor, "flip")
        torch.testing.assert_close(left_right(image.flip(-1)).flip(-1), left_right(image), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(left_right(image.flip(-2)).flip(-2), left_right(image), atol=1e-3)
    assert flip_averaged(predictor, "none") is predictor


def test_sliding_window_masks_of_a_mirrored_image_are_the_mirrored_masks():
    """Through the windows and their Gaussian blending as the evaluator runs them (an image larger than one
    window), the mask of a mirrored image is the mirror of the mask."""
    predictor = flip_averaged(lopsided_predictor(), "flips")
    image = torch.rand(3, 80, 96)
    mask = predict_mask(predictor, image, (64, 64), "crop", progress=False)
    for dims in ((-1,), (-2,)):
        mirrored = predict_mask(predictor, image.flip(dims), (64, 64), "crop", progress=False)
        assert (mirrored.flip(dims) == mask).float().mean() > 0.999


def test_an_unknown_augmentation_is_refused():
    with pytest.raises(ConfigError, match="unknown test-time augmentation 'rot'"):
        flip_averaged(lambda x: x, "rot")


def test_a_foreground_threshold_keeps_the_pixels_above_it_and_only_for_two_classes():
    from m4oe_adapters.inference import mask_from_probabilities

    foreground = torch.tensor([[0.1, 0.3, 0.45], [0.5, 0.51, 0.9]])
    probabilities = torch.stack([1 - foreground, foreground])
    assert mask_from_probabilities(probabilities).tolist() == [[0, 0, 0], [0, 1, 1]]  # argmax (0.5 ties to 0)
    assert mask_from_probabilities(probabilities, 0.25).tolist() == [[0, 1, 1], [1, 1, 1]]
    assert mask_from_probabilities(probabilities, 0.6).tolist() == [[0, 0, 0], [0, 0, 1]]
    with pytest.raises(ConfigError, match="two-class adapters; this one has 3 classes"):
        mask_from_probabilities(torch.full((3, 2, 2), 1 / 3), 0.3)
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        mask_from_probabilities(probabilities, 1.0)



def test_otsu_threshold_is_the_split_of_largest_between_class_variance_and_chosen_per_image():
    """``threshold="otsu"``: per image, the histogram split that maximises the between-class variance (checked
    against a direct search over every split); a low-contrast map (a new site's under-confident adapter) gets a
    threshold below 0.5 and keeps its faint foreground; a constant map falls back to 0.5."""
    from m4oe_adapters.inference import mask_from_probabilities, otsu_threshold

    generator = torch.Generator().manual_seed(0)
    faint = torch.cat([torch.rand(900, generator=generator) * 0.1, 0.25 + torch.rand(100, generator=generator) * 0.1])
    values = faint.double()
    best, chosen = -1.0, None
    for split in range(1, 256):  # foreground: values above split / 256
        low, high = values[values <= split / 256], values[values > split / 256]
        if len(low) and len(high):
            centre = lambda v: ((torch.floor(v * 256).clamp(max=255) + 0.5) / 256).mean()  # noqa: E731 (bin centres)
            variance = len(low) * len(high) / len(values) ** 2 * float(centre(low) - centre(high)) ** 2
            if variance > best + 1e-12:
                best, chosen = variance, split / 256
    assert otsu_threshold(faint) == pytest.approx(chosen) and 0.1 <= chosen < 0.25
    probabilities = torch.stack([1 - faint, faint]).reshape(2, 25, 40)
    mask = mask_from_probabilities(probabilities, "otsu")
    assert mask.sum() == 100 and mask_from_probabilities(probabilities).sum() == 0  # the argmax keeps nothing
    assert otsu_threshold(torch.full((8, 8), 0.3)) == 0.5
    if torch.cuda.is_available():  # probabilities on the GPU give the same threshold
        assert otsu_threshold(faint.cuda()) == otsu_threshold(faint)
    with pytest.raises(ConfigError, match="strictly between 0 and 1 or be 'otsu'"):
        mask_from_probabilities(probabilities, "mean")

def test_predict_applies_the_threshold_to_two_class_modalities_and_keeps_the_argmax_for_the_others():
    import numpy as np

    from conftest import tiny_model
    from m4oe_adapters.prediction import predict_array

    model = tiny_model(modalities=("CT", "MRI"))  # CT: 2 classes, MRI: 3
    raw = (np.random.default_rng(0).random((1, 64, 64)) * 255).astype(np.float32)
    meta = {"dtype": "uint8"}
    for modality, changes in (("CT", True), ("MRI", False)):
        plain = predict_array(model, raw, modality, meta)
        low = predict_array(model, raw, modality, meta, threshold=0.05)
        assert (not np.array_equal(plain, low)) is changes, modality
