"""Tests of the method: schedule.py and diff2flow.py against closed-form math and diffusers' schedulers."""
import pytest
import torch

from diff2flow import Diff2Flow, conditioned, euler, multires_noise
from schedule import T, Schedule, ddim_sample, prediction_target, sd_alphas_cumprod, trailing_taus

torch.set_default_dtype(torch.float32)
SETTINGS = [("v", False), ("v", True), ("eps", False), ("x0", False), ("x0", True)]


def oracle(d2f, x1, x0):
    """A 'network' that knows both endpoints and returns the exact target for the continuous τ it is given."""
    def model(x, tau):
        alpha, sigma = d2f.schedule.alpha_sigma(tau.to(torch.float64))
        shape = (-1,) + (1,) * (x1.dim() - 1)
        alpha, sigma = alpha.reshape(shape).to(x1.dtype), sigma.reshape(shape).to(x1.dtype)
        return prediction_target(x1, x0, alpha, sigma, d2f.prediction)
    return model


class RandomNet(torch.nn.Module):
    """An arbitrary smooth network of (x, τ): no structure that could make an identity hold by accident."""

    def __init__(self, dim=16, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(dim, 64, generator=g, dtype=dtype) / dim ** 0.5)
        self.wt = torch.nn.Parameter(torch.randn(64, generator=g, dtype=dtype))
        self.w2 = torch.nn.Parameter(torch.randn(64, dim, generator=g, dtype=dtype) / 8)

    def forward(self, x, tau):
        h = torch.tanh(x @ self.w1 + torch.sin(tau.to(x.dtype)[:, None] / 150.0) * self.wt)
        return x * 0.3 + h @ self.w2


# --- schedule ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("zero_snr", [False, True])
def test_schedule_nodes_match_discrete_and_diffusers(zero_snr):
    from diffusers import DDPMScheduler
    sched = Schedule(zero_snr)
    ac = sd_alphas_cumprod(zero_snr)
    tau = torch.arange(T, dtype=torch.float64)
    alpha, sigma = sched.alpha_sigma(tau)
    assert torch.equal(alpha, ac.sqrt()) and torch.equal(sigma, (1 - ac).sqrt())
    theirs = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           rescale_betas_zero_snr=zero_snr).alphas_cumprod.double()
    assert (alpha ** 2 - theirs).abs().max() < 1e-6
    # The end nodes: clean at τ = -1 and, without the rescale, pure noise at τ = T.
    assert sched.alpha_sigma(torch.tensor(-1.0, dtype=torch.float64)) == (1.0, 0.0)
    assert sched.tau_max == (T - 1 if zero_snr else T)
    assert tuple(sched.alpha_sigma(torch.tensor(sched.tau_max, dtype=torch.float64))) == (0.0, 1.0)
    with pytest.raises(ValueError, match="τ must lie in"):
        sched.alpha_sigma(torch.tensor([sched.tau_max + 0.5]))


@pytest.mark.parametrize("zero_snr", [False, True])
def test_f_t_monotone_and_exactly_inverted(zero_snr):
    d2f = Diff2Flow("v", zero_snr)
    tau = torch.linspace(-1, d2f.schedule.tau_max, 200_001, dtype=torch.float64)
    t = d2f.f_t(tau)
    assert (t[1:] < t[:-1]).all() and t[0] == 1 and t[-1] == 0
    t = torch.cat([torch.rand(10_000, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)])
    tau = d2f.f_t_inv(t)
    assert (d2f.f_t(tau) - t).abs().max() < 1e-6
    assert tau[-2] == d2f.schedule.tau_max and tau[-1] == -1
    # float32 in, float32 out: τ ≈ 500 holds only ~3e-5 in float32, |dt/dτ| ≤ 0.06 turns that into ~2e-6
    t32 = t.float()
    assert d2f.f_t_inv(t32).dtype == torch.float32
    assert (d2f.f_t(d2f.f_t_inv(t32).double()) - t32.double()).abs().max() < 1e-5
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        d2f.f_t_inv(torch.tensor([1.5]))


