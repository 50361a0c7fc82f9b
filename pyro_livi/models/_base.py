"""What every model of the zoo shares: its own parameter namespace, parameter groups,
active components, and observation sites built from the likelihood registry."""

from __future__ import annotations

import itertools

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam

from ..data.batch import Batch

_instance_counter = itertools.count()


class ZooModel(PyroModule):
    """Base class of the zoo's PyroModules.

    Subclasses define ``model(batch, observed=True)`` and ``guide(batch, observed=True)``, a
    ``config`` dict (the constructor's keyword arguments, enough to rebuild the model),
    ``param_groups`` (parameter-name prefix -> group name, used by training stages) and
    ``components_all`` (the optional parts a stage may switch on, e.g. the donor terms).

    Every instance gets a unique Pyro name prefix, so two models in one process never share
    parameters through Pyro's global parameter store.
    """

    modalities: tuple[str, ...] = ()
    param_groups: dict[str, str] = {}
    components_all: tuple[str, ...] = ()

    def __init__(self, name: str | None = None):
        super().__init__(name=name or f"{type(self).__name__.lower()}_{next(_instance_counter)}")
        #: parts of the model that are switched on; all of them unless a training stage says otherwise
        self.components: set[str] = set(self.components_all)
        self.likelihoods = {}

    # -------------------------------------------------------------- observation sites
    def _init_likelihood_params(self, modality: str, n_features: int, n_latent: int, counts_sample=None):
        """Create the per-feature parameters and cell heads the modality's likelihood needs."""
        lik = self.likelihoods[modality]
        for pname, init in lik.init_feature_params(n_features, counts_sample).items():
            setattr(self, f"lik_{modality}_{pname}", PyroParam(torch.as_tensor(init, dtype=torch.float32)))
        for head in lik.cell_heads:
            setattr(self, f"head_{modality}_{head}_weight", PyroParam(torch.zeros(n_latent, n_features)))
            setattr(self, f"head_{modality}_{head}_bias", PyroParam(torch.zeros(n_features)))

    def likelihood_params(self, modality: str, s: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feature parameters (G,) and cell heads (B, G) of a modality's likelihood."""
        lik = self.likelihoods[modality]
        params = {p: getattr(self, f"lik_{modality}_{p}") for p in lik.feature_params}
        for head in lik.cell_heads:
            weight = getattr(self, f"head_{modality}_{head}_weight")
            params[head] = s @ weight + getattr(self, f"head_{modality}_{head}_bias")
        return params

    def _observe(self, modality: str, mean: torch.Tensor, s: torch.Tensor, batch: Batch, observed: bool):
        """The observation site ``obs_<modality>``; cells absent from the modality are masked out."""
        lik = self.likelihoods[modality]
        fn = lik(mean, **self.likelihood_params(modality, s)).to_event(1).mask(batch.present[modality])
        return pyro.sample(f"obs_{modality}", fn, obs=batch.x[modality] if observed else None)

    def dispersions(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-feature likelihood parameters of each modality, constrained (e.g. theta = exp(log_theta))."""
        out = {}
        for modality, lik in self.likelihoods.items():
            out[modality] = {}
            for p in lik.feature_params:
                value = getattr(self, f"lik_{modality}_{p}").detach()
                key, value = (p[4:], value.exp()) if p.startswith("log_") else (p, value)
                out[modality][key] = value
        return out

    # ----------------------------------------------------------------- parameter groups
    def group_of(self, param_name: str) -> str:
        """Group of a parameter given its ``named_parameters`` name."""
        for prefix, group in self.param_groups.items():
            if param_name.startswith(prefix):
                return group
        raise KeyError(f"{type(self).__name__}: parameter {param_name!r} belongs to no group")

    def parameters_by_group(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        """{group: {parameter name: parameter}} over every parameter of the module."""
        groups: dict[str, dict[str, torch.nn.Parameter]] = {}
        for pname, param in self.named_parameters():
            groups.setdefault(self.group_of(pname), {})[pname] = param
        return groups

    def pyro_param_name(self, param_name: str) -> str:
        """Name under which a parameter appears at Pyro param sites."""
        return f"{self._pyro_name}.{param_name.removesuffix('_unconstrained')}"


class DonorFactorsMixin:
    """The donor latents shared by the LIVI family: D (N_y, K_DxC) and V (N_y, K_V).

    Model: ``D``, ``V`` ~ Normal(0, I) in the ``donors`` plate, each present only while its
    component ("interaction", "persistent") is on. Guide: a point mass at ``D_loc`` / ``V_loc``
    (``donor_guide="delta"``) or Normal(loc, scale) (``"normal"``). Expects the attributes
    ``n_donors``, ``n_dxc``, ``n_persistent``, ``donor_guide``, ``D_loc``, ``V_loc`` (and
    ``D_scale``, ``V_scale`` for the Normal guide).
    """

    def _donor_sites(self):
        """Model side: returns (D, V), each None while its component is off."""
        D = V = None
        with pyro.plate("donors", self.n_donors):
            if "persistent" in self.components:
                V = pyro.sample("V", dist.Normal(self.V_loc.new_zeros(self.n_persistent), 1.0).to_event(1))
            if "interaction" in self.components:
                D = pyro.sample("D", dist.Normal(self.D_loc.new_zeros(self.n_dxc), 1.0).to_event(1))
        return D, V

    def _donor_guide_sites(self) -> None:
        """Guide side of :meth:`_donor_sites`."""
        with pyro.plate("donors", self.n_donors):
            if "persistent" in self.components:
                pyro.sample("V", self._donor_posterior("V"))
            if "interaction" in self.components:
                pyro.sample("D", self._donor_posterior("D"))

    def _donor_posterior(self, name: str):
        loc = getattr(self, f"{name}_loc")
        if self.donor_guide == "delta":
            return dist.Delta(loc).to_event(1)
        return dist.Normal(loc, getattr(self, f"{name}_scale")).to_event(1)

    def donor_factors(self) -> dict[str, torch.Tensor]:
        """Posterior means of the donor factors: {"D": (N_y, K_DxC), "V": (N_y, K_V)}."""
        return {"D": self.D_loc.detach(), "V": self.V_loc.detach()}
