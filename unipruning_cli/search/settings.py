"""The search's settings, declared once: the ``schedule`` config group and the run's seed.

``ScheduleConfig`` is both the Hydra schema of ``configs/schedule/*.yaml`` (registered by
:mod:`unipruning_cli.core.config`) and what the search reads (:class:`SearchSettings` adds the seed and
the learning-rate schedule). Its defaults are written here only (``configs/schedule/default.yaml`` adds none):
the reference code's (spec §5.3), but 32 steps. A field that only steers
drift mode's weight optimiser is marked ``drift_only``: it cannot change Γ when W is frozen, so the
search fingerprint leaves it out in frozen mode (:data:`DRIFT_ONLY`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:
    import torch


def _drift_only(default=None, default_factory=None):
    meta = {"drift_only": True}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ScheduleConfig:
    """Mirror-descent schedule (steps, dual step α, weight mode) and the weight optimiser of drift mode
    (AdamW with a warm-up then ``decay`` schedule, gradient clipping and accumulation, ρ for the alignment term)."""

    # the reference runs one step per calibration sample (128: experiment=paper); 32 keeps the default run (four cuts
    # of Γ, Wanda at the same four) on the embedded model under 20 min on 2 CPU cores
    steps: int = 32
    dual_step: float = 0.01
    weight_mode: str = "drift"
    rho: float = _drift_only(0.0)
    lr: float = _drift_only(1e-4)
    warmup_ratio: float = _drift_only(0.1)
    decay: str = _drift_only("linear")  # after the warm-up: linear | cosine | constant (HF's schedules of those names)
    betas: List[float] = _drift_only(default_factory=lambda: [0.9, 0.999])
    eps: float = _drift_only(1e-10)
    weight_decay: float = _drift_only(0.0)
    grad_clip: Optional[float] = _drift_only(1.0)  # max global gradient norm; null: no clipping
    # which gradients the global norm is taken over (and clipped): "model", every parameter's, as the reference
    # (HF Trainer clips model.parameters(); embeddings, norms and lm_head get gradients that are never applied);
    # "prunable": the prunable weights' only (no gradient for the rest: less memory and time, another Γ)
    grad_clip_scope: str = _drift_only("model")
    grad_accumulation: int = _drift_only(1)
    accumulate_grads_across_steps: bool = _drift_only(True)
    # "weights": W drifts in its own dtype, and so do its gradient and Adam's m and v; "float32": an fp32 master
    # copy of W drifts (forward and backward under autocast in the weights' dtype), with fp32 gradient, m and v.
    # In bf16 most small weights never move at the first learning rates; fp32 lets them.
    drift_dtype: str = _drift_only("weights")
    # mixture of experts: add the model's router load-balancing loss (``output_router_logits``, weighted by the
    # config's ``router_aux_loss_coef``) to the LM loss W drifts on; off: the LM loss alone, as for a dense model
    router_aux_loss: bool = _drift_only(False)
    checkpoint_every: int = 16
    activation_checkpointing: bool = True  # drift: recompute block activations in the backward (same Γ)
    search_state: str = "auto"  # drift: V and Γ on the weights' "device", or "host" (pinned), one matrix moved at a
    # time; "auto": the device where they fit beside the rest of the search, else the host
    fsdp_offload: str = "auto"  # drift under torchrun (FSDP2): "true" keeps the sharded W, gradients, Adam state, V and Γ
    # in host memory (FSDP's CPU offload); "auto": only where the memory plan says the search does not fit without it


#: Fields that change how the search runs but never its Γ (bit for bit): left out of the search fingerprint.
NOT_IN_FINGERPRINT = ("checkpoint_every", "activation_checkpointing", "search_state", "fsdp_offload")


#: The ScheduleConfig fields that only steer the weight optimiser (marked ``drift_only`` above).
DRIFT_ONLY: tuple[str, ...] = tuple(f.name for f in fields(ScheduleConfig) if f.metadata.get("drift_only"))


def drift_element_size(drift_dtype: str, element_size: int) -> int:
    """Bytes per element of the drifting W, its gradient and Adam's m and v under ``schedule.drift_dtype``."""
    return 4 if drift_dtype == "float32" else element_size


def drift_gpu_bytes(numel: int, element_size: int, drift_dtype: str = "weights") -> float:
    """GPU bytes the drift search needs beside W with V and Γ on the device: V, Γ (fp32, 8 bytes per prunable weight),
    the gradient and Adam's m and v (3 copies in the drift dtype), the growth of W into an fp32 master copy under
    ``drift_dtype=float32``, plus 10 % and 2 GiB for activations. The one rule behind ``search_state=auto``: the
    search compares it with the free GPU memory, the plan with its card."""
    drift = drift_element_size(drift_dtype, element_size)
    return numel * (8 + 3 * drift + drift - element_size) * 1.1 + 2 * 2**30


@dataclass
class SearchSettings(ScheduleConfig):
    """The ``schedule`` config as the search reads it, plus the run's seed (one list of fields)."""

    seed: int = 0
    min_expert_tokens: int = 1  # calibration.min_expert_tokens: the step statistics of a rarely routed expert pool

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.warmup_ratio * self.steps)

    def lr_scheduler(self, optimizer) -> "torch.optim.lr_scheduler.LambdaLR":
        """The learning-rate schedule of the drift optimiser: transformers' ``get_scheduler`` (the reference's own
        library, spec §1.3 step 6) with ``warmup_steps`` of linear ramp, then ``decay``: ``linear`` to 0 at
        ``steps``, ``cosine`` (half a cosine to 0), ``constant``. A ``LambdaLR`` stepped once per search step.

        Raises ``ValueError`` for an unknown ``decay`` (the config validation refuses it before any weight is read).
        """
        from transformers import get_scheduler

        if self.decay not in LR_SCHEDULES:
            raise ValueError(f"schedule.decay={self.decay!r}: choose one of {', '.join(LR_SCHEDULES)}")
        return get_scheduler(LR_SCHEDULES[self.decay], optimizer, num_warmup_steps=self.warmup_steps,
                             num_training_steps=self.steps)


#: ``schedule.decay`` -> the name of transformers' schedule (warm-up first in each).
LR_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
