"""Nothing silently wrong after the run (issue 26): a run knows its inputs, a run directory holds one run and one
writer, no write destroys what the user did not produce, storage is checked before the work."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from _helpers import build_tiny_model, cli_env, run_cli, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _header(path: Path) -> dict:
    from unipruning_cli.pruning.mask_files import read_masks_header

    return read_masks_header(path)[1]


# A prune run through the CLI that most tests here then work on: those are end to end (`e2e`).
@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_llama_dir, tiny_tokenizer, corpus_files):
    """A model folder of its own (tests swap its weights), a second model of the same shapes, one Wanda 50 % run."""
    root = tmp_path_factory.mktemp("provenance")
    model = root / "model"
    shutil.copytree(tiny_llama_dir, model)
    other = root / "other"
    build_tiny_model("llama", len(tiny_tokenizer), seed=1).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    (root / "cwd").mkdir()
    env = cli_env(root / "runs", root / "cache")
    args = tiny_overrides(model, corpus_files)
    run = root / "run"
    proc, _ = run_cli(["prune", *args, f"hydra.run.dir={run}"], root / "cwd", env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "model": model, "other": other, "env": env, "args": args, "run": run, "cwd": root / "cwd"}


def _cli(ws, *args: str):
    return run_cli(list(args), ws["cwd"], ws["env"])[0]


@pytest.fixture()
def swapped_weights(ws):
    """The run's model folder holding other weights of the same shapes (restored after the test)."""
    target = ws["model"] / "model.safetensors"
    saved = target.read_bytes()
    shutil.copyfile(ws["other"] / "model.safetensors", target)
    yield target
    target.write_bytes(saved)


# ------------------------------------------------------------------------------------------ provenance


@pytest.mark.e2e
def test_run_records_what_it_read_by_content(ws, corpus_files):
    metrics = json.loads((ws["run"] / "metrics.json").read_text())
    inputs = metrics["inputs"]
    weights = ws["model"] / "model.safetensors"
    assert inputs["model"]["model.safetensors"] == {"bytes": weights.stat().st_size, "sha256": _sha(weights)}
    assert inputs["model"]["config.json"]["sha256"] == _sha(ws["model"] / "config.json")
    assert inputs["tokenizer"]["tokenizer.json"]["sha256"] == _sha(ws["model"] / "tokenizer.json")
    assert inputs["corpora"]["calibration"]["sha256"] == _sha(corpus_files["calib"])
    assert inputs["corpora"]["eval"][str(corpus_files["eval"])]["sha256"] == _sha(corpus_files["eval"])
    for masks in (ws["run"] / "masks").glob("*.safetensors"):
        header = _header(masks)["inputs"]
        assert header["model"] == inputs["model"] and header["tokenizer"] == inputs["tokenizer"]


