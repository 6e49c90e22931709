"""
Stable Diffusion's noise schedule, made continuous in time, and DDIM on it.

A diffusion model (DM) sees  x_τ = α_τ·x_data + σ_τ·ε  at discrete τ ∈ {0..T-1} (τ = 0 nearly clean).
Diff2Flow needs α, σ at *real* τ, so the schedule here is a polyline through these nodes:

    τ = -1          α = 1, σ = 0   the clean end, so that t_FM = 1 is reachable
    τ = 0 .. T-1    SD's own  α_τ = √ᾱ_τ, σ_τ = √(1 - ᾱ_τ)
    τ = T           α = 0, σ = 1   pure noise; only without the zero-SNR rescale (with it α_{T-1} = 0)

α(τ), σ(τ) are linear between neighbouring nodes (paper §3.2.1, Fig. 2). This one function is the only
place α and σ come from: DDIM below, the time/state maps and the velocity in diff2flow.py all use it,
so every identity between them holds to float precision (no table indexed two ways).
"""
import torch

T = 1000                      # SD's number of training timesteps
BETA_START, BETA_END = 0.00085, 0.012   # SD's "scaled linear" betas


def sd_alphas_cumprod(zero_snr=False):
    """ᾱ_k for k = 0..T-1 in float64, as the LDM code computes it: β = linspace(√β0, √β1, T)²."""
    betas = torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, T, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if zero_snr:
        # Lin et al. (WACV 2024): shift and scale √ᾱ so that √ᾱ_{T-1} = 0 and √ᾱ_0 is unchanged.
        a = alphas_cumprod.sqrt()
        a = (a - a[-1]) * a[0] / (a[0] - a[-1])
        alphas_cumprod = a ** 2
    return alphas_cumprod


class Schedule:
    """The continuous schedule α(τ), σ(τ) on τ ∈ [tau_min, tau_max] = [-1, T] (or [-1, T-1] with zero-SNR)."""

    def __init__(self, zero_snr=False):
        self.zero_snr = zero_snr
        ac = sd_alphas_cumprod(zero_snr)
        one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        alpha, sigma = ac.sqrt(), (1.0 - ac).sqrt()
        alpha, sigma = torch.cat([one, alpha]), torch.cat([zero, sigma])   # node τ = -1
        if not zero_snr:
            alpha, sigma = torch.cat([alpha, zero]), torch.cat([sigma, one])   # node τ = T
        self.alpha_nodes, self.sigma_nodes = alpha, sigma   # index i holds node τ = i - 1
        self.tau_min, self.tau_max = -1.0, float(len(alpha) - 2)
        self._on = {}                                        # device -> the node tables there

    def nodes(self, device):
        """(α nodes, σ nodes) on `device`, copied there once: no host-to-device copy on every call."""
        device = torch.device(device)
        if device not in self._on:
            self._on[device] = (self.alpha_nodes.to(device), self.sigma_nodes.to(device))
        return self._on[device]

    def alpha_sigma(self, tau):
        """α(τ), σ(τ) by linear interpolation between the nodes; τ may be fractional. Same dtype as τ."""
        tau = torch.as_tensor(tau)
        dtype = tau.dtype if tau.is_floating_point() else torch.float64
        s = tau.to(torch.float64) - self.tau_min                       # position along the node list
        if s.device.type == "cpu" and s.numel() and (s.min() < 0 or s.max() > self.tau_max - self.tau_min):
            raise ValueError(f"τ must lie in [{self.tau_min}, {self.tau_max}], got [{s.min().item() - 1}, "
                             f"{s.max().item() - 1}] (zero_snr={self.zero_snr})")
        a_nodes, s_nodes = self.nodes(s.device)   # (range checked on the CPU only: a GPU check stalls each step)
        i = s.floor().long().clamp(max=len(a_nodes) - 2)               # segment [i, i+1]; τ_max ends the last
        w = s - i
        alpha = a_nodes[i] + w * (a_nodes[i + 1] - a_nodes[i])
        sigma = s_nodes[i] + w * (s_nodes[i + 1] - s_nodes[i])
        return alpha.to(dtype), sigma.to(dtype)


