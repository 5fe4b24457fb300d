"""The real ``configs/`` folder composed through Hydra's compose API, and the semantic validator.

Expected values come from the YAML files themselves (read with plain PyYAML) and from the rules
stated in the brief (sparsity in [0, 1), 0 < N < M, ...), never from the code under test.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from unipruning_cli.cli import rewrite_nm_overrides
from unipruning_cli.core.config import register_schemas
from unipruning_cli.stages.preflight import validate
from unipruning_cli.core.errors import UserError

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
GROUPS = ("method", "model", "local_metric", "pattern", "regularizer", "schedule")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def hydra_ctx():
    register_schemas()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        yield


def _compose(*overrides: str):
    return compose("prune", overrides=list(overrides))


@pytest.fixture()
def offline_inputs(tmp_path) -> list[str]:
    """Overrides that make ``validate`` independent of any cache: a fake local model folder
    (validate only checks that config.json exists) and corpus files in tmp."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    calib = tmp_path / "calib.txt"
    calib.write_text("some calibration text " * 200)  # more bytes than one window of 2048 tokens could need
    ev = tmp_path / "eval.txt"
    ev.write_text("some evaluation text " * 200)
    return ["model=local", f"model.path={model}", f"calibration.source={calib}", f"eval.corpora=[{ev}]"]


# ----------------------------------------------------------------------------------- composition


def _assert_matches_yaml(node, expected: dict, where: str) -> None:
    """Every concrete value in the YAML shows up in the composed node (??? and ${...} skipped)."""
    for key, value in expected.items():
        if value == "???" or (isinstance(value, str) and value.startswith("${")):
            assert OmegaConf.is_missing(node, key) or key in node, f"{where}.{key}"
            continue
        got = node[key]
        if isinstance(got, (list, tuple)) or OmegaConf.is_list(got):
            got = list(got)
        if isinstance(value, float) or isinstance(got, float):
            assert math.isclose(float(got), float(value), rel_tol=1e-12), f"{where}.{key}: {got!r} != {value!r}"
        else:
            assert got == value, f"{where}.{key}: {got!r} != {value!r}"


def _documented(group: str, option: str) -> dict:
    """What an option of a group composes to: its schema's defaults (the group's dataclass, or the metric's knobs)
    with the option file's own values on top (an option file says only what differs: every default is written
    once, tests/test_config_defaults.py)."""
    from dataclasses import asdict

    from unipruning_cli.core.config import ModelConfig, PatternConfig, RegularizerConfig
    from unipruning_cli.metrics import METRICS, knob_defaults
    from unipruning_cli.search.settings import ScheduleConfig

    own = yaml.safe_load((CONFIGS / group / f"{option}.yaml").read_text()) or {}
    own.pop("defaults", None)
    schema = {"model": ModelConfig, "pattern": PatternConfig, "regularizer": RegularizerConfig,
              "schedule": ScheduleConfig}
    if group == "method":
        from unipruning_cli.pruning.method import METHODS

        base = {"name": option, **asdict(METHODS.get(option).Settings())}
    else:
        base = {"name": option, **knob_defaults(METRICS.get(option))} if group == "local_metric" else \
            asdict(schema[group]())
    return {**base, **own}


def test_defaults_compose_to_the_documented_defaults():
    cfg = _compose()
    top = yaml.safe_load((CONFIGS / "prune.yaml").read_text())
    defaults = {}
    for entry in top["defaults"]:
        if isinstance(entry, dict):
            defaults.update({k: v for k, v in entry.items() if not k.startswith("override")})
    for group in GROUPS:
        _assert_matches_yaml(cfg[group], _documented(group, defaults[group]), group)
    assert cfg.model.name == "smollm2-135m"
    assert cfg.local_metric.name == "stochria"
    assert cfg.pattern.kind == "unstructured"
    assert cfg.method.name == defaults["method"] == "unipruning"
    assert cfg.sparsity is None
    assert cfg.seed == 0
    # interpolations resolve to the model's window
    assert cfg.calibration.seqlen == cfg.model.seqlen == 512
    assert cfg.eval.seqlen == 512
    assert cfg.calibration.nsamples == top["calibration"]["nsamples"]
    assert list(cfg.eval.corpora) == top["eval"]["corpora"]
    assert cfg.eval.max_windows == top["eval"]["max_windows"]


