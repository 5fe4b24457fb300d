"""``unipruning <command> [args]``: dispatch on the command, hand the rest to that command.

Commands that take a config (``prune``) are Hydra apps: the dispatcher rewrites ``sys.argv`` and
calls the app, so ``-m``, ``--cfg job``, ``--help`` and ``key=value`` overrides work as Hydra users
expect. Wrapping Hydra in click or using only the compose API would lose multirun and run dirs.
"""

from __future__ import annotations

import difflib
import logging
import re
import sys
from pathlib import Path
from typing import Callable

from .core.config import config_dir
from .core.errors import UserError

log = logging.getLogger("unipruning")


_NM = re.compile(r"^(\+?pattern)=(\d+):(\d+)$")


def rewrite_nm_overrides(args: list[str], cfg_dir: str) -> list[str]:
    """``pattern=N:M`` for an N:M without a YAML of its own becomes ``pattern=nm pattern.n=N pattern.m=M``.

    So any N:M is accepted and an impossible one (``pattern=3:2``) reaches the validator, which
    says what is wrong, instead of Hydra's "could not find pattern/3:2".
    """
    out = []
    for arg in args:
        m = _NM.match(arg)
        if m and not (Path(cfg_dir) / "pattern" / f"{m.group(2)}:{m.group(3)}.yaml").exists():
            out += [f"{m.group(1)}=nm", f"pattern.n={m.group(2)}", f"pattern.m={m.group(3)}"]
        else:
            out.append(arg)
    return out


def _hydra_command(config_name: str, task: Callable) -> Callable[[list[str]], None]:
    def run(args: list[str]) -> None:
        import hydra

        from .core.config import register_schemas

        register_schemas()
        cfg_dir = config_dir()
        args = rewrite_nm_overrides(args, cfg_dir) + _rank_overrides(args)
        _check_output_root(args)
        _HYDRA_BEFORE.update(_hydra_files(args))
        sys.argv = [f"unipruning {config_name}", *args]
        hydra.main(version_base="1.3", config_path=cfg_dir, config_name=config_name)(task)()

    return run


def _rank_overrides(args: list[str]) -> list[str]:
    """Under ``torchrun`` or ``srun`` (several ranks): join the process group before Hydra composes, so that every
    rank takes rank 0's launch time for the run directory (``${launch_time:...}``, one directory), and on the other
    ranks Hydra writes nothing (no ``.hydra/``, no log file; console warnings only). A sweep (``-m``) is refused:
    each job of ``hydra/launcher=slurm`` with N tasks is the multi-rank form of a sweep."""
    from .core.config import set_launch_time
    from .core.distributed import broadcast, launch_ranks, start

    ranks = launch_ranks()
    if not ranks.sharded:
        return []
    if any(a in ("-m", "--multirun") for a in args):
        raise UserError(f"-m under {ranks.launcher} with {ranks.world} ranks: launch a sweep of multi-rank jobs with "
                        "hydra/launcher=slurm (hydra.launcher.tasks_per_node=N), or run each job with its own launch")
    start(ranks)
    from datetime import datetime

    set_launch_time(broadcast(datetime.now(), ranks))
    if ranks.main:
        return []
    from .core.progress import quiet

    quiet()
    return ["hydra.output_subdir=null", "hydra/job_logging=rank"]


#: ``.hydra/`` of a run directory named by ``hydra.run.dir=``, as it was before Hydra rewrote it for this launch.
_HYDRA_BEFORE: dict[Path, bytes] = {}


def _hydra_files(args: list[str]) -> dict[Path, bytes]:
    """The files of ``<hydra.run.dir>/.hydra/`` when an override names a directory that holds a run: Hydra rewrites
    them before the task starts, so a launch refused there (another config) must be able to put them back."""
    for arg in args:
        if arg.startswith("hydra.run.dir="):
            folder = Path(arg.split("=", 1)[1]).expanduser() / ".hydra"
            if (folder.parent / "config.yaml").is_file() and folder.is_dir():
                return {f: f.read_bytes() for f in folder.iterdir() if f.is_file()}
    return {}


def _check_output_root(args: list[str]) -> None:
    """The folder Hydra will make the run (``-m``: sweep) directory in, writable: Hydra makes it before the task runs
    and fails there with a bare ``PermissionError``. Raises :class:`UserError`."""
    import os

    from .stages.storage import check_writable

    if any(a.startswith(("--help", "-h", "--cfg", "-c", "--info", "--hydra-help", "--shell-completion")) for a in args):
        return  # nothing runs
    key = "hydra.sweep.dir=" if any(a in ("-m", "--multirun") for a in args) else "hydra.run.dir="
    given = [a.split("=", 1)[1] for a in args if a.startswith(key)]
    if given and "${" not in given[-1]:
        check_writable(Path(given[-1]), key.rstrip("="))
    elif not given:
        check_writable(Path(os.environ.get("UNIPRUNING_RUNS", "runs")), "the runs folder (UNIPRUNING_RUNS)")


