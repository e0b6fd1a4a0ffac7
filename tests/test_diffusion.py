import pytest
import torch

from motfusion.diffusion import (
    DDPM,
    DDIMSampler,
    DDPMSampler,
    RectifiedFlow,
    cfg,
    cosine_alpha_bar,
    make_process,
    make_sampler,
)
from motfusion.errors import ConfigError
from motfusion.objectives import TransfusionObjective
from motfusion.recipes import get_recipe

T = 1000


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=_gen(seed)) * 2 - 1  # (N, C, H, W) in [-1, 1)


def _ddpm_oracle(process: DDPM, x0: torch.Tensor):
    """Exact epsilon when the data distribution is a point mass at x0."""

    def model(x_t, t):
        ab = process.alpha_bar[t.long()].float().view(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    return model


def _flow_oracle(x0: torch.Tensor):
    """Exact velocity when the data distribution is a point mass at x0."""

    def model(x_t, t):
        s = (t / T).view(-1, 1, 1, 1)
        return (x_t - x0) / s

    return model


def _gaussian_ddpm_eps(process: DDPM, mu: float, sigma: float):
    """E[eps | x_t] for data ~ N(mu, sigma^2) per dimension: the optimal epsilon predictor."""

    def model(x_t, t):
        ab = process.alpha_bar[t.long()].float().view(-1, 1, 1, 1)
        return (1 - ab).sqrt() / (ab * sigma**2 + 1 - ab) * (x_t - ab.sqrt() * mu)

    return model


def _gaussian_flow_velocity(mu: float, sigma: float):
    """E[eps - x0 | x_t] for data ~ N(mu, sigma^2) per dimension: the optimal velocity predictor."""

    def model(x_t, t):
        s = (t / T).view(-1, 1, 1, 1)
        var = (1 - s) ** 2 * sigma**2 + s**2
        return -mu + (s - (1 - s) * sigma**2) / var * (x_t - (1 - s) * mu)

    return model


def test_cosine_alpha_bar_decreases_from_one_to_zero():
    ab = cosine_alpha_bar(T)
    assert ab.shape == (T,)
    assert (ab[1:] < ab[:-1]).all()
    assert ab[0] > 0.9999 and 0 < ab[-1] < 1e-6
    betas = 1 - ab / torch.cat([ab.new_ones(1), ab[:-1]])
    assert betas.max() <= 0.999 + 1e-12


@pytest.mark.parametrize("name", ["ddpm", "flow"])
def test_add_noise_at_t0_is_x0(name):
    process = make_process(name)
    x0 = _images()
    noise = torch.randn(x0.shape, generator=_gen(1))
    x_t = process.add_noise(x0, noise, torch.zeros(x0.shape[0]))
    assert (x_t - x0).abs().max() < 0.01 * noise.abs().max()


def test_flow_interpolates_linearly_and_targets_velocity():
    flow = RectifiedFlow(T)
    x0, noise = _images(), torch.randn(6, 3, 8, 8, generator=_gen(1))
    t = torch.full((6,), T / 4)
    torch.testing.assert_close(flow.add_noise(x0, noise, t), 0.75 * x0 + 0.25 * noise)
    torch.testing.assert_close(flow.target(x0, noise, t), noise - x0)


@pytest.mark.parametrize("name", ["ddpm", "flow"])
def test_oracle_target_inverts_to_x0_and_noise(name):
    process = make_process(name)
    x0 = _images()
    noise = torch.randn(x0.shape, generator=_gen(1))
    t = torch.tensor([0.0, 1.0, 250.0, 500.0, 900.0, 990.0])
    x_t = process.add_noise(x0, noise, t)
    target = process.target(x0, noise, t)
    torch.testing.assert_close(process.predict_x0(x_t, target, t), x0, atol=1e-4, rtol=0)
    torch.testing.assert_close(process.predict_eps(x_t, target, t), noise, atol=1e-4, rtol=0)
    # Recovering eps from x0 divides by b(t), which is 0 for flow at t = 0: skip that row.
    torch.testing.assert_close(process.eps_from_x0(x_t[1:], x0[1:], t[1:]), noise[1:], atol=1e-3, rtol=0)


@pytest.mark.parametrize(("name", "num_steps"), [("ddim", 50), ("ddpm", 50), ("ddpm", 1000)])
def test_ddpm_samplers_recover_point_mass(name, num_steps):
    process = DDPM(T)
    x0 = _images()
    sampler = make_sampler(process, name, num_steps)
    x_T = torch.randn(x0.shape, generator=_gen(1))
    out = sampler.sample(_ddpm_oracle(process, x0), x_T, _gen(2))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)


def test_euler_recovers_point_mass():
    x0 = _images()
    sampler = make_sampler(RectifiedFlow(T), "euler", 10)
    out = sampler.sample(_flow_oracle(x0), torch.randn(x0.shape, generator=_gen(1)))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


MU, SIGMA = 0.3, 0.5


