"""The uncertainty baselines as `peft-umema` methods, so that `train`, `evaluate` and the comparison run them.

Every method here trains its adapters exactly as the `lora` method does (they subclass `LoRAMethod`), so what
differs in a comparison is the uncertainty technique alone. Importing this module registers:

- `lora+ts`: LoRA, then one temperature fitted on the dev split.
- `mcdropout`: LoRA, predicting with dropout on, averaged over `samples` passes.
- `ensemble`: `members` LoRA adapters trained under different seeds on one base model, probabilities averaged.
- `swag`: LoRA-SWAG, snapshots of the LoRA weights at every optimizer step from epoch `start_epoch` on, a
  deviation matrix of rank `rank`, predictions averaged over `samples` weight samples.
- `multiswag`: `runs` SWAG runs under different seeds, `samples` weight samples each.
- `adue`: LoRA's predictions, with AdUE's confidence (head fitted on dev); also reports the error-detection AUROC of
  the softmax response and of the Mahalanobis distance (fitted on train).
- `laplace`: a laplace-torch posterior over the classification head (`subset_of_weights="last_layer"`, K-FAC GGN,
  GLM predictive with the probit link) or over the LoRA weights (`"lora"`, K-FAC GGN, `n_samples` weight samples);
  prior precision by marginal likelihood on train (laplace-torch's option names throughout).

`lora+ts`, `mcdropout`, `adue` and `laplace` are post hoc (`PostHocMethod`): they start from a trained `lora` fit
and leave it unchanged. So do `ensemble` (its member 0 is that fit) and `multiswag` (its run 0 is a `swag` fit with
the same options): they are all `DerivedMethod`s, to which the comparison hands the fit it already made for their base,
once per seed. Options come from `configured_method(name, options)`; a fitted method's options and seed are saved
beside its states, so that a run folder reloads with what it was fitted with.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from abc import abstractmethod
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import Trainer

from ..baselines.adue import AdUE, MahalanobisDistance
from ..baselines.ensemble import LoraEnsemble
from ..baselines.laplace import PRIOR_METHODS as LAPLACE_PRIOR_METHODS
from ..baselines.laplace import LaplaceApproximation
from ..baselines.mc_dropout import MCDropout
from ..baselines.persistence import SafetensorsState
from ..baselines.prediction import collect_labels, collect_logits
from ..baselines.swag import LoraSwag, MultiSwag, SwagCallback
from ..baselines.temperature import TemperatureScaling
from ..data.preprocessing import IGNORE_INDEX
from ..evaluation.metrics import error_detection_auroc
from .methods import (
    Fitted,
    LoRAMethod,
    Method,
    Predictions,
    RunSetup,
    confidence_and_correctness,
    get_method,
    register_method,
    write_json,
)

METHOD_STATE_NAME = "method_state.json"
# Member i of an ensemble (or MultiSWAG run i) trains under seed + i * stride: distinct from the members of the
# neighbouring seeds of a comparison, and member 0 is the run's own seed.
MEMBER_SEED_STRIDE = 1000
DEFAULT_ADAPTER = "default"


# ----------------------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------------------


def _check_positive_integers(options, *names: str) -> None:
    for name in names:
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """For methods without options."""


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    samples: int = 10

    def __post_init__(self):
        _check_positive_integers(self, "samples")


@dataclasses.dataclass(frozen=True)
class EnsembleOptions:
    members: int = 3

    def __post_init__(self):
        _check_positive_integers(self, "members")


@dataclasses.dataclass(frozen=True)
class SwagOptions:
    """`start_epoch` is a float epoch, as the Trainer counts them: 1.0 collects from the second epoch on."""

    start_epoch: float = 1.0
    rank: int = 10
    samples: int = 10

    def __post_init__(self):
        _check_positive_integers(self, "rank", "samples")
        if isinstance(self.start_epoch, bool) or not isinstance(self.start_epoch, (int, float)) or self.start_epoch < 0:
            raise ValueError(f"start_epoch must be a number >= 0, got {self.start_epoch!r}.")


@dataclasses.dataclass(frozen=True)
class MultiSwagOptions(SwagOptions):
    """`samples` counts per run, so predicting costs `runs * samples` passes."""

    runs: int = 3

    def __post_init__(self):
        super().__post_init__()
        _check_positive_integers(self, "runs")


@dataclasses.dataclass(frozen=True)
class LaplaceOptions:
    """laplace-torch's options (see `baselines.laplace`): `subset_of_weights` "last_layer" (the head) or "lora" (the
    LoRA weights), `hessian_structure`, the curvature `backend`, how to `optimize_prior_precision` ("marglik" on
    train, "gridsearch" by NLL on dev), `pred_type` and `link_approx` (None: "glm"/"probit" for the last layer,
    "nn"/"mc" for LoRA) and `n_samples` for the sampled predictives."""

    subset_of_weights: str = "last_layer"
    hessian_structure: str = "kron"
    backend: str = "CurvlinopsGGN"
    optimize_prior_precision: str = "marglik"
    pred_type: Optional[str] = None
    link_approx: Optional[str] = None
    n_samples: int = 20

    def __post_init__(self):
        _check_positive_integers(self, "n_samples")
        if self.optimize_prior_precision not in LAPLACE_PRIOR_METHODS:
            raise ValueError(
                f"optimize_prior_precision must be one of {LAPLACE_PRIOR_METHODS}, got {self.optimize_prior_precision!r}."
            )
        laplace = _laplace(self, seed=0)  # checks the combination, and fills in the default predictive
        object.__setattr__(self, "pred_type", laplace.pred_type)
        object.__setattr__(self, "link_approx", laplace.link_approx)


# ----------------------------------------------------------------------------------------------------------------
# Shared machinery
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BaselineFitted(Fitted):
    """A fitted baseline: the PeftModel, the options and seed it was fitted with, and its post-hoc states by name
    (each saved as `<name>.safetensors`)."""

    options: Any = None
    seed: int = 0
    states: dict[str, SafetensorsState] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class AdUEPredictions(Predictions):
    """AdUE's predictions also carry the Mahalanobis confidence, one of the two scores AdUE is compared with."""

    mahalanobis: Optional[list[np.ndarray]] = None