@pytest.mark.e2e
def test_changed_weights_are_refused_by_export_eval_and_apply(ws, swapped_weights):
    run, masks = ws["run"], next((ws["run"] / "masks").glob("*.safetensors"))
    before = (run / "metrics.json").read_bytes()
    for args in (["export", str(run), "--out", str(ws["root"] / "ex-refused")],
                 ["eval", str(run)],
                 ["apply", str(masks), "--model", str(ws["model"]), "--out", str(ws["root"] / "ap-refused")]):
        proc = _cli(ws, *args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert "model.safetensors changed" in proc.stderr and "--allow-changed-model" in proc.stderr, proc.stderr
        assert "loading" not in proc.stderr  # refused before any weight is read
    assert (run / "metrics.json").read_bytes() == before
    assert not (ws["root"] / "ex-refused").exists() and not (ws["root"] / "ap-refused").exists()

    proc_eval = proc = _cli(ws, "eval", str(run), "--allow-changed-model")
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = json.loads((run / "metrics.json").read_text())
    old = json.loads(before)
    assert after["results"] == old["results"] and after["perplexity"] == old["perplexity"]  # the run's own figures
    assert any("model.safetensors changed" in c for c in after["evaluations"][-1]["changed_model"])
    assert after["evaluations"][-1]["per_tag"]

    out = ws["root"] / "ex-allowed"
    proc = _cli(ws, "export", str(run), "--out", str(out), "--allow-changed-model")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((out / "unipruning_export.json").read_text())
    assert any("model.safetensors changed" in c for c in json.dumps(record).split('"'))
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "\n---\n\n> **Warning: these weights are not the ones" in card  # after the YAML
    assert "CHANGED MODEL" in proc_eval.stderr + proc_eval.stdout


@pytest.mark.e2e
def test_apply_to_another_model_of_the_same_shapes_is_refused(ws):
    masks = next((ws["run"] / "masks").glob("*.safetensors"))
    proc = _cli(ws, "apply", str(masks), "--model", str(ws["other"]), "--out", str(ws["root"] / "ap-other"))
    assert proc.returncode == 2 and "model.safetensors changed" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.e2e
def test_resuming_a_run_on_changed_weights_is_refused(ws, swapped_weights):
    proc = _cli(ws, "prune", *ws["args"], f"hydra.run.dir={ws['run']}")
    assert proc.returncode == 2 and "started on other inputs" in proc.stderr, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------ one run per directory


@pytest.mark.e2e
def test_a_run_directory_holds_one_run(ws):
    run = ws["run"]
    keep = {p: p.read_bytes() for p in [run / "config.yaml", run / "metrics.json", run / ".hydra" / "overrides.yaml",
                                        *(run / "masks").glob("*")]}
    other = [*ws["args"], "local_metric=magnitude", "sparsity=0.6", f"hydra.run.dir={run}"]
    proc = _cli(ws, "prune", *other)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "holds a run of another config" in proc.stderr and "local_metric.name" in proc.stderr
    assert {p: p.read_bytes() for p in keep} == keep  # Hydra's .hydra/ of the old run put back too
    assert sorted(p.name for p in (run / "masks").iterdir()) == sorted(p.name for p in keep if p.parent.name == "masks")
    assert not (run / "error.json").exists()

    proc = _cli(ws, "prune", *other, "existing_run=beside")
    assert proc.returncode == 0, proc.stderr[-2000:]
    beside = run.with_name(f"{run.name}-1")
    assert json.loads((beside / "metrics.json").read_text())["target_sparsity"] == 0.6
    assert "magnitude" in (beside / ".hydra" / "overrides.yaml").read_text()
    assert {p: p.read_bytes() for p in keep} == keep


@pytest.mark.e2e
def test_a_run_directory_has_one_writer(ws):
    from unipruning_cli.core.rundir import run_lock

    with run_lock(ws["run"], "prune"):
        proc = _cli(ws, "eval", str(ws["run"]))
        assert proc.returncode == 2 and "is being written by `unipruning prune`" in proc.stderr, proc.stderr[-2000:]
        proc = _cli(ws, "prune", *ws["args"], f"hydra.run.dir={ws['run']}")
        assert proc.returncode == 2 and "is being written by `unipruning prune`" in proc.stderr, proc.stderr[-2000:]
        assert not (ws["run"] / "error.json").exists()  # the refused launch writes nothing into the live run
        # an export that only reads a held cut writes nothing into the run: it needs no lock (read-only runs export)
        proc = _cli(ws, "export", str(ws["run"]), "sparsity=0.5", "--out", str(ws["root"] / "ex-locked"))
        assert proc.returncode == 0, proc.stderr[-2000:]
    with run_lock(ws["run"], "eval"):  # released: taken again
        pass


def test_config_differences_ignore_what_only_one_version_knows():
    from unipruning_cli.core.rundir import config_differences

    old = {"method": "local", "eval": {"seqlen": 32}, "plan_check": True}
    new = {"method": "local", "eval": {"seqlen": 32, "added_later": 1}, "plan_check": False}
    assert config_differences(old, new) == []
    assert config_differences(old, {**new, "method": "sparsegpt"}) == ["method: 'local' -> 'sparsegpt'"]


# ------------------------------------------------------------------------------------------ no write destroys user files


@pytest.mark.e2e
def test_export_never_writes_into_a_model_source_or_the_cache(ws):
    model = ws["model"]
    before = {p.name: _sha(p) for p in model.iterdir()}
    for out in (model, model / "pruned", ws["root"] / "cache" / "x"):
        proc = _cli(ws, "export", str(ws["run"]), "--out", str(out), "--force")
        assert proc.returncode == 2 and "model source or a cache" in proc.stderr, (out, proc.stderr[-2000:])
    masks = next((ws["run"] / "masks").glob("*.safetensors"))
    proc = _cli(ws, "apply", str(masks), "--model", str(model), "--out", str(model), "--force")
    assert proc.returncode == 2 and "model source or a cache" in proc.stderr, proc.stderr[-2000:]
    assert {p.name: _sha(p) for p in model.iterdir()} == before


# ------------------------------------------------------------------------------------------ storage


def _unwritable() -> Path:
    """A folder no file can be created in, even by root (sysfs); the test is skipped where there is none."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(dir="/sys")
    except OSError:
        return Path("/sys/unipruning-test")
    Path(probe).unlink()
    pytest.skip("/sys is writable here")


@pytest.mark.e2e
def test_unwritable_storage_is_refused_before_the_load(ws):
    bad = _unwritable()
    env = {**ws["env"], "UNIPRUNING_CACHE": str(bad / "cache")}
    proc = run_cli(["prune", *ws["args"], f"hydra.run.dir={ws['root'] / 'ro-cache'}"], ws["cwd"], env)[0]
    assert proc.returncode == 2 and "cache (UNIPRUNING_CACHE)" in proc.stderr and "not writable" in proc.stderr
    assert "loading" not in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli(ws, "prune", *ws["args"], f"hydra.run.dir={bad / 'run'}")
    assert proc.returncode == 2 and "hydra.run.dir" in proc.stderr and "not writable" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "PermissionError" not in proc.stderr
    proc = _cli(ws, "export", str(ws["run"]), "--out", str(bad / "out"))
    assert proc.returncode == 2 and "--out" in proc.stderr and "not writable" in proc.stderr, proc.stderr


@pytest.mark.e2e
def test_a_run_that_cannot_fit_the_disk_is_refused(ws, monkeypatch, tmp_path):
    from unipruning_cli.stages import storage
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.core.errors import UserError

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    cfg = compose_prune([o for o in ws["args"] if not o.startswith("method=")] + ["method=unipruning"])
    need = storage.run_disk_bytes(cfg)
    monkeypatch.setattr(storage, "free_bytes", lambda path: need["run_dir"] + need["cache"] - 1)
    with pytest.raises(UserError, match="needs about .* GiB .* free there"):
        storage.check_run_storage(cfg, tmp_path / "run")
    monkeypatch.setattr(storage, "free_bytes", lambda path: need["run_dir"] + need["cache"])
    assert storage.check_run_storage(cfg, tmp_path / "run") == need


def test_disk_figure_bounds_what_a_unipruning_run_writes(frozen_search_cfg, tmp_path):
    """The figure against the bytes a real (tiny) UniPruning run leaves in its directory, tensors only."""
    from unipruning_cli.stages import storage
    from unipruning_cli.commands.prune import run_prune

    cfg = frozen_search_cfg("export.sparsities=[0.5,0.6]", "export.patterns=[2:4]")
    run_prune(cfg, tmp_path / "run")
    written = sum(f.stat().st_size for f in (tmp_path / "run").rglob("*.safetensors"))
    need = storage.run_disk_bytes(cfg)["run_dir"] - storage.SMALL_FILES
    assert 0 < written <= need


def test_a_failed_write_names_the_path_what_and_how_much(tmp_path):
    from unipruning_cli.core.errors import UserError
    from unipruning_cli.core.rundir import _atomic_write

    def full(path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError) as err:
        _atomic_write(tmp_path / "gamma.safetensors", full, 3 * 2**20)
    text = str(err.value)
    assert str(tmp_path / "gamma.safetensors") in text and "3.0 MiB" in text and "No space left" in text
    assert "MiB are free there" in text and isinstance(err.value, OSError)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_a_plot_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    """PIL reports ENOSPC as an AttributeError raised while handling it; the cause is what the user reads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unipruning_cli.core.errors import UserError
    from unipruning_cli.core.report import save_png

    fig = plt.figure()

    def full(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise AttributeError("'NoneType' object has no attribute 'close'")  # what PIL's cleanup raised

    monkeypatch.setattr(fig, "savefig", full)
    with pytest.raises(UserError, match=r"cannot write the plot ppl\.png .* No space left on device"):
        save_png(fig, tmp_path / "plots" / "ppl.png")
    assert not list((tmp_path / "plots").iterdir())


def test_plan_shows_the_disk_a_run_writes(tiny_llama_dir, corpus_files, tmp_path, monkeypatch):
    from unipruning_cli.commands.plan import plan_command
    from unipruning_cli.stages.storage import run_disk_bytes
    from unipruning_cli.core.config import compose_prune

    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    args = [o for o in tiny_overrides(tiny_llama_dir, corpus_files) if not o.startswith("method=")] + ["method=unipruning"]
    plan_command([*args, "--gpus", "0", "--json", str(tmp_path / "plan.json")])
    disk = json.loads((tmp_path / "plan.json").read_text())["disk_gib"]
    expected = run_disk_bytes(compose_prune(args), "cpu")
    assert disk == {k: round(v / 2**30, 2) for k, v in expected.items()}


@pytest.mark.e2e
def test_a_run_without_evaluation_corpora_finishes(ws):
    args = [a for a in ws["args"] if not a.startswith("eval.corpora=")] + ["eval.corpora=[]"]
    proc = _cli(ws, "prune", *args, f"hydra.run.dir={ws['root'] / 'no-corpora'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((ws["root"] / "no-corpora" / "metrics.json").read_text())["perplexity"] == {}


# ------------------------------------------------------------------------------------------ hub models


def _hub_cache(root: Path, model_dir: Path, repo: str = "acme/tiny") -> Path:
    """A Hugging Face hub cache holding ``model_dir`` as ``repo`` at one commit, laid out as huggingface_hub lays it
    out: blobs named by their SHA-256, a snapshot of symlinks, refs/main."""
    import os

    cache = root / "hf-hub"
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for f in model_dir.iterdir():
        blob = repo_dir / "blobs" / _sha(f)
        shutil.copyfile(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    return cache


@pytest.mark.e2e
def test_a_hub_model_is_recorded_by_its_blobs_and_a_changed_blob_refused(ws, corpus_files):
    import os

    cache = _hub_cache(ws["root"] / "hub", ws["model"])
    env = {**ws["env"], "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    args = [a for a in ws["args"] if not a.startswith(("model=", "model.path="))] + ["model=hf", "model.path=acme/tiny"]
    run = ws["root"] / "hub-run"
    proc = run_cli(["prune", *args, f"hydra.run.dir={run}"], ws["cwd"], env)[0]
    assert proc.returncode == 0, proc.stderr[-3000:]
    inputs = json.loads((run / "metrics.json").read_text())["inputs"]
    assert inputs["commit"] == "0123456789abcdef0123456789abcdef01234567"
    assert inputs["model"]["model.safetensors"]["sha256"] == _sha(ws["model"] / "model.safetensors")
    assert set(inputs["model"]) >= {"config.json", "model.safetensors"} and "tokenizer.json" in inputs["tokenizer"]

    # the same commit's weights replaced in the cache (a corrupted or hand-edited blob)
    snap = cache / "models--acme--tiny" / "snapshots" / inputs["commit"]
    other = cache / "models--acme--tiny" / "blobs" / _sha(ws["other"] / "model.safetensors")
    shutil.copyfile(ws["other"] / "model.safetensors", other)
    (snap / "model.safetensors").unlink()
    os.symlink(os.path.relpath(other, snap), snap / "model.safetensors")
    proc = run_cli(["export", str(run), "--out", str(ws["root"] / "hub-ex")], ws["cwd"], env)[0]
    assert proc.returncode == 2 and "model.safetensors changed" in proc.stderr, proc.stderr[-2000:]
    proc = run_cli(["export", str(run), "--out", str(cache / "x")], ws["cwd"], env)[0]
    assert proc.returncode == 2 and "model source or a cache" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.e2e
def test_a_sweep_launched_again_with_another_config_leaves_the_old_jobs_as_they_were(ws):
    """Hydra rewrites each job's .hydra/ before the task runs: a refused job puts its overrides back, and the report
    of the sweep folder does not present the old jobs' figures under the new overrides."""
    sweep = ws["root"] / "sweep"
    proc = _cli(ws, "prune", "-m", *ws["args"], "seed=0,1", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    before = {p: p.read_bytes() for p in sweep.glob("*/.hydra/overrides.yaml")}
    assert len(before) == 2 and all((p.parent.parent / "overrides.yaml").is_file() for p in before)
    proc = _cli(ws, "prune", "-m", *ws["args"], "seed=0,1", "sparsity=0.6", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0 and proc.stderr.count("holds a run of another config") == 2, proc.stderr[-3000:]
    assert {p: p.read_bytes() for p in before} == before
    assert not list(sweep.glob("*/error.json"))
    proc = _cli(ws, "report", str(sweep))
    report = (sweep / "report.md").read_text()
    assert "INCOMPLETE SWEEP: 0 of the 2 jobs it asked for" in report and "never started (jobs 0, 1)" in report
    assert "2 folder(s) hold runs of other overrides" in report and "(best" not in report, report


@pytest.mark.e2e
def test_resume_neutral_keys_and_a_resume_counts_what_it_holds(ws, monkeypatch, tmp_path):
    """What the plan's advice changes (placement, batch sizes, search state) resumes; a resumed run's disk check
    counts the bytes its directory already holds as written."""
    from unipruning_cli.stages import storage
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.core.rundir import config_differences

    old = {"model": {"placement": "device", "path": "x"}, "eval": {"batch_size": 4}, "schedule": {"search_state": "auto"}}
    new = {"model": {"placement": "onload", "path": "x"}, "eval": {"batch_size": 1}, "schedule": {"search_state": "host"}}
    assert config_differences(old, new) == []
    monkeypatch.setenv("UNIPRUNING_CACHE", str(tmp_path / "cache"))
    cfg = compose_prune([o for o in ws["args"] if not o.startswith("method=")] + ["method=unipruning"])
    need = storage.run_disk_bytes(cfg)
    run = tmp_path / "run"
    run.mkdir()
    (run / "gamma.safetensors").write_bytes(b"\0" * 2**20)
    monkeypatch.setattr(storage, "free_bytes", lambda path: need["run_dir"] + need["cache"] - 2**20)
    assert storage.check_run_storage(cfg, run)["run_dir"] == need["run_dir"] - 2**20


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    import fcntl

    from unipruning_cli.core import rundir

    def no_locks(fd, op):
        if op & fcntl.LOCK_EX:
            raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    with rundir.run_lock(tmp_path / "run", "prune"):
        pass
    assert "takes no locks" in caplog.text


def test_a_gguf_files_own_folder_is_protected(tmp_path):
    from omegaconf import OmegaConf

    from unipruning_cli.core.config import ModelConfig
    from unipruning_cli.core.errors import UserError
    from unipruning_cli.stages.export.folder import check_out, protected_sources

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.gguf").write_bytes(b"GGUF")
    cfg = OmegaConf.structured(ModelConfig(name="m", source="gguf", path=str(tmp_path / "models" / "m.gguf")))
    with pytest.raises(UserError, match="model source or a cache"):
        check_out(tmp_path / "models", True, [], protected_sources(cfg))


@pytest.mark.e2e
def test_force_replaces_an_earlier_export_only(ws, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    proc = _cli(ws, "export", str(ws["run"]), "--out", str(mine), "--force")
    assert proc.returncode == 2 and "no unipruning export wrote" in proc.stderr, proc.stderr[-2000:]
    assert (mine / "notes.txt").read_text() == "mine"
    out = tmp_path / "export"
    for _ in range(2):  # the second replaces the first
        proc = _cli(ws, "export", str(ws["run"]), "--out", str(out), "--force")
        assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.e2e
def test_a_rerun_keeps_the_runs_later_evaluations(ws):
    run = ws["run"]
    assert _cli(ws, "eval", str(run), "eval.max_windows=2").returncode == 0
    evaluations = json.loads((run / "metrics.json").read_text())["evaluations"]
    proc = _cli(ws, "prune", *ws["args"], f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text())["evaluations"] == evaluations
