"""lm-eval on the in-memory pruned model equals the ``lm_eval`` command on the same model saved to disk."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from unipruning_cli.core.paths import cache_dir
from unipruning_cli.core.errors import UserError
from unipruning_cli.evaluation.zeroshot import check_tasks, expand_tasks, zero_shot

TASKS = cache_dir() / "tasks"
pytestmark = pytest.mark.skipif(not (TASKS / "quartz_offline.yaml").exists(), reason="offline tasks not prepared")


@pytest.mark.slow  # a separate lm_eval process (about 40 s): make test-slow
def test_in_memory_equals_lm_eval_command(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    with torch.no_grad():  # prune: a model whose numbers differ from the folder it came from
        for name, p in model.named_parameters():
            if "layers" in name and p.dim() == 2:
                p.mul_((p.abs() > p.abs().median()).to(p.dtype))
    ours = zero_shot(model, tok, ["quartz_offline"], limit=12, batch_size=1, max_length=64)
    folder = tmp_path / "pruned"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "lm_eval_out"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={folder},max_length=64",
           "--tasks", "quartz_offline", "--include_path", str(TASKS), "--limit", "12", "--batch_size", "1",
           "--device", "cpu", "--num_fewshot", "0", "--output_path", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                                                     "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(out.rglob("results*.json")).read_text())["results"]["quartz_offline"]
    assert ours["tasks"]["quartz_offline"]["acc"] == result["acc,none"]
    assert ours["tasks"]["quartz_offline"]["acc_norm"] == result["acc_norm,none"]


def test_suites_and_offline_refusal(monkeypatch):
    assert expand_tasks(["offline", "quartz_offline"]) == ["quartz_offline", "mmlu_sample_offline"]
    assert len(expand_tasks(["paper"])) == 7
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="need the HF hub"):
        check_tasks(["boolq"])
    check_tasks(["offline"])  # fine offline
