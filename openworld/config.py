"""Recipes: YAML (+ ``defaults:`` includes, ``--set a.b=c`` overrides) -> validated, typed config.

Every error is a :class:`ConfigError` whose message is one line naming the key path, the bad value
and what is allowed; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import copy
import inspect
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    create_model,
)

from openworld.params import Bool, ConfigError, NonNegInt, Number, OpenUnit, PosInt, Seed32, param_error  # noqa: F401 (re-exported)
from openworld.registry import BACKBONES, DATASETS, SCENARIOS, STRATEGIES, RegistryError

# Strategy-entry keys that are not constructor parameters.
_ENTRY_KEYS = {"strategy", "defaults"}




# ------------------------------------------------------------------------------------------------
# Schema
# ------------------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="allow")  # source-specific options are checked by the loader
    source: str
    root: str | None = None
    download: bool = False


class ScenarioConfig(BaseModel):
    model_config = ConfigDict(extra="allow")  # scenario parameters are checked against its signature
    kind: str
    data: DataConfig


class BackboneConfig(BaseModel):
    model_config = ConfigDict(extra="allow")  # backbone options are checked against its factory
    name: str


class OptimizerSection(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5.0e-4, ge=0)


class BaseSection(_Strict):
    epochs: PositiveInt = 30
    batch_size: PositiveInt = 128
    optimizer: OptimizerSection = OptimizerSection()
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: list[NonNegativeInt] = []
    gamma: float = Field(0.1, gt=0)
    temperature: float = Field(16.0, gt=0)
    selection: Literal["val", "last", "test"] = "val"


class PretrainSection(_Strict):
    """Backbone pre-training on data disjoint from the scenario (``RunContext.pretrained_backbone``).

    ``classes``: the source's class ids to train on (null: all of them); ``per_class``: keep this
    many training samples per class (hashed pick; null: all). Trained once per content hash and
    shared by every strategy and seed (``seed`` is the pre-training's own seed).
    """

    data: DataConfig
    classes: list[NonNegativeInt] | None = None
    per_class: PositiveInt | None = None
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 128
    optimizer: OptimizerSection = OptimizerSection(name="adamw", lr=1.0e-3, weight_decay=0.05)
    schedule: Literal["cosine", "constant"] = "cosine"
    seed: NonNegativeInt = 0
    # `simclr`: self-supervised (NT-Xent on two views, temperature τ, projection to proj_dim; labels never
    # read, so the scenario's own training images may be used: gcd-ncd card §9 stage 0).
    objective: Literal["supervised", "simclr"] = "supervised"
    temperature: float = Field(0.5, gt=0)
    proj_dim: PositiveInt = 128


class MetricsSection(_Strict):
    session_acc: Literal["sample", "batch_mean"] = "sample"
    hm_rounding: bool = False
    # chunk length of acc_batch_mean (TEEN's chunked accuracy); null: not computed (saves ~4 ns/sample)
    chunk_size: PositiveInt | None = 100
    topk: list[PositiveInt] = [5]
    # class distances for the expected squared label distance (esd) of classification eval sets:
    # "hierarchy" = tree path lengths of the class names split at hierarchy_sep (e.g. Omniglot's alphabets)
    label_metric: Literal["hierarchy"] | None = None
    hierarchy_sep: str = Field("/", min_length=1)


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str = ""
    scenario: ScenarioConfig
    backbone: BackboneConfig
    base: BaseSection = BaseSection()
    pretrain: PretrainSection | None = None
    strategies: dict[str, dict[str, Any]] = Field(min_length=1)
    seeds: list[NonNegativeInt] = Field([0], min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output: str = "runs"
    protocol: Literal["ours", "paper"] = "ours"
    amp: bool = False
    log_every: PositiveInt = 50
    eval_batch_size: PositiveInt = 256
    num_workers: NonNegativeInt = 0
    # CPU threads per run (None: torch's default); results on CPU depend on it, so it is recorded
    threads: PositiveInt | None = None
    metrics: MetricsSection = MetricsSection()

    def strategy_class(self, entry: str):
        return STRATEGIES.get(self.strategies[entry].get("strategy", entry))

    def strategy_params(self, entry: str) -> dict[str, Any]:
        return {k: v for k, v in self.strategies[entry].items() if k not in _ENTRY_KEYS}

    def scenario_params(self) -> dict[str, Any]:
        params = self.scenario.model_dump()
        params.pop("kind")
        return params

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def _read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _with_includes(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular 'defaults:' include")
    data = _read_yaml(path, "recipe")
    includes = data.pop("defaults", [])
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        merged = deep_merge(merged, _with_includes((path.parent / inc), seen + (path,)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key.path=value (e.g. --set base.epochs=5)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_override(data: dict, text: str) -> None:
    path, value = parse_override(text)
    node = data
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


def preset_dirs(recipe_path: Path) -> list[Path]:
    here = recipe_path.resolve().parent
    return [here.parent / "strategies", here / "strategies", Path.cwd() / "strategies"]


def _resolve_strategy_defaults(data: dict, recipe_path: Path) -> None:
    strategies = data.get("strategies")
    if not isinstance(strategies, dict):
        return
    for key, entry in list(strategies.items()):
        if entry is None:
            strategies[key] = entry = {}
        if not isinstance(entry, dict):
            raise ConfigError(f"strategies.{key} = {entry!r}: expected a mapping of parameters (use {{}} for defaults)")
        preset = entry.get("defaults")
        if preset is None:
            continue
        dirs = preset_dirs(recipe_path)
        for d in dirs:
            f = d / f"{preset}.yaml"
            if f.is_file():
                strategies[key] = deep_merge(_read_yaml(f, "strategy preset"), entry)
                break
        else:
            raise ConfigError(
                f"strategies.{key}.defaults = {preset!r}: no preset {preset}.yaml in {', '.join(map(str, dirs))}"
            )


def _apply_protocol(data: dict) -> None:
    """``protocol: paper`` sets every 'released code' value the recipe does not set itself."""
    if data.get("protocol") != "paper":
        return
    data.setdefault("base", {}).setdefault("selection", "test")
    metrics = data.setdefault("metrics", {})
    metrics.setdefault("session_acc", "batch_mean")
    metrics.setdefault("hm_rounding", True)
    for key, entry in (data.get("strategies") or {}).items():
        try:
            cls = STRATEGIES.get(entry.get("strategy", key))
        except RegistryError:
            continue  # reported by validation
        for k, v in getattr(cls, "paper_protocol", {}).items():
            entry.setdefault(k, v)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    data = _with_includes(path)
    for text in overrides:
        apply_override(data, text)
    _resolve_strategy_defaults(data, path)
    _apply_protocol(data)
    return validate_recipe(data)


def validate_recipe(data: dict) -> Recipe:
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, Recipe)) from None
    _check_components(recipe)
    return recipe


# ------------------------------------------------------------------------------------------------
# Messages
# ------------------------------------------------------------------------------------------------
def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        args = [a for a in typing.get_args(ann) if isinstance(a, type)]
        current = ann if isinstance(ann, type) else (args[0] if args else None)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def format_validation_error(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    path = prefix + ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        allowed = _fields_at(model, loc[:-1])
        return f"{path}: unknown key; allowed: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"{path}: required key is missing"
    return f"{path} = {err.get('input')!r}: {err['msg']}"


# ------------------------------------------------------------------------------------------------
# Component checks: registered names, and parameters against each component's signature
# ------------------------------------------------------------------------------------------------
def signature_model(
    func, name: str, skip: set[str] = frozenset(), types: dict[str, Any] | None = None
) -> tuple[type[BaseModel], list[str]]:
    """A pydantic model of ``func``'s keyword parameters (types from annotations, constraints of
    ``Annotated`` types included, defaults kept); ``types`` replaces the annotation of some parameters."""
    target = func.__init__ if inspect.isclass(func) else func
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:  # unresolved annotations in a plugin: fall back to untyped
        hints = {}
    hints.update(types or {})
    fields: dict[str, Any] = {}
    for p in inspect.signature(target).parameters.values():
        if p.name in ("self", *skip) or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = hints.get(p.name, Any)
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (ann, default)
    model = create_model(
        f"{name}_params", __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True), **fields
    )
    return model, list(fields)


def check_params(
    func, params: dict, path: str, skip: set[str] = frozenset(), types: dict[str, Any] | None = None
) -> dict:
    model, allowed = signature_model(func, path.replace(".", "_"), skip, types)
    try:
        validated = model.model_validate(params)
    except ValidationError as exc:
        err = exc.errors()[0]
        if err["type"] == "extra_forbidden":
            raise ConfigError(
                f"{path}.{err['loc'][0]}: unknown parameter; allowed: {', '.join(allowed) or '(none)'}"
            ) from None
        union = _union_error(exc.errors())
        if union is not None:
            where, e = union
            raise ConfigError(f"{path}.{'.'.join(map(str, where))} = {e.get('input')!r}: {e['msg']}") from None
        raise ConfigError(format_validation_error(exc, model, prefix=f"{path}.")) from None
    return {k: getattr(validated, k) for k in params}


def _union_error(errors: list[dict]) -> tuple[tuple, dict] | None:
    """A parameter typed as a union (``int | list[int]``) fails with one error per member, each
    located under the member's tag (``('known_classes', 'constrained-int')``, ``(…, 'list[…]', 0)``).
    Report the member that got furthest into the value (an item of a list beats "not an int"), without
    the tag. None for any other error."""
    first = tuple(errors[0]["loc"])
    same = [e for e in errors if tuple(e["loc"])[:1] == first[:1]]
    if len(same) < 2 or not all(len(e["loc"]) > 1 and isinstance(e["loc"][1], str) for e in same):
        return None
    best = max(same, key=lambda e: len(e["loc"]))  # the first of the deepest
    return first[:1] + tuple(best["loc"])[2:], best


def _get(registry, name: str, path: str):
    try:
        return registry.get(name)
    except RegistryError as exc:
        raise ConfigError(f"{path} = {name!r}: {exc}") from None


def _check_augment(value: Any, path: str) -> None:
    """An augmentation name must exist in some transform family (each source then checks its own family
    when it loads); catches typos at validate time instead of after the data is read."""
    if value is None:
        return
    from openworld.data.transforms import FAMILIES

    allowed = sorted({"default", *(a for augments in FAMILIES.values() for a in augments)})
    if value not in allowed:
        raise ConfigError(f"{path} = {value!r}: unknown augmentation; allowed: {', '.join(allowed)}")


def _check_components(recipe: Recipe) -> None:
    if recipe.metrics.session_acc == "batch_mean" and recipe.metrics.chunk_size is None:
        raise ConfigError("metrics.chunk_size: null leaves no acc_batch_mean for metrics.session_acc = 'batch_mean'; "
                          "set a chunk size (e.g. 100) or session_acc: sample")
    scenario_cls = _get(SCENARIOS, recipe.scenario.kind, "scenario.kind")
    kind = getattr(scenario_cls, "kind", recipe.scenario.kind)
    check_params(scenario_cls, recipe.scenario_params(), "scenario", skip={"seed"}, types=_scenario_types(scenario_cls))
    loader = _get(DATASETS, recipe.scenario.data.source, "scenario.data.source")
    options = {k: v for k, v in recipe.scenario.data.model_dump().items() if k not in ("source", "root", "download")}
    check_params(loader, options, "scenario.data", skip={"root", "download"})
    _check_augment(options.get("augment"), "scenario.data.augment")
    _check_scenario_rules(scenario_cls, recipe, declared_num_classes(loader, options))
    backbone = recipe.backbone.model_dump()
    _check_pretrain(recipe, backbone.pop("pretrain", None))
    factory = _get(BACKBONES, backbone.pop("name"), "backbone.name")
    check_params(factory, backbone, "backbone", skip={"in_channels", "input_size"})
    for key, entry in recipe.strategies.items():
        where = f"strategies.{key}.strategy" if "strategy" in entry else f"strategies.{key}"
        cls = _get(STRATEGIES, entry.get("strategy", key), where)
        check_params(cls, recipe.strategy_params(key), f"strategies.{key}")
        supports = getattr(cls, "supports", frozenset())
        if kind not in supports:
            raise ConfigError(
                f"strategies.{key}: strategy {getattr(cls, 'name', key)!r} does not support scenario kind {kind!r} "
                f"(it supports: {', '.join(sorted(supports)) or 'nothing'})"
            )


def _check_pretrain(recipe: Recipe, in_backbone: Any) -> None:
    """Validate the ``pretrain:`` section and hand it to the run context through the backbone block
    (``backbone.pretrain``, so every cache key built from the backbone includes the pre-training)."""
    if recipe.pretrain is None:
        if in_backbone is not None:
            raise ConfigError("backbone.pretrain: unknown key; declare pre-training as a top-level `pretrain:` section")
        return
    section = recipe.pretrain.model_dump(mode="json")
    if section["objective"] == "supervised":  # SimCLR-only keys stay out: supervised cache keys are unchanged
        for key in ("objective", "temperature", "proj_dim"):
            section.pop(key)
    if in_backbone is not None and in_backbone != section:
        raise ConfigError("backbone.pretrain: set by openworld from the top-level `pretrain:` section; remove it")
    data = recipe.pretrain.data
    loader = _get(DATASETS, data.source, "pretrain.data.source")
    options = {k: v for k, v in data.model_dump().items() if k not in ("source", "root", "download")}
    check_params(loader, options, "pretrain.data", skip={"root", "download"})
    _check_augment(options.get("augment"), "pretrain.data.augment")
    scen = recipe.scenario.data
    if (
        data.source == scen.source
        and data.root == scen.root
        and recipe.pretrain.classes is None
        and recipe.pretrain.objective == "supervised"
    ):
        raise ConfigError(
            f"pretrain.classes: pre-training on the scenario's own source {data.source!r} with all classes would "
            "leak the scenario's classes; list disjoint classes or use another source"
        )
    recipe.backbone.pretrain = section  # an extra field (BackboneConfig allows extras)


# ------------------------------------------------------------------------------------------------
# Scenario rules beyond single fields
# ------------------------------------------------------------------------------------------------


def declared_num_classes(loader, options: dict) -> int | None:
    """The class count a dataset loader declares without reading any data: its ``num_classes``
    attribute, an int or a function of the recipe's loader options (``load_x.num_classes = 10``). None
    when not declared: the scenario then decides its class-count rules when it reads the data (run start)."""
    n = getattr(loader, "num_classes", None)
    if callable(n):
        try:
            n = n(**options)
        except (TypeError, ValueError):
            return None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _with_defaults(cls, params: dict) -> dict:
    sig = inspect.signature(cls.__init__)
    full = {
        p.name: p.default
        for p in sig.parameters.values()
        if p.name != "self" and p.default is not p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    full.update(params)
    return full


def _check_scenario_rules(scenario_cls, recipe: Recipe, num_classes: int | None) -> None:
    """Cross-field rules: ``scenario_cls.check_config(params, num_classes=…, seeds=…)`` (raises
    ``ConfigError``/``ValueError`` naming the key), or this module's stopgap for a built-in without one."""
    check: Callable | None = getattr(scenario_cls, "check_config", None)
    if not callable(check):
        check = _STOPGAP_RULES.get(_qualname(scenario_cls))
    if check is None:
        return
    try:
        params = _with_defaults(scenario_cls, recipe.scenario_params())
        check(params, num_classes=num_classes, seeds=tuple(recipe.seeds))
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(" ".join(str(exc).split())) from None


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _scenario_types(scenario_cls) -> dict[str, Any] | None:
    """Constrained types for a built-in scenario whose signature is not annotated with them yet."""
    if callable(getattr(scenario_cls, "check_config", None)):
        return None
    return _STOPGAP_TYPES.get(_qualname(scenario_cls))