@pytest.mark.parametrize(
    "group,option",
    [(g, o) for g in GROUPS for o in _options(g)],
)
def test_every_option_of_every_group_composes(group, option):
    cfg = _compose(f"{group}={option}")
    expected = _documented(group, option)
    assert expected, f"{group}/{option} composes to nothing"
    _assert_matches_yaml(cfg[group], expected, f"{group}/{option}")
    if group in ("local_metric", "method"):
        # the group is an open dict: exactly the YAML's keys, no leftovers from the default
        assert OmegaConf.to_container(cfg[group]) == expected


def test_every_group_has_options():
    for group in GROUPS:
        assert _options(group), group


@pytest.mark.parametrize("option", [o for o in _options("local_metric")])
def test_every_local_metric_validates(option, offline_inputs):
    validate(_compose(*offline_inputs, f"local_metric={option}"))


@pytest.mark.parametrize("option", [o for o in _options("pattern") if o != "nm"])
def test_every_concrete_pattern_validates(option, offline_inputs):
    validate(_compose(*offline_inputs, f"pattern={option}"))


def test_regularizer_and_schedule_defaults_validate(offline_inputs):
    for r in _options("regularizer"):
        for s in _options("schedule"):
            validate(_compose(*offline_inputs, f"regularizer={r}", f"schedule={s}"))


def test_defaults_validate_with_prepared_cache():
    from _helpers import real_model_prepared

    if not real_model_prepared():
        pytest.skip("embedded model not prepared in the cache")
    validate(_compose())


# ----------------------------------------------------------------------------------- validation


def _user_error(overrides: list[str]) -> str:
    cfg = _compose(*overrides)
    with pytest.raises(UserError) as info:
        validate(cfg)
    return str(info.value)


def test_sparsity_out_of_range_names_the_field(offline_inputs):
    msg = _user_error([*offline_inputs, "sparsity=1.5"])
    assert "sparsity" in msg and "1.5" in msg


def test_negative_sparsity_rejected(offline_inputs):
    assert "sparsity" in _user_error([*offline_inputs, "sparsity=-0.1"])


def test_nm_with_n_not_below_m_names_the_pattern(offline_inputs):
    msg = _user_error([*offline_inputs, "pattern=nm", "pattern.n=3", "pattern.m=2"])
    assert "pattern" in msg and "3:2" in msg


def test_nm_with_conflicting_sparsity(offline_inputs):
    msg = _user_error([*offline_inputs, "pattern=2:4", "sparsity=0.7"])
    assert "sparsity" in msg and "0.7" in msg and "2:4" in msg


def test_nm_with_matching_sparsity_is_fine(offline_inputs):
    validate(_compose(*offline_inputs, "pattern=2:4", "sparsity=0.5"))


def test_unknown_corpus(offline_inputs):
    msg = _user_error([*offline_inputs, "calibration.source=nosuch"])
    assert "nosuch" in msg and "corpus" in msg
    # lists what is known
    assert "wiki_offline" in msg and "owt_offline" in msg


def test_missing_corpus_file(offline_inputs, tmp_path):
    missing = tmp_path / "missing.txt"
    msg = _user_error([*offline_inputs, f"calibration.source={missing}"])
    assert str(missing) in msg and "corpus" in msg


def test_unknown_eval_corpus(offline_inputs):
    msg = _user_error([*offline_inputs, "eval.corpora=[nosuch]"])
    assert "nosuch" in msg


def test_corpus_errors_name_the_config_field(offline_inputs):
    assert "calibration.source" in _user_error([*offline_inputs, "calibration.source=nosuch"])
    assert "eval.corpora" in _user_error([*offline_inputs, "eval.corpora=[nosuch]"])


def test_local_model_folder_without_config_json(offline_inputs, tmp_path):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    msg = _user_error([*offline_inputs, f"model.path={empty}"])
    assert "model.path" in msg and "config.json" in msg


def test_bad_local_metric_knob(offline_inputs):
    msg = _user_error([*offline_inputs, "local_metric=stochria", "local_metric.beta=2"])
    assert "local_metric" in msg and "beta" in msg


def test_unknown_local_metric_knob(offline_inputs):
    msg = _user_error([*offline_inputs, "local_metric=ria", "+local_metric.nosuchknob=1"])
    assert "local_metric" in msg and "nosuchknob" in msg


def test_unknown_method(offline_inputs):
    """``method`` is a config group: an unknown one fails at compose, listing the methods (as every group does)."""
    with pytest.raises(MissingConfigException) as info:
        _compose(*offline_inputs, "method=foo")
    msg = str(info.value)
    assert "method" in msg and "foo" in msg and "sparsegpt" in msg


