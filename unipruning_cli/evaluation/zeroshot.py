"""Zero-shot accuracy with lm-eval-harness on the pruned model object in memory.

No save/reload in between: ``HFLM(pretrained=<model>)`` wraps the very model the run pruned. Offline
tasks (QuaRTz, an MMLU sample; see ``tasks.py``) are YAMLs over data in the cache; the pruning
papers' suite (``paper``) uses lm-eval's built-in tasks and needs the HF hub.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable

from ..core.errors import UserError
from ..core.paths import cache_dir
from .tasks import OFFLINE_TASKS

log = logging.getLogger(__name__)

#: The zero-shot suite of Wanda / SparseGPT / RIA, and the metric customary for each task.
PAPER_SUITE = {"boolq": "acc", "rte": "acc", "hellaswag": "acc_norm", "winogrande": "acc",
               "arc_easy": "acc", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
SUITES = {"paper": list(PAPER_SUITE), "offline": list(OFFLINE_TASKS)}


def expand_tasks(tasks: Iterable[str]) -> list[str]:
    out: list[str] = []
    for t in tasks:
        for name in SUITES.get(t, [t]):
            if name not in out:
                out.append(name)
    return out


def hub_offline() -> bool:
    return os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"


def check_tasks(tasks: Iterable[str]) -> None:
    """Fail before any model work for a task that is unknown or cannot run here."""
    names = expand_tasks(tasks)
    if not names:
        return
    offline = [t for t in names if t in OFFLINE_TASKS]
    if offline and not (cache_dir() / "tasks" / f"{offline[0]}.yaml").exists():
        raise UserError(f"eval.tasks: offline task files are missing in {cache_dir() / 'tasks'}; run `unipruning prepare`")
    hub = [t for t in names if t not in OFFLINE_TASKS]
    if hub and hub_offline():
        raise UserError(f"eval.tasks: {', '.join(hub)} need the HF hub, but HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is "
                        f"set; use the offline tasks ({', '.join(OFFLINE_TASKS)}) or eval.tasks=[offline]")
    if hub:
        known = set(_task_manager().all_tasks)
        unknown = [t for t in hub if t not in known]
        if unknown:
            import difflib

            hints = {t: difflib.get_close_matches(t, list(known) + list(OFFLINE_TASKS), n=2) for t in unknown}
            raise UserError("eval.tasks: unknown lm-eval task(s): " + "; ".join(
                f"'{t}'" + (f" (did you mean {', '.join(h)}?)" if h else "") for t, h in hints.items()))


def _task_manager(names: Iterable[str] = ()):
    """lm-eval's task index, with the offline tasks; only them when ``names`` are all offline (indexing lm-eval's
    own thousands of task files takes most of 20 s on 2 cores)."""
    from lm_eval.tasks import TaskManager

    folder = cache_dir() / "tasks"
    only_offline = bool(names) and all(n in OFFLINE_TASKS for n in names) and folder.exists()
    return TaskManager(include_path=str(folder) if folder.exists() else None, include_defaults=not only_offline)


def task_metric(task: str) -> str:
    return PAPER_SUITE.get(task, "acc")


def zero_shot(model, tokenizer, tasks: Iterable[str], limit: int | None, batch_size: int, max_length: int) -> dict:
    """Per-task accuracy (acc and acc_norm with stderr) and the mean of each task's customary metric, with the
    protocol they were measured under: ``limit``, ``max_length``, ``num_fewshot`` and ``batch_size`` (lm-eval's
    accuracies move with the batch size on GPUs, lm-eval#1645, so a result without it cannot be compared)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    names = expand_tasks(tasks)
    if not names:
        return {}
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, device=device)
    res = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=_task_manager(names), limit=limit, num_fewshot=0,
                                  log_samples=False, bootstrap_iters=100)
    per_task = {}
    for name in names:
        r = res["results"][name]
        per_task[name] = {k.split(",")[0]: v for k, v in r.items() if k.split(",")[0] in
                          ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr")}
        per_task[name]["metric"] = task_metric(name)
        per_task[name]["samples"] = res.get("n-samples", {}).get(name, {}).get("effective")
    mean = sum(per_task[t][task_metric(t)] for t in names) / len(names)
    return {"tasks": per_task, "mean": mean, "limit": limit, "max_length": max_length, "num_fewshot": 0,
            "batch_size": batch_size}


def request_lengths(tokenizer, tasks: Iterable[str], limit: int | None) -> dict[str, list[int]]:
    """Tokens of each zero-shot request (context + continuation, as HFLM scores it) per task, from the tasks'
    documents and the tokenizer alone: no model. ``limit``: lm-eval's per-task document limit."""
    out: dict[str, list[int]] = {}
    names = expand_tasks(tasks)
    for name, task in _task_manager(names).load(names)["tasks"].items():
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        texts = ["".join(a for a in inst.args if isinstance(a, str)) for inst in task.instances]
        out[name] = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return out


def check_request_lengths(tokenizer, tasks: Iterable[str], limit: int | None, max_length: int, key: str) -> None:
    """Refuse tasks with requests longer than ``max_length`` tokens: HFLM would cut their contexts from the left
    without a word, and score questions it never saw whole. Raises :class:`UserError` naming ``key``."""
    too_long = {t: (sum(n > max_length for n in lengths), len(lengths), max(lengths))
                for t, lengths in request_lengths(tokenizer, tasks, limit).items() if lengths and max(lengths) > max_length}
    if too_long:
        raise UserError(f"{key}={max_length}: lm-eval would cut the contexts of requests longer than that from the "
                        "left: " + "; ".join(f"{t}: {n} of {total} requests, the longest {longest} tokens"
                                             for t, (n, total, longest) in too_long.items())
                        + f". Use {key} of at least the longest (within the model's position limit) or drop the task")