@pytest.mark.parametrize("zero_snr", [False, True])
def test_trajectories_align_between_nodes(zero_snr):
    """(α + σ)·x_t^FM = α·x1 + σ·x0 at τ = f_t⁻¹(t) for random t (Eq. 7-13), not only at the nodes."""
    d2f = Diff2Flow("v", zero_snr)
    x1, x0 = torch.randn(512, 8, dtype=torch.float64), torch.randn(512, 8, dtype=torch.float64)
    t = torch.rand(512, dtype=torch.float64)
    x_fm = t[:, None] * x1 + (1 - t[:, None]) * x0
    x_dm, tau, alpha, sigma = d2f.f_x_inv(x_fm, t)
    assert (tau != tau.round()).all()   # really between nodes
    assert (x_dm - (alpha * x1 + sigma * x0)).abs().max() < 1e-12
    assert (d2f.f_x(x_dm, tau) - x_fm).abs().max() < 1e-12


# --- the velocity --------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction,zero_snr", SETTINGS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_oracle_velocity_is_exact_on_the_whole_axis(prediction, zero_snr, dtype, tol):
    d2f = Diff2Flow(prediction, zero_snr)
    n = 2001
    t = torch.linspace(d2f.t_min, 1, n, dtype=torch.float64)
    if prediction == "x0":
        t = t[:-1]                                  # σ = 0 at t = 1: no x0-velocity there
        if dtype == torch.float32:
            tol = 5e-4   # u = ((α+σ)·x̂ - x)/σ cancels as σ → 0: measured 2.1e-4 at t = 0.9995 in float32
    x1, x0 = torch.randn(len(t), 4, dtype=dtype), torch.randn(len(t), 4, dtype=dtype)
    x_t = (t[:, None] * x1 + (1 - t[:, None]) * x0).to(dtype)
    u = d2f.velocity(oracle(d2f, x1, x0), x_t, t)
    assert torch.isfinite(u).all()
    rel = ((u - (x1 - x0)).norm(dim=1) / (x1 - x0).norm(dim=1)).max().item()
    assert rel < tol, rel


def test_eps_below_t_min_and_eps_zero_snr_are_refused():
    d2f = Diff2Flow("eps")
    assert 0.06 < d2f.t_min < 0.07
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="below t_min"):
        d2f.velocity(lambda x, tau: x, x, torch.tensor([0.5, d2f.t_min / 2]))
    with pytest.raises(ValueError, match="zero-SNR"):
        Diff2Flow("eps", zero_snr=True)
    with pytest.raises(ValueError, match="x0-model has no velocity at t = 1"):
        Diff2Flow("x0").velocity(lambda x, tau: x, x, torch.tensor(1.0))


@pytest.mark.parametrize("prediction,zero_snr", [("v", True), ("v", False), ("eps", False)])
def test_objectives_on_the_oracle(prediction, zero_snr):
    """The oracle's diff2flow and diffusion losses vanish; read as a naive-FM velocity it is far off."""
    d2f = Diff2Flow(prediction, zero_snr)
    x1, x0 = torch.randn(256, 16, dtype=torch.float64), torch.randn(256, 16, dtype=torch.float64)
    model = oracle(d2f, x1, x0)
    assert d2f.loss(model, x1, "diff2flow", noise=x0).max() < 1e-20
    assert d2f.loss(model, x1, "diffusion", noise=x0).max() < 1e-20
    fm = d2f.loss(model, x1, "fm", noise=x0).mean().item()
    # At raw timesteps τ = t ∈ [0, 1] the oracle returns ≈ ε (v) or exactly ε (eps), against x1 - x0:
    # an expected loss of E‖x1 - 2·x0‖² / d = 5 per element.
    assert 4 < fm < 6, fm
    with pytest.raises(ValueError, match="unknown objective"):
        d2f.loss(model, x1, "flow")


