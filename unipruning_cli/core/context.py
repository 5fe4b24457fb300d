"""A run's context: what a command builds once and hands to every stage.

The runner (``unipruning prune``) builds one :class:`RunContext` from the composed config before anything else and
fills in the model as it loads it; ``unipruning eval`` and ``export`` build one for the finished run they measure
again. Stages take the context instead of the config and their own copies of its parts, so the calibration samples
are cut once per run (not once per stage), and a method's :meth:`..pruning.method.Method.masks` reads the same
objects every other stage reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig

from ..pruning.block_loop import PassSettings
from ..data.calibration_set import calibration_set
from .distributed import SINGLE, Ranks
from ..models.loading import prunable_layers
from .progress import Timer


@dataclass
class RunContext:
    """One run's objects.

    ``cfg``: the composed config (``configs/prune.yaml``'s schema, :class:`.config.PruneConfig`), read only.
    ``rd``: the run directory (:class:`.rundir.RunDir`; None for a command that writes no run). ``timer``: the
    stage timer whose seconds and memory figures go into ``metrics.json``. ``sweep``: the sweep the run belongs to
    (:class:`.sweep.SweepContext`). ``ranks``: the launch's processes. Set by :meth:`loaded`: ``model``, ``tok`` and
    ``layers`` (the prunable matrices, name -> ``nn.Linear``). Set by the runner: ``primary`` (the target the run
    is named for, :class:`..pruning.targets.Target`) and ``targets`` (every cut the run makes)."""

    cfg: DictConfig
    rd: Any = None
    timer: Timer = field(default_factory=Timer)
    sweep: Any = None
    ranks: Ranks = SINGLE
    model: Any = None
    tok: Any = None
    layers: dict = field(default_factory=dict)
    primary: Any = None
    targets: list = field(default_factory=list)
    allocation_choices: dict = field(default_factory=dict)  # allocation=auto: tag -> what was picked, and why
    routing: Any = None  # pattern=experts: the dense model's routing (:func:`..stages.routing.routing_of`), once
    _calibration: Optional[tuple] = field(default=None, repr=False)

    def loaded(self, model, tok) -> "RunContext":
        """Take the loaded ``model`` and ``tok``; ``layers`` are then its prunable matrices. Returns self."""
        self.model, self.tok = model, tok
        self.layers = prunable_layers(model)
        return self

    @property
    def passes(self) -> PassSettings:
        """How a calibration pass runs (``calibration.offload``, ``calibration.min_expert_tokens``)."""
        return PassSettings.of(self.cfg.calibration)

    def calibration(self):
        """The run's calibration samples (:class:`..data.sampling.TokenSamples`) and their record (a fresh dict each call),
        cut once per run (:func:`..data.calibration_set.calibration_set`). Raises :class:`.errors.UserError` for a corpus
        too short for the samples asked for."""
        if self._calibration is None:
            self._calibration = calibration_set(self.cfg, self.tok)
        windows, info = self._calibration
        return windows, dict(info)
