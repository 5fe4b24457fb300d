"""Nothing silently wrong after the run (issue 26): an overflow without evaluation corpora, SparseGPT's non-finite
Hessian, the report of an interrupted sweep, the zero-shot batch size, and what an export says about speed."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from _helpers import cli_env, run_cli, tiny_overrides
from unipruning_cli.core.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fp16_overflowing_llama(tokenizer, folder: Path) -> Path:
    """A tiny float16 Llama whose first MLP product silu(gate)·up lies far above float16's 65504."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64))
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight.mul_(2e5)
        model.model.layers[0].mlp.up_proj.weight.mul_(2e5)
    model.to(torch.float16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ============================================================================ 26.1: an overflow without corpora

OVERFLOW = r"model\.layers\.0\.mlp\.down_proj are not finite \(NaN\) in float16.*model\.dtype=bfloat16"


@pytest.mark.parametrize("extra", [[], ["calibration.mode=one_shot"], ["method=sparsegpt"],
                                   ["method=unipruning", "local_metric=stochria", "schedule.weight_mode=frozen",
                                    "schedule.steps=2"]])
def test_a_float16_overflow_without_eval_corpora_names_the_layer_and_dtype(extra, tmp_path, monkeypatch,
                                                                           tiny_tokenizer, corpus_files):
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.stages.preflight import validate
    from unipruning_cli.commands.prune import run_prune

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    folder = _fp16_overflowing_llama(tiny_tokenizer, tmp_path / "fp16")
    cfg = compose_prune([*tiny_overrides(folder, corpus_files), "model.dtype=float16", "eval.corpora=[]", *extra])
    validate(cfg)
    with pytest.raises(UserError, match=OVERFLOW):
        run_prune(cfg, tmp_path / "run")
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # NaN statistics are never cached
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "masks").exists()