# FSCIL (openworld/scenarios/fscil.py) until its constructor carries these annotations and a
# ``check_config`` classmethod (both are skipped here as soon as the class defines ``check_config``).
_FSCIL_TYPES: dict[str, Any] = {
    "base_classes": PosInt,
    "ways": PosInt,
    "shots": PosInt,
    "num_sessions": PosInt | None,
    "split_files": str | None,
    "class_order": Literal["natural", "shuffled"],
    "split_seed": NonNegInt,
    "val_frac": OpenUnit,
    "base_subsample": PosInt | None,
    "test_subsample": PosInt | None,
    "holdout_unknown": NonNegInt,
}


def fscil_rules(params: dict, *, num_classes: int | None = None, seeds: Sequence[int] = ()) -> None:
    """FSCIL cross-field rules (card fscil-teen §1): index lists fix the natural class order; the
    session layout must fit the data's C classes (less ``holdout_unknown``)."""
    if params.get("split_files") is not None and params.get("class_order") == "shuffled":
        late = [int(s) for s in seeds if int(s) > 0]
        if late:
            raise param_error(
                "class_order", "shuffled", f"cannot be combined with split_files for seed > 0 (seeds {late}): the "
                "index lists fix the natural class order; use class_order: natural or split_files: null"
            )
    if num_classes is None:
        return
    B, W, H, S = params["base_classes"], params["ways"], params.get("holdout_unknown") or 0, params.get("num_sessions")
    taught = num_classes - H
    held = f" − holdout_unknown {H}" if H else ""
    if H >= num_classes:
        raise param_error("holdout_unknown", H, f"must leave classes to teach; the data has {num_classes}")
    if B > taught:
        raise param_error("base_classes", B, f"at most {num_classes}{held} = {taught} (the data's classes)")
    if S is None:
        if (taught - B) % W:
            raise param_error(
                "ways", W, f"({num_classes} classes{held} − base_classes {B}) = {taught - B} is not a multiple of "
                "ways; change ways or base_classes, or set num_sessions"
            )
    elif B + (S - 1) * W > taught:
        raise param_error(
            "num_sessions", S, f"base_classes {B} + (num_sessions {S} − 1) × ways {W} = {B + (S - 1) * W} classes, "
            f"the data has {taught}{' after holdout_unknown' if H else ''}"
        )


_STOPGAP_TYPES = {"openworld.scenarios.fscil.FSCILScenario": _FSCIL_TYPES}
_STOPGAP_RULES: dict[str, Callable] = {"openworld.scenarios.fscil.FSCILScenario": fscil_rules}