class BaselineMethod(LoRAMethod):
    """A LoRA-based baseline with options, post-hoc states saved as safetensors, and sampled predictions.

    Subclasses say which states they hold (`new_states`), how they predict (`predict_outputs`, padded tensors as
    the baselines return them) and how many passes over the data that takes (`prediction_passes`, for the
    progress bar); saving, reloading and the conversion to `Predictions` are shared.
    """

    options_class: type = NoOptions
    predictions_class: type = Predictions

    def __init__(self, **options):
        names = [field.name for field in dataclasses.fields(self.options_class)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(f"Method {self.name!r} has no option(s) {unknown}; its options are {names or 'none'}.")
        self.options = self.options_class(**options)

    @abstractmethod
    def new_states(self, model: torch.nn.Module, options, seed: int) -> dict[str, SafetensorsState]:
        """Unfitted states of the right configuration for `model`, to load saved ones into."""

    @abstractmethod
    def predict_outputs(self, fitted: BaselineFitted, batches: Iterable) -> dict[str, torch.Tensor]:
        """`probs` (and optionally `confidence`, ...), [N, C] / [N] or padded [N, T, C] / [N, T] like the labels."""

    def prediction_passes(self, options) -> int:
        return 1

    def trained_copies(self, options) -> int:
        """How many adapters were trained (ensemble members, MultiSWAG runs), for the parameter count."""
        return 1

    def method_details(self, fitted: BaselineFitted, predictions: Predictions) -> dict:
        return {"options": dataclasses.asdict(fitted.options)}

    def fitted_from(self, base: Fitted, setup: RunSetup, states: Optional[dict] = None) -> BaselineFitted:
        return BaselineFitted(
            model=base.model, log_history=base.log_history, options=self.options, seed=setup.seed, states=states or {}
        )

    def predict(self, fitted: BaselineFitted, batches: DataLoader, progress: bool = True) -> Predictions:
        labels = collect_labels(batches)
        total = self.prediction_passes(fitted.options) * len(batches)
        with tqdm(total=total, desc=f"Predicting ({self.name})", disable=not progress, leave=False) as bar:
            outputs = self.predict_outputs(fitted, _TickingBatches(batches, bar))
        return self.predictions_class(**_per_prediction(outputs, labels))

    def parameter_counts(self, fitted: BaselineFitted) -> tuple[int, int]:
        trainable, total = super().parameter_counts(fitted)
        return trainable * self.trained_copies(fitted.options), total

    def save(self, fitted: BaselineFitted, output_dir: Path) -> None:
        super().save(fitted, output_dir)
        self.save_states(fitted, output_dir)

    def save_states(self, fitted: BaselineFitted, output_dir: Path) -> None:
        """The post-hoc states (`<name>.safetensors`) and the options and seed (`method_state.json`)."""
        for name, state in fitted.states.items():
            state.save(output_dir / f"{name}.safetensors")
        write_json(
            output_dir / METHOD_STATE_NAME,
            {"method": self.name, "options": dataclasses.asdict(fitted.options), "seed": fitted.seed},
        )

    def load(self, output_dir: Path, run_info: dict) -> BaselineFitted:
        info_path = output_dir / METHOD_STATE_NAME
        if not info_path.is_file():
            raise FileNotFoundError(
                f"{output_dir} has no {METHOD_STATE_NAME}, which a {self.name!r} run folder holds (its options and "
                "seed); re-run `peft-umema train` to write a complete run folder."
            )
        info = json.loads(info_path.read_text(encoding="utf-8"))
        options = self.options_class(**info["options"])
        model = self.load_model(output_dir, run_info, options)
        states = self.new_states(model, options, info["seed"])
        for name, state in states.items():
            state.load(output_dir / f"{name}.safetensors")
        return BaselineFitted(model=model, options=options, seed=info["seed"], states=states)

    def load_model(self, output_dir: Path, run_info: dict, options) -> torch.nn.Module:
        return super().load(output_dir, run_info).model


class DerivedMethod(BaselineMethod):
    """A method that starts from the fit of another (`base_method`) and leaves that fit unchanged (`fit_on`), so that
    the comparison fits each base once per seed and hands the same fit to every method that builds on it."""

    def fit(self, setup: RunSetup) -> BaselineFitted:
        return self.fit_on(self.base_method().fit(setup), setup)

    @abstractmethod
    def base_method(self) -> Method:
        """The method whose fit on the same setup this one starts from."""

    @abstractmethod
    def fit_on(self, base: Fitted, setup: RunSetup) -> BaselineFitted:
        """Fit this method from `base` (the base method's fit on `setup`), without changing `base`."""


class PostHocMethod(DerivedMethod):
    """A method fitted on top of a trained `lora` fit, without further training of the adapter."""

    def base_method(self) -> Method:
        return get_method(LoRAMethod.name)


class _TickingBatches:
    """Batches that advance `bar` once each, however many passes a sampling method makes over them."""

    def __init__(self, batches: Iterable, bar: tqdm):
        self.batches = batches
        self.bar = bar

    def __iter__(self):
        for batch in self.batches:
            yield batch
            self.bar.update()


def _per_prediction(outputs: Mapping[str, torch.Tensor], labels: torch.Tensor) -> dict[str, list[np.ndarray]]:
    """The baselines' padded outputs as `Predictions` fields: one entry per example, and for token tasks the
    positions that carry a label only, as `collect_predictions` gives them."""
    arrays = {name: value.float().numpy() for name, value in outputs.items()}
    arrays["labels"] = labels.numpy()
    if labels.dim() == 1:
        return {name: list(values) for name, values in arrays.items()}
    scored = arrays["labels"] != IGNORE_INDEX
    return {name: [values[row][scored[row]] for row in range(len(scored))] for name, values in arrays.items()}


def _batches(setup: RunSetup, dataset) -> DataLoader:
    """`dataset` (the train or dev split of `setup`) in order, batched for prediction."""
    return DataLoader(dataset, batch_size=2 * setup.options.batch_size, collate_fn=setup.collator)


def _member_setup(setup: RunSetup, index: int) -> RunSetup:
    """Member `index` of an ensemble or MultiSWAG: its own seed and checkpoint folder, the same data."""
    return dataclasses.replace(
        setup, seed=_member_seed(setup.seed, index), work_dir=setup.work_dir / f"member_{index}"
    )


def _member_seed(seed: int, index: int) -> int:
    return seed + MEMBER_SEED_STRIDE * index


def _fit_with_trainer(method: LoRAMethod, setup: RunSetup, trainer_class) -> Fitted:
    """`LoRAMethod.fit` with its Trainer built by `trainer_class`; a copy of `method` carries it, so the registered
    method stays as it is."""
    fitting = copy.copy(method)
    fitting.trainer_class = trainer_class
    return LoRAMethod.fit(fitting, setup)


def _flat(values: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.reshape(value, -1) for value in values])


