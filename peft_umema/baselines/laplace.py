"""Laplace approximations around a trained LoRA classifier, computed by `laplace-torch` (Daxberger et al., 2021;
Yang et al., 2024 for LoRA).

The options are laplace-torch's own: `subset_of_weights`, `hessian_structure`, `backend`, `pred_type`,
`link_approx`, `n_samples`, and prior tuning by `optimize_prior_precision(method="marglik" | "gridsearch")`. Two
posteriors, named by `subset_of_weights`:

- `"last_layer"`: laplace-torch's last-layer Laplace over the classification head (weight and bias). The head is
  fitted on its input features, which we collect once per split; that is what laplace-torch cannot do on an HF
  model by itself: decoder sequence classifiers run their head on every token and keep one per row, and token
  classifiers carry -100 labels on padding and sub-word positions. `hessian_structure` "kron", "diag" or "full";
  `pred_type` "glm" (link "probit", "mc", "bridge", "bridge_norm") or "nn" (link "mc").
- `"lora"`: laplace-torch's `subset_of_weights="all"` over the LoRA A/B weights of one adapter (only they require
  grad while laplace-torch runs; the head stays at its trained value). `hessian_structure` "kron" (K-FAC) or
  "diag"; with some weights frozen laplace-torch predicts with `pred_type="nn"`, `link_approx="mc"` only. The model
  sees labeled positions only while the Hessian is computed (each labeled token counts as one data point).

The Hessian backends are laplace-torch's GGN/EF classes by name; BackPack's fail when some grads are off, so
Curvlinops (default) and Asdl ones are offered. What remains ours: the adaptation to HF batches described above,
seeding the sampled predictives, and saving the fitted posterior as safetensors (laplace-torch pickles).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .persistence import SafetensorsState
from .prediction import (
    IGNORE_INDEX,
    Batches,
    _concat_batches,
    adapter_parameter_groups,
    classification_head,
    collect_labels,
    collect_logits,
    labeled,
    model_device,
    prediction_mode,
    seeded,
    split_batch,
    using_adapter,
)

if TYPE_CHECKING:
    from laplace.baselaplace import BaseLaplace

SUBSETS_OF_WEIGHTS = ("last_layer", "lora")
HESSIAN_STRUCTURES = {"last_layer": ("kron", "diag", "full"), "lora": ("kron", "diag")}
PRED_TYPES = ("glm", "nn")
LINK_APPROXES = ("probit", "mc", "bridge", "bridge_norm")
# laplace-torch's curvature classes that work with some weights frozen (BackPACK's do not)
BACKENDS = ("CurvlinopsGGN", "AsdlGGN", "CurvlinopsEF", "AsdlEF")
PRIOR_METHODS = ("marglik", "gridsearch")
# Rows of head features per laplace-torch call: the GLM predictive forms [rows, C, P] Jacobians for "diag"/"full".
LAST_LAYER_CHUNK = 256
HEAD_NAME = "0"  # the head's name inside the one-layer network laplace-torch fits on features
SCORED = "scored_positions"  # batch key of the labeled positions while the LoRA Hessian is computed
INSTALL_HINT = (
    "pip install --no-deps laplace-torch==0.3 backpack-for-pytorch==1.7.1 curvlinops-for-pytorch==3.0.1 "
    "(listed in requirements-offline.txt; see the README)"
)


def _laplace_torch():
    """laplace-torch's `Laplace` and its curvature module, imported when first needed so that the other baselines
    work without it."""
    try:
        import laplace
        import laplace.curvature
    except ImportError as error:
        raise ImportError(f"The `laplace` baseline needs laplace-torch: {INSTALL_HINT}") from error
    return laplace.Laplace, laplace.curvature


class LaplaceApproximation(SafetensorsState):
    """A laplace-torch posterior over the classification head (`subset_of_weights="last_layer"`) or the LoRA
    weights (`"lora"`) of a peft classifier, fitted and evaluated on dict batches as the Trainer's collators give.

    `pred_type` defaults to "glm" for the last layer and "nn" for LoRA; `link_approx` to "probit" for "glm" and
    "mc" for "nn". Sampled predictives (`link_approx="mc"`) are seeded by `seed`, and with `pred_type="nn"` every
    batch sees the same `n_samples` weight samples.
    """

    def __init__(
        self,
        subset_of_weights: str = "last_layer",
        hessian_structure: str = "kron",
        prior_precision: float = 1.0,
        pred_type: str | None = None,
        link_approx: str | None = None,
        n_samples: int = 30,
        backend: str = "CurvlinopsGGN",
        adapter_name: str | None = None,
        seed: int = 0,
    ):
        if subset_of_weights not in SUBSETS_OF_WEIGHTS:
            raise ValueError(f"subset_of_weights must be one of {SUBSETS_OF_WEIGHTS}, got {subset_of_weights!r}")
        structures = HESSIAN_STRUCTURES[subset_of_weights]
        if hessian_structure not in structures:
            raise ValueError(
                f"hessian_structure must be one of {structures} with subset_of_weights={subset_of_weights!r}, "
                f"got {hessian_structure!r}"
            )
        pred_type = pred_type or ("glm" if subset_of_weights == "last_layer" else "nn")
        link_approx = link_approx or ("probit" if pred_type == "glm" else "mc")
        if pred_type not in PRED_TYPES:
            raise ValueError(f"pred_type must be one of {PRED_TYPES}, got {pred_type!r}")
        if link_approx not in LINK_APPROXES:
            raise ValueError(f"link_approx must be one of {LINK_APPROXES}, got {link_approx!r}")
        if pred_type == "nn" and link_approx != "mc":
            raise ValueError('pred_type="nn" samples weights: it takes link_approx="mc" only')
        if subset_of_weights == "lora" and pred_type != "nn":
            raise ValueError(
                'subset_of_weights="lora" predicts with pred_type="nn" only (laplace-torch\'s GLM predictive needs '
                "every weight of the model to require grad)"
            )
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        _validate_prior_precision(prior_precision)
        self.subset_of_weights = subset_of_weights
        self.hessian_structure = hessian_structure
        self.prior_precision = float(prior_precision)
        self.pred_type = pred_type
        self.link_approx = link_approx
        self.n_samples = n_samples
        self.backend = backend
        self.adapter_name = adapter_name
        self.seed = seed
        self.laplace: BaseLaplace | None = None  # laplace-torch's object, once fitted (or rebuilt after a load)
        self._loaded_state: dict[str, torch.Tensor] | None = None  # a loaded state, until a model rebuilds it

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(subset_of_weights={self.subset_of_weights!r}, "
            f"hessian_structure={self.hessian_structure!r}, prior_precision={self.prior_precision:.4g}, "
            f"pred_type={self.pred_type!r}, link_approx={self.link_approx!r})"
        )

    @property
    def variant(self) -> str:
        return (
            f"{self.subset_of_weights}, {self.hessian_structure} Hessian ({self.backend}), "
            f"{self.pred_type}/{self.link_approx} predictive"
        )

    # fitting

    def fit(self, model: nn.Module, dataloader: Batches) -> None:
        """Compute the Hessian approximation at the trained weights over `dataloader` (the training split)."""
        if self.subset_of_weights == "last_layer":
            features, labels = labeled(*_features_and_labels(model, dataloader))
            self.laplace = self._new_last_layer_laplace(model)
            batch_size = len(labels) if self.hessian_structure == "kron" else LAST_LAYER_CHUNK
            # K-FAC on one batch is the exact Kronecker product of the summed factors; diag/full sum exactly per batch
            self.laplace.fit(DataLoader(TensorDataset(features.double(), labels), batch_size=batch_size))
        else:
            self.adapter_name = self.adapter_name or model.active_adapter
            with self._lora_network(model) as network:
                self.laplace = self._new_lora_laplace(network)
                self.laplace.fit(_ScoredBatches(dataloader, model_device(model)))
        self.laplace.prior_precision = self.prior_precision
        self._loaded_state = None

    def log_marginal_likelihood(self, prior_precision: float | None = None) -> float:
        """laplace-torch's Laplace evidence of the training data at `prior_precision` (default the current one)."""
        laplace = self._fitted()
        value = self.prior_precision if prior_precision is None else prior_precision
        _validate_prior_precision(value)
        return float(laplace.log_marginal_likelihood(torch.tensor([float(value)], dtype=laplace._dtype)))

    def optimize_prior_precision(
        self,
        method: str = "marglik",
        model: nn.Module | None = None,
        dataloader: Batches | None = None,
        n_steps: int = 100,
        log_prior_prec_min: float = -4,
        log_prior_prec_max: float = 4,
        grid_size: int = 21,
    ) -> float:
        """Tune one (scalar) prior precision with laplace-torch and return it.

        `"marglik"` maximises the marginal likelihood of the training data by gradient steps on its log
        (`n_steps`); `"gridsearch"` picks, among `grid_size` values log-evenly spaced from 10^`log_prior_prec_min`
        to 10^`log_prior_prec_max`, the one with the lowest NLL of this posterior's predictive on `dataloader`, a
        dev split of `model`.
        """
        laplace = self._fitted()
        options = {"pred_type": self.pred_type, "link_approx": self.link_approx, "n_samples": self.n_samples}
        if method not in PRIOR_METHODS:
            raise ValueError(f"method must be one of {PRIOR_METHODS}, got {method!r}")
        if method == "gridsearch" and (model is None or dataloader is None):
            raise ValueError('method="gridsearch" needs the model and a dev dataloader')
        with warnings.catch_warnings():
            # laplace-torch reminds callers to tune with the link_approx they predict with, which we pass
            warnings.filterwarnings("ignore", message="By default `link_approx` is `probit`")
            if method == "marglik":
                laplace.optimize_prior_precision(
                    method="marglik", n_steps=n_steps, prior_structure="scalar", **options
                )
            else:
                grid = torch.logspace(log_prior_prec_min, log_prior_prec_max, grid_size, dtype=torch.float64)
                self._choose_on_grid(model, dataloader, grid)
        self.prior_precision = float(laplace.prior_precision.reshape(-1)[0])
        return self.prior_precision

    def _choose_on_grid(self, model: nn.Module, dataloader: Batches, grid: torch.Tensor) -> None:
        if len(grid) == 0:
            raise ValueError("the prior precision grid is empty")
        options = {"pred_type": self.pred_type, "link_approx": self.link_approx, "n_samples": self.n_samples}
        if self.subset_of_weights == "last_layer":
            features, labels = labeled(*_features_and_labels(model, dataloader))
            val_loader = DataLoader(TensorDataset(features.double(), labels), batch_size=LAST_LAYER_CHUNK)
            with seeded(self.seed, torch.device("cpu")):
                self.laplace.optimize_prior_precision(
                    method="gridsearch",
                    val_loader=val_loader,
                    log_prior_prec_min=math.log10(grid[0]),
                    log_prior_prec_max=math.log10(grid[-1]),
                    grid_size=len(grid),
                    **options,
                )
            return
        # LoRA: laplace-torch's grid search feeds its predictive the dev batches whole, which it cannot align with
        # token labels; score each grid value with the same (laplace-torch) predictive through predict_proba
        labels = collect_labels(dataloader)
        nlls = []
        for value in grid.tolist():
            self.laplace.prior_precision = value
            probs, flat_labels = labeled(self.predict_proba(model, dataloader), labels)
            nlls.append(float(-probs.gather(1, flat_labels[:, None]).clamp_min(1e-12).log().mean()))
        self.laplace.prior_precision = float(grid[min(range(len(grid)), key=nlls.__getitem__)])

    # prediction

    def predict_proba(self, model: nn.Module, dataloader: Batches) -> torch.Tensor:
        """Predictive probabilities aligned with `collect_labels(dataloader)` ([N, C] or padded [N, T, C])."""
        if self.subset_of_weights == "last_layer":
            laplace = self._posterior(model)
            features, _ = _features_and_labels(model, dataloader)
            flat = features.reshape(-1, features.shape[-1]).double()
            with seeded(self.seed, torch.device("cpu")):
                probs = torch.cat(
                    [
                        self._call(laplace, flat[start : start + LAST_LAYER_CHUNK])
                        for start in range(0, len(flat), LAST_LAYER_CHUNK)
                    ]
                )
            return probs.reshape(*features.shape[:-1], -1).float()
        laplace = self._posterior(model)
        device = model_device(model)
        parts = []
        adapter = self.adapter_name or model.active_adapter
        with using_adapter(model, adapter), prediction_mode(model), _kept_parameter_storage(laplace.params):
            for batch in dataloader:
                inputs, _ = split_batch(batch, device)
                with seeded(self.seed, device), torch.no_grad():  # the same weight samples for every batch
                    parts.append(self._call(laplace, inputs).float().cpu())
        if not parts:
            raise ValueError("the dataloader yielded no batches")
        # positions a shorter batch lacks get uniform probabilities, the softmax of the zero logits others pad with
        return _concat_batches(parts, parts[0].dim() == 3, 1.0 / parts[0].shape[-1])

    def _call(self, laplace: BaseLaplace, inputs) -> torch.Tensor:
        return laplace(inputs, pred_type=self.pred_type, link_approx=self.link_approx, n_samples=self.n_samples)

    # persistence

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self._loaded_state is not None:
            return dict(self._loaded_state)
        laplace = self._fitted()
        laplace.prior_precision = self.prior_precision
        full = laplace.state_dict()
        state = {
            "mean": full["mean"].detach(),
            "loss": torch.as_tensor(float(full["loss"]), dtype=torch.float64),
            "prior_precision": torch.tensor(self.prior_precision, dtype=torch.float64),
            "n_data": torch.tensor(int(full["n_data"])),
            "n_outputs": torch.tensor(int(full["n_outputs"])),
        }
        if self.hessian_structure == "kron":
            for block, factors in enumerate(full["H"]):
                state.update({f"H.{block}.{index}": factor.detach() for index, factor in enumerate(factors)})
        else:
            state["H"] = full["H"].detach()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a state saved with the same `subset_of_weights` and `hessian_structure`; the laplace-torch object is
        rebuilt on the model at the first prediction."""
        owner = f"{type(self).__name__}({self.variant})"
        required = {"mean", "loss", "prior_precision", "n_data", "n_outputs"}
        hessian_keys = {key for key in state if key == "H" or key.startswith("H.")}
        expected_hessian = "K-FAC factors H.<block>.<factor>" if self.hessian_structure == "kron" else "H"
        kron_keys = all(key.startswith("H.") for key in hessian_keys)
        if (
            not required <= state.keys()
            or not hessian_keys
            or (self.hessian_structure == "kron") != kron_keys
            or state.keys() - required - hessian_keys
        ):
            raise ValueError(
                f"{owner} state does not match: needs {sorted(required)} and {expected_hessian}, "
                f"got {sorted(state)[:8]}"
            )
        _validate_prior_precision(float(state["prior_precision"]))
        self.prior_precision = float(state["prior_precision"])
        self._loaded_state = dict(state)
        self.laplace = None

    def _posterior(self, model: nn.Module) -> BaseLaplace:
        """The fitted laplace-torch object, rebuilt on `model` from a loaded state if need be."""
        if (
            self._loaded_state is None
            and self.subset_of_weights == "lora"
            and self._fitted().model.model is not model
        ):
            self._loaded_state = self.state_dict()  # fitted on another model: rebuild on this one
        if self._loaded_state is None:
            laplace = self._fitted()
        elif self.subset_of_weights == "last_layer":
            laplace = self._new_last_layer_laplace(model)
            self._load_into(laplace, self._loaded_state)
        else:
            self.adapter_name = self.adapter_name or model.active_adapter
            with self._lora_network(model) as network:
                laplace = self._new_lora_laplace(network)
                self._load_into(laplace, self._loaded_state)
        if self._loaded_state is not None:
            self.laplace, self._loaded_state = laplace, None
        laplace.prior_precision = self.prior_precision
        return laplace

    def _load_into(self, laplace: BaseLaplace, state: dict[str, torch.Tensor]) -> None:
        if state["mean"].numel() != laplace.n_params:
            raise ValueError(
                f"the model's {'head' if self.subset_of_weights == 'last_layer' else 'LoRA weights'} do not match "
                f"this Laplace state: {laplace.n_params} parameters, the state has {state['mean'].numel()}"
            )
        dtype = laplace._dtype
        if self.hessian_structure == "kron":
            blocks: dict[int, dict[int, torch.Tensor]] = {}
            for key, value in state.items():
                if key.startswith("H."):
                    _, block, index = key.split(".")
                    blocks.setdefault(int(block), {})[int(index)] = value.to(dtype)
            hessian = [[factors[index] for index in sorted(factors)] for _, factors in sorted(blocks.items())]
        else:
            hessian = state["H"].to(dtype)
        laplace.load_state_dict(
            {
                "mean": state["mean"].to(dtype),
                "H": hessian,
                "loss": state["loss"].to(dtype),
                "prior_mean": torch.tensor(0.0, dtype=dtype),
                "prior_precision": torch.tensor([float(state["prior_precision"])], dtype=dtype),
                "sigma_noise": torch.tensor(1.0, dtype=dtype),
                "n_data": int(state["n_data"]),
                "n_outputs": int(state["n_outputs"]),
                "likelihood": "classification",
                "temperature": 1.0,
                "enable_backprop": False,
                "cls_name": type(laplace).__name__,
                "data": None,
                "_last_layer_name": HEAD_NAME,
            }
        )

    # building laplace-torch objects

    def _new_last_layer_laplace(self, model: nn.Module) -> BaseLaplace:
        """Last-layer Laplace over a float64 copy of the head, fed with the head's input features."""
        head = classification_head(model)
        copy = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, dtype=torch.float64)
        with torch.no_grad():
            copy.weight.copy_(head.weight)
            if head.bias is not None:
                copy.bias.copy_(head.bias)
        laplace_class, curvature = _laplace_torch()
        return laplace_class(
            nn.Sequential(copy),
            "classification",
            subset_of_weights="last_layer",
            hessian_structure=self.hessian_structure,
            prior_precision=self.prior_precision,
            backend=getattr(curvature, self.backend),
            last_layer_name=HEAD_NAME,
        )

    def _new_lora_laplace(self, network: nn.Module) -> BaseLaplace:
        # the labels of a batch are those of its labeled positions, so their count is the batch's number of data
        # points (laplace-torch reads it from `dict_key_x`)
        laplace_class, curvature = _laplace_torch()
        return laplace_class(
            network,
            "classification",
            subset_of_weights="all",
            hessian_structure=self.hessian_structure,
            prior_precision=self.prior_precision,
            backend=getattr(curvature, self.backend),
            dict_key_x="labels",
            dict_key_y="labels",
        )

    @contextlib.contextmanager
    def _lora_network(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model as laplace-torch sees it, with only this adapter's LoRA weights requiring grad; the model's
        mode, active adapter and grad flags come back afterwards."""
        lora, _ = adapter_parameter_groups(model, self.adapter_name)
        lora_ids = {id(param) for param in lora.values()}
        with using_adapter(model, self.adapter_name or model.active_adapter), prediction_mode(model):
            flags = {param: param.requires_grad for param in model.parameters()}
            for param in model.parameters():
                param.requires_grad_(id(param) in lora_ids)
            try:
                with torch.enable_grad():
                    yield _LogitsNetwork(model)
            finally:
                for param, flag in flags.items():
                    param.requires_grad_(flag)

    def _fitted(self) -> BaseLaplace:
        if self.laplace is None:
            if self._loaded_state is not None:
                raise RuntimeError("this Laplace state was loaded: predict_proba(model, ...) rebuilds it first")
            raise RuntimeError("the Laplace approximation is not fitted: call fit() or load() first")
        return self.laplace


class _LogitsNetwork(nn.Module):
    """An HF classifier as a function of one dict batch, returning logits: all of them, or, when the batch carries
    `SCORED`, those of the labeled positions (one row per position) to align with its flattened labels."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        inputs = {name: value for name, value in batch.items() if name not in ("labels", SCORED)}
        logits = self.model(**inputs).logits
        return logits[batch[SCORED]] if SCORED in batch else logits


class _Count:
    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count


class _ScoredBatches:
    """Dict batches for laplace-torch: model inputs, the mask of labeled positions and their labels, on `device`.
    `dataset` has the number of labeled positions as its length, the N laplace-torch scales the Hessian by."""

    def __init__(self, dataloader: Batches, device: torch.device):
        self.dataloader = dataloader
        self.device = device
        count = int((collect_labels(dataloader) != IGNORE_INDEX).sum())
        if count == 0:
            raise ValueError("the dataloader holds no labeled examples")
        self.dataset = _Count(count)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.dataloader:
            inputs, labels = split_batch(batch, self.device)
            scored = (labels != IGNORE_INDEX).to(self.device)
            if scored.any():
                yield {**inputs, SCORED: scored, "labels": labels.to(self.device)[scored]}


def _features_and_labels(model: nn.Module, dataloader: Batches) -> tuple[torch.Tensor, torch.Tensor]:
    collected = collect_logits(model, dataloader, capture_features=True)
    return collected.features, collected.labels


@contextlib.contextmanager
def _kept_parameter_storage(parameters: Iterable[nn.Parameter]) -> Iterator[None]:
    """laplace-torch's sampling predictive leaves the parameters as views of its posterior mean; give them their
    own storage back (same values) so that the model and the posterior never alias."""
    parameters = list(parameters)
    storages = [param.data for param in parameters]
    try:
        yield
    finally:
        for param, storage in zip(parameters, storages, strict=True):
            param.data = storage


def _validate_prior_precision(value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"prior precision must be a positive finite number, got {value}")

