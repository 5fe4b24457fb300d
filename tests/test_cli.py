"""The installed ``unipruning`` console script, end to end, on a tiny random Llama.

Refused inputs must fail fast (no model load), name the field, and leave no run artifacts.
Successful runs are checked against references computed here from the original model folder:
perplexity from HF's own loss, Wanda / magnitude / N:M / global masks from hook-captured
activation norms and plain top-k, sparsity from counting.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from _helpers import (
    ARTIFACTS,
    LLAMA_PROJ,
    cli_env,
    hook_sq_sums,
    linears,
    merge_overrides,
    run_cli,
    tiny_overrides,
)

# every test here runs the CLI in a subprocess: end to end (`make test`, not `make test-fast`)
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.e2e]

REPO = Path(__file__).resolve().parent.parent
NSAMPLES, SEQLEN, MAX_WINDOWS = 8, 32, 4  # what tiny_overrides asks for
N_BLOCKS = 3


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5 + 1e-9)


# ====================================================================================== help / usage


def test_help_lists_commands(tmp_path):
    proc, _ = run_cli(["--help"], tmp_path, cli_env(tmp_path / "runs", tmp_path / "cache"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "prune" in proc.stdout and "prepare" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_no_arguments_prints_usage(tmp_path):
    proc, _ = run_cli([], tmp_path, cli_env(tmp_path / "runs", tmp_path / "cache"), timeout=60)
    assert proc.returncode == 0
    assert "usage: unipruning" in proc.stdout


def test_unknown_command_suggests_the_close_one(tmp_path):
    proc, _ = run_cli(["prnue"], tmp_path, cli_env(tmp_path / "runs", tmp_path / "cache"), timeout=60)
    assert proc.returncode != 0
    assert "did you mean 'prune'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_prune_help_lists_the_config_groups(tmp_path):
    proc, _ = run_cli(["prune", "--help"], tmp_path, cli_env(tmp_path / "runs", tmp_path / "cache"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    for group in ("model", "local_metric", "pattern"):
        options = sorted(p.stem for p in (REPO / "configs" / group).glob("*.yaml"))
        assert f"{group}: {', '.join(options)}" in proc.stdout
    assert not (tmp_path / "runs").exists()


# ====================================================================================== refused inputs


MODEL_OPTIONS = sorted(p.stem for p in (REPO / "configs" / "model").glob("*.yaml"))
METRIC_OPTIONS = sorted(p.stem for p in (REPO / "configs" / "local_metric").glob("*.yaml"))

BAD_INPUTS = [
    pytest.param(["sparsity=1.5"], ["sparsity", "1.5"], True, id="sparsity-1.5"),
    pytest.param(["pattern=3:2"], ["pattern", "3:2"], True, id="pattern-3:2"),
    pytest.param(["pattern=2:4", "sparsity=0.7"], ["sparsity", "0.7", "2:4"], True, id="pattern-2:4-sparsity-0.7"),
    pytest.param(["model=nosuchmodel"], ["model", "nosuchmodel", *MODEL_OPTIONS], False, id="model-nosuchmodel"),
    pytest.param(["local_metric=foo"], ["local_metric", "foo", *METRIC_OPTIONS], True, id="local_metric-foo"),
    pytest.param(["calibration.source=nosuch"], ["corpus", "nosuch", "owt_offline"], True, id="corpus-nosuch"),
    pytest.param(["calibration.source=/missing.txt"], ["corpus", "/missing.txt"], True, id="corpus-missing-file"),
]


@pytest.mark.parametrize("bad,expected,with_tiny", BAD_INPUTS)
def test_bad_input_fails_fast_and_cleanly(bad, expected, with_tiny, tmp_path, tiny_llama_dir, corpus_files):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    runs = tmp_path / "runs"
    args = merge_overrides(tiny_overrides(tiny_llama_dir, corpus_files), *bad) if with_tiny else bad
    proc, seconds = run_cli(["prune", *args], cwd, cli_env(runs, tmp_path / "cache"), timeout=60)
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert seconds < 15, f"refusal took {seconds:.1f} s (a model was loaded?)"
    for word in expected:
        assert word in proc.stderr, f"{word!r} not in stderr:\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr
    # no run artifacts anywhere, no Hydra output in the working directory
    if runs.exists():
        found = [p for p in runs.rglob("*") if ".hydra" not in p.parts  # Hydra's own record of the call
                 and (p.name in ARTIFACTS or p.suffix == ".safetensors" or p.name in ("masks", "stages"))]
        assert found == []
    assert list(cwd.iterdir()) == []
    assert not (tmp_path / "cache" / "dense").exists()


# ====================================================================================== end to end


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_e2e")
    (root / "cwd").mkdir()
    return {"root": root, "cwd": root / "cwd", "runs": root / "runs", "cache": root / "cache",
            "env": cli_env(root / "runs", root / "cache")}


@pytest.fixture(scope="module")
def base_args(tiny_llama_dir, corpus_files):
    return tiny_overrides(tiny_llama_dir, corpus_files)


def _run_into(ws, base_args, name: str, *extra: str):
    run_dir = ws["root"] / name
    proc, _ = run_cli(["prune", *merge_overrides(base_args, *extra), f"hydra.run.dir={run_dir}"], ws["cwd"], ws["env"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir, proc


@pytest.fixture(scope="module")
def variant(ws, base_args):
    """Memoised runs by name, so several tests can inspect one run."""
    done: dict[str, tuple[Path, object]] = {}

    def get(name: str, *extra: str):
        if name not in done:
            done[name] = _run_into(ws, base_args, name, *extra)
        return done[name]

    return get


@pytest.fixture(scope="module")
def default_run(ws, base_args):
    """A run with the defaults (wanda, unstructured 0.5) into $UNIPRUNING_RUNS/prune/<timestamp>."""
    proc, _ = run_cli(["prune", *base_args], ws["cwd"], ws["env"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    dirs = list((ws["runs"] / "prune").iterdir())
    assert len(dirs) == 1, dirs
    return dirs[0], proc


@pytest.fixture(scope="module")
def ref(tiny_llama_dir, corpus_files):
    """The original tiny model and the token windows the run uses, loaded independently."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unipruning_cli.data.corpora import calibration_windows

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    calib_ids = tok(corpus_files["calib"].read_text(), return_tensors="pt").input_ids[0]
    eval_ids = tok(corpus_files["eval"].read_text(), return_tensors="pt").input_ids[0]
    calib = calibration_windows(calib_ids, NSAMPLES, SEQLEN, seed=0)
    assert eval_ids.numel() >= MAX_WINDOWS * SEQLEN
    evalw = eval_ids[: MAX_WINDOWS * SEQLEN].view(MAX_WINDOWS, SEQLEN)
    return {"dir": tiny_llama_dir, "model": model, "calib": calib, "eval": evalw,
            "sq": hook_sq_sums(model, calib), "corpus": str(corpus_files["eval"])}