# ----------------------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------------------


class TemperatureScaledLoRA(PostHocMethod):
    name = "lora+ts"
    description = "LoRA, then temperature scaling fitted on the dev split"

    def fit_on(self, base: Fitted, setup: RunSetup) -> BaselineFitted:
        scaling = TemperatureScaling()
        scaling.fit(base.model, _batches(setup, setup.eval_dataset))
        return self.fitted_from(base, setup, {"temperature": scaling})

    def new_states(self, model, options, seed):
        return {"temperature": TemperatureScaling()}

    def predict_outputs(self, fitted, batches):
        return {"probs": fitted.states["temperature"].predict_proba(fitted.model, batches)}

    def method_details(self, fitted, predictions):
        return {**super().method_details(fitted, predictions), "temperature": fitted.states["temperature"].temperature}

    def parameter_counts(self, fitted):
        trainable, total = super().parameter_counts(fitted)
        return trainable + 1, total + 1  # the temperature


class MCDropoutMethod(PostHocMethod):
    name = "mcdropout"
    description = "LoRA, predicting with dropout on, probabilities averaged over `samples` passes"
    options_class = SamplingOptions

    def fit_on(self, base, setup):
        return self.fitted_from(base, setup)

    def new_states(self, model, options, seed):
        return {}

    def prediction_passes(self, options):
        return options.samples

    def predict_outputs(self, fitted, batches):
        sampler = MCDropout(num_samples=fitted.options.samples, seed=fitted.seed)
        return {"probs": sampler.predict_proba(fitted.model, batches)}


