"""Laplace approximations around a trained LoRA classifier (MacKay, 1992; Daxberger et al., 2021; Yang et al., 2024).

Written here rather than taken from `laplace-torch`, whose torchvision requirement pins torch to matching versions.
Two posteriors, named by `subset`:

- `"last_layer"`: a Gaussian over the classification head's weights (bias included), with the generalised
  Gauss-Newton Hessian of the summed NLL either Kronecker-factored (`"kron"`: inputs x output curvature, as in K-FAC)
  or diagonal (`"diag"`). Predictions use the probit approximation (logits / sqrt(1 + pi/8 var)) or MC samples of
  the logits; both are closed form in the head's input features, so the backbone runs once per prediction.
- `"lora"`: a diagonal Gaussian over all LoRA A/B weights of the active adapter, the Hessian being the diagonal
  Fisher estimated with labels sampled from the model (one backward pass per example and sample), and predictions
  averaging weight samples. The head stays at its trained value.

The prior is N(0, 1/prior_precision); `optimize_prior_precision` picks it on a grid by the Laplace marginal
likelihood of the training data or by NLL on a dev split.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .persistence import SafetensorsState, check_state_keys, check_state_shapes
from .prediction import (
    IGNORE_INDEX,
    Batches,
    adapter_parameter_groups,
    classification_head,
    collect_labels,
    collect_logits,
    labeled,
    model_device,
    predict_with_weight_samples,
    prediction_mode,
    split_batch,
    using_adapter,
)

SUBSETS = ("last_layer", "lora")
HESSIAN_STRUCTURES = ("kron", "diag")
PREDICTIVES = ("probit", "mc")


class LaplaceApproximation(SafetensorsState):
    """A Laplace posterior over the classification head (`subset="last_layer"`) or the LoRA weights (`"lora"`)."""

    def __init__(
        self,
        subset: str = "last_layer",
        hessian_structure: str = "kron",
        prior_precision: float = 1.0,
        predictive: str = "probit",
        num_samples: int = 30,
        fisher_samples: int = 1,
        adapter_name: str | None = None,
        seed: int = 0,
    ):
        if subset not in SUBSETS:
            raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
        if hessian_structure not in HESSIAN_STRUCTURES:
            raise ValueError(f"hessian_structure must be one of {HESSIAN_STRUCTURES}, got {hessian_structure!r}")
        if predictive not in PREDICTIVES:
            raise ValueError(f"predictive must be one of {PREDICTIVES}, got {predictive!r}")
        if subset == "lora" and (hessian_structure, predictive) != ("diag", "mc"):
            raise ValueError('subset="lora" supports hessian_structure="diag" with predictive="mc" only')
        if num_samples < 1 or fisher_samples < 1:
            raise ValueError(f"num_samples and fisher_samples must be >= 1, got {num_samples} and {fisher_samples}")
        self._validate_prior_precision(prior_precision)
        self.subset = subset
        self.hessian_structure = hessian_structure
        self.prior_precision = float(prior_precision)
        self.predictive = predictive
        self.num_samples = num_samples
        self.fisher_samples = fisher_samples
        self.adapter_name = adapter_name
        self.seed = seed
        self.log_likelihood: float | None = None  # summed over the training examples (tokens), at the MAP
        self.num_data = 0
        self.map_values: dict[str, torch.Tensor] = {}  # last layer: "weight"/"bias"; lora: parameter names
        self.curvature: dict[str, torch.Tensor] = {}
        self._kron_eigen: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(subset={self.subset!r}, hessian_structure={self.hessian_structure!r}, "
            f"prior_precision={self.prior_precision:.4g}, predictive={self.predictive!r})"
        )

    def fit(self, model: nn.Module, dataloader: Batches) -> None:
        """Compute the Hessian approximation at the trained weights over `dataloader` (the training split)."""
        if self.subset == "last_layer":
            self._fit_last_layer(model, dataloader)
        else:
            self._fit_lora(model, dataloader)

    def log_marginal_likelihood(self, prior_precision: float | None = None) -> float:
        """log p(D) ~ log p(D|theta*) + log p(theta*) + P/2 log 2pi - 1/2 log det(H + prior_precision I)."""
        self._check_fitted()
        delta = self.prior_precision if prior_precision is None else prior_precision
        self._validate_prior_precision(delta)
        eigenvalues = self._hessian_eigenvalues()
        theta_norm = sum(float((value.double() ** 2).sum()) for value in self.map_values.values())
        return (
            self.log_likelihood
            - 0.5 * delta * theta_norm
            + 0.5 * eigenvalues.numel() * math.log(delta)
            - 0.5 * float(torch.log(eigenvalues + delta).sum())
        )

    def optimize_prior_precision(
        self,
        method: str = "marglik",
        grid: Sequence[float] | torch.Tensor | None = None,
        model: nn.Module | None = None,
        dataloader: Batches | None = None,
    ) -> float:
        """Set and return the grid value that maximises the marginal likelihood (`"marglik"`) or minimises the NLL
        on `dataloader`, a dev split (`"dev_nll"`; with subset="lora" each grid point costs a full MC prediction)."""
        self._check_fitted()
        grid = torch.logspace(-4, 4, 81).tolist() if grid is None else [float(value) for value in grid]
        if not grid:
            raise ValueError("the prior precision grid is empty")
        for value in grid:
            self._validate_prior_precision(value)
        if method == "marglik":
            scores = [self.log_marginal_likelihood(value) for value in grid]
        elif method == "dev_nll":
            if model is None or dataloader is None:
                raise ValueError('method="dev_nll" needs the model and a dev dataloader')
            scores = [-nll for nll in self._dev_nlls(model, dataloader, grid)]
        else:
            raise ValueError(f'method must be "marglik" or "dev_nll", got {method!r}')
        self.prior_precision = grid[max(range(len(grid)), key=scores.__getitem__)]
        return self.prior_precision

    def predict_proba(self, model: nn.Module, dataloader: Batches) -> torch.Tensor:
        self._check_fitted()
        if self.subset == "lora":
            return self._lora_samples(model, dataloader, self.prior_precision).mean(0)
        collected = collect_logits(model, dataloader, capture_features=True)
        return self._last_layer_probs(collected.features, self.prior_precision)

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        state = {
            "prior_precision": torch.tensor(self.prior_precision, dtype=torch.float64),
            "log_likelihood": torch.tensor(self.log_likelihood, dtype=torch.float64),
            "num_data": torch.tensor(self.num_data),
        }
        state.update({f"map.{name}": value for name, value in self.map_values.items()})
        state.update({f"curvature.{name}": value for name, value in self.curvature.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state saved with the same `subset` and `hessian_structure`."""
        owner = f"{type(self).__name__}(subset={self.subset!r}, hessian_structure={self.hessian_structure!r})"
        map_names = sorted(key[len("map.") :] for key in state if key.startswith("map."))
        if self.subset == "last_layer":
            if "weight" not in map_names or state["map.weight"].dim() != 2:
                raise ValueError(f"{owner} state needs a 2-D `map.weight`")
            num_classes, num_inputs = state["map.weight"].shape
            num_inputs += "bias" in map_names
            shapes = {"map.weight": state["map.weight"].shape}
            if "bias" in map_names:
                shapes["map.bias"] = torch.Size([num_classes])
            if self.hessian_structure == "kron":
                shapes["curvature.inputs"] = torch.Size([num_inputs, num_inputs])
                shapes["curvature.outputs"] = torch.Size([num_classes, num_classes])
            else:
                shapes["curvature.diagonal"] = torch.Size([num_inputs, num_classes])
        else:
            shapes = {f"map.{name}": state[f"map.{name}"].shape for name in map_names}
            shapes.update({f"curvature.{name}": state[f"map.{name}"].shape for name in map_names})
        check_state_keys(state, set(shapes) | {"prior_precision", "log_likelihood", "num_data"}, owner)
        check_state_shapes(state, shapes, owner)
        self._validate_prior_precision(state["prior_precision"].item())
        self.prior_precision = state["prior_precision"].item()
        self.log_likelihood = state["log_likelihood"].item()
        self.num_data = int(state["num_data"])
        self.map_values = {name: state[f"map.{name}"].double() for name in map_names}
        self._set_curvature(
            {key[len("curvature.") :]: value.double() for key, value in state.items() if key.startswith("curvature.")}
        )

    # last layer

    def _fit_last_layer(self, model: nn.Module, dataloader: Batches) -> None:
        collected = collect_logits(model, dataloader, capture_features=True)
        features, labels = labeled(collected.features, collected.labels)
        head = classification_head(model)
        self.map_values = {name: value.detach().double().cpu().clone() for name, value in head.state_dict().items()}
        inputs = self._head_inputs(features)
        logits = self._map_logits(inputs)
        probs = logits.softmax(-1)
        self.log_likelihood = -float(F.cross_entropy(logits, labels, reduction="sum"))
        self.num_data = len(labels)
        if self.hessian_structure == "kron":
            # sum_n phi phi^T (x) Lambda_n  ~  (sum_n phi phi^T) (x) (sum_n Lambda_n) / N, Lambda = diag(p) - p p^T
            self._set_curvature({"inputs": inputs.T @ inputs, "outputs": torch.diag(probs.sum(0)) - probs.T @ probs})
        else:
            # the exact GGN diagonal: entry (input i, class c) = sum_n phi_ni^2 p_nc (1 - p_nc)
            self._set_curvature({"diagonal": (inputs**2).T @ (probs * (1 - probs))})

    def _last_layer_probs(self, features: torch.Tensor, prior_precision: float) -> torch.Tensor:
        inputs = self._head_inputs(features)
        logits = self._map_logits(inputs)
        if self.hessian_structure == "kron":
            # in the eigenbases of both factors the posterior precision is diagonal: a_i g_j / N + prior
            input_eigenvalues, input_basis, output_eigenvalues, output_basis = self._kron_eigen
            precision = torch.outer(input_eigenvalues, output_eigenvalues) / self.num_data
            # logit covariance = output_basis diag(rotated_variance) output_basis^T
            rotated_variance = (inputs @ input_basis) ** 2 @ (1 / (precision + prior_precision))
            variance = rotated_variance @ (output_basis**2).T
        else:
            variance = inputs**2 @ (1 / (self.curvature["diagonal"] + prior_precision))
        if self.predictive == "probit":
            return (logits / torch.sqrt(1 + math.pi / 8 * variance)).softmax(-1).float()
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((self.num_samples, *logits.shape), generator=generator, dtype=logits.dtype)
        if self.hessian_structure == "kron":
            samples = logits + (rotated_variance.sqrt() * noise) @ output_basis.T
        else:
            samples = logits + variance.sqrt() * noise
        return samples.softmax(-1).mean(0).float()

    def _head_inputs(self, features: torch.Tensor) -> torch.Tensor:
        """Features with a constant 1 appended when the head has a bias, so that weight and bias form one matrix."""
        num_inputs = self.map_values["weight"].shape[1]
        if features.shape[-1] != num_inputs:
            raise ValueError(f"the model's head takes {features.shape[-1]} features, this Laplace state {num_inputs}")
        features = features.double()
        if "bias" not in self.map_values:
            return features
        return torch.cat([features, features.new_ones(*features.shape[:-1], 1)], dim=-1)

    def _map_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        weight = self.map_values["weight"]
        if "bias" in self.map_values:
            weight = torch.cat([weight, self.map_values["bias"][:, None]], dim=1)
        return inputs @ weight.T

    # LoRA weights

    def _fit_lora(self, model: nn.Module, dataloader: Batches) -> None:
        lora, _ = adapter_parameter_groups(model, self.adapter_name)
        self.adapter_name = self.adapter_name or model.active_adapter
        with using_adapter(model, self.adapter_name):
            self._fit_lora_fisher(model, dataloader, lora)

    def _fit_lora_fisher(self, model: nn.Module, dataloader: Batches, lora: dict[str, nn.Parameter]) -> None:
        self.map_values = {name: param.detach().double().cpu().clone() for name, param in lora.items()}
        fisher = {name: torch.zeros_like(value) for name, value in self.map_values.items()}
        generator = torch.Generator().manual_seed(self.seed)
        device = model_device(model)
        log_likelihood, num_data = 0.0, 0
        with prediction_mode(model), _requiring_grad(lora.values()), torch.enable_grad():
            for batch in dataloader:
                inputs, labels = split_batch(batch, device)
                for row in range(len(labels)):
                    row_inputs = {k: v[row : row + 1] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
                    keep = labels[row : row + 1] != IGNORE_INDEX
                    if not keep.any():
                        continue
                    log_probs = model(**row_inputs).logits[keep.to(device)].log_softmax(-1)  # [positions, C]
                    targets = labels[row : row + 1][keep].to(device)
                    log_likelihood += float(log_probs.detach().gather(1, targets[:, None]).sum())
                    num_data += len(targets)
                    for sample in range(self.fisher_samples):
                        drawn = torch.multinomial(log_probs.detach().exp().cpu(), 1, generator=generator).to(device)
                        grads = torch.autograd.grad(
                            log_probs.gather(1, drawn).sum(),
                            list(lora.values()),
                            retain_graph=sample < self.fisher_samples - 1,
                        )
                        for name, grad in zip(lora, grads, strict=True):
                            fisher[name] += grad.detach().double().cpu() ** 2 / self.fisher_samples
        if num_data == 0:
            raise ValueError("the dataloader holds no labeled examples")
        self.log_likelihood, self.num_data = log_likelihood, num_data
        self._set_curvature(fisher)

    def _lora_samples(self, model: nn.Module, dataloader: Batches, prior_precision: float) -> torch.Tensor:
        lora, _ = adapter_parameter_groups(model, self.adapter_name)
        found = {name: param.shape for name, param in lora.items()}
        expected = {name: value.shape for name, value in self.map_values.items()}
        if found != expected:
            differing = sorted(name for name in found.keys() | expected.keys() if found.get(name) != expected.get(name))
            raise ValueError(f"the model's LoRA weights do not match this Laplace state; differing: {differing[:5]}")
        scales = {name: (fisher + prior_precision).rsqrt() for name, fisher in self.curvature.items()}
        generator = torch.Generator().manual_seed(self.seed)
        # drawn in name order, so a reloaded state (whose key order may differ) gives the same samples
        samples = (
            {
                name: self.map_values[name]
                + scales[name] * torch.randn(shape, generator=generator, dtype=torch.float64)
                for name, shape in sorted(expected.items())
            }
            for _ in range(self.num_samples)
        )
        with using_adapter(model, self.adapter_name or model.active_adapter):
            return predict_with_weight_samples(model, dataloader, lora, samples)

    # shared

    def _set_curvature(self, curvature: dict[str, torch.Tensor]) -> None:
        """Store the Hessian factors; K-FAC's are eigendecomposed once here, not at every prediction or grid point."""
        self.curvature = curvature
        if self.hessian_structure == "kron":
            input_eigenvalues, input_basis = torch.linalg.eigh(curvature["inputs"])
            output_eigenvalues, output_basis = torch.linalg.eigh(curvature["outputs"])
            self._kron_eigen = (
                input_eigenvalues.clamp_min(0),
                input_basis,
                output_eigenvalues.clamp_min(0),
                output_basis,
            )

    def _hessian_eigenvalues(self) -> torch.Tensor:
        if self.hessian_structure == "kron":
            input_eigenvalues, _, output_eigenvalues, _ = self._kron_eigen
            return torch.outer(input_eigenvalues, output_eigenvalues).flatten() / self.num_data
        return torch.cat([value.flatten() for value in self.curvature.values()])

    def _dev_nlls(self, model: nn.Module, dataloader: Batches, grid: list[float]) -> list[float]:
        if self.subset == "last_layer":
            collected = collect_logits(model, dataloader, capture_features=True)
            labels = collected.labels
            probs_per_value = (self._last_layer_probs(collected.features, value) for value in grid)
        else:
            labels = collect_labels(dataloader)
            probs_per_value = (self._lora_samples(model, dataloader, value).mean(0) for value in grid)
        nlls = []
        for probs in probs_per_value:
            flat_probs, flat_labels = labeled(probs, labels)
            nlls.append(float(F.nll_loss(flat_probs.clamp_min(1e-12).log(), flat_labels)))
        return nlls

    def _check_fitted(self) -> None:
        if self.log_likelihood is None:
            raise RuntimeError("the Laplace approximation is not fitted: call fit() or load() first")

    @staticmethod
    def _validate_prior_precision(value: float) -> None:
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"prior precision must be a positive finite number, got {value}")


@contextlib.contextmanager
def _requiring_grad(parameters: Iterable[nn.Parameter]) -> Iterator[None]:
    """Let autograd differentiate parameters a frozen (inference-mode) adapter may have switched off."""
    parameters = list(parameters)
    flags = [param.requires_grad for param in parameters]
    for param in parameters:
        param.requires_grad_(True)
    try:
        yield
    finally:
        for param, flag in zip(parameters, flags, strict=True):
            param.requires_grad_(flag)
