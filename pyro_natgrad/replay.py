"""The guide's draws under a JIT-compiled ELBO, by replaying the random state.

The optimizer's control variate and model curvature need the draw ``z`` behind each
step's gradient, which forward hooks on the guide record. ``JitTrace_ELBO`` runs a
compiled graph after its first step, so the hooks never fire. The graph draws from
torch's generator in the order the Python guide does, so the guide run again in
Python from the random state at the start of the step makes the same draw.

That state is the one the optimizer saw when its previous call ended, unless
something drew random numbers between the steps (e.g. a minibatch index in the
training loop), the ELBO draws several particles, or the guide draws differently in
Python. So a replayed draw is used only where the gradients confirm it: for a
Gaussian group ``z = loc + s * w`` (``s`` the diagonal scale, ``L = diag(s) U``
for a full-rank one), the reparameterised loss ``l = -log p(z) + log q(z)`` has

    ``dl/ds = dl/dloc * w - 1/s``,

exactly, since ``log q(z) = log N(eps) - sum(log s)`` at ``z = loc + L eps``.
An unrelated draw misses this by about ``|dl/dloc|`` per element. Other guides
(low-rank, other families) have no such check, and their replayed draws are not
confirmed. An unconfirmed draw is still a draw of ``q``: the optimizer takes the
model's Hessian there, but no control variate.
"""

from typing import Dict, List, Optional

import torch
from pyro import poutine

from .guides import DiagonalGaussianGroup, FullGaussianGroup
from .minibatch import plate_scale

#: Relative residual of the identity above within which a replayed draw is accepted;
#: an unrelated draw leaves a residual about as large as ``|dl/dloc * w|`` itself.
REPLAY_TOLERANCE = 1e-3


class TorchRandomState:
    """torch's generator state on the CPU and on ``device`` (a CUDA one, if so): what a
    compiled graph draws from. Numpy's and Python's are not, and are left alone."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self):
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def replay_guide(guide, recorders, state: TorchRandomState, args, kwargs) -> List[Dict]:
    """The records of one call of ``guide(*args, **kwargs)`` made from the random state
    ``state``. The random state is left as it was, and no handler outside sees the
    call (``poutine.block``)."""
    now = TorchRandomState(state.device)
    try:
        state.restore()
        with torch.enable_grad(), poutine.block():
            guide(*args, **kwargs)
    finally:
        now.restore()
    records = []
    for r in recorders:
        records += r.take()
    return records


def gradients_match_draw(group, grads: Dict[str, torch.Tensor], record: Dict) -> bool:
    """Whether ``grads`` (the group's unconstrained gradients) come from the draw in
    ``record``, by the identity ``dl/ds + c/s = dl/dloc * w`` of the module docstring,
    where ``c`` is the subsampled plates' ``full_size / size`` (it scales the site's
    whole loss), checked on the subsample. False for groups it does not apply to (other
    families, several particles: the draw's shape is not ``loc``'s)."""
    if not isinstance(group, (DiagonalGaussianGroup, FullGaussianGroup)) \
            or group.site not in record:
        return False
    g_loc, g_raw = grads.get("loc"), grads.get("scale")
    if g_loc is None or g_raw is None:
        return False
    loc = group.params["loc"].detach()
    s, ds = group.scale()
    if isinstance(group, DiagonalGaussianGroup):
        for dim, idx in group.subsample_index(record):
            loc, s, ds, g_loc, g_raw = (x.index_select(dim, idx)
                                        for x in (loc, s, ds, g_loc, g_raw))
    c = plate_scale(None, group, [record])  # the site is in the record: no guide needed
    z = record[group.site][0]
    if z.shape != loc.shape:
        return False
    w = (z - loc) / s
    explained = g_loc * w
    g_s = g_raw / ds
    residual = g_s + c / s - explained
    # Rounding: of z = loc + s * w (|loc|/s per element) and of the cancelling terms
    # of log q's gradient (c w^2/s), each a few ulps.
    eps = torch.finfo(loc.dtype).eps
    rounding = 64 * eps * (g_s.norm() + (c * (1 + w.square()) / s).norm()
                           + (g_loc * (z.abs() + loc.abs()) / s).norm())
    return bool(residual.norm() <= REPLAY_TOLERANCE * explained.norm() + rounding)


def replayed_records(groups, records: List[Dict]) -> Optional[List[Dict]]:
    """``records`` (of one guide call) if every group's gradients come from its draw
    in them, else None."""
    if not records:
        return None
    for group in groups:
        grads = group.grads()
        if any(g is None for g in grads.values()):
            continue  # a part of the guide this step did not use
        mine = [r for r in records if group.site in r]
        if len(mine) != 1 or not gradients_match_draw(group, grads, mine[0]):
            return None
    return records