class EnsembleMethod(DerivedMethod):
    """Member 0 is a `lora` fit under the run's seed, the `default` adapter; the others train under their own seeds
    and are copied onto (a copy of) its model as `member_1`, ...: one base model carrying `members` adapters."""

    name = "ensemble"
    description = "`members` LoRA adapters trained under different seeds on one base model, probabilities averaged"
    options_class = EnsembleOptions

    def base_method(self) -> Method:
        return get_method(LoRAMethod.name)

    def fit_on(self, base: Fitted, setup: RunSetup) -> BaselineFitted:
        model = copy.deepcopy(base.model)
        for index, name in enumerate(self.member_names(self.options)[1:], start=1):
            member = LoRAMethod.fit(self, _member_setup(setup, index)).model
            model.add_adapter(name, member.peft_config[DEFAULT_ADAPTER])
            set_peft_model_state_dict(model, get_peft_model_state_dict(member), adapter_name=name)
        model.set_adapter(DEFAULT_ADAPTER)
        return BaselineFitted(model=model, log_history=base.log_history, options=self.options, seed=setup.seed)

    @staticmethod
    def member_names(options: EnsembleOptions) -> list[str]:
        return [DEFAULT_ADAPTER] + [f"member_{index}" for index in range(1, options.members)]

    def new_states(self, model, options, seed):
        return {}

    def load_model(self, output_dir, run_info, options):
        model = super().load_model(output_dir, run_info, options)
        for name in self.member_names(options)[1:]:
            model.load_adapter(output_dir / name, adapter_name=name)  # save_pretrained puts each in a subfolder
        return model

    def prediction_passes(self, options):
        return options.members

    def trained_copies(self, options):
        return options.members

    def predict_outputs(self, fitted, batches):
        return {"probs": LoraEnsemble(self.member_names(fitted.options)).predict_proba(fitted.model, batches)}


