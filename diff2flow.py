"""
Diff2Flow (Schusterbauer et al., CVPR 2025): use a pretrained diffusion model as a flow-matching model.

Flow matching (FM) here follows the paper: t ∈ [0, 1], t = 0 is noise, t = 1 is data,
    x_t = t·x1 + (1 - t)·x0,  x1 = data, x0 = noise,  target velocity u = x1 - x0.
A diffusion model (DM) instead sees x_τ = α_τ·x1 + σ_τ·x0 (schedule.py). Both are straight mixes of
the same two endpoints, only weighted differently. Dividing the DM state by α + σ makes its weights
sum to one, which is exactly an FM state:

    t = f_t(τ) = α(τ) / (α(τ) + σ(τ))          (Eq. 11)     time:  DM → FM
    x_FM = f_x(x_DM) = x_DM / (α + σ)            (Eq. 13)     state: DM → FM

So to ask the DM for an FM velocity at (x_FM, t): go to τ = f_t⁻¹(t) and x_DM = (α + σ)·x_FM, call
the network there, read its output as (x̂1, x̂0) and return u = x̂1 - x̂0 (Eq. 14). Training then
uses the plain FM loss ‖u_θ - (x1 - x0)‖² (Alg. 1) and sampling is Euler in t (Alg. 2). At step 0
the finetuned model already samples what the prior sampled: Euler on this velocity is exactly DDIM.

Where the paper's printed formulas differ from this file:
- Eq. 12 interpolates τ linearly between node values of f_t; here f_t⁻¹ inverts the polyline schedule
  exactly per segment (Eq. 12 is off by up to 0.016 in τ and breaks the DM/FM alignment between nodes).
- Eq. 15 has the sign of x̂_T wrong and Eq. 16's coefficient on v̂ does not follow; here the velocity is
  x̂1 - x̂0 with the exact inversion of schedule.data_and_noise:
      v-model:   u = ((α - σ)·x_DM - (α + σ)·v̂) / (α² + σ²)
      eps-model: u = (x_DM - (α + σ)·ε̂) / α                  (needs α > 0: t ≥ t_min = f_t(T-1))
      x0-model:  u = ((α + σ)·x̂1 - x_DM) / σ                 (needs σ > 0: t < 1)
"""
import torch

from schedule import T, Schedule, data_and_noise, ddim_sample, expand, prediction_target, time_dtype

OBJECTIVES = ("diffusion", "fm", "diff2flow")
# Diff2Flow differs from the `diffusion` objective in four things: the zero-SNR end of the schedule (a
# constructor switch) and these three, which the `diffusion` loss can take one at a time (an ablation).
DIFFUSION_CHANGES = ("continuous", "density", "weight")


