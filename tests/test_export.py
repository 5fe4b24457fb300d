"""``unipruning export`` and ``unipruning apply`` on the tiny random Llama, end to end.

Two real prune runs are made here (CLI subprocesses, as a user would): a UniPruning run (frozen search,
3 steps, anchored to Wanda, unstructured 0.5 per row plus a 2:4 cut) and a Wanda run. Exports are then
checked against what the runs measured: a fresh Python process that imports only transformers loads the
exported folders and recomputes perplexity on the same token windows, which must give the run's number;
zeros are counted in the reloaded weights. Refusals (bad run dirs, unavailable cuts, SparseGPT, existing
output folders) must exit 2 with a clear message; masks applied by ``apply`` must reproduce the export bit
for bit; the compressed N:M file must round-trip exactly and be small.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from _helpers import build_tiny_model, cli_env, load_script, eval_windows_of, merge_overrides, run_cli, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parent.parent
REL_TOL = 1e-6


# ====================================================================================== runs


# Prune runs through the CLI that most tests here export and reload: those are end to end (`e2e`).
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    (root / "cwd").mkdir()
    return {"root": root, "cwd": root / "cwd", "env": cli_env(root / "runs", root / "cache")}


def _prune(ws, args: list[str], name: str) -> Path:
    run_dir = ws["root"] / name
    proc, _ = run_cli(["prune", *args, f"hydra.run.dir={run_dir}"], ws["cwd"], ws["env"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


@pytest.fixture(scope="module")
def uni_run(ws, tiny_llama_dir, corpus_files) -> Path:
    args = merge_overrides(tiny_overrides(tiny_llama_dir, corpus_files), "method=unipruning",
                           "schedule.weight_mode=frozen", "schedule.steps=3", "export.patterns=[2:4]",
                           "pattern.allocation=per_row")  # the cuts _expected_zeros can count row by row
    return _prune(ws, args, "uni")


@pytest.fixture(scope="module")
def wanda_run(ws, tiny_llama_dir, corpus_files) -> Path:
    return _prune(ws, tiny_overrides(tiny_llama_dir, corpus_files), "wanda")


@pytest.fixture(scope="module")
def exported(ws, uni_run, wanda_run):
    """Memoised in-process exports: name -> (folder, stdout)."""
    from unipruning_cli.commands.export import export_command

    runs = {"uni": uni_run, "wanda": wanda_run}
    done: dict[str, tuple[Path, str]] = {}

    def get(name: str, run: str, *opts: str) -> tuple[Path, str]:
        if name not in done:
            out = ws["root"] / "exports" / name
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                export_command([str(runs[run]), *opts, "--out", str(out)])
            done[name] = (out, buf.getvalue())
        return done[name]

    return get


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("model*.safetensors"))
    assert files, list(folder.iterdir())
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _expected_zeros(shape, target: str) -> int:
    from unipruning_cli.pruning.masks import num_pruned

    rows, cols = shape
    if target == "2of4":
        return rows * cols // 2
    sparsity, allocation = float(target[1:5]), target[6:]
    if allocation == "per_row":
        return rows * num_pruned(cols, sparsity)
    assert allocation == "per_matrix", target
    return num_pruned(rows * cols, sparsity)


# A fresh interpreter that imports only torch and transformers: load each folder, score the windows the
# way the run does (batches of the run's batch size, per-window mean NLL, exp of the mean) and with HF's
# own loss (one window at a time), and count the zeros of every Linear inside the decoder blocks.
RELOAD_SCRIPT = r"""
import json, math, sys
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