class SwagMethod(BaselineMethod):
    name = "swag"
    description = "LoRA-SWAG: a Gaussian over the LoRA weights from their trajectory, `samples` weight samples"
    options_class = SwagOptions

    def fit(self, setup: RunSetup) -> BaselineFitted:
        lora, posterior = self.fit_swag_run(setup)
        return self.fitted_from(lora, setup, {"swag": posterior})

    def fit_swag_run(self, setup: RunSetup) -> tuple[Fitted, LoraSwag]:
        """Train LoRA as `lora` does, collecting a SWAG snapshot at every optimizer step from `start_epoch` on."""
        options, posteriors = self.options, []

        def trainer_collecting_snapshots(model, args, **kwargs) -> Trainer:
            trainer = Trainer(model=model, args=args, **kwargs)
            posteriors.append(_swag_posterior(model, options, args.seed))
            trainer.add_callback(SwagCallback(posteriors[-1], start_epoch=options.start_epoch, every_n_steps=1))
            return trainer

        lora = _fit_with_trainer(self, setup, trainer_collecting_snapshots)
        (posterior,) = posteriors
        if posterior.num_snapshots == 0:
            raise ValueError(
                f"SWAG collected no snapshot: training stopped at epoch {lora.log_history[-1].get('epoch')} before "
                f"start_epoch={options.start_epoch}; lower start_epoch or train for more epochs."
            )
        return lora, posterior

    def new_states(self, model, options, seed):
        return {"swag": _swag_posterior(model, options, seed)}

    def prediction_passes(self, options):
        return options.samples

    def predict_outputs(self, fitted, batches):
        return {"probs": fitted.states["swag"].predict_proba(fitted.model, batches)}

    def method_details(self, fitted, predictions):
        snapshots = {name: swag.num_snapshots for name, swag in fitted.states.items()}
        return {**super().method_details(fitted, predictions), "snapshots": snapshots}


def _swag_posterior(model, options: SwagOptions, seed: int) -> LoraSwag:
    return LoraSwag(model, max_rank=options.rank, num_samples=options.samples, seed=seed)


class MultiSwagMethod(DerivedMethod, SwagMethod):
    """Run 0 is a `swag` fit under the run's seed (with the same SWAG options), run i > 0 trains under its own seed.
    Every SWAG state also holds its head, so all runs sample on run 0's model."""

    name = "multiswag"
    description = "MultiSWAG: `runs` SWAG runs under different seeds, `samples` weight samples each"
    options_class = MultiSwagOptions

    def base_method(self) -> Method:
        options = self.options
        return SwagMethod(start_epoch=options.start_epoch, rank=options.rank, samples=options.samples)

    def fit_on(self, base: BaselineFitted, setup: RunSetup) -> BaselineFitted:
        posteriors = [base.states["swag"]]
        posteriors += [self.fit_swag_run(_member_setup(setup, index))[1] for index in range(1, self.options.runs)]
        return self.fitted_from(base, setup, {f"swag_{index}": posterior for index, posterior in enumerate(posteriors)})

    def new_states(self, model, options, seed):
        return {
            f"swag_{index}": _swag_posterior(model, options, _member_seed(seed, index)) for index in range(options.runs)
        }

    def prediction_passes(self, options):
        return options.runs * options.samples

    def trained_copies(self, options):
        return options.runs

    def predict_outputs(self, fitted, batches):
        return {"probs": MultiSwag(list(fitted.states.values())).predict_proba(fitted.model, batches)}