def _fresh_model(ref):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ref["dir"], dtype=torch.float32).eval()


@torch.no_grad()
def _hf_ppl(model, windows) -> float:
    losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    return math.exp(sum(losses) / len(losses))


def _apply(model, masks):
    lins = linears(model)
    with torch.no_grad():
        for n, m in masks.items():
            lins[n].weight.mul_(m.to(lins[n].weight.dtype))
    return model


def _load_run_masks(run_dir: Path) -> tuple[str, dict[str, torch.Tensor]]:
    from unipruning_cli.pruning.mask_files import load_masks

    files = sorted((run_dir / "masks").glob("*.safetensors"))
    assert len(files) == 1, files
    return files[0].name, load_masks(files[0])


def _wanda_scores(model, sq: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: lin.weight.detach().double().abs() * sq[n].sqrt()[None, :] for n, lin in linears(model).items()
            if n in sq}


def _topk_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    flat = scores.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.topk(keep).indices] = True
    return mask.view_as(scores)


def _per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    keep = scores.shape[1] - _round_half_up(scores.shape[1] * sparsity)
    return torch.stack([_topk_mask(row, keep) for row in scores])


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _mask_sparsity(masks) -> float:
    return sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def _expected_names() -> set[str]:
    return {f"model.layers.{i}.{p}" for i in range(N_BLOCKS) for p in LLAMA_PROJ}


# -------------------------------------------------------------------------------------- default run


def test_default_run_writes_its_artifacts(default_run, ws):
    run_dir, _ = default_run
    for rel in ("config.yaml", "metrics.json", "summary.md", "calibration.safetensors", "stages/prune.json"):
        assert (run_dir / rel).is_file(), rel
    assert [p.name for p in (run_dir / "masks").glob("*.safetensors")] == ["s0.50_per_row.safetensors"]
    marker = json.loads((run_dir / "stages" / "prune.json").read_text())
    assert marker["stage"] == "prune" and marker["fingerprint"]
    assert "masks/s0.50_per_row.safetensors" in marker["artifacts"]
    assert all((run_dir / a).exists() for a in marker["artifacts"])
    # Hydra's outputs stay in $UNIPRUNING_RUNS, nothing in the working directory
    assert list(ws["cwd"].iterdir()) == []
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["calibration"]["nsamples"] == NSAMPLES and cfg["calibration"]["seqlen"] == SEQLEN
    assert cfg["model"]["source"] == "local" and cfg["local_metric"] == {"name": "wanda"}