def _moments(sampler, model) -> tuple[float, float]:
    x_T = torch.randn(4096, 2, 4, 4, generator=_gen(1))  # 131k independent scalar samples
    out = sampler.sample(model, x_T, _gen(2))
    return out.mean().item(), out.std().item()


@pytest.mark.parametrize(
    ("name", "std_tol"),
    # Plugging the optimal x0 estimate into the posterior with its "fixed small" variance drops
    # the uncertainty of that estimate, so 100 ancestral steps land ~3.5% under sigma (the exact
    # linear-Gaussian recursion gives 0.4823 for sigma=0.5); DDIM's discretisation error is ~1.5%.
    [("ddpm", 0.05), ("ddim", 0.025)],
)
def test_gaussian_data_moments_ddpm(name, std_tol):
    process = DDPM(T)
    mean, std = _moments(make_sampler(process, name, 100), _gaussian_ddpm_eps(process, MU, SIGMA))
    assert mean == pytest.approx(MU, abs=0.01)
    assert std == pytest.approx(SIGMA, rel=std_tol)


def test_gaussian_data_moments_euler():
    mean, std = _moments(make_sampler(RectifiedFlow(T), "euler", 100), _gaussian_flow_velocity(MU, SIGMA))
    assert mean == pytest.approx(MU, abs=0.01)
    assert std == pytest.approx(SIGMA, rel=0.025)


def test_respaced_betas():
    process = DDPM(T)
    full = DDPMSampler(process, T)
    training_betas = 1 - process.alpha_bar / torch.cat(
        [process.alpha_bar.new_ones(1), process.alpha_bar[:-1]]
    )
    torch.testing.assert_close(full.betas.flip(0), training_betas)

    strided = DDPMSampler(process, 37)
    ts = strided.timesteps
    assert ts[0] == T - 1 and ts[-1] == 0 and (ts[1:] < ts[:-1]).all()
    # The shortened chain reaches exactly the training marginals at the kept steps.
    kept_alpha_bar = torch.cumprod((1 - strided.betas).flip(0), 0).flip(0)
    torch.testing.assert_close(kept_alpha_bar, process.alpha_bar[ts.long()])


def test_ddim_with_eta_one_matches_ddpm_step():
    process = DDPM(T)
    ddpm, ddim = DDPMSampler(process, 20), DDIMSampler(process, 20, eta=1.0)
    x_t = torch.randn(4, 3, 8, 8, generator=_gen(1))
    eps = torch.randn(4, 3, 8, 8, generator=_gen(2))
    for i in (0, 5, 19):
        expected = ddpm.step(eps, i, x_t, _gen(3))
        torch.testing.assert_close(ddim.step(eps, i, x_t, _gen(3)), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("name", "sampler_name"), [("ddpm", "ddpm"), ("ddpm", "ddim"), ("flow", "euler")])
def test_clip_x0_bounds_the_sample(name, sampler_name):
    process = make_process(name)
    x0 = torch.full((2, 1, 4, 4), 3.0)  # a point mass outside [-1, 1]
    model = _flow_oracle(x0) if name == "flow" else _ddpm_oracle(process, x0)
    sampler = make_sampler(process, sampler_name, 20, clip_x0=True)
    out = sampler.sample(model, torch.randn(x0.shape, generator=_gen(1)), _gen(2))
    torch.testing.assert_close(out, torch.ones_like(x0), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("name", "sampler_name", "options"),
    [("ddpm", "ddpm", {}), ("ddpm", "ddim", {"eta": 0.5}), ("flow", "euler", {})],
)
def test_same_seed_same_samples(name, sampler_name, options):
    process = make_process(name)
    sampler = make_sampler(process, sampler_name, 10, **options)

    def model(x_t, t):
        return 0.5 * x_t + 0.001 * t.view(-1, 1, 1, 1)

    def run(seed):
        g = _gen(seed)
        return sampler.sample(model, torch.randn(3, 2, 4, 4, generator=g), g)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    assert torch.equal(process.sample_timesteps(64, _gen(7)), process.sample_timesteps(64, _gen(7)))


def test_ddpm_timesteps_are_integers_within_per_sample_caps():
    process = DDPM(T)
    t = process.sample_timesteps(20000, _gen(), "cpu")
    assert t.dtype == torch.float32 and torch.equal(t, t.round())
    assert t.min() == 0 and t.max() == T - 1

    caps = torch.tensor([0.0, 3.0, 500.0, 1000.0]).repeat(5000)  # (20000,) per-sample caps, 1000 = no cap
    t = process.sample_timesteps(caps.numel(), _gen(), "cpu", max_t=caps)
    assert (t <= caps.clamp(max=T - 1)).all() and (t >= 0).all()
    assert set(t[caps == 3.0].tolist()) == {0.0, 1.0, 2.0, 3.0}  # inclusive cap
    assert t[caps == 0.0].eq(0).all()
    assert t[caps == 500.0].max() == 500 and t[caps == 1000.0].max() == T - 1

    capped = process.sample_timesteps(5000, _gen(), max_t=500)
    assert capped.max() == 500


