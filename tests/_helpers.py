"""Helpers shared by the test modules (not a test module itself): tiny corpora, tokenizers and models, the overrides
that point a run at them, the CLI in a subprocess, MoE models, the sharded-search comparisons.

Every test module imports what it shares from here; fixtures live in ``conftest.py``; no test module imports another
(``tests/test_suite_rules.py`` checks it)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent

# ============================================================================ tiny corpora, tokenizers and models

_WORDS = ("the model prunes weights with a mask while activations flow through every layer of the network "
          "and sparse matrices keep half of their entries so perplexity grows slowly when calibration data "
          "is good and the saliency is anchored to a local metric").split()


def load_script(name: str):
    """The module ``scripts/<name>.py`` of this repository, imported by path (scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_text(seed: int, n_words: int = 6000) -> str:
    """A corpus of about ``n_words`` words: random sentences over a small vocabulary, the same for the same seed."""
    rng = random.Random(seed)
    sentences, words = [], 0
    while words < n_words:
        k = rng.randint(5, 14)
        sentences.append(" ".join(rng.choice(_WORDS) for _ in range(k)).capitalize() + ".")
        words += k
    return " ".join(sentences)


def make_tokenizer(text: str):
    """A byte-level BPE tokenizer (200 tokens, <s> and </s>) trained on ``text``, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_tiny_model(arch: str, vocab_size: int, seed: int = 0):
    """A random tiny ``llama`` or ``qwen2`` (3 layers, hidden 64, 4 heads, 2 KV heads), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    raise ValueError(arch)


def tiny_llama(tokenizer, **fields):
    """A random tiny Llama (2 layers, 4 heads, 2 KV heads) over ``tokenizer``'s vocabulary, with ``fields``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, **fields))


def save_model(model, tokenizer, folder: Path) -> Path:
    """``model`` and ``tokenizer`` saved as a local HF folder; returns the folder."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_overrides(model_dir: Path, corpus_files: dict[str, Path], **extra: object) -> list[str]:
    """Overrides that point a prune run at a tiny local model and tiny corpora."""
    args = [
        "method=local", "local_metric=wanda",
        "model=local", f"model.path={model_dir}", "model.seqlen=32",
        f"calibration.source={corpus_files['calib']}", "calibration.nsamples=8",
        f"eval.corpora=[{corpus_files['eval']}]", "eval.max_windows=4", "eval.batch_size=2",
        # one cut per run, as the tests were written: UniPruning's default adds 0.6, 0.7, 2:4 and Wanda beside
        "export.sparsities=[]", "export.patterns=[]", "eval.baselines=[]",
    ]
    return args + [f"{k}={v}" for k, v in extra.items()]


def validate_overrides(model_dir: Path, corpus_files, *extra: str):
    """The prune config of :func:`tiny_overrides` plus ``extra``, composed and validated (preflight); returns it."""
    from unipruning_cli.core.config import compose_prune
    from unipruning_cli.stages.preflight import validate

    cfg = compose_prune([*tiny_overrides(model_dir, corpus_files), *extra])
    validate(cfg)
    return cfg


def eval_windows_of(run_dir: Path) -> tuple[torch.Tensor, int, str]:
    """The run's evaluation windows, rebuilt from its config (same tokenizer, corpus, seqlen, max_windows)."""
    import yaml
    from transformers import AutoTokenizer

    from unipruning_cli.data.corpora import eval_windows, token_stream
    from unipruning_cli.data.sampling import with_bos

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    tok = AutoTokenizer.from_pretrained(cfg["model"]["path"])
    corpus = cfg["eval"]["corpora"][0]
    windows = eval_windows(token_stream(tok, corpus, "eval"), cfg["eval"]["seqlen"], cfg["eval"]["max_windows"])
    from omegaconf import OmegaConf

    from unipruning_cli.models.loading import resolve_add_bos

    if resolve_add_bos(OmegaConf.create(cfg["model"]), tok):
        windows = with_bos(windows, tok.bos_token_id)
    return windows, cfg["eval"]["batch_size"], corpus


# ============================================================================================ the real model


def _real_cache() -> Path:
    from unipruning_cli.core.paths import cache_dir

    return cache_dir()


#: The prepared offline assets (``unipruning prepare``), whatever cache a test later points UNIPRUNING_CACHE at.
REAL_CACHE = _real_cache()


def real_model_prepared() -> bool:
    """Whether ``unipruning prepare`` has put the embedded model (SmolLM2-135M) in the cache."""
    from unipruning_cli.core.paths import cache_dir

    return (cache_dir() / "models" / "smollm2-135m" / "config.json").exists()


# ============================================================================================ the CLI and runs

# What a run leaves behind; none of it may exist after a refused run.
ARTIFACTS = ("config.yaml", "metrics.json", "summary.md", "calibration.safetensors", "calibration.json")
LLAMA_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def cli_command() -> list[str]:
    script = Path(sys.executable).parent / "unipruning"
    if script.exists():
        return [str(script)]
    found = shutil.which("unipruning")
    return [found] if found else [sys.executable, "-m", "unipruning_cli.cli"]


def cli_env(runs: Path | None, cache: Path | None, threads: int | None = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("UNIPRUNING_RUNS", None)
    env.pop("UNIPRUNING_CACHE", None)
    if runs is not None:
        env["UNIPRUNING_RUNS"] = str(runs)
    if cache is not None:
        env["UNIPRUNING_CACHE"] = str(cache)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HYDRA_FULL_ERROR="0", COLUMNS="200")
    return env


def run_cli(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([*cli_command(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - t0


def merge_overrides(base: list[str], *extra: str) -> list[str]:
    """``base`` with any key that ``extra`` sets removed, then ``extra`` (Hydra rejects duplicates)."""
    keys = {e.split("=", 1)[0].lstrip("+~") for e in extra}
    return [b for b in base if b.split("=", 1)[0] not in keys] + list(extra)


def linears(model) -> dict[str, nn.Linear]:
    """Every Linear inside model.model.layers, by full name (independent of unipruning_cli.models.loading)."""
    return {f"model.layers.{i}.{n}": m for i, block in enumerate(model.model.layers)
            for n, m in block.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def hook_sq_sums(model, windows: torch.Tensor, only: str | None = None) -> dict[str, torch.Tensor]:
    """Σ x_j² (fp64) of every block Linear's inputs over ordinary full forwards, window by window."""
    sq: dict[str, torch.Tensor] = {}
    handles = []
    for name, lin in linears(model).items():
        if only is not None and not name.startswith(only):
            continue

        def hook(mod, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sq[name] = sq.get(name, 0) + (x * x).sum(0)

        handles.append(lin.register_forward_pre_hook(hook))
    try:
        for w in windows:
            model(w.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return sq


# ============================================================================ mixture-of-experts models

MOE_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=64)


def moe_config(family: str, vocab: int):
    """The transformers config of a tiny ``mixtral``, ``qwen2_moe``, ``qwen3_moe`` or ``gpt_oss`` (4 experts, top 2)."""
    import transformers as tf

    if family == "mixtral":
        return tf.MixtralConfig(vocab_size=vocab, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
                                **MOE_SHAPE)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(vocab_size=vocab, intermediate_size=128, moe_intermediate_size=64,
                                 shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2, **MOE_SHAPE)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(vocab_size=vocab, intermediate_size=128, moe_intermediate_size=64, num_experts=4,
                                 num_experts_per_tok=2, head_dim=16, **MOE_SHAPE)
    if family == "gpt_oss":
        return tf.GptOssConfig(vocab_size=vocab, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                               head_dim=16, layer_types=["full_attention"] * 2, **MOE_SHAPE)
    raise ValueError(family)


def moe_model(family: str, vocab: int = 320, seed: int = 0):
    """A random tiny MoE model of ``family`` (:func:`moe_config`), in eval mode, every expert tensor initialised."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(moe_config(family, vocab)).eval()
    with torch.no_grad():  # transformers 5 leaves 3-D expert tensors at torch.empty's values in from_config
        for p in model.parameters():
            if p.dim() == 3:
                p.normal_(0, 0.05)
    return model


def moe_folder(family: str, tokenizer, root: Path) -> Path:
    """``root/family``: a tiny MoE model over ``tokenizer``'s vocabulary saved as a HF folder (once)."""
    folder = root / family
    if not (folder / "config.json").exists():
        moe_model(family, len(tokenizer)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


# ============================================================================ the sharded drift search (torchrun)

#: A short UniPruning drift search with checkpoints and three cuts, for comparing one process with 2 ranks.
SHARDED_SEARCH = ["method=unipruning", "schedule.steps=6", "schedule.checkpoint_every=2", "reuse_search=false",
                  "export.sparsities=[0.5,0.6]", "export.patterns=[2:4]", "pattern.allocation=per_matrix"]


def sharded_overrides(model_dir: Path, corpus_files, *extra: str) -> list[str]:
    """:func:`tiny_overrides` with :data:`SHARDED_SEARCH` instead of its method, then ``extra``."""
    base = [o for o in tiny_overrides(model_dir, corpus_files) if not o.startswith(("method=", "local_metric="))]
    return [*base, *SHARDED_SEARCH, *extra]


def torchrun_command(args: list[str]) -> list[str]:
    """``unipruning prune args`` under torchrun, 2 ranks on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "unipruning_cli", "prune", *args]


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors."""
    from safetensors.torch import load_file

    return load_file(str(path))


def single_and_sharded(tmp_path: Path, args: list[str]) -> tuple[Path, Path, float, float]:
    """Run the same prune in one process and over 2 ranks; their run directories and wall seconds."""
    from unipruning_cli.core import distributed

    env1 = cli_env(tmp_path / "runs1", tmp_path / "cache1")
    proc, t_single = run_cli(["prune", *args], tmp_path, env1, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env2 = cli_env(tmp_path / "runs2", tmp_path / "cache2")
    t0 = time.perf_counter()
    proc = subprocess.run(torchrun_command(args), cwd=tmp_path, env=env2, capture_output=True, text=True, timeout=300)
    t_sharded = time.perf_counter() - t0
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    # every rank left the process group after the search; rank 0 went on with every core (torchrun had left it one)
    assert f"rank 0 goes on alone with {distributed.cores()} CPU threads" in " ".join((proc.stdout + proc.stderr).split())
    single = list((tmp_path / "runs1" / "prune").iterdir())
    sharded = list((tmp_path / "runs2" / "prune").iterdir())
    assert len(single) == 1 and len(sharded) == 1, sharded  # one run directory for the two ranks
    return single[0], sharded[0], t_single, t_sharded


def assert_same_gamma(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Γ of every matrix within 1e-6 relative (Frobenius); returns the worst matrix's difference."""
    assert a.keys() == b.keys() and a
    worst = 0.0
    for name in a:
        rel = float((a[name] - b[name]).norm() / a[name].norm().clamp_min(1e-30))
        assert rel <= 1e-6, (name, rel)
        worst = max(worst, rel)
    return worst


def run_files(run: Path) -> set[str]:
    """The files of a run directory (relative paths), checkpoints left out."""
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "checkpoints" not in p.parts}


def assert_same_run(single: Path, sharded: Path, same_files: bool = True) -> None:
    """Γ within 1e-6 relative, the same masks at every cut, and the same files (rank 1 wrote nothing)."""
    from unipruning_cli.pruning.mask_files import load_masks

    worst = assert_same_gamma(load_tensors(single / "gamma.safetensors"), load_tensors(sharded / "gamma.safetensors"))
    print(f"Γ, 2 ranks against one process: worst matrix {worst:.2g} relative")
    tags = sorted(p.name for p in (single / "masks").iterdir())
    assert tags == ["2of4.safetensors", "s0.50_per_matrix.safetensors", "s0.60_per_matrix.safetensors"]
    for tag in tags:
        a, b = load_masks(single / "masks" / tag), load_masks(sharded / "masks" / tag)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[n], b[n]) for n in a), tag
    if same_files:
        assert run_files(sharded) == run_files(single)
    info = json.loads((sharded / "stages" / "search.json").read_text())["info"]
    assert info["ranks"] == 2 and info["sharding"] == "fsdp2"