def test_default_run_metrics(default_run, ref):
    import transformers

    m = _metrics(default_run[0])
    assert m["method"] == "local" and m["local_metric"]["name"] == "wanda"
    assert m["target_sparsity"] == 0.5 and m["allocation"] == "per_row"

    # perplexities against HF's loss on the original model and on the masked original model
    ppl = m["perplexity"][ref["corpus"]]
    dense_ref = _hf_ppl(ref["model"], ref["eval"])
    assert math.isclose(ppl["dense"]["ppl"], dense_ref, rel_tol=1e-4)
    _, masks = _load_run_masks(default_run[0])
    pruned_ref = _hf_ppl(_apply(_fresh_model(ref), masks), ref["eval"])
    assert math.isclose(ppl["pruned"]["ppl"], pruned_ref, rel_tol=1e-4)
    assert ppl["pruned"]["windows"] == MAX_WINDOWS and ppl["pruned"]["seqlen"] == SEQLEN
    assert ppl["dense"]["windows"] == MAX_WINDOWS

    # sparsity
    assert abs(m["sparsity"]["overall"] - 0.5) < 1e-6
    assert m["sparsity"]["prunable_params"] == sum(lin.weight.numel() for lin in linears(ref["model"]).values())
    assert set(m["sparsity"]["per_layer"]) == _expected_names()

    # calibration
    assert m["calibration"]["tokens"] == NSAMPLES * SEQLEN
    assert m["calibration"]["nsamples"] == NSAMPLES and m["calibration"]["seqlen"] == SEQLEN

    # seconds per stage, versions
    secs = m["seconds"]
    for stage in ("load", "dense_eval", "calibrate_prune", "pruned_eval", "total"):
        assert isinstance(secs[stage], (int, float)) and secs[stage] >= 0, stage
    assert secs["total"] >= max(v for k, v in secs.items() if k != "total")
    from importlib.metadata import version

    assert m["versions"]["torch"] == torch.__version__
    assert m["versions"]["transformers"] == transformers.__version__
    assert m["versions"]["unipruning"] == version("unipruning")


def test_default_run_summary(default_run, ref):
    run_dir, _ = default_run
    m = _metrics(run_dir)
    text = (run_dir / "summary.md").read_text()
    ppl = m["perplexity"][ref["corpus"]]
    assert f"{ppl['pruned']['ppl']:.3f}" in text and f"{ppl['dense']['ppl']:.3f}" in text
    assert "0.5000" in text