@pytest.mark.parametrize("prediction,zero_snr", [("v", True), ("v", False), ("eps", False)])
def test_diff2flow_loss_is_a_weighted_diffusion_loss(prediction, zero_snr):
    """Per sample: v-models (α+σ)²/(α²+σ²)²·‖v̂ - v‖², eps-models ‖ε̂ - ε‖²/t² (DESIGN.md)."""
    d2f = Diff2Flow(prediction, zero_snr)
    net = RandomNet(16)
    x1, x0 = torch.randn(512, 16, dtype=torch.float64), torch.randn(512, 16, dtype=torch.float64)
    t = d2f.sample_t(512)
    loss = d2f.loss(net, x1, "diff2flow", noise=x0, t=t)
    tau = d2f.f_t_inv(t)
    alpha, sigma = (c[:, None] for c in d2f.schedule.alpha_sigma(tau))
    pred = net(alpha * x1 + sigma * x0, tau)
    mse = ((pred - prediction_target(x1, x0, alpha, sigma, prediction)) ** 2).mean(1)
    if prediction == "v":
        weight = ((alpha + sigma) ** 2 / (alpha ** 2 + sigma ** 2) ** 2)[:, 0]
        # (α+σ)² ∈ [1, 2] on the unit circle; between nodes α²+σ² < 1 lifts the top a little
        assert 1 - 1e-9 < weight.min() and weight.max() < 2.01
    else:
        weight = 1 / t ** 2
    assert ((loss - weight * mse).abs() / loss).max() < 1e-12
    # ... so the diffusion loss with Diff2Flow's three changes (density, continuous τ, weight) is the same loss
    ablated = d2f.loss(net, x1, "diffusion", noise=x0, t=t, changes=("continuous", "density", "weight"))
    assert ((loss - ablated).abs() / loss).max() < 1e-12
    assert torch.allclose(d2f.loss_weight(alpha, sigma)[:, 0], weight)


def test_diffusion_changes_one_at_a_time():
    d2f = Diff2Flow("v", zero_snr=True)
    seen = []
    net = lambda x, tau: seen.append(tau) or torch.zeros_like(x)
    x1 = torch.randn(4096, 2, dtype=torch.float64)
    d2f.loss(net, x1, "diffusion")
    d2f.loss(net, x1, "diffusion", changes=("continuous",))
    d2f.loss(net, x1, "diffusion", changes=("density",))
    integer, continuous, density = seen
    assert torch.equal(integer, integer.round()) and integer.min() >= 0 and integer.max() <= T - 1
    assert (continuous != continuous.round()).all() and -1 <= continuous.min() and continuous.max() <= T - 1
    # uniform t puts more weight on the clean end: 37% of τ below 200 (20% for uniform τ), median τ ≈ 340
    assert (density < 200).double().mean() > 0.3 > (continuous < 200).double().mean()
    weighted = d2f.loss(net, x1, "diffusion", changes=("weight",))
    plain = d2f.loss(net, x1, "diffusion")
    assert not torch.allclose(weighted, plain)
    with pytest.raises(ValueError, match="unknown diffusion change"):
        d2f.loss(net, x1, "diffusion", changes=("schedule",))