# ---------------------------------------------------------------------------------------------------
# Reading a network's prediction. Between nodes the polyline leaves the unit circle (α² + σ² < 1, by
# up to 2.1e-4 on [-1, 0] and 1.2e-3 on [T-1, T]), so the v-inversion divides by α² + σ² instead of
# assuming it is 1; at the nodes this is the textbook formula.

PREDICTIONS = ("v", "eps", "x0")


def data_and_noise(pred, x, alpha, sigma, prediction):
    """(x̂_data, ε̂) from a network output `pred` at x = α·x_data + σ·ε. alpha/sigma broadcast against x.

    v:   v = α·ε - σ·x_data   →  x̂ = (α·x - σ·v̂)/(α²+σ²),  ε̂ = (σ·x + α·v̂)/(α²+σ²)
    eps:                          x̂ = (x - σ·ε̂)/α           (needs α > 0)
    x0:                           ε̂ = (x - α·x̂)/σ           (needs σ > 0)
    """
    if prediction == "v":
        norm = alpha ** 2 + sigma ** 2
        return (alpha * x - sigma * pred) / norm, (sigma * x + alpha * pred) / norm
    if prediction == "eps":
        return (x - sigma * pred) / alpha, pred
    if prediction == "x0":
        return pred, (x - alpha * pred) / sigma
    raise ValueError(f"unknown prediction type {prediction!r}: use one of {PREDICTIONS}")


def prediction_target(x_data, noise, alpha, sigma, prediction):
    """What a network of this prediction type should output at x = α·x_data + σ·noise."""
    if prediction == "v":
        return alpha * noise - sigma * x_data
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x_data
    raise ValueError(f"unknown prediction type {prediction!r}: use one of {PREDICTIONS}")


def time_dtype(x):
    """Timesteps go to the network in fp32 (fp64 for fp64 tests): bf16 would round τ = 999 to 1000."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def expand(c, x):
    """A per-sample coefficient of shape (B,) (or scalar) reshaped to broadcast against x (B, ...)."""
    c = torch.as_tensor(c, device=x.device)
    return c.reshape(c.shape + (1,) * (x.dim() - c.dim())).to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# DDIM (η = 0): the diffusion baseline's sampler, and the oracle that Diff2Flow's Euler must match.

def trailing_taus(steps):
    """DDIM's "trailing" spacing (Lin et al.): the first step is at τ = T-1, e.g. 4 steps → 999, 749, 499, 249."""
    return [int(round(T - i * T / steps)) - 1 for i in range(steps)]


@torch.no_grad()
def ddim_sample(model, noise, schedule, prediction, taus=None, steps=50, progress=False):
    """Deterministic DDIM from x = noise at taus[0] down to τ = -1 (α = 1, σ = 0), where x = x̂_data.

    model(x, tau) -> prediction; tau is a (B,) float tensor and may be fractional. `taus` is any
    decreasing grid (default: trailing integer spacing with `steps` steps). Each step re-noises the
    current estimate:  x_s = α_s·x̂_data + σ_s·ε̂.
    """
    from tqdm.auto import tqdm
    taus = list(taus) if taus is not None else trailing_taus(steps)
    if prediction == "eps" and schedule.alpha_sigma(float(taus[0]))[0] == 0:
        raise ValueError("an eps-model cannot start at α = 0 (zero-SNR end): use zero_snr=False or a v-model")
    x = noise
    grid = taus + [schedule.tau_min]
    for tau, tau_next in tqdm(list(zip(grid[:-1], grid[1:])), disable=not progress, desc="ddim"):
        tau_b = torch.full((x.shape[0],), float(tau), dtype=torch.float64, device=x.device)
        alpha, sigma = schedule.alpha_sigma(tau_b)
        x_data, eps = data_and_noise(model(x, tau_b.to(time_dtype(x))), x, expand(alpha, x), expand(sigma, x), prediction)
        alpha_next, sigma_next = schedule.alpha_sigma(torch.tensor(float(tau_next), dtype=torch.float64))
        x = alpha_next.item() * x_data + sigma_next.item() * eps
    return x

