"""The method is the plugin (issue 27): a new pruning method is one module in ``unipruning_cli/methods/`` and one
``configs/method/<name>.yaml``, and ``prune``, ``plan``, ``eval``, ``export`` and a sweep run it with nothing else
touched; no module outside ``methods/`` tests the method's name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from _helpers import cli_env, run_cli, tiny_overrides

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "unipruning_cli"

#: The whole method: keep the largest |W|^power in every column (docs/extending.md shows the same two files).
TOY_MODULE = '''"""``method=keep_column``: in every column, keep the largest |W| ** power (a toy: one file and one YAML)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unipruning_cli.methods import Cuts, Method, RunContext, register_method
from unipruning_cli.pruning.mask_files import save_masks


@dataclass
class KeepColumnSettings:
    power: float = 1.0  # scores |W| ** power


@register_method("keep_column")
class KeepColumn(Method):
    Settings = KeepColumnSettings

    def allocation(self, asked):
        return "per_column"

    def masks(self, ctx: RunContext) -> Cuts:
        target, cut = ctx.primary, {}
        for name, layer in ctx.layers.items():
            score = layer.weight.detach().float().abs() ** self.settings.power
            keep = score.topk(round((1 - target.sparsity) * score.shape[0]), dim=0).indices
            cut[name] = torch.zeros(score.shape, dtype=torch.bool).scatter_(0, keep, True)
        path = f"masks/{target.tag}.safetensors"
        save_masks(ctx.rd / path, cut, {"target": target.tag, "method": self.name})
        ctx.rd.mark_complete(self.stage, "keep_column", [path], 0.0)
        return Cuts({}, {target.tag: cut})