torch.set_num_threads(1)
spec = json.load(open(sys.argv[1]))
windows = torch.tensor(spec["windows"], dtype=torch.long)
out = {}
for folder in spec["folders"]:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    nlls, hf = [], []
    with torch.no_grad():
        for batch in torch.split(windows, spec["batch_size"]):
            logits = model(batch, use_cache=False).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                   reduction="none").view(batch.shape[0], -1)
            nlls.append(loss.mean(dim=1))
        for w in windows:
            hf.append(float(model(input_ids=w[None], labels=w[None]).loss))
    zeros = {}
    for i, block in enumerate(model.model.layers):
        for name, mod in block.named_modules():
            if isinstance(mod, torch.nn.Linear):
                zeros[f"model.layers.{i}.{name}"] = [int((mod.weight == 0).sum()), list(mod.weight.shape)]
    out[folder] = {"ppl": math.exp(torch.cat(nlls).double().mean().item()),
                   "ppl_hf_loss": math.exp(sum(hf) / len(hf)), "zeros": zeros, "dtype": str(model.dtype)}
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def reloaded(ws, exported, uni_run, wanda_run):
    """Exports of both runs, reloaded and scored in one fresh process."""
    cases = {
        "uni_s050": ("uni", uni_run, "s0.50_per_row", ()),
        "uni_2of4": ("uni", uni_run, "2of4", ("pattern=2:4",)),
        "wanda_s050": ("wanda", wanda_run, "s0.50_per_row", ()),
        "uni_s080": ("uni", uni_run, "s0.80_per_row", ("sparsity=0.8",)),
        "uni_s070_pm": ("uni", uni_run, "s0.70_per_matrix", ("sparsity=0.7", "allocation=per_matrix")),
    }
    folders = {name: exported(name, run, *opts)[0] for name, (run, _, _, opts) in cases.items()}
    windows, batch_size, corpus = eval_windows_of(uni_run)
    w2, _, _ = eval_windows_of(wanda_run)
    assert torch.equal(windows, w2)
    spec = ws["root"] / "reload_spec.json"
    spec.write_text(json.dumps({"folders": [str(f) for f in folders.values()], "windows": windows.tolist(),
                                "batch_size": batch_size}))
    script = ws["root"] / "reload.py"
    script.write_text(RELOAD_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(spec)], cwd=ws["cwd"], env=ws["env"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout)
    return {name: {**got[str(folders[name])], "run": cases[name][1], "tag": cases[name][2], "corpus": corpus,
                   "folder": folders[name]} for name in cases}


# ====================================================================================== export


@pytest.mark.parametrize("case", ["uni_s050", "uni_2of4", "wanda_s050"])
@pytest.mark.e2e
def test_fresh_reload_gives_the_runs_perplexity(reloaded, case):
    r = reloaded[case]
    want = _metrics(r["run"])["results"][r["tag"]]["ppl"][r["corpus"]]
    assert math.isclose(r["ppl"], want, rel_tol=REL_TOL, abs_tol=0), (r["ppl"], want)
    assert math.isclose(r["ppl_hf_loss"], want, rel_tol=REL_TOL, abs_tol=0), (r["ppl_hf_loss"], want)
    assert r["dtype"] == "torch.float32"


@pytest.mark.parametrize("case", ["uni_s050", "uni_2of4", "wanda_s050", "uni_s080", "uni_s070_pm"])
@pytest.mark.e2e
def test_reloaded_sparsity_is_the_asked_one(reloaded, case):
    r = reloaded[case]
    zeros = r["zeros"]
    assert len(zeros) == 21  # 3 blocks x 7 projections: the random weights have no zeros of their own
    for name, (z, shape) in zeros.items():
        assert z == _expected_zeros(shape, r["tag"]), (name, z)
    overall = sum(z for z, _ in zeros.values()) / sum(s[0] * s[1] for _, s in zeros.values())
    asked = 0.5 if r["tag"] in ("2of4", "s0.50_per_row") else float(r["tag"][1:5])
    assert abs(overall - asked) < 0.01, overall
    if r["tag"] in _metrics(r["run"])["results"]:
        assert overall == _metrics(r["run"])["results"][r["tag"]]["measured_sparsity"]


@pytest.mark.e2e
def test_2of4_export_keeps_two_of_every_four(reloaded):
    folder = reloaded["uni_2of4"]["folder"]
    for name, w in _weights(folder).items():
        if ".layers." in name and name.endswith("proj.weight"):
            assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) == 2).all(), name


@pytest.mark.e2e
def test_model_card_and_summary(exported, uni_run):
    folder, stdout = exported("uni_s050", "uni")
    m = _metrics(uni_run)
    card = (folder / "README.md").read_text()
    corpus = next(iter(m["perplexity"]))
    ppl = m["perplexity"][corpus]
    for text in ("unipruning", "anchor metric | wanda", "sparsity | 0.5", "pattern | unstructured",
                 "allocation | per_row", f"{m['calibration']['source']}: 8 windows x 32 tokens = 256 tokens",
                 f"seqlen {ppl['pruned']['seqlen']}, {ppl['pruned']['windows']} windows",
                 f"dense {ppl['dense']['ppl']:.3f}", f"pruned {ppl['pruned']['ppl']:.3f}",
                 "measured sparsity of the prunable weights: 0.5000",
                 "55,296 of 110,592 prunable weights", "bytes", "Unstructured zeros give no speed-up"):
        assert text in card, f"{text!r} not in the card:\n{card}"
    for text in ("parameters kept: 55,296 of 110,592", "folder size:", "expected speed-up: none"):
        assert text in stdout, stdout
    record = json.loads((folder / "unipruning_export.json").read_text())
    assert record["tag"] == "s0.50_per_row" and record["masks"] == "file"
    card24 = (exported("uni_2of4", "uni", "pattern=2:4")[0] / "README.md").read_text()
    assert "pattern | 2:4" in card24 and "Ampere" not in card24 and "no mainstream serving engine runs 2:4" in card24