def test_default_run_masks_are_wanda_per_row_under_its_sequential_protocol(default_run, ref):
    """Wanda's published protocol (calibration.mode=auto): block i is scored on the activations of the model whose
    blocks < i are already pruned. Checked block by block against full forwards of such a model."""
    name, masks = _load_run_masks(default_run[0])
    assert set(masks) == _expected_names()
    assert _metrics(default_run[0])["calibration"]["mode"] == "sequential"
    model = _fresh_model(ref)
    lins = linears(model)
    for i in range(len(model.model.layers)):
        block = f"model.layers.{i}."
        scores = _wanda_scores(model, hook_sq_sums(model, ref["calib"], only=block))
        for n in (n for n in masks if n.startswith(block)):
            mask = masks[n]
            assert mask.shape == lins[n].weight.shape
            assert (mask.sum(1) == mask.shape[1] // 2).all(), n  # exactly half of every row kept
            assert torch.equal(mask, _per_row(scores[n], 0.5)), n
        with torch.no_grad():  # block i as the run pruned it, for block i + 1's activations
            for n in (n for n in masks if n.startswith(block)):
                lins[n].weight.mul_(masks[n])
    one_shot = _wanda_scores(ref["model"], ref["sq"])
    assert any(not torch.equal(masks[n], _per_row(one_shot[n], 0.5)) for n in masks if ".layers.0." not in n)


def test_rerun_in_the_same_dir_skips_prune(default_run, ws, base_args):
    src, _ = default_run
    run_dir = ws["root"] / "rerun"
    shutil.copytree(src, run_dir)  # keeps mtimes
    marker = run_dir / "stages" / "prune.json"
    mask_file = run_dir / "masks" / "s0.50_per_row.safetensors"
    before = {p: (os.stat(p).st_mtime_ns, p.read_bytes()) for p in (marker, mask_file, run_dir / "calibration.safetensors")}
    log_before = (run_dir / "prune.log").read_text()
    assert "prune stage complete" not in log_before

    proc, _ = run_cli(["prune", *base_args, f"hydra.run.dir={run_dir}"], ws["cwd"], ws["env"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    for p, (mtime, data) in before.items():
        assert os.stat(p).st_mtime_ns == mtime, p
        assert p.read_bytes() == data, p
    new_log = (run_dir / "prune.log").read_text()[len(log_before):]
    assert "prune stage complete" in new_log and "loading masks/s0.50_per_row.safetensors" in new_log
    assert "stage calibrate_prune" not in new_log

    old, new = _metrics(src), _metrics(run_dir)
    for corpus in old["perplexity"]:
        assert new["perplexity"][corpus]["pruned"]["ppl"] == old["perplexity"][corpus]["pruned"]["ppl"]
        assert new["perplexity"][corpus]["dense"]["cached"] is True
        assert new["perplexity"][corpus]["dense"]["ppl"] == old["perplexity"][corpus]["dense"]["ppl"]
    assert new["sparsity"]["overall"] == old["sparsity"]["overall"]
    assert "calibrate_prune" not in new["seconds"]


def test_changed_config_in_the_same_dir_is_refused(default_run, ws, base_args):
    """One directory, one run (issue 26): another seed there is refused and leaves the run as it was; with
    existing_run=beside it runs in a fresh directory next to it."""
    src, _ = default_run
    run_dir = ws["root"] / "rerun_changed"
    shutil.copytree(src, run_dir)
    old_marker = (run_dir / "stages" / "prune.json").read_bytes()
    proc, _ = run_cli(["prune", *merge_overrides(base_args, "seed=1"), f"hydra.run.dir={run_dir}"],
                      ws["cwd"], ws["env"])
    assert proc.returncode == 2 and "holds a run of another config (seed: 0 -> 1)" in proc.stderr, proc.stderr[-4000:]
    assert (run_dir / "stages" / "prune.json").read_bytes() == old_marker
    proc, _ = run_cli(["prune", *merge_overrides(base_args, "seed=1", "existing_run=beside"),
                       f"hydra.run.dir={run_dir}"], ws["cwd"], ws["env"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = _metrics(run_dir.with_name(f"{run_dir.name}-1"))
    assert m["seed"] == 1 and "calibrate_prune" in m["seconds"]
    assert _metrics(run_dir)["seed"] == 0


# -------------------------------------------------------------------------------------- variants


def test_nm_2_4_every_group_has_two_nonzeros(variant, ref):
    run_dir, _ = variant("nm24", "pattern=2:4", "calibration.mode=one_shot")  # the N:M rule on dense statistics
    name, masks = _load_run_masks(run_dir)
    assert name == "2of4.safetensors"
    assert set(masks) == _expected_names()
    pruned = _apply(_fresh_model(ref), masks)
    scores = _wanda_scores(ref["model"], ref["sq"])
    for n, lin in linears(pruned).items():
        w = lin.weight.detach()
        groups = (w != 0).view(w.shape[0], w.shape[1] // 4, 4).sum(-1)
        assert (groups == 2).all(), n
        # the kept two are the two highest Wanda scores of each group
        s = scores[n].view(w.shape[0], -1, 4)
        want = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, s.topk(2, dim=-1).indices, True)
        assert torch.equal(masks[n], want.view_as(masks[n])), n
    m = _metrics(run_dir)
    assert m["pattern"] == "2of4" and abs(m["sparsity"]["overall"] - 0.5) < 1e-6


def test_magnitude_keeps_largest_half_per_matrix(variant, ref):
    run_dir, _ = variant("magnitude", "local_metric=magnitude")
    m = _metrics(run_dir)
    assert m["local_metric"]["name"] == "magnitude" and m["allocation"] == "per_matrix"
    assert abs(m["sparsity"]["overall"] - 0.5) < 1e-6
    _, masks = _load_run_masks(run_dir)
    for n, lin in linears(ref["model"]).items():
        w = lin.weight.detach().abs()
        assert torch.equal(masks[n], _topk_mask(w, w.numel() // 2)), n


def test_sparsegpt_hits_the_sparsity(variant, ref):
    run_dir, _ = variant("sparsegpt", "method=sparsegpt")
    m = _metrics(run_dir)
    assert m["method"] == "sparsegpt"
    assert abs(m["sparsity"]["overall"] - 0.5) < 1e-6
    for n, s in m["sparsity"]["per_layer"].items():
        assert abs(s - 0.5) < 1e-6, n  # per_matrix budget
    _, masks = _load_run_masks(run_dir)
    assert set(masks) == _expected_names()
    assert abs(_mask_sparsity(masks) - 0.5) < 1e-9
    ppl = m["perplexity"][ref["corpus"]]["pruned"]["ppl"]
    assert math.isfinite(ppl)
    # SparseGPT reconstructs the kept weights: masking the original model is a different model
    masked_only = _hf_ppl(_apply(_fresh_model(ref), masks), ref["eval"])
    assert not math.isclose(ppl, masked_only, rel_tol=1e-6)


def test_one_shot_calibration_scores_every_block_on_the_dense_model(variant, default_run, ref):
    """calibration.mode=one_shot: Wanda per row from the dense model's statistics; block 0 sees the same inputs as
    under the default sequential protocol, later blocks do not."""
    run_dir, _ = variant("one_shot", "calibration.mode=one_shot")
    m = _metrics(run_dir)
    assert m["calibration"]["mode"] == "one_shot"
    assert abs(m["sparsity"]["overall"] - 0.5) < 1e-6
    _, one_shot = _load_run_masks(run_dir)
    _, seq = _load_run_masks(default_run[0])
    scores = _wanda_scores(ref["model"], ref["sq"])
    assert all(torch.equal(one_shot[n], _per_row(scores[n], 0.5)) for n in one_shot)
    block0 = [n for n in seq if n.startswith("model.layers.0.")]
    assert all(torch.equal(seq[n], one_shot[n]) for n in block0)
    assert any(not torch.equal(seq[n], one_shot[n]) for n in seq if n not in block0)


def test_global_allocation(variant, ref):
    run_dir, _ = variant("global", "pattern.allocation=global", "pattern.max_matrix_sparsity=1.0")  # the plain rule
    m = _metrics(run_dir)
    assert m["allocation"] == "global"
    assert abs(m["sparsity"]["overall"] - 0.5) < 1e-6
    per_layer = m["sparsity"]["per_layer"]
    assert max(per_layer.values()) - min(per_layer.values()) > 0.01  # not a per-layer budget
    _, masks = _load_run_masks(run_dir)
    scores = _wanda_scores(ref["model"], ref["sq"])
    names = sorted(scores)
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    keep = flat.numel() - _round_half_up(flat.numel() * 0.5)
    want = _topk_mask(flat, keep)
    got = torch.cat([masks[n].reshape(-1) for n in names])
    assert torch.equal(got, want)


# -------------------------------------------------------------------------------------- multirun


@pytest.fixture(scope="module")
def multirun(ws, base_args):
    runs = ws["root"] / "mruns"
    env = {**ws["env"], "UNIPRUNING_RUNS": str(runs)}
    proc, _ = run_cli(["prune", "-m", *base_args, "sparsity=0.3,0.6"], ws["cwd"], env, timeout=240)
    sweeps = list((runs / "multirun").iterdir()) if (runs / "multirun").exists() else []
    assert len(sweeps) == 1, (sweeps, proc.stderr[-4000:])
    return proc, sweeps[0]


def test_multirun_makes_one_job_dir_per_value(multirun, ws):
    proc, sweep = multirun
    found = sorted(sweep.rglob("metrics.json"))
    assert len(found) == 2, (found, proc.stderr[-4000:])
    got = {}
    for path in found:
        job = path.parent
        cfg = yaml.safe_load((job / "config.yaml").read_text())
        m = json.loads(path.read_text())
        got[cfg["sparsity"]] = m
        # the job's own masks, at its own sparsity, round half up per row
        _, masks = _load_run_masks(job)
        zeros = sum(_round_half_up(mk.shape[1] * cfg["sparsity"]) * mk.shape[0] for mk in masks.values())
        total = sum(mk.numel() for mk in masks.values())
        assert abs(m["sparsity"]["overall"] - zeros / total) < 1e-9
        assert abs(_mask_sparsity(masks) - zeros / total) < 1e-9
    assert sorted(got) == [0.3, 0.6]
    assert abs(got[0.3]["sparsity"]["overall"] - 0.3) < 0.01
    assert abs(got[0.6]["sparsity"]["overall"] - 0.6) < 0.01
    assert len({p.parent for p in found}) == 2
    assert list(ws["cwd"].iterdir()) == []


def test_multirun_exits_zero(multirun):
    proc, _ = multirun
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_multirun_job_dirs_are_direct_children_of_the_sweep_dir(multirun):
    _, sweep = multirun
    for path in sweep.rglob("metrics.json"):
        assert path.parent.parent == sweep, path.relative_to(sweep)