@pytest.mark.parametrize("objective", ["diffusion", "fm", "diff2flow"])
@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_gradients_reach_the_network(objective, prediction):
    d2f = Diff2Flow(prediction, zero_snr=(prediction == "v"))
    net = RandomNet(16, torch.float32)
    x1 = torch.randn(8, 16)
    mask = (torch.rand(8, 16) > 0.3).float()
    d2f.loss(net, x1, objective, mask=mask).mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mask_ignores_invalid_elements():
    """A masked loss is the loss over the valid elements alone (per-element network)."""
    d2f = Diff2Flow("v", True)
    net = lambda x, tau: 0.5 * x + torch.cos(tau[:, None].to(x.dtype) / 300)
    x1, x0 = torch.randn(4, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
    t = d2f.sample_t(4)
    mask = torch.zeros(4, 16, dtype=torch.float64)
    mask[:, :8] = 1
    masked = d2f.loss(net, x1, "diff2flow", noise=x0, t=t, mask=mask)
    valid_only = d2f.loss(net, x1[:, :8], "diff2flow", noise=x0[:, :8], t=t)
    assert torch.allclose(masked, valid_only)
    assert not torch.allclose(masked, d2f.loss(net, x1, "diff2flow", noise=x0, t=t))


# --- sampling ------------------------------------------------------------------------------------------

def gaussian_v_predictor(d2f, mu, s):
    """The exact (posterior-mean) v-predictor for data x1 ~ N(μ, diag s²) at any continuous τ."""
    def model(x, tau):
        alpha, sigma = (c[:, None].to(x.dtype) for c in d2f.schedule.alpha_sigma(tau.to(torch.float64)))
        denom = alpha ** 2 * s ** 2 + sigma ** 2
        x1_hat = mu + alpha * s ** 2 * (x - alpha * mu) / denom
        eps_hat = sigma * (x - alpha * mu) / denom
        return alpha * eps_hat - sigma * x1_hat
    return model


def standard_noise(n, dim):
    """Gaussian noise whitened to exactly zero mean and unit std per dimension. The ODE of Gaussian data
    is affine per dimension and so are Euler and DDIM steps, so the samples' mean and std are then those
    of the sampler's map alone: the test measures discretisation error, not Monte-Carlo error."""
    z = torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return (z - z.mean(0)) / z.std(0)


@pytest.mark.parametrize("zero_snr", [True, False])
def test_sampling_recovers_a_gaussian_and_two_steps_do_not(zero_snr):
    g = torch.Generator().manual_seed(0)
    mu = torch.rand(16, dtype=torch.float64, generator=g) * 4 - 2
    s = torch.rand(16, dtype=torch.float64, generator=g) * 1.7 + 0.3
    d2f = Diff2Flow("v", zero_snr)
    model = gaussian_v_predictor(d2f, mu, s)
    noise = standard_noise(4000, 16)

    def errors(x):   # worst error of the mean (in units of s) and worst relative error of the std
        return ((x.mean(0) - mu) / s).abs().max().item(), (x.std(0) / s - 1).abs().max().item()

    euler100, euler2 = errors(d2f.sample(model, noise, steps=100)), errors(d2f.sample(model, noise, steps=2))
    ddim100 = errors(ddim_sample(model, noise, d2f.schedule, "v", steps=100))
    print(f"zero_snr={zero_snr}: (mean, std) errors Euler-100 {euler100}, DDIM-100 {ddim100}, Euler-2 {euler2}")
    assert max(euler100) < 0.02            # measured 0.0149 (std), first order: 0.0075 at 200 steps
    assert euler2[1] > 0.5                 # measured 0.61: 2 steps shrink the spread, the curvature reflow removes
    if zero_snr:
        assert max(ddim100) < 0.05         # measured 0.037
    else:
        # Without the rescale DDIM starts at τ = T-1 where α = 0.068 but is handed pure noise: a mean
        # bias that more steps do not remove (0.126 at 100 steps, 0.127 at 200). Euler starts at the
        # τ = T node (α = 0) and has none.
        ddim200 = errors(ddim_sample(model, noise, d2f.schedule, "v", steps=200))
        assert ddim100[0] > 0.1 and ddim200[0] > 0.1


@pytest.mark.parametrize("prediction,zero_snr,steps", [("v", True, 7), ("v", False, 5), ("eps", False, 6), ("x0", True, 4)])
def test_euler_is_ddim_on_the_mapped_grid(prediction, zero_snr, steps):
    """For ANY network, N Euler steps through Diff2Flow = DDIM on τ_i = f_t⁻¹(t_i) (DESIGN.md)."""
    d2f = Diff2Flow(prediction, zero_snr)
    net = RandomNet(16)
    noise = torch.randn(64, 16, dtype=torch.float64)
    t_grid = d2f.t_min + (1 - d2f.t_min) * torch.arange(steps, dtype=torch.float64) / steps
    ours = d2f.sample(net, noise, steps=steps)
    ddim = ddim_sample(net, noise, d2f.schedule, prediction, taus=d2f.f_t_inv(t_grid).tolist())
    assert (ours - ddim).abs().max() < 1e-12 * ddim.abs().max()


@pytest.mark.parametrize("zero_snr", [True, False])
def test_ddim_matches_diffusers_on_its_trailing_grid(zero_snr):
    from diffusers import DDIMScheduler
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=True, timestep_spacing="trailing", prediction_type="v_prediction",
                          rescale_betas_zero_snr=zero_snr)
    sched.set_timesteps(5)
    assert sched.timesteps.tolist() == trailing_taus(5)
    net = RandomNet(16, torch.float32)
    noise = torch.randn(8, 16)
    x = noise.clone()
    with torch.no_grad():
        for tau in sched.timesteps:
            x = sched.step(net(x, tau.float().expand(8)), tau, x).prev_sample
        ours = ddim_sample(net, noise, Schedule(zero_snr), "v", steps=5)
    assert (ours - x).abs().max() < 1e-4 * x.abs().max()