@pytest.mark.e2e
def test_default_out_is_inside_the_run(uni_run, capsys):
    from unipruning_cli.commands.export import export_command

    export_command([str(uni_run), "pattern=2:4"])
    out = uni_run / "export" / "2of4"
    assert (out / "config.json").is_file() and (out / "README.md").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers
    assert str(out) in capsys.readouterr().out


@pytest.mark.e2e
def test_gamma_cut_at_a_sparsity_the_run_does_not_hold(exported, uni_run, tiny_llama_dir):
    from unipruning_cli.pruning.targets import Target
    from unipruning_cli.core.rundir import load_tensors
    from unipruning_cli.pruning.mask_files import load_masks

    assert "s0.80_per_row" not in _metrics(uni_run)["results"]
    folder, stdout = exported("uni_s080", "uni", "sparsity=0.8")
    saved = uni_run / "masks" / "s0.80_per_row.safetensors"
    assert saved.is_file()  # the new cut is kept in the run
    masks = load_masks(saved)
    gamma = load_tensors(uni_run / "gamma.safetensors")
    want = Target(sparsity=0.8, allocation="per_row").cut({n: g.abs() for n, g in gamma.items()})
    assert set(masks) == set(want) and all(torch.equal(masks[n], want[n]) for n in want)
    original = load_file(str(tiny_llama_dir / "model.safetensors"))
    got = _weights(folder)
    for n, mask in masks.items():
        assert torch.equal(got[n + ".weight"], original[n + ".weight"] * mask), n
    assert "not measured by the run" in (folder / "README.md").read_text()
    assert "cut from" in stdout


@pytest.mark.e2e
def test_export_in_bfloat16_with_compressed_file(exported, uni_run):
    folder, stdout = exported("uni_2of4_bf16", "uni", "pattern=2:4", "dtype=bfloat16", "--compressed")
    weights = _weights(folder)
    assert weights["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    record = json.loads((folder / "unipruning_export.json").read_text())
    assert record["compressed"]["prunable_ratio"] <= 0.6
    assert "compressed prunable tensors" in stdout


@pytest.mark.e2e
def test_wanda_run_cannot_cut_a_new_sparsity(wanda_run, ws):
    from unipruning_cli.core.errors import UserError
    from unipruning_cli.commands.export import export_command

    out = ws["root"] / "exports" / "wanda_s080"
    before = sorted(p.name for p in (wanda_run / "masks").iterdir())
    with pytest.raises(UserError) as err:
        export_command([str(wanda_run), "sparsity=0.8", "--out", str(out)])
    msg = str(err.value)
    assert "s0.80_per_row" in msg and "s0.50_per_row (sparsity=0.5 allocation=per_row)" in msg
    assert "method=local" in msg and "Γ" in msg
    assert not out.exists()
    assert sorted(p.name for p in (wanda_run / "masks").iterdir()) == before


@pytest.mark.e2e
def test_sparsegpt_run_is_refused(wanda_run, ws):
    """A run whose config says method=sparsegpt (a copy of the Wanda run's layout: same files as a SparseGPT run)."""
    from unipruning_cli.core.errors import UserError
    from unipruning_cli.commands.export import export_command

    fake = ws["root"] / "sparsegpt_run"
    shutil.copytree(wanda_run, fake)
    cfg = yaml.safe_load((fake / "config.yaml").read_text())
    cfg["method"] = "sparsegpt"
    (fake / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match="sparsegpt") as err:
        export_command([str(fake)])
    assert "reconstructs" in str(err.value) and "does not store" in str(err.value)
    assert not (fake / "export").exists()


@pytest.mark.parametrize("case", ["missing", "half_written"])
@pytest.mark.e2e
def test_bad_run_dir_via_cli_exits_2(case, ws, wanda_run):
    if case == "missing":
        target, words = ws["root"] / "no_such_run", ["does not exist", "no_such_run"]
    else:
        target = ws["root"] / "half_written"
        shutil.copytree(wanda_run, target)
        (target / "metrics.json").unlink()
        words = ["incomplete", "metrics.json", "hydra.run.dir"]
    proc, seconds = run_cli(["export", str(target)], ws["cwd"], ws["env"], timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("Error: "), proc.stderr[-2000:]
    for w in words:
        assert w in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert seconds < 30, f"refusal took {seconds:.1f} s (a model was loaded?)"
    assert not (target / "export").exists()


@pytest.mark.e2e
def test_existing_output_folder_needs_force(uni_run, ws):
    from unipruning_cli.core.errors import UserError
    from unipruning_cli.commands.export import export_command

    out = ws["root"] / "exports" / "occupied"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists.*--force"):
        export_command([str(uni_run), "--out", str(out)])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(UserError, match="no unipruning export wrote"):  # issue 26: --force replaces exports only
        export_command([str(uni_run), "--out", str(out), "--force"])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    export_command([str(uni_run), "--out", str(out), "--force"])  # an empty folder: replaced
    (out / "added.txt").write_text("written by the export's user")
    export_command([str(uni_run), "--out", str(out), "--force"])  # an earlier export: replaced
    assert not (out / "added.txt").exists() and (out / "config.json").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".occupied")]
    with pytest.raises(UserError, match="would hold"):  # --force never replaces the run itself
        export_command([str(uni_run), "--out", str(uni_run), "--force"])