def test_bad_calibration_mode(offline_inputs):
    msg = _user_error([*offline_inputs, "calibration.mode=sometimes"])
    assert "calibration.mode" in msg


@pytest.mark.parametrize("override, field", [
    ("schedule.decay=exponential", "schedule.decay"),
    ("schedule.grad_clip=0", "schedule.grad_clip"),
    ("schedule.grad_clip=-1", "schedule.grad_clip"),
    ("schedule.betas=[1.5,2]", "schedule.betas"),
    ("schedule.betas=[0.9]", "schedule.betas"),
    ("schedule.grad_clip_scope=embeddings", "schedule.grad_clip_scope"),
    ("schedule.lr=0", "schedule.lr"),
    ("schedule.eps=0", "schedule.eps"),
])
def test_a_schedule_knob_that_would_do_nothing_or_fail_later_is_refused(override, field, offline_inputs):
    """Refused by ``validate``, which the CLI runs before any weight is read (issue 17, findings 4-6)."""
    assert field in _user_error([*offline_inputs, "method=unipruning", override])


@pytest.mark.parametrize("override", ["schedule.grad_clip=null", "schedule.decay=cosine", "schedule.decay=constant",
                                      "schedule.grad_clip_scope=prunable", "schedule.betas=[0,0.5]"])
def test_every_live_schedule_value_validates(override, offline_inputs):
    validate(_compose(*offline_inputs, "method=unipruning", override))


def test_a_frozen_search_may_leave_lr_at_zero(offline_inputs):
    validate(_compose(*offline_inputs, "method=unipruning", "schedule.weight_mode=frozen", "schedule.lr=0"))


def test_bad_allocation(offline_inputs):
    msg = _user_error([*offline_inputs, "pattern.allocation=per_column"])
    assert "pattern.allocation" in msg


# ----------------------------------------------------------------------------------- compose failures


@pytest.mark.parametrize("group,bad", [("model", "nosuchmodel"), ("local_metric", "foo")])
def test_unknown_group_option_lists_the_options(group, bad):
    with pytest.raises(MissingConfigException) as info:
        _compose(f"{group}={bad}")
    msg = str(info.value)
    assert f"{group}/{bad}" in msg
    for option in _options(group):
        assert option in msg


def test_type_errors_fail_at_compose():
    with pytest.raises(Exception) as info:
        _compose("sparsity=abc")
    assert "sparsity" in str(info.value)


# ----------------------------------------------------------------------------------- N:M rewrite


def test_rewrite_nm_overrides_for_pattern_without_yaml():
    out = rewrite_nm_overrides(["sparsity=0.5", "pattern=1:4", "seed=3"], str(CONFIGS))
    assert out == ["sparsity=0.5", "pattern=nm", "pattern.n=1", "pattern.m=4", "seed=3"]


def test_rewrite_keeps_patterns_with_a_yaml():
    assert (CONFIGS / "pattern" / "2:4.yaml").exists()
    assert rewrite_nm_overrides(["pattern=2:4"], str(CONFIGS)) == ["pattern=2:4"]
    assert rewrite_nm_overrides(["pattern=4:8"], str(CONFIGS)) == ["pattern=4:8"]


def test_rewrite_leaves_other_arguments_alone():
    args = ["pattern=unstructured", "pattern.n=1", "model=local", "hydra.run.dir=/x/1:4", "-m"]
    assert rewrite_nm_overrides(args, str(CONFIGS)) == args


def test_rewrite_keeps_the_plus_prefix():
    assert rewrite_nm_overrides(["+pattern=3:8"], str(CONFIGS)) == ["+pattern=nm", "pattern.n=3", "pattern.m=8"]


def test_rewritten_impossible_pattern_reaches_the_validator(offline_inputs):
    msg = _user_error([*offline_inputs, *rewrite_nm_overrides(["pattern=3:2"], str(CONFIGS))])
    assert "3:2" in msg and "pattern" in msg


def test_rewritten_pattern_composes_to_nm(offline_inputs):
    cfg = _compose(*offline_inputs, *rewrite_nm_overrides(["pattern=1:4"], str(CONFIGS)))
    assert (cfg.pattern.kind, cfg.pattern.n, cfg.pattern.m) == ("nm", 1, 4)
    validate(cfg)