class AdUEMethod(PostHocMethod):
    """The AdUE head learns from the dev split, where the classifier makes mistakes (on its few-shot training set it
    makes almost none); the Mahalanobis scorer fits class means on the training split, as it is defined."""

    name = "adue"
    description = "LoRA's predictions with AdUE's confidence; also scores softmax response and Mahalanobis distance"
    predictions_class = AdUEPredictions

    def fit_on(self, base, setup):
        adue, mahalanobis = AdUE(seed=setup.seed), MahalanobisDistance()
        adue.fit(base.model, _batches(setup, setup.eval_dataset))
        mahalanobis.fit(base.model, _batches(setup, setup.train_dataset))
        return self.fitted_from(base, setup, {"adue": adue, "mahalanobis": mahalanobis})

    def new_states(self, model, options, seed):
        return {"adue": AdUE(seed=seed), "mahalanobis": MahalanobisDistance()}

    def predict_outputs(self, fitted, batches):
        collected = collect_logits(fitted.model, batches, capture_features=True)
        return {
            "probs": collected.logits.softmax(-1),
            "confidence": 1 - fitted.states["adue"].uncertainty_from_features(collected.features),
            "mahalanobis": fitted.states["mahalanobis"].confidence_from_features(collected.features),
        }

    def method_details(self, fitted, predictions: AdUEPredictions):
        max_probability, correct = confidence_and_correctness(predictions)
        confidences = {
            "adue": _flat(predictions.confidence),
            "softmax_response": max_probability,
            "mahalanobis": _flat(predictions.mahalanobis),
        }
        aurocs = {name: error_detection_auroc(confidence, correct) for name, confidence in confidences.items()}
        return {**super().method_details(fitted, predictions), "error_detection_auroc": aurocs}

    def parameter_counts(self, fitted):
        trainable, total = super().parameter_counts(fitted)
        head = sum(parameter.numel() for parameter in fitted.states["adue"].head.parameters())
        return trainable + head, total + head


class LaplaceMethod(PostHocMethod):
    name = "laplace"
    description = (
        "LoRA with a laplace-torch posterior over the head (`subset_of_weights=last_layer`) or the LoRA weights "
        "(`lora`)"
    )
    options_class = LaplaceOptions

    def fit_on(self, base, setup):
        laplace = _laplace(self.options, setup.seed)
        laplace.fit(base.model, _batches(setup, setup.train_dataset))
        if self.options.optimize_prior_precision == "marglik":
            laplace.optimize_prior_precision("marglik")
        else:
            laplace.optimize_prior_precision(
                "gridsearch", model=base.model, dataloader=_batches(setup, setup.eval_dataset)
            )
        return self.fitted_from(base, setup, {"laplace": laplace})

    def new_states(self, model, options, seed):
        return {"laplace": _laplace(options, seed)}

    def predict_outputs(self, fitted, batches):
        return {"probs": fitted.states["laplace"].predict_proba(fitted.model, batches)}

    def method_details(self, fitted, predictions):
        laplace = fitted.states["laplace"]
        return {
            **super().method_details(fitted, predictions),
            "variant": laplace.variant,
            "prior_precision": laplace.prior_precision,
        }


def _laplace(options: LaplaceOptions, seed: int) -> LaplaceApproximation:
    return LaplaceApproximation(
        options.subset_of_weights,
        options.hessian_structure,
        pred_type=options.pred_type,
        link_approx=options.link_approx,
        n_samples=options.n_samples,
        backend=options.backend,
        seed=seed,
    )


BASELINE_METHODS = tuple(
    register_method(method)
    for method in (
        TemperatureScaledLoRA(),
        MCDropoutMethod(),
        EnsembleMethod(),
        SwagMethod(),
        MultiSwagMethod(),
        AdUEMethod(),
        LaplaceMethod(),
    )
)


def configured_method(name: str, options: Optional[Mapping[str, Any]] = None) -> Method:
    """The registered method `name`, or, given `options` (e.g. `{"samples": 20}`), a new one of its kind with them."""
    method = get_method(name)
    if not options:
        return method
    if not isinstance(method, BaselineMethod):
        raise ValueError(f"Method {name!r} takes no options; got {sorted(options)}.")
    return type(method)(**options)
