"""A toy zoo model for testing the training engine without any model family.

Poisson factor model, for cell i with counts x_i over G features::

    tau   ~ Normal(0, 1)                 global, present only with the "offset" component
    z_i   ~ Normal(0, I_K)               cell plate
    x_ig  ~ Poisson(l_i softmax(z_i W + b + tau * u)_g)

Guide: z_i ~ Normal(encoder(log1p x_i)); tau ~ Normal(tau_loc, tau_scale). Parameter groups:
"encoder" (the encoder), "decoder" (W, b), "offset" (u, tau_loc, tau_scale).
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam, pyro_method
from torch import nn

from pyro_livi.models import ZooModel


class ToyModel(ZooModel):
    param_groups = {"encoder": "encoder", "W": "decoder", "b": "decoder", "u": "offset", "tau_": "offset"}
    components_all = ("offset",)

    def __init__(self, n_features: int, n_latent: int = 2):
        super().__init__()
        self.config = dict(n_features=n_features, n_latent=n_latent)
        self.n_latent = n_latent
        self.encoder = PyroModule[nn.Linear](n_features, 2 * n_latent)
        self.W = PyroParam(0.1 * torch.randn(n_latent, n_features))
        self.b = PyroParam(torch.zeros(n_features))
        self.u = PyroParam(0.1 * torch.randn(n_features))
        self.tau_loc = PyroParam(torch.tensor(0.5))
        self.tau_scale = PyroParam(torch.tensor(0.5), constraint=constraints.positive)

    @pyro_method
    def model(self, batch, observed=True):
        tau = pyro.sample("tau", dist.Normal(0.0, 1.0)) if "offset" in self.components else None
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            z = pyro.sample("z", dist.Normal(self.W.new_zeros(self.n_latent), 1.0).to_event(1))
            logits = z @ self.W + self.b + (tau * self.u if tau is not None else 0.0)
            rate = torch.softmax(logits, dim=-1) * batch.size_factor["rna"][:, None]
            pyro.sample("obs_rna", dist.Poisson(rate).to_event(1), obs=batch.x["rna"] if observed else None)

    @pyro_method
    def guide(self, batch, observed=True):
        if "offset" in self.components:
            pyro.sample("tau", dist.Normal(self.tau_loc, self.tau_scale))
        with pyro.plate("cells", batch.n_cells, subsample=batch.index):
            loc, scale = self.encode(batch)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def encode(self, batch):
        h = self.encoder(torch.log1p(batch.x["rna"]))
        return h[:, :self.n_latent], nn.functional.softplus(h[:, self.n_latent:]) + 1e-3