@pytest.mark.e2e
def test_the_overflow_reaches_the_user_as_a_message_not_a_traceback(tmp_path, tiny_tokenizer, corpus_files):
    folder = _fp16_overflowing_llama(tiny_tokenizer, tmp_path / "fp16")
    args = [*tiny_overrides(folder, corpus_files), "model.dtype=float16", "eval.corpora=[]",
            f"hydra.run.dir={tmp_path / 'run'}"]
    proc, _ = run_cli(["prune", *args], tmp_path, cli_env(tmp_path / "runs", tmp_path / "cache"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "model.layers.0.mlp.down_proj are not finite (NaN) in float16" in " ".join(proc.stderr.split())


# ============================================================================ 26.2: SparseGPT's non-finite Hessian

def test_a_non_finite_sparsegpt_hessian_names_the_layer_the_dtype_and_what_to_do():
    from unipruning_cli.pruning.obs import obs_reconstruct
    from unipruning_cli.pruning.blockwise import SparseGPTPruning
    from unipruning_cli.pruning.targets import Target
    from unipruning_cli.data.stats import ActivationStats

    name = "model.layers.2.self_attn.o_proj"
    layer = torch.nn.Linear(8, 4, bias=False).to(torch.float16)
    xtx = torch.eye(8)
    xtx[1, 2] = float("inf")
    stats = ActivationStats(sq_sum=torch.ones(8, dtype=torch.float64), count=4, xtx=xtx)
    with pytest.raises(UserError, match=rf"hessian of {name} contains non-finite .*float16.*"
                                        r"model\.dtype=bfloat16 or float32.*calibration\.nsamples.*percdamp"):
        SparseGPTPruning().prune_block({name: layer}, {name: stats}, Target(sparsity=0.5))
    weight = torch.randn(4, 8)  # float32 already: fewer tokens or a finite model, not another dtype
    with pytest.raises(UserError, match=r"hessian of down contains non-finite .*float32") as err:
        obs_reconstruct(weight, xtx, torch.ones(4, 8, dtype=torch.bool), name="down")
    assert "model.dtype" not in str(err.value) and "calibration.nsamples" in str(err.value)
    with pytest.raises(ValueError, match="hessian of down is not positive definite"):
        obs_reconstruct(weight, -torch.eye(8), torch.ones(4, 8, dtype=torch.bool), percdamp=0.0, name="down")


# ============================================================================ 26.3: an interrupted sweep

def _finished(job: Path, ppl: float) -> None:
    """What a finished job leaves: metrics.json (the fields the report reads), in place of its error."""
    (job / "error.json").unlink(missing_ok=True)
    (job / "metrics.json").write_text(json.dumps({
        "perplexity": {"eval.txt": {"pruned": {"ppl": ppl}}}, "results": {"s0.50": {"ppl": {"eval.txt": ppl}}},
        "zero_shot": {}, "seconds": {"total": 1.0}, "calibration": {}}))


@pytest.mark.e2e
def test_the_report_of_an_interrupted_sweep_lists_every_job_and_names_no_best(tmp_path, tiny_llama_dir, corpus_files):
    from unipruning_cli.core.sweep import report

    env = cli_env(tmp_path / "runs", tmp_path / "cache")
    # schedule.dual_step=2 is refused before any work: a real sweep of 2 x 3 jobs (Hydra's own files) in seconds
    proc, _ = run_cli(["prune", "-m", *tiny_overrides(tiny_llama_dir, corpus_files), "schedule.dual_step=2",
                       "sparsity=0.5,0.6", "seed=0,1,2"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = next((tmp_path / "runs" / "multirun").iterdir())
    jobs = {p.name: p for p in sweep.iterdir() if p.is_dir()}
    assert sorted(jobs) == ["0", "1", "2", "3", "4", "5"]
    _finished(jobs["0"], 30.0)
    _finished(jobs["1"], 20.0)
    (jobs["2"] / "error.json").unlink()  # started, never ended (killed)
    shutil.rmtree(jobs["4"])  # the sweep stopped before these two
    shutil.rmtree(jobs["5"])

    res = report(sweep)
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert [r["job"].split()[0] for r in rows] == ["0", "1", "2", "3", "4", "5"]  # every job it asked for
    assert [r["status"] for r in rows] == ["ok", "ok", "incomplete", "failed", "not started", "not started"]
    assert [(r["sparsity"], r["seed"]) for r in rows[4:]] == [("0.6", "1"), ("0.6", "2")]  # their overrides
    assert not any("(best)" in r["job"] for r in rows)  # no unqualified best
    assert rows[1]["job"] == "1 (best of the finished 2 of 6)"
    md = (sweep / "report.md").read_text()
    assert md.startswith("**INCOMPLETE SWEEP: 2 of the 6 jobs it asked for finished")
    assert "never started (jobs 4, 5)" in md and "(job 2)" in md and f"hydra.sweep.dir={sweep} " in md
    assert not res["standing"]["complete"] and (sweep / "report.png").is_file()
    proc, _ = run_cli(["report", str(sweep)], tmp_path, env)
    assert proc.returncode == 0 and "INCOMPLETE SWEEP" in proc.stderr  # said again, last

    for name, ppl in (("2", 25.0), ("4", 10.0), ("5", 40.0)):  # the rest ran: now the best is the sweep's
        (sweep / name / ".hydra").mkdir(parents=True, exist_ok=True)
        if name != "2":
            shutil.copy(jobs["3"] / ".hydra" / "overrides.yaml", sweep / name / ".hydra" / "overrides.yaml")
            text = (sweep / name / ".hydra" / "overrides.yaml").read_text()
            (sweep / name / ".hydra" / "overrides.yaml").write_text(
                text.replace("seed=0", f"seed={1 if name == '4' else 2}"))
        _finished(sweep / name, ppl)
    report(sweep)
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert [r["job"] for r in rows if "best" in r["job"]] == ["4 (best)"]
    assert not (sweep / "report.md").read_text().startswith("**")


# ============================================================================ 26.4: the zero-shot batch size

@pytest.fixture()
def fake_lm_eval(monkeypatch):
    """lm-eval's entry points replaced by a fake whose accuracy moves with the batch size, as on GPUs (lm-eval#1645);
    returns the batch sizes it was called with."""
    import lm_eval
    import lm_eval.models.huggingface as hf

    calls: list[int] = []

    class FakeLM:
        def __init__(self, pretrained, tokenizer, batch_size, max_length, device):
            self.batch_size = batch_size
            calls.append(batch_size)

    def evaluate(model, tasks, **_):
        acc = 0.25 + 0.01 * model.batch_size
        return {"results": {t: {"acc,none": acc, "acc_norm,none": acc} for t in tasks}}

    monkeypatch.setattr(hf, "HFLM", FakeLM)
    monkeypatch.setattr(lm_eval, "simple_evaluate", evaluate)
    monkeypatch.setattr("unipruning_cli.evaluation.zeroshot._task_manager", lambda names=(): None)
    return calls


def test_the_dense_zero_shot_cache_and_metrics_hold_the_task_batch_size(tmp_path, monkeypatch, fake_lm_eval,
                                                                        tiny_llama_dir, corpus_files):
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.commands.prune import run_prune

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    metrics = {}
    for bs in (2, 4):
        cfg = compose_prune([*tiny_overrides(tiny_llama_dir, corpus_files), "eval.tasks=[quartz_offline]",
                             f"eval.task_batch_size={bs}"])
        metrics[bs] = run_prune(cfg, tmp_path / f"run{bs}")
    assert fake_lm_eval == [2, 2, 4, 4]  # dense and pruned each time: the dense result at 2 is not the one at 4
    for bs, m in metrics.items():
        saved = json.loads((tmp_path / f"run{bs}" / "metrics.json").read_text())["zero_shot"]
        assert saved["dense"]["batch_size"] == saved["pruned"]["batch_size"] == bs
        assert saved["dense"]["tasks"]["quartz_offline"]["acc"] == pytest.approx(0.25 + 0.01 * bs)
        assert f"batch size {bs}" in (tmp_path / f"run{bs}" / "summary.md").read_text()


# ===================================================================== 26.5: no speed promise, no sparsity_config

PROMISES = ("Ampere", "accelerat", "faster", "up to")


def test_an_export_holds_no_sparsity_config_and_promises_no_speed(tmp_path, monkeypatch, tiny_llama_dir, corpus_files,
                                                                  capsys):
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.commands.export import export_command
    from unipruning_cli.commands.prune import run_prune

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "source"  # a model whose config still carries compressed-tensors sparsity metadata
    shutil.copytree(tiny_llama_dir, source)
    config = json.loads((source / "config.json").read_text())
    config["sparsity_config"] = {"format": "dense", "targets": ["Linear"], "sparsity_structure": "2:4"}
    (source / "config.json").write_text(json.dumps(config))
    run = tmp_path / "run"
    run_prune(compose_prune([*tiny_overrides(source, corpus_files), "pattern=2:4"]), run)
    out = tmp_path / "export"
    capsys.readouterr()
    export_command([str(run), "--compressed", "--out", str(out)])
    printed = capsys.readouterr().out

    exported = json.loads((out / "config.json").read_text())
    assert "sparsity_config" not in exported
    assert "sparsity_config" not in (exported.get("quantization_config") or {})
    assert (out / "compressed.safetensors").is_file()  # --compressed still writes its file format
    card, summary = (out / "README.md").read_text(), (run / "summary.md").read_text()
    for text in (card, summary, printed):
        assert not [p for p in PROMISES if p in text], text
    assert "runs at the dense speed" in card and "no mainstream serving engine runs 2:4" in card
    assert "saves disk and download, not inference time" in card
    assert "speed: none" in summary and "expected speed-up: none" in printed


def test_every_speed_note_promises_nothing():
    from unipruning_cli.stages.export.card import short_speed, speed_note

    for n, m in ((0, 0), (2, 4), (4, 8)):
        for text in (speed_note(n, m), short_speed(n, m)):
            assert not [p for p in PROMISES if p in text], text
        assert short_speed(n, m).startswith("none")


def test_every_sparsity_description_leaves_an_exported_config(tmp_path):
    """The three places a source config may carry one (compressed-tensors nests it): all go, the rest stays."""
    from unipruning_cli.stages.export.folder import drop_sparsity_metadata

    config = {"model_type": "llama", "sparsity_config": {"format": "dense"},
              "quantization_config": {"quant_method": "compressed-tensors", "sparsity_config": {"format": "24"}},
              "compression_config": {"sparsity_config": {}, "keep": 1}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert drop_sparsity_metadata(tmp_path) == ["sparsity_config", "quantization_config.sparsity_config",
                                                "compression_config.sparsity_config"]
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "model_type": "llama", "quantization_config": {"quant_method": "compressed-tensors"},
        "compression_config": {"keep": 1}}
    assert drop_sparsity_metadata(tmp_path) == []


def test_the_summary_names_the_best_kept_and_the_best_updated_model_per_target():
    """Per target the lowest perplexity with the weights kept (a cut's own, or a reconstructed cut's weights_kept
    figure) and with them updated (a reconstruction, or SparseGPT's in-place cut), each with its cut; a run where
    nothing was updated has no such table."""
    from unipruning_cli.core.report import _best_md

    def result(ppl, **more):
        return {"ppl": {"wiki": ppl}, **more}

    metrics = {"perplexity": {"wiki": {}}, "results": {
        "s0.60_owl": result(70.0, reconstruction={"method": "obs"}, weights_kept={"ppl": {"wiki": 80.0}}),
        "wanda:s0.60_per_row": result(75.0, reconstruction={"method": "obs"}, weights_kept={"ppl": {"wiki": 79.0}}),
        "2of4": result(90.0, reconstruction={"method": "obs"}, weights_kept={"ppl": {"wiki": 110.0}})}}
    text = "\n".join(_best_md(metrics))
    assert "| 60% | 79.000 (`wanda:s0.60_per_row`) | 70.000 (`s0.60_owl`) |" in text
    assert "| 2:4 | 110.000 (`2of4`) | 90.000 (`2of4`) |" in text
    assert "| 60% | 88.000 (`s0.60_per_row`) |  |" not in text
    gpt = {"perplexity": {"wiki": {}}, "results": {"s0.60_per_row": result(88.0, weights="updated")}}
    assert "| 60% |  | 88.000 (`s0.60_per_row`) |" in "\n".join(_best_md(gpt))
    plain = {"perplexity": {"wiki": {}}, "results": {"s0.60_owl": result(80.0), "2of4": result(110.0)}}
    assert _best_md(plain) == []
