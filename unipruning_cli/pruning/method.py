"""The unit of extension: a pruning method is one :class:`Method` subclass (one module of
``unipruning_cli/methods/``) and one config group option (``configs/method/<name>.yaml``).

A method answers every question the rest of the house asks of it (the runner, the memory plan, the checks before
any weight is read, export): its default allocation and cuts, its calibration protocol, its config checks, its rows
of the memory plan, and its masks (:meth:`Method.masks`, given the run's :class:`..core.context.RunContext`). Its
knobs are a typed dataclass, ``Settings``, which is also the schema of its config group: ``method=sparsegpt method.percdamp=0.1``.

Methods are looked up by name in :data:`METHODS` (a :class:`..core.registry.Registry` with a base-class check, as
lm-eval's). The modules that define them sit above this one in the import order (their masks run the stages), so
the registry imports a method's module on first use (lm-eval's lazy registry): a file
``unipruning_cli/methods/<name>.py`` registering ``<name>`` is found without being listed anywhere, and so is a
``<name>.py`` in a folder of ``$UNIPRUNING_PLUGINS`` (for an installed package; it imports from
``unipruning_cli.methods``, and needs no YAML: ``method=<name>`` then takes its ``Settings`` defaults).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from omegaconf import DictConfig, OmegaConf

from ..core.errors import UserError, check
from ..core.registry import Registry

#: Each local metric's own comparison group in the paper that introduced it.
DEFAULT_ALLOCATION = {"magnitude": "per_matrix", "wanda": "per_row", "ria": "per_matrix", "stochria": "per_matrix"}
#: The package of the built-in methods, one module each (stage tier: their masks run the stages).
METHODS_PACKAGE = "unipruning_cli.methods"


#: Folders of method modules outside the package (``os.pathsep``-separated): a user's own methods, for an installed
#: package whose folder is not theirs to write in.
PLUGINS_ENV = "UNIPRUNING_PLUGINS"


def _method_modules() -> dict[str, Callable[[], None]]:
    """name -> a loader of the module that registers it: this package's modules, then each ``<name>.py`` of the
    folders in ``$UNIPRUNING_PLUGINS`` (a module's stem is the name it registers)."""
    here = Path(__file__).resolve().parent.parent / METHODS_PACKAGE.rpartition(".")[2]
    found = {m.name: (lambda m=m.name: importlib.import_module(f"{METHODS_PACKAGE}.{m}"))
             for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_")}
    where = {name: here / f"{name}.py" for name in found}
    for folder in filter(None, os.environ.get(PLUGINS_ENV, "").split(os.pathsep)):
        for path in sorted(Path(folder).expanduser().glob("*.py")):
            if path.stem.startswith("_"):  # a package's __init__, a helper module: not a method
                continue
            if path.stem in where:
                if where[path.stem] != path:
                    _warn_once(f"{PLUGINS_ENV}: {path} is not loaded: method '{path.stem}' is {where[path.stem]}")
                continue
            found[path.stem], where[path.stem] = (lambda path=path: _load_file(path)), path
    return found


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    import logging

    if message not in _WARNED:
        _WARNED.add(message)
        logging.getLogger(__name__).warning(message)


def _load_file(path: Path) -> None:
    import importlib.util
    import sys

    name = f"unipruning_plugins.{path.stem}"
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # a failed load is tried (and said) again, not taken for a module without methods
        raise


@dataclass
class NoSettings:
    """A method without knobs of its own (its metric, schedule, ... are other config groups)."""


@dataclass
class Cuts:
    """What :meth:`Method.masks` hands the runner: ``masks`` (tag -> name -> bool ``[out, in]``) to evaluate in turn
    from the dense weights, or ``in_place`` when the model already holds its one cut (the weights it evaluates:
    SparseGPT's reconstructed ones); ``calibration``: the calibration record for ``metrics.json``."""

    calibration: dict
    masks: dict[str, dict] = field(default_factory=dict)
    in_place: bool = False


class Method(ABC):
    """A pruning method. Subclasses set ``name`` (by registering), ``Settings``, the class flags below, and
    implement :meth:`masks` and :meth:`plan_rows`; every other answer has a default that fits a method which
    scores weights once and cuts one target."""

    name: ClassVar[str] = ""
    Settings: ClassVar[type] = NoSettings
    #: one score per weight learned over the whole model (Γ) and cut at every target of a run: its run has a search
    #: stage, extra cuts (``export.sparsities`` / ``patterns``), baselines beside it and a Γ that export can cut
    searches: ClassVar[bool] = False
    #: the kept weights change as the mask is chosen (SparseGPT): the masks alone do not give the measured model
    updates_weights: ClassVar[bool] = False
    #: the stage marker (``stages/<stage>.json``) that says a run of this method is complete
    stage: ClassVar[str] = "prune"
    #: the cuts a run makes where ``export.sparsities`` / ``export.patterns`` / ``eval.baselines`` are null
    default_cuts: ClassVar[dict[str, tuple]] = {"sparsities": (), "patterns": (), "baselines": ()}

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.settings = self.settings_of(cfg)

    @classmethod
    def settings_of(cls, cfg: DictConfig):
        """``cfg.method``'s knobs as a ``Settings`` instance; :class:`UserError` for an unknown knob or a bad type."""
        knobs = {k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k != "name"}
        try:
            return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls.Settings), knobs))
        except Exception as err:  # noqa: BLE001 - OmegaConf's validation errors, said as the user's
            key = getattr(err, "full_key", None)
            raise UserError(f"method={cls.name}: {f'method.{key}: ' if key else ''}"
                            f"{str(err).splitlines()[0]}") from None

    def label(self) -> str:
        """How a summary titles a run of this method: its name, and its local metric where it uses one."""
        return self.name

    def allocation(self, asked: str | None) -> str:
        """The allocation of an unstructured cut given ``pattern.allocation`` (``asked``, null: the default)."""
        return asked or self.default_allocation()

    def default_allocation(self) -> str:
        """``pattern.allocation`` where it is null: the local metric's own comparison group."""
        return DEFAULT_ALLOCATION.get(self.cfg.local_metric.name, "per_matrix")

    def calibration_mode(self) -> str:
        """``calibration.mode=auto`` resolved: this method's published block protocol."""
        return "one_shot"

    def backpropagates(self) -> bool:
        """Whether the method backpropagates through the whole model at once (no sequential onloading; FSDP2 over
        the ranks of a ``torchrun`` launch)."""
        return False

    def check(self) -> None:
        """Refuse, before any weight is read, what this method cannot do or would ignore (:class:`UserError`)."""
        cfg, name = self.cfg, self.name
        if self.updates_weights:
            check(cfg.pattern.kind not in ("channels", "heads", "experts"), f"method={name} chooses single weights as it "
                  f"updates the kept ones (OBS), not whole {cfg.pattern.kind}: pattern={cfg.pattern.kind} needs a "
                  "method whose scores are cut (method=unipruning, method=local)")
            check(cfg.reconstruct == "none", f"reconstruct={cfg.reconstruct} updates the kept weights of a mask (or refits "
                   f"them); method={name} already does, as it chooses its mask: drop reconstruct")
            check(cfg.refine == "none", f"refine=swap refines a mask on the original weights; method={name} updates "
                   "the kept weights as it chooses its mask, so a swap would revive a weight it has already "
                   "compensated for: drop refine")
        if not self.searches:
            check(cfg.pattern.allocation != "auto", f"pattern.allocation=auto chooses among the cuts of one saliency Γ "
                  f"on held-out calibration windows (method=unipruning); method={name} cuts one allocation: name it")
            check(not cfg.eval.baselines, f"eval.baselines cuts local metrics beside a UniPruning Γ; with "
                   f"method={name} run each baseline as its own run (method=local local_metric=<name>)")
            check(not (cfg.export.sparsities or cfg.export.patterns), f"export.sparsities / export.patterns cut one "
                   f"Γ at several targets (method=unipruning); method={name} prunes one target per run: sweep it "
                   "with -m sparsity=0.5,0.6,0.7")
            check(cfg.pattern.kind != "nm" or cfg.pattern.allocation in (None, "per_row"),
                   "pattern.allocation applies to unstructured cuts only (with an N:M pattern, to the "
                   "export.sparsities cuts of a UniPruning run)")
        if self.backpropagates():
            check(cfg.model.placement != "onload", "model.placement=onload serves the block-wise stages "
                   "(method=local, method=sparsegpt, schedule.weight_mode=frozen); the drift search backpropagates "
                   "through the whole model at once")

    def plan_rows(self, sheet) -> None:
        """Add this method's stages to the memory plan (:class:`..stages.plan.rows.Sheet`): by default, calibration
        statistics, one matrix's scores and the packed masks, and the pruned model evaluated in place."""
        sheet.calibration()
        sheet.add("prune", sheet.Wo, 5 * sheet.s["L_max"] + sheet.P / 8,
                  "one matrix's scores (fp32) on the host; masks packed")
        sheet.pruned_eval_in_place()

    @abstractmethod
    def masks(self, ctx) -> Cuts:
        """The run's cuts (see :class:`Cuts`) from ``ctx``, the run's :class:`unipruning_cli.core.context.RunContext`
        (model, layers, targets, run directory, calibration samples); records its stage in ``ctx.rd``."""


#: Methods by name (``method=<name>``), loaded on first use from this package's modules.
METHODS: Registry[type[Method]] = Registry("method", base=Method, lazy=_method_modules)


def register_method(name: str):
    """Class decorator: register a :class:`Method` subclass as ``method=<name>`` (and set its ``name``)."""
    def decorator(cls: type[Method]) -> type[Method]:
        METHODS.register(name)(cls)
        cls.name = name
        return cls

    return decorator


def method_name(cfg: DictConfig) -> str:
    """The method a config names: ``method.name`` (``method: <name>`` in a run made before methods had settings)."""
    m = cfg.method
    return str(m) if isinstance(m, str) else str(m.name)


def method_of(cfg: DictConfig) -> Method:
    """The :class:`Method` of ``cfg`` with its settings. Raises :class:`UserError` for an unknown name ("did you
    mean") or bad settings."""
    name = method_name(cfg)
    try:
        cls = METHODS.get(name)
    except KeyError as err:
        raise UserError(f"method: {err}") from None
    except Exception as err:  # noqa: BLE001 - its module failed to import: say which, as the user's error
        raise UserError(f"method={name}: its module could not be loaded: {type(err).__name__}: {err}") from None
    return cls(cfg)
