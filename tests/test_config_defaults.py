"""Every default is written once (issue 27): ``configs/prune.yaml`` holds the top-level, ``calibration``, ``eval`` and
``export`` values (MISSING in the schema); each config group's dataclass (or a metric's class) holds its group's
defaults, and the option files say only what differs. An older run's config opens with what it predates filled in."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from unipruning_cli.core.config import (ModelConfig, PatternConfig, PruneConfig, RegularizerConfig, compose_prune,
                                        complete_run_config, config_dir)
from unipruning_cli.metrics import METRICS, knob_defaults
from unipruning_cli.search.settings import ScheduleConfig, SearchSettings

ROOT = Path(config_dir())
#: Each group's schema defaults: what an option file may not restate.
GROUP_DEFAULTS = {"model": asdict(ModelConfig()), "pattern": asdict(PatternConfig()),
                  "regularizer": asdict(RegularizerConfig()), "schedule": asdict(ScheduleConfig())}
#: The options that are the schema itself (a group's only option, or the default of several): they set nothing.
SCHEMA_OPTIONS = ("schedule/default.yaml", "regularizer/l1.yaml", "pattern/unstructured.yaml")


def _leaves(node, prefix=""):
    for k, v in node.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _leaves(v, path + ".")
        else:
            yield path, v


def _schema_has_default(schema, path: str) -> bool:
    parent, _, key = path.rpartition(".")
    node = OmegaConf.select(schema, parent) if parent else schema
    return not OmegaConf.is_missing(node, key)


def test_prune_yaml_sets_only_what_the_schema_leaves_missing():
    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "prune.yaml"))
    raw.pop("defaults"), raw.pop("hydra")
    schema = OmegaConf.structured(PruneConfig)
    both = [path for path, _ in _leaves(raw) if _schema_has_default(schema, path)]
    assert not both, f"written in prune.yaml and in the schema: {both}"
    assert len(list(_leaves(raw))) > 25  # every top-level, calibration, eval and export value is there


@pytest.mark.parametrize("option", sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("*/*.yaml")
                                          if p.parent.name in (*GROUP_DEFAULTS, "local_metric", "method")))
def test_an_option_file_says_only_what_differs_from_its_schema(option):
    group = option.split("/")[0]
    raw = OmegaConf.to_container(OmegaConf.load(ROOT / option)) or {}
    raw.pop("defaults", None)
    if group == "local_metric":
        defaults = {"name": Path(option).stem, **knob_defaults(METRICS.get(Path(option).stem))}
    elif group == "method":
        from unipruning_cli.pruning.method import METHODS

        defaults = {"name": Path(option).stem, **asdict(METHODS.get(Path(option).stem).Settings())}
    else:
        defaults = GROUP_DEFAULTS[group]
    restated = [k for k, v in raw.items() if k in defaults and defaults[k] == v and defaults[k] != "???"]
    assert not restated, f"{option} restates its schema's defaults: {restated}"
    if option in SCHEMA_OPTIONS:
        assert not raw, f"{option} is the schema's own option: it sets nothing ({sorted(raw)})"


def test_the_default_run_is_defined_everywhere_with_the_defaults_the_issue_found_disagreeing():
    cfg = compose_prune([])
    assert not OmegaConf.missing_keys(cfg)
    # these four were written twice and disagreed; now one value each, the one a run gets
    assert (cfg.method.name, cfg.local_metric.name, cfg.eval.max_windows, cfg.schedule.steps) == \
        ("unipruning", "stochria", 20, 32)
    assert SearchSettings().steps == ScheduleConfig().steps == 32
    assert dict(cfg.local_metric) == {"name": "stochria", **knob_defaults(METRICS.get("stochria"))}


@pytest.mark.parametrize("overrides", [["method=local", "local_metric=ria"], ["pattern=2:4"], ["model=qwen2.5-7b"],
                                       ["experiment=paper"], ["local_metric=magnitude", "method=local"]])
def test_every_group_option_composes_with_nothing_missing(overrides):
    assert not OmegaConf.missing_keys(compose_prune(overrides))


def test_a_run_of_an_older_version_opens_with_what_it_predates_filled_in():
    """A config.yaml written before ``refine``, ``reconstruct`` and the per-matrix cap existed: the code reads every
    field directly; the cap it predates is none (1.0: it was cut without one), the rest today's defaults."""
    saved = OmegaConf.create({"method": "local", "local_metric": {"name": "wanda"}, "sparsity": 0.5,
                              "model": {"name": "m", "source": "local", "path": "/m"},
                              "pattern": {"kind": "unstructured", "n": 0, "m": 0, "allocation": None},
                              "a_key_since_removed": 1})
    cfg = complete_run_config(saved)
    assert (cfg.refine, cfg.reconstruct, cfg.pattern.max_matrix_sparsity) == ("none", "none", 1.0)
    assert cfg.local_metric == {"name": "wanda"} and cfg.a_key_since_removed == 1
    assert cfg.method == {"name": "local"}  # ``method: local`` before methods had settings
    now = complete_run_config(OmegaConf.create({**OmegaConf.to_container(saved),
                                                "pattern": {"max_matrix_sparsity": 0.99}}))
    assert now.pattern.max_matrix_sparsity == 0.99  # a run that has the field keeps its own value


def test_a_run_of_an_older_version_resumes_in_its_directory_when_only_the_method_gained_settings():
    from unipruning_cli.core.rundir import config_differences

    new = {"method": {"name": "sparsegpt", "blocksize": 128, "percdamp": 0.01}, "seed": 0}
    assert config_differences({"method": "sparsegpt", "seed": 0}, new) == []
    assert config_differences({"method": "local", "seed": 0}, new) == ["method.name: 'local' -> 'sparsegpt'"]