@pytest.mark.e2e
def test_bad_requests_name_the_problem(uni_run):
    from unipruning_cli.core.errors import UserError
    from unipruning_cli.commands.export import export_command

    for args, match in ([["sparsity=1.5"], "sparsity=1.5 is out of range"],
                        [["sparsity=0.555"], "two decimals"],
                        [["pattern=3:2"], "pattern='3:2' is not valid"],
                        [["pattern=2:4", "sparsity=0.6"], "conflicts"],
                        [["allocation=diagonal", "sparsity=0.6"], "allocation='diagonal'"],
                        [["foo=1"], "unknown option"],
                        [["--compressed"], "--compressed needs an N:M pattern"]):
        with pytest.raises(UserError, match=match):
            export_command([str(uni_run), *args, "--out", str(uni_run.parent / "never")])
    assert not (uni_run.parent / "never").exists()


# ====================================================================================== apply


@pytest.mark.parametrize("model_from", ["run_dir", "hf_folder"])
@pytest.mark.e2e
def test_apply_reproduces_the_export_bit_for_bit(model_from, exported, uni_run, tiny_llama_dir, ws):
    from unipruning_cli.commands.export import apply_command

    folder, _ = exported("uni_2of4", "uni", "pattern=2:4")
    out = ws["root"] / f"applied_{model_from}"
    model = uni_run if model_from == "run_dir" else tiny_llama_dir
    apply_command([str(uni_run / "masks" / "2of4.safetensors"), "--model", str(model), "--out", str(out)])
    a, b = _weights(folder), _weights(out)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert (out / "tokenizer.json").is_file() and "2of4" in (out / "README.md").read_text()


@pytest.mark.e2e
def test_apply_shape_mismatch_lists_the_layers(uni_run, tiny_llama_dir, ws):
    from unipruning_cli.core.errors import UserError
    from unipruning_cli.commands.export import apply_command
    from unipruning_cli.pruning.mask_files import load_masks, save_masks

    masks = load_masks(uni_run / "masks" / "2of4.safetensors")
    bad = ["model.layers.1.self_attn.k_proj", "model.layers.2.mlp.gate_proj"]
    for n in bad:
        masks[n] = masks[n].t().contiguous()
    path = ws["root"] / "bad_masks.safetensors"
    save_masks(path, masks, {"target": "2of4", "method": "test"})
    out = ws["root"] / "applied_bad"
    with pytest.raises(UserError, match="2 mismatched layer") as err:
        apply_command([str(path), "--model", str(tiny_llama_dir), "--out", str(out)])
    for n in bad:
        assert n in str(err.value)
    assert not out.exists()


@pytest.mark.e2e
def test_apply_refuses_an_existing_folder_via_cli(uni_run, tiny_llama_dir, ws):
    out = ws["root"] / "applied_exists"
    out.mkdir()
    proc, _ = run_cli(["apply", str(uni_run / "masks" / "2of4.safetensors"), "--model", str(tiny_llama_dir),
                       "--out", str(out)], ws["cwd"], ws["env"], timeout=60)
    assert proc.returncode == 2 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert list(out.iterdir()) == []