'''
TOY_YAML = """# keep the largest |W| ** power in every column (unipruning_cli/methods/keep_column.py)
defaults:
  - /defaults/method@_here_: keep_column
  - _self_
"""


@pytest.fixture()
def toy_method():
    """The two files of the toy method, in place for this test only."""
    files = {PACKAGE / "methods" / "keep_column.py": TOY_MODULE, REPO / "configs" / "method" / "keep_column.yaml": TOY_YAML}
    for path, text in files.items():
        assert not path.exists(), path
        path.write_text(text)
    try:
        yield
    finally:
        for path in files:
            path.unlink(missing_ok=True)


def _expected(model_dir: Path, sparsity: float, power: float) -> dict[str, torch.Tensor]:
    """The obviously-right masks: per column, sort |W| ** power and keep the top rows."""
    from transformers import AutoModelForCausalLM

    from unipruning_cli.models.loading import prunable_layers

    out = {}
    for name, layer in prunable_layers(AutoModelForCausalLM.from_pretrained(model_dir)).items():
        w = layer.weight.detach().float().abs() ** power
        keep = round((1 - sparsity) * w.shape[0])
        mask = torch.zeros(w.shape, dtype=torch.bool)
        for j in range(w.shape[1]):
            mask[torch.argsort(w[:, j], descending=True)[:keep], j] = True
        out[name] = mask
    return out


def test_a_method_in_one_file_and_one_yaml_runs_through_every_command(toy_method, tmp_path, tiny_llama_dir,
                                                                        corpus_files):
    from unipruning_cli.pruning.mask_files import load_masks

    env = cli_env(tmp_path / "runs", tmp_path / "cache")
    base = [o for o in tiny_overrides(tiny_llama_dir, corpus_files) if not o.startswith("method=")]
    args = [*base, "method=keep_column", "method.power=2", "sparsity=0.5"]

    proc, _ = run_cli(["plan", *args, "--json", str(tmp_path / "plan.json")], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["method"] == "keep_column" and {"prune", "pruned_eval"} <= {s["stage"] for s in plan["stages"]}

    run = tmp_path / "run"
    proc, _ = run_cli(["prune", *args, f"hydra.run.dir={run}"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "keep_column" and metrics["pattern"] == "s0.50_per_column"
    assert metrics["sparsity"]["overall"] == pytest.approx(0.5)
    got, want = load_masks(run / "masks" / "s0.50_per_column.safetensors"), _expected(tiny_llama_dir, 0.5, 2.0)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)

    proc, _ = run_cli(["eval", str(run)], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((run / "metrics.json").read_text())["evaluations"][-1]["per_tag"]["s0.50_per_column"]
    assert {c: p["ppl"] for c, p in again["perplexity"].items()} == metrics["results"]["s0.50_per_column"]["ppl"]

    out = tmp_path / "export"
    proc, _ = run_cli(["export", str(run), "--out", str(out)], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "config.json").is_file() and "keep_column" in (out / "README.md").read_text()

    sweep = tmp_path / "sweep"
    proc, _ = run_cli(["prune", "-m", *[a for a in args if not a.startswith("sparsity=")], "sparsity=0.3,0.5",
                       f"hydra.sweep.dir={sweep}"], tmp_path, env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    swept = sorted(json.loads(p.read_text())["pattern"] for p in sweep.glob("*/metrics.json"))
    assert swept == ["s0.30_per_column", "s0.50_per_column"]


def test_an_unknown_knob_of_a_method_is_refused_with_its_name(tiny_llama_dir, corpus_files):
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.core.errors import UserError
    from unipruning_cli.stages.preflight import validate

    base = [o for o in tiny_overrides(tiny_llama_dir, corpus_files) if not o.startswith("method=")]
    with pytest.raises(UserError, match="method=sparsegpt.*nosuchknob"):
        validate(compose_prune([*base, "method=sparsegpt", "+method.nosuchknob=1"]))
    with pytest.raises(UserError, match="method.percdamp"):
        validate(compose_prune([*base, "method=sparsegpt", "method.percdamp=-1"]))


def test_no_module_outside_methods_tests_the_methods_name():
    """Every per-method answer lives in the method's class: ``cfg.method`` is never compared outside ``methods/``."""
    pattern = re.compile(r"\bmethod(\.name)?\s*[!=]=|[!=]=\s*\S*\.method\b|method_name\([^)]*\)\s*[!=]=")
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in PACKAGE.rglob("*.py") if "methods" not in p.parts
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders


def test_a_method_in_a_folder_of_unipruning_plugins_needs_no_yaml(tmp_path, monkeypatch, tiny_llama_dir, corpus_files):
    """An installed package's folder is not the user's to write in: a ``<name>.py`` in a folder of
    ``$UNIPRUNING_PLUGINS`` registers a method that ``method=<name>`` selects, with its ``Settings`` defaults."""
    import sys

    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.pruning.method import METHODS, method_of
    from unipruning_cli.stages.preflight import validate

    (tmp_path / "my_column.py").write_text(TOY_MODULE.replace('"keep_column"', '"my_column"'))
    monkeypatch.setenv("UNIPRUNING_PLUGINS", str(tmp_path))
    base = [o for o in tiny_overrides(tiny_llama_dir, corpus_files) if not o.startswith("method=")]
    try:
        assert "my_column" in METHODS.names()
        cfg = compose_prune([*base, "method=my_column", "method.power=3"])
        validate(cfg)
        assert dict(cfg.method) == {"name": "my_column", "power": 3.0} and method_of(cfg).settings.power == 3.0
    finally:
        METHODS._items.pop("my_column", None)
        sys.modules.pop("unipruning_plugins.my_column", None)


def test_a_broken_or_clashing_plugin_only_matters_where_it_is_chosen(tmp_path, monkeypatch, caplog, tiny_llama_dir,
                                                                      corpus_files):
    """A plugin folder may hold a package's ``__init__.py``, a module that fails to import, or a file named like a
    built-in method: every other method still composes and validates; the broken one, chosen, is a UserError naming
    what failed; the clash is said, and the built-in wins."""
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.core.errors import UserError
    from unipruning_cli.pruning.method import METHODS, method_of
    from unipruning_cli.stages.preflight import validate

    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "broken.py").write_text("raise ImportError('no such dependency')\n")
    (tmp_path / "local.py").write_text("raise AssertionError('a plugin may not replace a built-in method')\n")
    monkeypatch.setenv("UNIPRUNING_PLUGINS", str(tmp_path))
    base = [o for o in tiny_overrides(tiny_llama_dir, corpus_files) if not o.startswith("method=")]
    with caplog.at_level("WARNING"):
        validate(compose_prune([*base, "method=local"]))
    assert "__init__" not in METHODS.names() and "broken" in METHODS.names()
    assert any("local.py is not loaded" in r.message for r in caplog.records)
    assert any("method broken is not available" in r.message for r in caplog.records)
    cfg = compose_prune([*base, "method=local"])
    cfg.method.name = "broken"
    with pytest.raises(UserError, match="method=broken: its module could not be loaded: ImportError"):
        method_of(cfg)
