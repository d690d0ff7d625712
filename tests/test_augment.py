import pytest
import torch

from dcbs.augment import DSA_TRANSFORMS, DiffAugment, ParamDiffAug, augment, get_daparam

STRATEGY = "color_crop_cutout_flip_scale_rotate"


def batch(n, seed, c=3, s=16):
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(DSA_TRANSFORMS))
def test_siamese_same_seed_same_transform_on_two_batches(name):
    a, b = batch(4, 0), batch(6, 1)
    p = ParamDiffAug()
    together = DiffAugment(torch.cat([a, b]), name, seed=123, param=p)
    ya, yb = DiffAugment(a, name, seed=123, param=p), DiffAugment(b, name, seed=123, param=p)
    # the same parameters for every sample: applying to the concatenation equals applying separately
    assert torch.allclose(torch.cat([ya, yb]), together, atol=1e-6)


@pytest.mark.parametrize("name", ["crop", "cutout", "scale", "rotate", "color"])
def test_siamese_shares_parameters_within_batch(name):
    x = batch(1, 3).repeat(5, 1, 1, 1)
    y = DiffAugment(x, name, seed=7, param=ParamDiffAug())
    assert all(torch.allclose(y[0], y[i], atol=1e-6) for i in range(5))


def test_different_seeds_give_different_transforms():
    x = batch(3, 4)
    outs = [DiffAugment(x, STRATEGY, seed=s, param=ParamDiffAug()) for s in range(8)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])
    assert torch.equal(DiffAugment(x, STRATEGY, seed=5), DiffAugment(x, STRATEGY, seed=5))


@pytest.mark.parametrize("name", ["crop", "cutout", "scale", "rotate", "color"])
def test_per_sample_draws_when_seed_is_minus_one(name):
    x = batch(1, 5).repeat(16, 1, 1, 1)
    y = DiffAugment(x, name, seed=-1, param=ParamDiffAug(), generator=torch.Generator().manual_seed(0))
    distinct = {tuple(y[i].flatten()[:64].tolist()) for i in range(16)}
    assert len(distinct) > 1


def test_per_sample_draws_follow_the_generator():
    x = batch(8, 6)
    y1 = DiffAugment(x, STRATEGY, seed=-1, generator=torch.Generator().manual_seed(3))
    y2 = DiffAugment(x, STRATEGY, seed=-1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(y1, y2)


def test_crop_translates_with_zero_fill():
    x = torch.ones(1, 1, 8, 8)
    y = DiffAugment(x, "crop", seed=11)
    rows_zero = (y[0, 0].sum(1) == 0).sum() + (y[0, 0].sum(0) == 0).sum()
    # shift of at most int(8*0.125+0.5) = 1 pixel per axis
    assert y.shape == x.shape and rows_zero <= 2 and y.sum() >= 49


def test_cutout_zeroes_a_square_of_half_size():
    x = torch.ones(1, 1, 8, 8)
    y = DiffAugment(x, "cutout", seed=2)
    zeros = int((y == 0).sum())
    assert 0 < zeros <= 16


def test_flip_mirrors_or_keeps():
    x = batch(1, 9)
    for s in range(10):
        y = DiffAugment(x, "flip", seed=s)
        assert torch.equal(y, x) or torch.equal(y, x.flip(3))


def test_augmentation_is_differentiable():
    x = batch(2, 1).requires_grad_(True)
    for name in DSA_TRANSFORMS:
        DiffAugment(x, name, seed=1).sum().backward()
    assert x.grad is not None


def test_unknown_transform_refused():
    with pytest.raises(ValueError, match="unknown DSA transform"):
        DiffAugment(batch(1, 0), "crop_blur", seed=1)


def test_none_strategy_is_identity():
    x = batch(2, 0)
    assert DiffAugment(x, "none", seed=1) is x


def test_dc_augmentation_params_and_application():
    assert get_daparam("MNIST", "ConvNet", "ConvNet", 1)["strategy"] == "crop_scale_rotate"
    assert get_daparam("CIFAR10", "ConvNet", "ConvNet", 1)["strategy"] == "none"
    assert get_daparam("CIFAR10", "ConvNet", "ConvNetBN", 1)["strategy"] == "crop_noise"
    x = batch(6, 2, c=1, s=12)
    p = get_daparam("MNIST", "ConvNet", "ConvNet", 1)
    y = augment(x, p, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and not torch.equal(x, y)
    assert torch.equal(augment(x, get_daparam("CIFAR10", "ConvNet", "ConvNet", 1)), x)