def _claim(cfg, asked: Path, overrides: list[str]) -> Path:
    """The run directory of this job (:func:`.core.rundir.claim_run_dir`), where its own ``overrides.yaml`` (the launch's
    overrides, what ``unipruning report`` reads) is written. Hydra rewrote ``<asked>/.hydra/`` before the task ran:
    where that directory holds another run, the job's ``.hydra/`` follows it to its own directory (``beside``) and the
    other run's files are put back (exactly, for ``hydra.run.dir``; its ``overrides.yaml`` for a sweep's job)."""
    import shutil

    import yaml

    from .core.config import plain
    from .core.rundir import atomic_write_text, claim_run_dir
    from .commands.prune import follow_log

    try:
        out = claim_run_dir(asked, plain(cfg), cfg.existing_run)
    except UserError:
        _restore_hydra(asked)
        raise
    if out != asked:
        if (asked / ".hydra").is_dir():
            shutil.copytree(asked / ".hydra", out / ".hydra", dirs_exist_ok=True)
        _restore_hydra(asked)
        follow_log(asked, out)
    atomic_write_text(out / "overrides.yaml", yaml.safe_dump(overrides, default_flow_style=False))
    return out


def _restore_hydra(folder: Path) -> None:
    """Put back the ``.hydra/`` files of the run in ``folder`` that Hydra rewrote for a launch refused there."""
    before = {p: data for p, data in _HYDRA_BEFORE.items() if p.parent.parent.resolve() == folder.resolve()}
    for path, data in before.items():
        path.write_bytes(data)
    own = folder / "overrides.yaml"
    if not before and own.is_file() and (folder / ".hydra").is_dir():
        (folder / ".hydra" / "overrides.yaml").write_bytes(own.read_bytes())


def _prune_task(cfg) -> float | None:
    """One prune job. In a sweep (-m) a failing job records ``error.json`` and the sweep goes on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .stages.preflight import validate
    from .commands.prune import record_failure, run_prune
    from .core.distributed import from_main, launch_ranks
    from .core.rundir import RunDirRefused
    from .core.sweep import sweep_context

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    ranks = launch_ranks()  # several: torchrun, or a SLURM job with several tasks (the search runs over them)
    if not ranks.main:  # a hydra/launcher=slurm task other than 0 (Hydra set its logging up): no log file
        for handler in [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]:
            logging.getLogger().removeHandler(handler)
    asked, overrides = out, [str(o) for o in hc.overrides.task]
    try:  # rank 0 claims; every rank stops where it refused
        out = from_main(lambda: _claim(cfg, asked, overrides), ranks)
    except UserError as err:  # no error.json either: nothing of this launch is left in the other run's directory
        if multirun:
            log.error("job %s refused: %s", hc.job.num, err)
            return None
        _fail(err)
    try:
        validate(cfg)
        metrics = run_prune(cfg, out, reuse_model=multirun, sweep=sweep_context(Path(hc.sweep.dir)) if multirun else None,
                            ranks=ranks)
        if metrics is None:  # a rank other than 0: its part (the sharded search) is done
            return None
    except Exception as err:  # noqa: BLE001 - every failure is recorded, then re-raised outside sweeps
        if ranks.main and not isinstance(err, RunDirRefused):  # a refused directory holds another run: untouched
            record_failure(out, err)
        if multirun:
            log.error("job %s failed: %s", hc.job.num, err)
            return None
        if isinstance(err, UserError):
            _fail(err)
        raise
    first = next(iter(metrics["perplexity"].values()), None)  # eval.corpora=[]: no perplexity to hand the sweeper
    return None if first is None else first["pruned"]["ppl"]


def _prepare(args: list[str]) -> None:
    import argparse

    from .data.assets import prepare
    from .core.paths import cache_dir
    from .core.progress import console_logging

    parser = argparse.ArgumentParser(prog="unipruning prepare",
                                     description="Fetch, verify and convert the offline model and corpora into the cache.")
    parser.add_argument("--cache", type=Path, default=None, help=f"cache folder (default: {cache_dir()})")
    parser.add_argument("--no-model", action="store_true", help="only the corpora and tasks")
    ns = parser.parse_args(args)
    console_logging()
    root = prepare(ns.cache, with_model=not ns.no_model)
    log.info("offline assets ready in %s", root)


def _fail(err: Exception) -> None:
    print(f"Error: {err}", file=sys.stderr)
    raise SystemExit(2)


def _lazy(module: str, func: str) -> Callable[[list[str]], None]:
    """A command implemented in another module, imported only when it runs (keeps --help fast)."""

    def run(args: list[str]) -> None:
        import importlib

        getattr(importlib.import_module(f"unipruning_cli.{module}"), func)(args)

    return run


COMMANDS: dict[str, tuple[Callable[[list[str]], None], str]] = {
    "prune": (_hydra_command("prune", _prune_task), "prune a model (Hydra app: key=value overrides, -m, --cfg job)"),
    "plan": (_lazy("commands.plan", "plan_command"), "peak GPU and host memory of a prune run, stage by stage, before any weight is read"),
    "prepare": (_prepare, "fetch and verify the embedded model and offline corpora into the cache"),
    "eval": (_lazy("commands.eval", "eval_command"), "evaluate the masks of a finished run again (PPL, lm-eval), no search"),
    "report": (_lazy("core.sweep", "report_command"), "tables and a heatmap of a sweep directory (unipruning prune -m ...)"),
    "export": (_lazy("commands.export", "export_command"), "write a pruned HF model folder from a run (any sparsity its Γ can cut)"),
    "apply": (_lazy("commands.export", "apply_command"), "apply saved masks to the original model and save the result"),
}


def usage() -> str:
    lines = ["usage: unipruning <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`unipruning <command> --help` for the command's own options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"Unknown command '{name}'{hint}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    try:
        COMMANDS[name][0](rest)
    except UserError as err:
        _fail(err)


if __name__ == "__main__":
    main()
