"""The recipe: one typed, frozen description of a run.

A recipe is YAML on disk, validated once into a frozen ``Recipe`` (pydantic, unknown
keys forbidden). ``key=value`` overrides from the command line are applied to the
raw mapping *before* validation, so they are typed by the same schema. Relative
paths written in a recipe file resolve against that file's folder; paths given as
overrides resolve against the current directory. Derived quantities (λ, steps per
epoch, the learning rate at a step) are pure functions below, never stored back.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lnsgd.errors import LnsgdError

IMAGE_DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist", "svhn", "digits")
DATASETS = (*IMAGE_DATASETS, "mnist1d", "synthetic")


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class SyntheticData(Section):
    """The `synthetic` regression dataset (no download): y = teacher(x) on Gaussian x."""

    n: int = Field(40, ge=1, description="number of training examples")
    n_test: int = Field(200, ge=1, description="number of test examples")
    d: int = Field(100, ge=1, description="input dimension")
    sparsity: int = Field(5, ge=1, description="non-zeros of the sparse teacher w* (teacher=sparse_linear)")
    teacher: Literal["sparse_linear", "two_layer"] = Field(
        "sparse_linear", description="sparse_linear: y=<w*,x> with w* ≥ 0 sparse; two_layer: a random tanh network"
    )
    teacher_width: int = Field(4, ge=1, description="hidden units of the two_layer teacher")
    label_noise_std: float = Field(0.0, ge=0, description="noise added once to the stored training targets")
    seed: int = Field(0, description="seed of the data and the teacher (independent of the run seed)")


class DataConfig(Section):
    """Which dataset, where it lives, and which deterministic subset is used."""

    name: Literal[DATASETS] = Field(
        "digits",
        description="cifar10|cifar100|mnist|fashion_mnist|svhn (torchvision), digits (scikit-learn, offline), "
        "mnist1d (generated locally), synthetic (regression, see data.synthetic)",
    )
    root: str = Field("data", description="folder holding torchvision datasets (relative: to the recipe's folder)")
    download: bool = Field(False, description="let torchvision download a missing dataset")
    train_size: int | None = Field(
        None, ge=1, description="use this many training examples (a fixed subset, the same for every seed); null: all"
    )
    test_size: int | None = Field(None, ge=1, description="use this many test examples (a fixed subset); null: all")
    augment: Literal["none", "crop_flip"] = Field(
        "none",
        description="training-batch augmentation: none (as in the paper), or crop_flip (random crop with 4-pixel "
        "zero padding + horizontal flip, per example, on the device; image datasets only)",
    )
    synthetic: SyntheticData = Field(default_factory=SyntheticData, description="settings of the synthetic dataset")


class ModelConfig(Section):
    """The network. Input shape and number of outputs come from the dataset."""

    name: Literal["resnet18", "cnn", "mlp", "quadratic", "two_layer"] = Field(
        "mlp",
        description="resnet18 (CIFAR stem: 3x3 stride-1 conv, no max-pool), cnn (small conv net, 1-D or 2-D), "
        "mlp (two hidden layers), quadratic (f=<v*v,x>) and two_layer (theory lab)",
    )
    norm: Literal["groupnorm", "batchnorm", "none"] | None = Field(
        None, description="normalization layer; null: the model's default (groupnorm for resnet18, none otherwise)"
    )
    group_size: int | None = Field(
        None, ge=1,
        description="channels per group for groupnorm; must divide every layer's width; "
        "null: the model's default (32 for resnet18, as the paper's code; 16 otherwise)",
    )
    width: int | None = Field(
        None, ge=1, description="base width: resnet18 first-stage channels (64), cnn channels (32), mlp hidden units (512)"
    )
    init_scale: float = Field(0.1, gt=0, description="quadratic: v0 = init_scale * 1 (alpha in HaoChen et al.)")


class AdversarialInit(Section):
    """Phase 1 of `init-adversarial` (Liu, Papailiopoulos & Achlioptas 2019)."""

    replicas: int = Field(10, ge=1, description="copies of the training set, each with its own random labels")
    zero_fraction: float = Field(0.1, ge=0, lt=1, description="fraction of pixel locations (or features) zeroed per copy")
    memorize_acc: float = Field(0.99, gt=0, le=1, description="stop memorizing at this accuracy on the replicated set")
    memorize_epochs: int = Field(100, ge=1, description="epoch limit of the memorize phase (epochs over the replicated set)")
    memorize_lr: float | None = Field(None, gt=0, description="learning rate of the memorize phase; null: optim.lr")
    memorize_batch_size: int | None = Field(None, ge=1, description="batch size of the memorize phase; null: optim.batch_size")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="optimizer of both phases (the prototype used adam)")


class InitConfig(Section):
    """Where training starts: random initialization or a checkpoint."""

    checkpoint: str | None = Field(None, description="start from this checkpoint's weights (final.pt or last.pt); null: random")
    stop_loss: float = Field(1e-3, gt=0, description="init-* commands stop once train acc is 100% and train loss is below this")
    allow_unconverged: bool = Field(False, description="init-* commands exit 0 even if the stop condition was never reached")
    adversarial: AdversarialInit = Field(default_factory=AdversarialInit, description="settings of init-adversarial")


class NoiseConfig(Section):
    """Label noise, drawn fresh for every example of every step (or, for smooth, its expectation)."""

    kind: Literal["flip", "smooth", "sign", "gaussian", "none"] = Field(
        "none",
        description="flip (classification), smooth (no sampled noise: train on flip's expected loss, "
        "the label-smoothed CE — the control without the noise-driven regularizer), "
        "sign (y±sigma), gaussian (y+N(0,sigma²)), none (plain SGD)",
    )
    p: float = Field(
        0.0, ge=0, lt=1,
        description="flip: probability of replacing a label by a uniformly random other class; "
        "smooth: the same p, as label smoothing (1−p on the label, p/(C−1) on each other class)",
    )
    sigma: float = Field(0.0, ge=0, description="sign/gaussian: noise scale")


class ScheduleConfig(Section):
    """Learning-rate schedule over steps; warmup is linear from 0."""

    kind: Literal["constant", "cosine", "step"] = Field("constant", description="constant, cosine (to min_lr), or step")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warmup length in epochs")
    min_lr: float = Field(0.0, ge=0, description="cosine: final learning rate")
    milestones: tuple[int, ...] = Field((), description="step: epochs at which the rate is multiplied by gamma")
    gamma: float = Field(0.1, gt=0, description="step: multiplicative factor at each milestone")


class OptimConfig(Section):
    """SGD with heavy-ball momentum."""

    lr: float = Field(0.1, gt=0, description="learning rate η")
    momentum: float = Field(0.0, ge=0, lt=1, description="heavy-ball momentum β")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay")
    batch_size: int = Field(32, ge=1, description="minibatch size B (examples per step)")
    full_batch: bool = Field(False, description="one exact full-dataset gradient step per epoch instead of minibatches")
    chunk_size: int = Field(1024, ge=1, description="examples per chunk when accumulating full-batch gradients/evals")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="learning-rate schedule")


class TrainConfig(Section):
    """How long to train and how often to evaluate and checkpoint."""

    epochs: int = Field(10, ge=1, description="epochs to train (init-fullbatch: maximum GD steps)")
    eval_every: int = Field(1, ge=1, description="evaluate (one metrics row) every this many epochs")
    checkpoint_every: int = Field(1, ge=1, description="write checkpoints/last.pt every this many epochs")
    eval_batch_size: int = Field(2048, ge=1, description="batch size of evaluation passes")



def parse_measured_loss(text: str) -> tuple[str, float]:
    """``track.sharpness.loss`` / ``measure-sharpness --loss`` as (kind, value): ("expected", 0),
    ("clean", 0), ("flip", p) or ("gaussian", σ). Raises ValueError naming the valid forms."""
    if text in ("expected", "clean"):
        return text, 0.0
    kind, _, value = str(text).partition(":")
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if kind == "flip" and 0 < number < 1 or kind == "gaussian" and number > 0:
        return kind, number
    raise ValueError("expected 'expected', 'clean', 'flip:P' with 0 < P < 1 or 'gaussian:SIGMA' with SIGMA > 0")


def describe_measured_loss(which: str, loss: str, noise_kind: str, p: float, sigma: float) -> str:
    """What a sharpness measurement's loss is, in words that compare across runs: "flip p=0.2",
    "gaussian σ=0.1" or "clean" — ``which`` = "expected" resolved to the run's own noise
    (``loss``, ``noise_kind``, ``p``, ``sigma``; plain SGD's expected loss is the clean one)."""
    kind, value = parse_measured_loss(which)
    if kind == "expected":
        if noise_kind in ("flip", "smooth") and (p or 0) > 0 and loss == "cross_entropy":
            kind, value = "flip", p  # smooth trains on flip's expected loss itself
        elif noise_kind in ("sign", "gaussian") and (sigma or 0) > 0 and loss == "mse":
            kind, value = "gaussian", sigma  # ±σ and N(0, σ²) have the same expected MSE
        else:
            kind = "clean"
    if kind == "clean":
        return "clean"
    return f"flip p={value:g}" if kind == "flip" else f"gaussian σ={value:g}"

class SharpnessTrack(Section):
    """Curvature measured during training on a fixed subset of the training set."""

    every: int = Field(
        1, ge=1,
        description="measure every this many epochs: at the evaluations whose epoch is a multiple of it "
        "(keep it a multiple of train.eval_every)",
    )
    examples: int = Field(1000, ge=1, description="first N training examples used for the Hessian")
    hvps: int = Field(40, ge=4, description="Hessian-vector products per estimate")
    measures: tuple[Literal["trace", "lambda_max", "trace_gn", "R"], ...] = Field(
        ("trace",), description="which of trace, lambda_max, trace_gn, R to record"
    )
    loss: str = Field(
        "expected",
        description="the loss whose Hessian is measured: expected (over this run's noise), clean, or an explicit "
        "noise model flip:P or gaussian:SIGMA (pin it to compare arms, e.g. a plain-SGD control: flip:0.2)",
    )

    @field_validator("loss")
    @classmethod
    def _measured_loss(cls, v: str) -> str:
        parse_measured_loss(v)
        return v
    rtol: float | None = Field(
        None, gt=0, lt=1, description="stop spending trace HVPs once the standard error is below rtol·|tr∇²L| (hvps caps it); null: all"
    )
    trace_method: Literal["auto", "split", "xtrace", "hutchpp", "hutchinson"] = Field(
        "auto",
        description="tr∇²L estimator: auto (exact tr G, then probes of ∇²L − G or ∇²L, whichever a pilot finds less noisy), "
        "split (always ∇²L − G), or xtrace/hutchpp/hutchinson on ∇²L",
    )
    project: bool = Field(
        False,
        description="also measure at the nearest minimizer of the measured loss on the same examples (deterministic descent "
        "to ‖∇L‖ ≤ project_tol; sharp/proj_* columns); the run's parameters are never touched",
    )
    project_tol: float = Field(1e-4, gt=0, description="the projection stops once ‖∇L‖₂ of the measured loss is at most this")
    project_steps: int = Field(500, ge=1, description="the projection's step cap; one that does not converge within it warns")


class TrackConfig(Section):
    """Extra measurements during training."""

    sharpness: SharpnessTrack | None = Field(None, description="periodic curvature measurements; null: none")


class WandbConfig(Section):
    """Weights & Biases mirroring of metrics.jsonl."""

    mode: Literal["disabled", "offline", "online"] = Field("disabled", description="disabled, offline (local folder), online")
    project: str = Field("lnsgd", description="wandb project")
    entity: str | None = Field(None, description="wandb entity (user or team)")
    group: str | None = Field(None, description="wandb group (sweeps set it)")
    tags: tuple[str, ...] = Field((), description="wandb tags")


class LogConfig(Section):
    """Where run folders go."""

    dir: str = Field("runs", description="parent folder of run folders; the run goes to <dir>/<name>")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="wandb settings")


