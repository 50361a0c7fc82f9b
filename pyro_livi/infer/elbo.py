"""The mean-field ELBO split into its sites.

Computes the same objective as :class:`pyro.infer.TraceMeanField_ELBO` (analytic KL where it
exists, a single-sample estimate otherwise), but keeps each site's contribution, so that the
training history shows every ELBO term and every penalty separately.
"""

from __future__ import annotations

import pyro.poutine as poutine
import torch
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites


def elbo_terms(model, guide, *args, **kwargs) -> dict[str, torch.Tensor]:
    """Per-site terms of the negative ELBO, for one sample of the guide.

    Returns ``{term: scalar}`` whose sum is the loss to minimise:
    ``nll_obs_<modality>`` for observation sites (minus log-likelihood), ``<name>`` for
    factor sites such as ``pyro.factor("penalty_<name>", -value)`` (giving +value),
    and ``kl_<site>`` for latent sites (KL(q || p), analytic when registered). Plate scaling
    (minibatch subsampling) and masks are applied.
    """
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)
    terms: dict[str, torch.Tensor] = {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            log_p = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"]).sum()
            terms[f"nll_{name}" if name.startswith("obs_") else name] = -log_p
            continue
        guide_site = guide_trace.nodes.get(name)
        if guide_site is None:
            raise ValueError(f"latent site {name!r} of the model has no counterpart in the guide")
        try:
            kl = kl_divergence(guide_site["fn"], site["fn"])
            kl = scale_and_mask(kl, guide_site["scale"], guide_site["mask"]).sum()
        except NotImplementedError:
            value = guide_site["value"]
            log_q = scale_and_mask(guide_site["fn"].log_prob(value), guide_site["scale"], guide_site["mask"])
            log_p = scale_and_mask(site["fn"].log_prob(value), site["scale"], site["mask"])
            kl = (log_q - log_p).sum()
        terms[f"kl_{name}"] = kl
    return terms