def test_flow_timesteps_are_continuous_within_per_sample_caps():
    flow = RectifiedFlow(T)
    t = flow.sample_timesteps(20000, _gen())
    assert (t >= 0).all() and (t < T).all() and t.max() > 0.99 * T
    assert not torch.equal(t, t.round())

    caps = torch.tensor([10.0, 500.0]).repeat(10000)
    t = flow.sample_timesteps(caps.numel(), _gen(), max_t=caps)
    assert (t <= caps).all() and t[caps == 500.0].max() > 495
    assert t[caps == 500.0].mean().item() == pytest.approx(250, rel=0.02)

    with pytest.raises(ValueError, match="max_t"):
        flow.sample_timesteps(4, _gen(), max_t=-1.0)


def test_logit_normal_flow_timesteps_favour_the_middle_within_caps():
    """s = sigmoid(u), u ~ N(0, 1): P(s in [1/4, 3/4]) = P(|u| < ln 3) = 0.728, against 0.5 uniform."""
    flow = RectifiedFlow(T, timesteps="logit_normal")
    t = flow.sample_timesteps(40000, _gen())
    assert (t >= 0).all() and (t < T).all()
    middle = ((t >= T / 4) & (t <= 3 * T / 4)).double().mean().item()
    assert middle == pytest.approx(0.728, abs=0.01)
    assert t.mean().item() == pytest.approx(T / 2, rel=0.02)
    caps = torch.tensor([10.0, 500.0]).repeat(10000)
    capped = flow.sample_timesteps(caps.numel(), _gen(), max_t=caps)
    assert (capped <= caps).all() and capped[caps == 500.0].mean().item() == pytest.approx(250, rel=0.02)
    with pytest.raises(ValueError, match="logit_normal"):
        RectifiedFlow(T, timesteps="beta")


def test_shifted_flow_timesteps_move_toward_noise_within_caps():
    """shift s / (1 + (shift - 1) s) of uniform s: the median becomes shift / (1 + shift); shift 1 is
    the unshifted draw bit for bit; capped images keep their caps."""
    plain = RectifiedFlow(T).sample_timesteps(40000, _gen())
    assert torch.equal(RectifiedFlow(T, shift=1.0).sample_timesteps(40000, _gen()), plain)
    t = RectifiedFlow(T, shift=3.0).sample_timesteps(40000, _gen())
    assert (t >= 0).all() and (t < T).all()
    assert t.median().item() == pytest.approx(0.75 * T, rel=0.02)
    s = plain.double() / T  # the same uniform draws, shifted by hand
    assert torch.allclose(t.double(), (3 * s / (1 + 2 * s) * T).float().double())
    caps = torch.tensor([10.0, 500.0]).repeat(10000)
    capped = RectifiedFlow(T, shift=3.0).sample_timesteps(caps.numel(), _gen(), max_t=caps)
    assert (capped <= caps).all() and capped[caps == 500.0].median().item() == pytest.approx(375, rel=0.03)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="shift"):
            RectifiedFlow(T, shift=bad)


def test_flow_shift_reaches_the_objective_and_is_checked():
    cfg = get_recipe("debug").override(["objective.diffusion=flow", "objective.flow_shift=3"])
    assert TransfusionObjective(cfg.objective).process.shift == 3.0
    with pytest.raises(ConfigError, match="objective.flow_shift=0.0 must be a positive number"):
        get_recipe("debug").override(["objective.diffusion=flow", "objective.flow_shift=0"])
    with pytest.raises(ConfigError, match="use it with objective.diffusion=flow"):
        get_recipe("debug").override(["objective.diffusion=ddpm", "objective.flow_shift=2"])


def test_unknown_names_list_valid_choices():
    with pytest.raises(ValueError, match=r"'edm'.*\['ddpm', 'flow'\]"):
        make_process("edm")
    with pytest.raises(ValueError, match=r"'ddim'.*\['euler'\]"):
        make_sampler(RectifiedFlow(T), "ddim", 10)
    with pytest.raises(ValueError, match=r"'euler'.*\['ddim', 'ddpm'\]"):
        make_sampler(DDPM(T), "euler", 10)


def test_cfg_interpolates_and_extrapolates():
    cond, uncond = torch.full((2, 3), 2.0), torch.ones(2, 3)
    assert torch.equal(cfg(cond, uncond, 0.0), uncond)
    assert torch.equal(cfg(cond, uncond, 1.0), cond)
    assert torch.equal(cfg(cond, uncond, 3.0), torch.full((2, 3), 4.0))


def test_sampler_timesteps_start_at_pure_noise():
    ddpm = make_sampler(DDPM(T), "ddim", 1)
    assert ddpm.timesteps.tolist() == [T - 1]
    euler = make_sampler(RectifiedFlow(T), "euler", 4)
    assert euler.timesteps.tolist() == [1000.0, 750.0, 500.0, 250.0]
    assert len(euler) == 4
