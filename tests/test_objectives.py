import pytest
import torch

from ddpm.objectives import loss_weight, to_x0_eps, training_target
from ddpm.schedule import NoiseSchedule

OBJECTIVES = ("eps", "v", "x0")


def _batch(seed: int = 0):
    """x0, noise (4, 2, 3, 3) float64 and alpha_bar (4, 1, 1, 1) at t = 0, 3, 6, 9 of cosine T=10."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(4, 2, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    s = NoiseSchedule.from_name("cosine", 10)
    ab = s.at(s.alpha_bar, torch.tensor([0, 3, 6, 9]), x0)
    return x0, noise, ab


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_target_round_trips_to_x0_and_eps(objective):
    x0, noise, ab = _batch()
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    target = training_target(objective, x0, noise, ab)
    assert target.shape == x0.shape
    x0_hat, eps_hat = to_x0_eps(objective, target, x_t, ab)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(eps_hat, noise, rtol=1e-9, atol=1e-9)


def test_targets_are_the_papers_definitions():
    x0, noise, ab = _batch()
    assert torch.equal(training_target("eps", x0, noise, ab), noise)
    assert torch.equal(training_target("x0", x0, noise, ab), x0)
    # Salimans & Ho 2022: v = alpha eps - sigma x0
    torch.testing.assert_close(training_target("v", x0, noise, ab), ab.sqrt() * noise - (1 - ab).sqrt() * x0)


def test_round_trip_in_float32_at_moderate_noise():
    x0, noise, ab = (a.float() for a in _batch(1))
    ab = ab[1:3]  # t = 3, 6: away from the ends where eps -> x0 amplifies float32 error
    x0, noise = x0[1:3], noise[1:3]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    for objective in OBJECTIVES:
        x0_hat, eps_hat = to_x0_eps(objective, training_target(objective, x0, noise, ab), x_t, ab)
        torch.testing.assert_close(x0_hat, x0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(eps_hat, noise, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_gamma_zero_gives_unit_weights(objective):
    snr = torch.tensor([1e-4, 0.5, 5.0, 1e4], dtype=torch.float64)
    w = loss_weight(objective, snr, 0.0)
    assert torch.equal(w, torch.ones_like(snr))


def test_min_snr_known_values():
    """Hang et al. 2023, gamma=5: x0 weight min(SNR, 5); eps min(SNR, 5)/SNR; v min(SNR, 5)/(SNR + 1)."""
    snr = torch.tensor([0.5, 5.0, 20.0], dtype=torch.float64)
    torch.testing.assert_close(loss_weight("x0", snr, 5.0), torch.tensor([0.5, 5.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(loss_weight("eps", snr, 5.0), torch.tensor([1.0, 1.0, 0.25], dtype=torch.float64))
    torch.testing.assert_close(loss_weight("v", snr, 5.0),
                               torch.tensor([1 / 3, 5 / 6, 5 / 21], dtype=torch.float64))


def test_min_snr_weights_put_every_objective_on_the_same_x0_loss():
    """The point of the weights: weighted loss in each objective's space = min(SNR, gamma) * ||x0_hat - x0||^2."""
    x0, noise, ab = _batch(2)
    x0, noise, ab = x0[:3], noise[:3], ab[:3]  # skip t=9, where SNR ~ 2e-5 and weights are extreme
    snr = (ab / (1 - ab)).flatten()
    gamma = 5.0
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    # a wrong prediction, consistent with x_t
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    eps_hat = (x_t - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
    x0_mse = (x0_hat - x0).pow(2).mean(dim=(1, 2, 3))
    for objective in OBJECTIVES:
        out = training_target(objective, x0_hat, eps_hat, ab)
        own_mse = (out - training_target(objective, x0, noise, ab)).pow(2).mean(dim=(1, 2, 3))
        weighted = loss_weight(objective, snr, gamma) * own_mse
        torch.testing.assert_close(weighted, snr.clamp(max=gamma) * x0_mse, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("call", [
    lambda: training_target("score", torch.zeros(1), torch.zeros(1), torch.ones(1)),
    lambda: to_x0_eps("score", torch.zeros(1), torch.zeros(1), torch.ones(1)),
    lambda: loss_weight("score", torch.ones(1), 5.0),
])
def test_unknown_objective_names_value_and_choices(call):
    with pytest.raises(ValueError, match=r"'score'.*eps, v, x0"):
        call()