def test_fm_and_diffusion_samplers_and_flow_noise():
    # Naive FM integrates the raw output at raw t: a constant velocity c moves noise by exactly c.
    d2f = Diff2Flow("eps")
    noise = torch.randn(8, 4, dtype=torch.float64)
    c = torch.randn(4, dtype=torch.float64)
    assert torch.allclose(d2f.sample(lambda x, t: c.expand_as(x), noise, steps=3, objective="fm"), noise + c)
    # eps-models start at SD's own start: x_DM = noise at τ = T-1.
    x_dm, tau, _, _ = d2f.f_x_inv(d2f.start_state(noise), torch.tensor(d2f.t_min, dtype=torch.float64))
    assert abs(tau.item() - (T - 1)) < 1e-9 and torch.allclose(x_dm, noise)
    # Reflow's effective noise puts the straight line through that start.
    x1 = torch.randn(8, 4, dtype=torch.float64)
    x0 = d2f.flow_noise(noise, x1)
    assert torch.allclose(d2f.t_min * x1 + (1 - d2f.t_min) * x0, d2f.start_state(noise))
    with pytest.raises(ValueError, match="unknown objective"):
        d2f.sample(lambda x, t: x, noise, objective="ddpm")


def test_conditioned_concat_and_cfg():
    seen = {}

    def net(x, tau, context):
        seen["x"], seen["context"] = x, context
        return x[:, :2] * context[:, :1]

    x, img = torch.randn(3, 2), torch.randn(3, 2)
    cond, uncond = torch.full((3, 1), 2.0), torch.full((3, 1), 0.5)
    out = conditioned(net, cond, concat=img)(x, torch.zeros(3))
    assert torch.equal(seen["x"], torch.cat([x, img], 1)) and torch.equal(out, 2 * x)
    out = conditioned(net, cond, uncond_context=uncond, cfg_scale=3.0)(x, torch.zeros(3))
    assert torch.allclose(out, 0.5 * x + 3.0 * (2 * x - 0.5 * x))
    assert seen["x"].shape[0] == 6   # one batched call for both branches


def test_euler_integrates_linear_ode_to_first_order():
    # dx/dt = x from t = 0 ends at e; Euler gives (1 + 1/N)^N, an error that falls as 1/N.
    x = torch.ones(1, dtype=torch.float64)
    err = [abs(euler(lambda x, t: x, x, 0.0, n).item() - torch.e) for n in (10, 100)]
    assert 8 < err[0] / err[1] < 11


def test_multires_noise_is_unit_variance_with_more_coarse_energy():
    shape = (64, 4, 24, 32)
    white = multires_noise(shape, 0.0, torch.Generator().manual_seed(3))
    assert torch.equal(white, torch.randn(shape, generator=torch.Generator().manual_seed(3)))   # 0 = the plain draw
    pyr = multires_noise(shape, 0.9, torch.Generator().manual_seed(3))
    assert torch.equal(pyr, multires_noise(shape, 0.9, torch.Generator().manual_seed(3)))     # deterministic
    assert torch.allclose(pyr.flatten(1).std(1), torch.ones(64), atol=1e-5)
    # 8x8 block means: white noise keeps 1/64 of its variance there; the pyramid keeps several times more
    coarse = lambda x: torch.nn.functional.avg_pool2d(x, 8).var().item()
    assert abs(coarse(white) - 1 / 64) < 0.004
    assert coarse(pyr) > 5 * coarse(white)
    assert abs(pyr.mean().item()) < 0.05


def test_logit_normal_times_have_the_asked_location_and_scale():
    """sample_t(logit_normal=(loc, scale)): logit of the FM time is N(loc, scale²) for a v-model (t_min = 0);
    an ε-model's times stay in [t_min, 1]; the uniform default has mean 1/2."""
    torch.manual_seed(0)
    t = Diff2Flow("v").sample_t(200_000, logit_normal=(-2.0, 0.5))
    z = torch.logit(t)
    assert abs(z.mean().item() + 2.0) < 0.01 and abs(z.std().item() - 0.5) < 0.01
    assert abs(t.median().item() - torch.sigmoid(torch.tensor(-2.0)).item()) < 0.005
    eps = Diff2Flow("eps")
    assert eps.t_min > 0 and eps.sample_t(10_000, logit_normal=(-4.0, 1.0)).min() >= eps.t_min
    assert abs(Diff2Flow("v").sample_t(200_000).mean().item() - 0.5) < 0.005