class Diff2Flow:
    """The time/state maps, velocity, losses and samplers for one prior (schedule + prediction type).

    A `model` everywhere below is a callable model(x, timesteps) -> network output, with x (B, C, ...)
    and timesteps a (B,) float tensor (fractional τ, or raw t for the naive `fm` objective). Wrap a
    UNet and its conditioning with `conditioned` below.
    """

    def __init__(self, prediction="v", zero_snr=False):
        if prediction not in ("v", "eps", "x0"):
            raise ValueError(f"unknown prediction type {prediction!r}: use 'v', 'eps' or 'x0'")
        if prediction == "eps" and zero_snr:
            raise ValueError("the zero-SNR rescale makes α = 0 at τ = T-1, where an eps-model cannot tell the "
                             "data (0/0): use zero_snr=False for eps-models (as the official SD1.5 configs do)")
        self.prediction, self.zero_snr = prediction, zero_snr
        self.schedule = Schedule(zero_snr)
        a, s = self.schedule.alpha_nodes, self.schedule.sigma_nodes
        self.t_nodes = a / (a + s)   # f_t at the nodes τ = -1..tau_max: 1 → 0, strictly decreasing
        # An eps-model's FM time axis starts where α > 0 (DESIGN.md): t_min = f_t(T-1) ≈ 0.064.
        self.t_min = self.f_t(torch.tensor(T - 1.0, dtype=torch.float64)).item() if prediction == "eps" else 0.0

    # --- the time and state maps (Eq. 11, 13) --------------------------------------------------------
    def f_t(self, tau):
        """FM time of DM timestep τ: t = α/(α+σ) (Eq. 11). Strictly decreasing; f_t(-1) = 1, f_t(τ_max) = 0."""
        alpha, sigma = self.schedule.alpha_sigma(tau)
        return alpha / (alpha + sigma)

    def f_t_inv(self, t):
        """DM timestep τ of FM time t, the exact inverse of f_t (not the paper's approximate Eq. 12).

        On the segment between nodes k, k+1 α and σ are linear in w = τ - τ_k, so t = α/(α+σ) is a
        Möbius function of w and  w = (α_k - t·(α_k + σ_k)) / (t·Δσ - (1 - t)·Δα)  solves it.
        """
        t = torch.as_tensor(t)
        t64 = t.to(torch.float64)
        if t64.device.type == "cpu" and t64.numel() and (t64.min() < 0 or t64.max() > 1):   # no GPU sync
            raise ValueError(f"FM time t must lie in [0, 1], got [{t64.min().item()}, {t64.max().item()}]")
        a, s = self.schedule.nodes(t64.device)
        nodes = a / (a + s)                               # self.t_nodes, on t's device
        # Node k is the last one with t_nodes[k] ≥ t (searchsorted wants ascending order, so negate).
        k = (torch.searchsorted(-nodes, -t64, right=True) - 1).clamp(0, len(nodes) - 2)
        da, ds = a[k + 1] - a[k], s[k + 1] - s[k]
        w = (a[k] - t64 * (a[k] + s[k])) / (t64 * ds - (1 - t64) * da)
        tau = self.schedule.tau_min + k + w
        return tau.to(t.dtype) if t.is_floating_point() else tau

    def f_x(self, x_dm, tau):
        """FM state of a DM state: x_FM = x_DM / (α + σ) (Eq. 13)."""
        alpha, sigma = self.schedule.alpha_sigma(tau)
        return x_dm / expand(alpha + sigma, x_dm)

    def f_x_inv(self, x_fm, t):
        """DM state and timestep of an FM state: x_DM = (α + σ)·x_FM at τ = f_t⁻¹(t) (Eq. 13).

        Then x_DM = α·x1 + σ·x0 exactly for x_FM = t·x1 + (1-t)·x0: the two trajectories align.
        Returns (x_dm, tau, alpha, sigma) with the coefficients shaped to broadcast against x.
        """
        tau = self.f_t_inv(torch.as_tensor(t, dtype=torch.float64))
        alpha, sigma = self.schedule.alpha_sigma(tau)
        alpha, sigma = expand(alpha, x_fm), expand(sigma, x_fm)
        return (alpha + sigma) * x_fm, tau, alpha, sigma

    # --- the velocity (Eq. 14) ------------------------------------------------------------------------
    def velocity(self, model, x, t):
        """FM velocity u(x_FM, t) derived from the diffusion network's own prediction (Alg. 1, 2)."""
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(x.shape[0])
        # Checked where it costs nothing: the sampler's times are on the CPU side; training times on a GPU
        # come from sample_t (>= t_min by construction), and a check there would stall every step.
        if t.device.type == "cpu" and (t < self.t_min - 1e-9).any():
            raise ValueError(f"t = {t.min().item():.4g} is below t_min = {self.t_min:.4g}: an eps-model has no "
                             f"velocity where α = 0 (start eps-models at t_min)")
        if self.prediction == "x0" and (t >= 1).any():
            raise ValueError("an x0-model has no velocity at t = 1 (σ = 0); Euler never evaluates t = 1")
        x_dm, tau, alpha, sigma = self.f_x_inv(x, t)
        pred = model(x_dm, tau.to(time_dtype(x)))
        x1_hat, x0_hat = data_and_noise(pred, x_dm, alpha, sigma, self.prediction)
        return x1_hat - x0_hat

    # --- training objectives -------------------------------------------------------------------------
    def sample_t(self, n, device=None, logit_normal=None):
        """t ~ U(t_min, 1) in float64 (t_min = 0 for v- and x0-models). logit_normal = (loc, scale) draws
        u = sigmoid(loc + scale * N(0, 1)) instead of u ~ U(0, 1) (SD3's logit-normal density; loc < 0 puts
        more of training near the noise end t = 0, which is all a 1-step sample ever asks of the model)."""
        if logit_normal is None:
            u = torch.rand(n, dtype=torch.float64, device=device)
        else:
            loc, scale = logit_normal
            u = torch.sigmoid(loc + scale * torch.randn(n, dtype=torch.float64, device=device))
        return self.t_min + (1 - self.t_min) * u

    def loss_weight(self, alpha, sigma):
        """Per-sample weight w with ‖u_θ - (x1 - x0)‖² = w·‖pred - target‖² (u from data_and_noise):
        v: ((α+σ)/(α²+σ²))² ∈ [1, 2];  eps: ((α+σ)/α)² = 1/t²;  x0: ((α+σ)/σ)² = 1/(1-t)²."""
        scale = {"v": alpha ** 2 + sigma ** 2, "eps": alpha, "x0": sigma}[self.prediction]
        return ((alpha + sigma) / scale) ** 2

    def loss(self, model, x1, objective="diff2flow", noise=None, mask=None, t=None, changes=()):
        """Per-sample training loss (B,) of one of the three objectives.

        diffusion: the prior's own loss, v (or ε) MSE at τ ~ U{0..T-1} on this schedule.
        fm:        naive FM: the raw network output is the velocity, given the raw t as its timestep.
        diff2flow: FM loss ‖u_θ(x_t, t) - (x1 - x0)‖² with u_θ derived from the prediction (Alg. 1).
        `noise` replaces fresh noise (reflow pairs); `mask` (B, 1, ...) weights pixels (1 = valid);
        `t` (B,) fixes the FM times of fm/diff2flow (drawn when None; for tests and per-t logging).
        `changes` (diffusion only, a subset of DIFFUSION_CHANGES) adds Diff2Flow's differences one by one:
            continuous: τ ~ U(-1, τ_top) real-valued instead of U{0..T-1} (τ_top = f_t⁻¹(t_min))
            density:    τ = f_t⁻¹(t), t ~ U(t_min, 1), Diff2Flow's timestep density (continuous too)
            weight:     × loss_weight(α, σ), Diff2Flow's per-sample weight
        With all three and zero_snr as diff2flow uses it, this IS the diff2flow loss.
        """
        x0 = torch.randn_like(x1) if noise is None else noise
        B = x1.shape[0]
        weight = None
        if objective == "diffusion":
            unknown = set(changes) - set(DIFFUSION_CHANGES)
            if unknown:
                raise ValueError(f"unknown diffusion change(s) {sorted(unknown)}: use any of {DIFFUSION_CHANGES}")
            if "density" in changes:
                tau = self.f_t_inv(self.sample_t(B, x1.device) if t is None else t.to(torch.float64))
            elif "continuous" in changes:
                top = self.f_t_inv(torch.tensor(self.t_min, dtype=torch.float64)).item()
                tau = -1 + (top + 1) * torch.rand(B, dtype=torch.float64, device=x1.device)
            else:
                tau = torch.randint(0, T, (B,), device=x1.device).to(torch.float64)
            alpha, sigma = self.schedule.alpha_sigma(tau)
            if "weight" in changes:
                weight = self.loss_weight(alpha, sigma)
            alpha, sigma = expand(alpha, x1), expand(sigma, x1)
            pred = model(alpha * x1 + sigma * x0, tau.to(time_dtype(x1)))
            target = prediction_target(x1, x0, alpha, sigma, self.prediction)
        elif objective in ("fm", "diff2flow"):
            if t is None:
                t = self.sample_t(B, x1.device) if objective == "diff2flow" else torch.rand(B, dtype=torch.float64, device=x1.device)
            t = t.to(torch.float64)
            tx = expand(t, x1)
            x_t = tx * x1 + (1 - tx) * x0
            pred = self.velocity(model, x_t, t) if objective == "diff2flow" else model(x_t, t.to(time_dtype(x1)))
            target = x1 - x0
        else:
            raise ValueError(f"unknown objective {objective!r}: use one of {OBJECTIVES}")
        dtype = torch.promote_types(pred.dtype, torch.float32)   # bf16 outputs: the loss in fp32
        err = (pred.to(dtype) - target.to(dtype)) ** 2
        dims = tuple(range(1, err.dim()))
        if mask is None:
            per_sample = err.mean(dims)
        else:
            mask = mask.to(err.dtype).expand_as(err)
            per_sample = (err * mask).sum(dims) / mask.sum(dims).clamp_min(1)
        return per_sample if weight is None else per_sample * weight.to(per_sample.dtype)

    # --- sampling --------------------------------------------------------------------------------------
    def start_state(self, noise):
        """The FM state at t_min holding pure noise in DM terms: x_FM = noise/(α+σ) at τ = f_t⁻¹(t_min).

        For v-models t_min = 0 and this is the noise itself; for eps-models it is SD's own start
        (x_DM = noise at τ = T-1).
        """
        return self.f_x(noise, self.f_t_inv(torch.tensor(self.t_min, dtype=torch.float64)))

    def flow_noise(self, noise, x1):
        """The x0 with t·x1 + (1-t)·x0 passing through start_state(noise) at t_min (reflow pairs).

        Storing the raw noise of an eps-model would leave a 0.046 RMS floor (on Gaussian data) that any
        straightness measure reads as curvature.
        """
        return (self.start_state(noise) - self.t_min * x1) / (1 - self.t_min)

    @torch.no_grad()
    def sample(self, model, noise, steps=4, objective="diff2flow", progress=False):
        """Data from noise: Euler in FM time for `diff2flow`/`fm` (Alg. 2), trailing DDIM for `diffusion`."""
        if objective == "diffusion":
            return ddim_sample(model, noise, self.schedule, self.prediction, steps=steps, progress=progress)
        if objective == "fm":
            velocity = lambda x, t: model(x, t.to(time_dtype(x)).expand(x.shape[0]))
            return euler(velocity, noise, 0.0, steps, progress)
        if objective == "diff2flow":
            velocity = lambda x, t: self.velocity(model, x, t)
            return euler(velocity, self.start_state(noise), self.t_min, steps, progress)
        raise ValueError(f"unknown objective {objective!r}: use one of {OBJECTIVES}")


