"""Whether a sampler reuses earlier predictions, read from its own steps (no sampler names needed).

A quality target's estimate drifts further from the measured quality, at a lower guidance scale,
with samplers whose update combines the current prediction with earlier ones (dpmpp_2m, deis,
ipndm, ...): see :data:`fbcache.holder.ESTIMATE_CFG_LIMITS`. ComfyUI's own samplers are known by
name, but a sampler from another pack (or a custom sampler node) is not. Every deterministic
sampler of either kind is a linear update, though, and the calibration run sees each step's latent
``x[k]`` and prediction ``D[k]`` through the sampler callback:

- single-step (euler, DDIM-like): ``x[k+1] = a x[k] + b D[k]``;
- linear multistep: ``x[k+1] = sum_j a_j x[k-j] + b_j D[k-j]`` over the last few steps.

:class:`UpdateProbe` keeps a fixed subsample of both per step (on the device, no sync) and, after
the run, fits both forms by least squares on each step. A step whose single-step fit misses but
whose multistep fit is exact marks a multistep sampler; an exact single-step fit marks a
single-step one; samplers that add fresh noise or call the model more than once per step fit
neither exactly, and so do samplers whose callback does not report the step's latent (ComfyUI's
ipndm and deis pass the starting latent): there the answer stays unknown and the caller falls
back to the sampler's name. Checked against ComfyUI v0.19.3's samplers (8, 12 and 30 steps):
euler and ddim read as single-step; dpmpp_2m, lms, res_multistep and gradient_estimation as
multistep (sa_solver too from 12 steps); heun, uni_pc, the ancestral and SDE samplers, ipndm and
deis stay undecided.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

SAMPLES = 256
"""Latent values kept per step (evenly spaced over the flattened latent): far more equations than
the fits' unknowns (2 and 8), a few KiB per run."""
HISTORY = 4
"""Steps of the multistep form (the current and three before: ComfyUI's ipndm uses four)."""
EXACT = 1e-4
"""A fit counts as exact when it leaves less than this share of what the step added to its scaled
latent (float32 latents: 2e-6 to 2e-5 when the form is the sampler's; heun and uni_pc, whose
updates use a model call the callback does not show, leave 5e-4 to 1.5e-3)."""
HELPED = 2.0
"""The single-step form is the sampler's when its fit leaves at most this many times what the
multistep fit leaves (the same float32 rounding both ways)."""
MISSED = 20.0
"""The sampler is multistep when the single-step fit leaves at least this many times more (a
dpmpp_2m-shaped update on a test model: 200-600 times)."""
MIN_STEPS = 3
"""Conclusive steps needed for an answer."""


class UpdateProbe:
    """Records a subsample of each step's latent and prediction during one sampling run."""

    def __init__(self) -> None:
        self._index: torch.Tensor | None = None
        self._index_for: tuple[int, torch.device] | None = None  # (latent size, device) of _index
        self._rows: list[torch.Tensor] = []
        self._steps: list[int] = []
        self._failed = False

    def record(self, step: int, denoised: torch.Tensor, x: torch.Tensor) -> None:
        """One callback of the sampler (``x`` the latent at the step's sigma, ``denoised`` its prediction).

        Runs inside the sampler: anything unexpected only ends the reading (the answer stays unknown)."""
        if self._failed:
            return
        if not (isinstance(denoised, torch.Tensor) and isinstance(x, torch.Tensor)) or denoised.shape != x.shape:
            return
        if x.numel() < 8 * 2 * HISTORY:
            return  # too few values for the multistep fit's unknowns to be overdetermined
        try:
            self._record(step, denoised, x)
        except Exception:  # noqa: BLE001 - a tensor of an unusual kind: no reading, the sampling goes on
            logger.debug("First Block Cache: the sampler's steps could not be read", exc_info=True)
            self._failed = True

    def _record(self, step: int, denoised: torch.Tensor, x: torch.Tensor) -> None:
        if self._steps and step != self._steps[-1] + 1:
            self._rows, self._steps = [], []  # not consecutive (a restarted run): start over
        flat_x, flat_d = x.detach().reshape(-1), denoised.detach().reshape(-1)
        # the positions are kept with the size and device they were made for: no read from the GPU
        if self._index is None or self._index_for != (flat_x.numel(), flat_x.device):
            count = min(SAMPLES, flat_x.numel())
            self._index = torch.linspace(0, flat_x.numel() - 1, count, device=flat_x.device).long()
            self._index_for = (flat_x.numel(), flat_x.device)
        self._rows.append(torch.stack([flat_x[self._index], flat_d[self._index]]).float())
        self._steps.append(int(step))

    def multistep(self) -> bool | None:
        """True: the updates combined earlier predictions; False: each used only its own step;
        None: not decidable from this run (noise, several model calls per step, too few steps)."""
        if self._failed or len(self._rows) < HISTORY + 2:
            return None
        try:
            return self._classify(torch.stack(self._rows).to("cpu", torch.float64))  # one sync
        except Exception:  # noqa: BLE001 - e.g. a solver error on degenerate values: unknown
            logger.debug("First Block Cache: the sampler's steps could not be classified", exc_info=True)
            return None

    @staticmethod
    def _classify(data: torch.Tensor) -> bool | None:
        """``data``: [steps, 2 (x, D), SAMPLES]."""
        if not bool(torch.isfinite(data).all()):
            return None
        xs, ds = data[:, 0], data[:, 1]
        single = multi = 0
        for k in range(HISTORY - 1, len(xs) - 1):
            target = xs[k + 1]
            # what the step added beyond scaling its latent: the fits are measured against that
            added = _residual(xs[k][:, None], target)
            if added < 1e-6 * float(target.norm()):
                continue  # the step only scaled the latent: nothing to tell the forms apart
            short = _residual(torch.stack([xs[k], ds[k]], 1), target) / added
            history = [xs[k - j] for j in range(HISTORY)] + [ds[k - j] for j in range(HISTORY)]
            full = _residual(torch.stack(history, 1), target) / added
            if full >= EXACT:
                continue  # neither form explains the step (fresh noise, more model calls per step)
            if short <= HELPED * full + EXACT / 10:
                single += 1  # the earlier steps add nothing: a single-step update
            elif short >= MISSED * full:
                multi += 1  # only the earlier steps make the fit exact
        if single + multi < MIN_STEPS:
            return None
        if multi >= 2 * single:
            return True
        if single >= 2 * multi:
            return False
        return None


def _residual(columns: torch.Tensor, target: torch.Tensor) -> float:
    """||columns @ w - target|| for the least-squares ``w``."""
    solution = torch.linalg.lstsq(columns, target[:, None]).solution
    return float((columns @ solution - target[:, None]).norm())
