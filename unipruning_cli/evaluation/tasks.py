"""Offline lm-eval tasks over real data shipped in a PyPI wheel (QuaRTz, an MMLU sample).

``unipruning prepare`` converts the raw files into the field layout of a multiple-choice task and
writes one lm-eval task YAML per task into ``<cache>/tasks``, the folder handed to
``TaskManager(include_path=...)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..core.rundir import atomic_write_text


_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _quartz(line: dict) -> dict:
    text = line["input"][-1]["content"]
    stem, _, opts = text.partition("\n\n")
    choices = [m.group(2).strip() for m in re.finditer(r"^\s*([A-Z]): (.*)$", opts, flags=re.M)]
    return {"question": stem.strip(), "choices": choices, "label": ord(line["ideal"].strip()) - ord("A")}


def _mmlu(line: dict) -> dict:
    body = line["question"].rsplit("Answer:", 1)[0]
    stem, _, opts = body.partition("\n\nA. ")
    opts = "A. " + opts
    choices = [m.group(2).strip() for m in re.finditer(r"^([A-D])\. (.*)$", opts, flags=re.M)]
    return {"question": stem.strip(), "choices": choices, "label": ord(line["answer"].strip()) - ord("A")}


#: The offline tasks by name: the raw file under ``<cache>/raw`` and the function that turns one of its JSON
#: lines into ``{"question", "choices", "label"}``. A new offline task is one converter plus one entry here
#: (and its raw file fetched by ``assets.prepare``); any task lm-eval knows needs nothing.
OFFLINE_TASKS = {"quartz_offline": ("quartz.jsonl", _quartz), "mmlu_sample_offline": ("mmlu_sample.jsonl", _mmlu)}


def _convert(src: Path, dest: Path, fn) -> int:
    docs = [fn(json.loads(line)) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    docs = [d for d in docs if len(d["choices"]) >= 2 and 0 <= d["label"] < len(d["choices"])]
    atomic_write_text(dest, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    return len(docs)


def write_offline_tasks(root: Path) -> Path:
    """Convert the raw task files in ``root/raw`` and write their YAMLs; returns the task folder."""
    tasks = root / "tasks"
    for task, (raw, fn) in OFFLINE_TASKS.items():
        data = tasks / f"{task}.jsonl"
        _convert(root / "raw" / raw, data, fn)
        atomic_write_text(tasks / f"{task}.yaml", _YAML.format(task=task, data=data))
    return tasks