def euler(velocity, x, t_start, steps, progress=False):
    """Integrate dx/dt = velocity(x, t) from t_start to 1 in `steps` equal Euler steps (Alg. 2)."""
    from tqdm.auto import tqdm
    ts = torch.linspace(t_start, 1.0, steps + 1, dtype=torch.float64, device=x.device)
    for i in tqdm(range(steps), disable=not progress, desc="euler"):
        x = x + (ts[i + 1] - ts[i]).item() * velocity(x, ts[i])
    return x


def multires_noise(shape, strength, generator=None):
    """Multi-resolution ("pyramid") Gaussian noise, the source Marigold trains its depth model from:
    white noise plus bilinearly upsampled white noise at 1/2, 1/4, ... of the size, level i weighted
    strength**i, each sample scaled to unit variance. strength = 0 is plain white noise.

    Why: with white noise the coarse layout of x1 shows through x_t = t·x1 + (1 - t)·x0 already at small
    t (averaging a k×k block shrinks white noise k-fold, not the layout), so the network can read the
    layout from x_t instead of learning to read it from the image; only t near 0 teaches that.
    Low-frequency noise hides the layout longer. Marigold draws the factor per level from [2, 4] and
    anneals the strength with τ; here the factor is 2 and the strength fixed, so the source is one
    fixed Gaussian and training and Euler sampling start from the same distribution.
    """
    b, c, h, w = shape
    noise = torch.randn(shape, generator=generator)
    if strength <= 0:
        return noise
    level = 1
    while h >> level >= 1 and w >> level >= 1:
        coarse = torch.randn((b, c, h >> level, w >> level), generator=generator)
        noise = noise + strength ** level * torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        level += 1
    return noise / noise.flatten(1).std(1).view(b, 1, 1, 1)


def conditioned(net, context, concat=None, uncond_context=None, cfg_scale=1.0):
    """Bind a UNet net(x, timesteps, context) to its conditioning, giving model(x, timesteps).

    concat: an image latent appended to the noisy input along channels (image-to-X tasks such as depth;
    order [x_noisy, image_latent] as DepthFM and the official code). With cfg_scale != 1, classifier-free
    guidance on the raw network output: out = uncond + s·(cond - uncond). All three readings of the output
    (v, ε, velocity) are affine in it, so guiding the output and guiding u are the same thing.
    """
    def model(x, timesteps):
        x_in = x if concat is None else torch.cat([x, concat.to(x.dtype)], dim=1)
        if uncond_context is None or cfg_scale == 1.0:
            return net(x_in, timesteps, context)
        out = net(torch.cat([x_in, x_in]), torch.cat([timesteps, timesteps]), torch.cat([uncond_context, context]))
        uncond, cond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)
    return model