class TheoryConfig(Section):
    """Settings of `lnsgd theory` (exact-Hessian checks of Theorem 1; small models only)."""

    steps: int = Field(20000, ge=1, description="SGD steps of each trajectory (label noise, plain, regularized Φ)")
    eval_every: int = Field(200, ge=1, description="log one metrics row every this many steps")
    max_params: int = Field(400, ge=1, description="refuse models with more parameters (dense Hessians cost p² memory)")
    fit_steps: int = Field(0, ge=0, description="full-batch GD steps before the three trajectories (to an interpolating start)")
    fit_lr: float | None = Field(None, gt=0, description="learning rate of the fitting phase; null: optim.lr")


class Recipe(Section):
    """A complete, validated description of one run."""

    name: str = Field("run", min_length=1, description="run name; the run folder is <log.dir>/<name>")
    seed: int = Field(0, description="seed of initialization, batch order and label noise")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks cuda when available")
    precision: Literal["fp32", "tf32", "bf16"] = Field("fp32", description="training precision (curvature is always fp32+)")
    compile: Literal["off", "default", "cuda-graphs"] = Field(
        "off",
        description="the training step: off (eager), default (torch.compile of the whole step), "
        "cuda-graphs (compiled and replayed as a CUDA graph; GPU only)",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="dataset")
    model: ModelConfig = Field(default_factory=ModelConfig, description="network")
    init: InitConfig = Field(default_factory=InitConfig, description="starting point")
    loss: Literal["cross_entropy", "mse"] = Field("cross_entropy", description="cross_entropy, or mse = mean of ½‖f−y‖²")
    noise: NoiseConfig = Field(default_factory=NoiseConfig, description="label noise")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="optimizer")
    train: TrainConfig = Field(default_factory=TrainConfig, description="schedule of the run")
    track: TrackConfig = Field(default_factory=TrackConfig, description="extra measurements")
    log: LogConfig = Field(default_factory=LogConfig, description="outputs")
    theory: TheoryConfig = Field(default_factory=TheoryConfig, description="lnsgd theory settings")

    @field_validator("compile", mode="before")
    @classmethod
    def _bare_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` (or `no`) as false: `compile: off` must mean what it says.
        return "off" if value is False else value

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.noise.kind in ("flip", "smooth") and self.loss != "cross_entropy":
            raise ValueError(f"noise.kind={self.noise.kind} needs loss=cross_entropy (use sign or gaussian noise with mse)")
        if self.noise.kind in ("sign", "gaussian") and self.loss != "mse":
            raise ValueError(f"noise.kind={self.noise.kind} needs loss=mse (use flip noise with cross_entropy)")
        if self.noise.kind in ("flip", "smooth") and self.noise.p == 0:
            raise ValueError(f"noise.kind={self.noise.kind} needs noise.p > 0 (use noise.kind=none for plain SGD)")
        if self.noise.kind in ("sign", "gaussian") and self.noise.sigma == 0:
            raise ValueError(f"noise.kind={self.noise.kind} needs noise.sigma > 0 (use noise.kind=none for plain SGD)")
        if self.data.augment == "crop_flip" and self.data.name not in IMAGE_DATASETS:
            raise ValueError(
                f"data.augment=crop_flip needs an image dataset (C, H, W): one of {', '.join(IMAGE_DATASETS)}; "
                f"data.name={self.data.name} is not one (set data.augment=none)"
            )
        if self.data.name == "synthetic" and self.loss != "mse":
            raise ValueError("data.name=synthetic is regression: set loss=mse")
        return self


# --------------------------------------------------------------------------- loading


def format_validation_error(err: ValidationError, source: str, unknown_key: str | None = None) -> str:
    """One line for a pydantic error: ``source: loc: what is wrong; ...``.

    ``unknown_key`` replaces the message for keys the model does not have (a sweep spec
    lists its own keys); by default it points at `lnsgd validate`.
    """
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = ".".join(str(x) for x in e["loc"][:-1]) or "the top level"
            msg = unknown_key or f"unknown key (not a field of {parent}; `lnsgd validate` prints every field)"
        elif e["type"] == "literal_error":
            msg = f"{msg}, got {e.get('input')!r}"
        elif "input" in e and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{source}: " + "; ".join(parts)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (["a","b","c"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part.isidentifier() for part in key.split(".")):
        raise LnsgdError(
            f"malformed override {text!r}: expected key=value with a dotted recipe key, e.g. optim.lr=0.5 or noise.kind=flip"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The recipe section a field holds (``SharpnessTrack | None`` → SharpnessTrack); None for a value."""
    import typing

    if isinstance(annotation, type):
        return annotation if issubclass(annotation, BaseModel) else None
    return next(filter(None, (_section_model(a) for a in typing.get_args(annotation))), None)


def recipe_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every dotted recipe key, sections included: "optim", "optim.lr", ..."""
    keys = []
    for name, info in (model or Recipe).model_fields.items():
        keys.append(prefix + name)
        sub = _section_model(info.annotation)
        if sub is not None:
            keys += recipe_keys(sub, f"{prefix}{name}.")
    return keys


def _did_you_mean(key: str) -> str:
    """`` (did you mean `optim.lr`?)`` for a near miss of a recipe key: a typo of it, or its last part alone (lr)."""
    import difflib

    known = recipe_keys()
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.7)
    if not close:
        last = key.rsplit(".", 1)[-1]
        close = [k for k in known if k.rsplit(".", 1)[-1] == last][:1] or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def check_override_key(text: str) -> None:
    """An override's key must name a recipe field: the error names the override (not the recipe
    file, which is not where the typo is) and the nearest field."""
    keys, _ = parse_override(text)
    model: type[BaseModel] | None = Recipe
    for depth, k in enumerate(keys):
        if model is None:
            raise LnsgdError(f"override {text!r}: {'.'.join(keys[:depth])} is a value, not a section, so it has no field {k!r}")
        if k not in model.model_fields:
            raise LnsgdError(
                f"override {text!r}: {'.'.join(keys)}: unknown key{_did_you_mean('.'.join(keys))}; "
                "`lnsgd validate RECIPE --fields` lists every field"
            )
        model = _section_model(model.model_fields[k].annotation)


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Return a copy of ``raw`` with each ``key=value`` override set (validation happens later)."""
    result = _deepcopy(raw)
    for text in overrides:
        check_override_key(text)
        keys, value = parse_override(text)
        node = result
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            elif not isinstance(child, dict):
                raise LnsgdError(f"override {text!r}: {k} is not a section, so it has no field {keys[-1]!r}")
            node = child
        node[keys[-1]] = value
    return result


def _deepcopy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _deepcopy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deepcopy(v) for v in raw]
    return raw


def read_yaml(path: Path) -> dict:
    """Read a recipe file into a mapping, with one-line errors for the usual failures."""
    try:
        exists, is_dir = path.exists(), path.is_dir()  # raise where a parent folder cannot be searched
    except OSError as e:
        raise LnsgdError(f"cannot read recipe {path} ({e.strerror or e}); check that the file is readable") from None
    if not exists:
        raise LnsgdError(f"recipe {path} does not exist (give the path to a .yaml recipe, e.g. recipes/quickstart.yaml)")
    if is_dir:
        raise LnsgdError(f"recipe {path} is a folder; give a .yaml recipe file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise LnsgdError(f"recipe {path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise LnsgdError(f"recipe {path} is not a text file") from None
    except OSError as e:  # PermissionError, a file that vanished, an I/O error
        raise LnsgdError(f"cannot read recipe {path} ({e.strerror or e}); check that the file is readable") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise LnsgdError(f"recipe {path}: expected a mapping of sections (name, data, model, ...), got {type(raw).__name__}")
    return raw


# Recipe fields holding paths. Relative values resolve against the file that gives them (a
# recipe's or a sweep spec's folder), or against the current directory on the command line.
PATH_FIELDS = ("data.root", "init.checkpoint", "log.dir")


def _resolve_paths(raw: dict, base: Path) -> dict:
    out = _deepcopy(raw)
    for section, key in (f.split(".") for f in PATH_FIELDS):
        node = out.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str):
            p = Path(node[key]).expanduser()
            node[key] = str(p if p.is_absolute() else (base / p).resolve())
    return out


def validate_mapping(raw: dict, source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise LnsgdError(format_validation_error(e, source)) from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, resolve paths of, override and validate a recipe file."""
    path = Path(path)
    raw = read_yaml(path)
    if not raw:  # an empty file would silently run every default
        raise LnsgdError(f"recipe {path} is empty; give at least its name and sections, e.g. start from recipes/quickstart.yaml")
    raw = _resolve_paths(raw, path.resolve().parent)
    # Overrides carry paths relative to where the user typed them.
    raw = apply_overrides(raw, overrides)
    raw = _resolve_paths(raw, Path.cwd())
    recipe = validate_mapping(raw, source=str(path))
    # Defaults (data.root, log.dir) are relative to where lnsgd runs; store them absolute so
    # the run folder's recipe.yaml means the same thing wherever it is read from.
    return validate_mapping(_resolve_paths(recipe_to_dict(recipe), Path.cwd()), source=str(path))


def recipe_to_dict(recipe: Recipe) -> dict:
    """Plain, JSON/YAML-safe mapping of a recipe (tuples become lists)."""
    return recipe.model_dump(mode="json")


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def with_overrides(recipe: Recipe, overrides: list[str] | tuple[str, ...]) -> Recipe:
    """A new recipe with overrides applied (the original stays frozen and unchanged)."""
    return validate_mapping(apply_overrides(recipe_to_dict(recipe), overrides), source="recipe")


def recipe_from_dict(raw: dict, source: str = "recipe") -> Recipe:
    return validate_mapping(raw, source)


# What a run may change when it resumes: more epochs, other wandb settings.
RESUME_TOLERATED = ("train.epochs", "log.wandb")


def recipe_differences(new: dict, old: dict, ignore: tuple[str, ...] = (), prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) wherever two recipe mappings differ; keys under an ``ignore`` prefix are skipped."""
    diffs: list[tuple[str, Any, Any]] = []
    for k in sorted(set(new) | set(old)):
        key = f"{prefix}{k}"
        if key.startswith(ignore):
            continue
        a, b = new.get(k), old.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += recipe_differences(a, b, ignore, f"{key}.")
        elif a != b:
            diffs.append((key, b, a))
    return diffs


# --------------------------------------------------------------------------- derived values


def steps_per_epoch(recipe: Recipe, train_size: int) -> int:
    """Optimizer steps in one epoch: 1 for full batch, else ⌊n/B⌋ (the last partial batch is dropped)."""
    if recipe.optim.full_batch:
        return 1
    return train_size // recipe.optim.batch_size


def lambda_eff(recipe: Recipe, train_size: int) -> float:
    """λ of the implicit regularizer: ησ²/(B(1−β)) for sign/gaussian noise.

    For flip noise there is no σ; we report η/(B(1−β)), the factor multiplying the
    noise covariance (Damian et al. 2021, Sec. 3 with momentum, Sec. 5). B is the
    examples averaged per step: ``optim.batch_size``, or ``train_size`` (the whole
    training set) with ``optim.full_batch``. Without sampled noise (none, smooth)
    there is no noise-driven regularizer: 0.
    """
    o = recipe.optim
    batch = train_size if o.full_batch else o.batch_size
    base = o.lr / (batch * (1 - o.momentum))
    if recipe.noise.kind in ("sign", "gaussian"):
        return base * recipe.noise.sigma**2
    if recipe.noise.kind == "flip":
        return base
    return 0.0


def lr_at(recipe: Recipe, step: int, steps_per_epoch_: int) -> float:
    """Learning rate used for optimizer step ``step`` (0-based)."""
    s = recipe.optim.schedule
    base = recipe.optim.lr
    epoch = step / max(steps_per_epoch_, 1)
    warmup_steps = s.warmup_epochs * steps_per_epoch_
    if warmup_steps > 0 and step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if s.kind == "constant":
        return base
    if s.kind == "step":
        return base * s.gamma ** sum(1 for m in s.milestones if epoch >= m)
    total = recipe.train.epochs * steps_per_epoch_
    progress = (step - warmup_steps) / max(total - warmup_steps, 1)
    return s.min_lr + 0.5 * (base - s.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def field_help() -> list[tuple[str, str, str]]:
    """(dotted key, default, "type · description") for every recipe field, for `lnsgd validate --fields`.

    Read from pydantic's JSON schema of `Recipe`, so a section that is optional and off
    unless set (``track.sharpness``: null) gets a row of its own and then one row per
    field, like every other section. Defaults are JSON, as a recipe would write them
    (null, false, [], "run"). Types are written without "[word" brackets ("list of int"): the
    CLI prints this text as rich markup, which would swallow them.
    """
    import json  # here, not at the top: this function is the only user

    schema = Recipe.model_json_schema()
    defs = schema.get("$defs", {})
    rows: list[tuple[str, str, str]] = []

    def walk(section: dict, prefix: str) -> None:
        for name, prop in section["properties"].items():
            key = f"{prefix}{name}"
            # An optional field is anyOf [its type, null]; a section is a $ref to a $defs entry.
            branches = [_resolve_schema_ref(b, defs) for b in prop.get("anyOf", [prop])]
            sub = next((b for b in branches if "properties" in b), None)
            if sub is None or "default" in prop:  # a leaf, or a section that can be null
                default = json.dumps(prop["default"], ensure_ascii=False) if "default" in prop else "(required)"
                kind = " | ".join(_schema_type(b) for b in branches)
                rows.append((key, default, " · ".join(filter(None, (kind, prop.get("description"))))))
            if sub is not None:
                walk(sub, f"{key}.")

    walk(schema, "")
    return rows


def _resolve_schema_ref(node: dict, defs: dict) -> dict:
    """The `$defs` entry a {"$ref": "#/$defs/Name"} node points to; other nodes as they are."""
    ref = node.get("$ref")
    return defs[ref.rsplit("/", 1)[-1]] if ref else node


_SCHEMA_TYPES = {"integer": "int", "number": "float", "boolean": "bool", "string": "str", "null": "null", "object": "mapping"}


def _schema_type(node: dict) -> str:
    """A JSON-schema node as a short type: "int ≥ 1", "float in (0, 1)", "{a, b}", "list of str", "mapping"."""
    if "properties" in node:
        return "mapping"
    if "enum" in node:
        return "{" + ", ".join(str(v) for v in node["enum"]) + "}"
    if node.get("type") == "array":
        return f"list of {_schema_type(node.get('items', {}))}"
    name = _SCHEMA_TYPES.get(node.get("type"), node.get("type", "any"))
    lo = ("≥", "[", node["minimum"]) if "minimum" in node else (">", "(", node["exclusiveMinimum"]) if "exclusiveMinimum" in node else None
    hi = ("≤", "]", node["maximum"]) if "maximum" in node else ("<", ")", node["exclusiveMaximum"]) if "exclusiveMaximum" in node else None
    if lo and hi:
        return f"{name} in {lo[1]}{lo[2]}, {hi[2]}{hi[1]}"
    if lo or hi:
        sign, _, bound = lo or hi
        return f"{name} {sign} {bound}"
    return name