# ====================================================================================== compressed N:M


def test_pack_indices_round_trip():
    from unipruning_cli.stages.export.nm import pack_indices, unpack_indices

    g = torch.Generator().manual_seed(0)
    for m, bits in ((2, 1), (4, 2), (8, 3), (16, 4)):
        for count in (1, 7, 8, 1001):
            idx = torch.randint(0, m, (count,), generator=g)
            packed = pack_indices(idx, m)
            assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count * bits / 8)
            assert torch.equal(unpack_indices(packed, count, m), idx)


def test_compress_nm_rules():
    from unipruning_cli.stages.export.nm import compress_nm, decompress_nm

    g = torch.Generator().manual_seed(1)
    for n, m in ((2, 4), (4, 8), (1, 4)):
        w = torch.randn(6, 4 * m, generator=g)
        keep = torch.zeros(6, 4, m, dtype=torch.bool)
        keep.scatter_(-1, torch.rand(6, 4, m, generator=g).argsort(-1)[..., :n], True)
        w = w * keep.view_as(w)
        w[0, :m] = 0  # a group with fewer than n non-zeros
        values, packed = compress_nm(w, n, m)
        assert values.shape == (6, 4 * n)
        assert torch.equal(decompress_nm(values, packed, tuple(w.shape), n, m), w)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        compress_nm(torch.ones(2, 8), 2, 4, "dense")


def test_compressed_round_trip_is_exact_and_small_in_bf16(tmp_path, tiny_tokenizer):
    from unipruning_cli.stages.export.folder import COMPRESSED_FILE
    from unipruning_cli.stages.export.nm import load_compressed, write_compressed
    from unipruning_cli.pruning.masks import nm_masks
    from unipruning_cli.pruning.weights import apply_masks
    from unipruning_cli.models.loading import prunable_layers

    model = build_tiny_model("llama", len(tiny_tokenizer)).to(torch.bfloat16)
    layers = prunable_layers(model)
    apply_masks(layers, nm_masks({n: lin.weight.float().abs() for n, lin in layers.items()}, 2, 4))
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()  # the loader needs config.json and the compressed file only
    sizes = write_compressed(model, tmp_path, 2, 4)
    back = load_compressed(tmp_path)
    a, b = model.state_dict(), back.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # the bound is on the prunable tensors: the tiny model's embeddings / lm_head are a large share of it
    dense = sum(lin.weight.numel() * 2 for lin in layers.values())
    stored = load_file(str(tmp_path / COMPRESSED_FILE))
    nm_bytes = sum(t.numel() * t.element_size() for k, t in stored.items() if k.startswith("nm."))
    assert sizes["prunable_dense_bytes"] == dense and sizes["prunable_compressed_bytes"] == nm_bytes
    assert nm_bytes <= 0.6 * dense, nm_bytes / dense
    assert nm_bytes == dense // 2 + dense // 16  # values: half; positions: 2 bits per kept bf16 value
    assert stored["nm.model.layers.0.mlp.up_proj.values"].dtype == torch.bfloat16


@pytest.mark.e2e
def test_exported_compressed_file_rebuilds_the_exported_model(exported, ws):
    from transformers import AutoModelForCausalLM

    from unipruning_cli.stages.export.folder import COMPRESSED_FILE
    from unipruning_cli.stages.export.nm import load_compressed

    folder, _ = exported("uni_2of4_fp32_c", "uni", "pattern=2:4", "--compressed")
    assert (folder / COMPRESSED_FILE).is_file()
    ref = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    shipped = ws["root"] / "shipped"
    shipped.mkdir()
    for name in ("config.json", COMPRESSED_FILE):
        shutil.copy(folder / name, shipped / name)
    got = load_compressed(shipped).state_dict()
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


# ====================================================================================== GPU path


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.e2e
def test_semi_structured_needs_an_nvidia_gpu(exported, capsys):
    from unipruning_cli.core.errors import UserError
    from unipruning_cli.stages.export.nm import to_semi_structured

    with pytest.raises(UserError, match=r"compute capability >= 8\.0"):
        to_semi_structured(torch.nn.Linear(4, 4))
    bench = load_script("bench_semi_structured")
    folder, _ = exported("uni_2of4", "uni", "pattern=2:4")
    assert bench.main([str(folder)]) == 0
    assert "cannot time" in capsys.readouterr().out
