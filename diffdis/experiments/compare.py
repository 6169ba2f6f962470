"""Training methods side by side over seeds: train every arm on the same data, steps, batch and seeds, evaluate
every run with :func:`diffdis.eval.api.evaluate_model`, and aggregate (mean ± sample std, n) per arm and metric.

Each training run is a child process (``settings.train_command``, e.g. ``python -m diffdis.cli.train`` or
``accelerate launch ... -m diffdis.cli.train``) whose output goes to ``<run>/train.log``, so a crash is recorded in
that run's result and the other runs go on. Each run folder (``<out>/<arm>/seed<k>`` by default) holds the
training outputs (``model/``, ``train_summary.json``), ``run.json`` (the overrides it was trained with and the
evaluation options) and ``eval/`` (``metrics.json``, ``report.md``); a run whose model and metrics are present is
reused when the comparison is repeated, and its evaluation is redone when the evaluation options changed.
:func:`run_comparison` runs everything and writes ``compare.json``, ``compare.md`` and ``compare.png``
(:mod:`diffdis.experiments.report`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from ..eval.api import EvaluationOptions, evaluate_model, preset_sizes, report
from ..utils.host import host_record
from .arms import RUN_REF, Arm, CompareError, resolve_runs

COST_KEYS = ("trainable_parameters", "total_parameters", "ms_per_step", "peak_rss_mb", "peak_cuda_memory_mb",
             "train_loop_seconds")  # what train_summary.json says a run cost (diffdis.train.trainer.resource_summary)


@dataclass
class CompareSettings:
    """What a comparison runs (everything but the output folder)."""

    arms: Sequence[Arm]
    train_command: Sequence[str]  # the child that trains: ``python -m diffdis.cli.train`` (or under accelerate launch)
    seeds: Sequence[int] = (0, 1, 2)
    config: Optional[str] = None  # training config (None: the shipped tiny config)
    overrides: Sequence[str] = ()  # key=value for every arm, before the arm's own
    base_overrides: Sequence[str] = ("train.max_minutes=null",)  # before ``overrides``: the same steps for every arm
    evaluation: EvaluationOptions = field(default_factory=lambda: EvaluationOptions(sizes=preset_sizes("quick")))
    run_folder: str = "{arm}/seed{seed}"  # run folder under the output folder ({arm}: the arm's folder name)
    env: Optional[Mapping[str, str]] = None  # the child's environment (None: this process's)
    jobs: int = 1  # runs at once, each in a worker process with cpu_count // jobs threads


def run_dir(settings: CompareSettings, out: Path, arm: Arm, seed: int) -> Path:
    """The folder of one arm's run for one seed."""
    return Path(out) / settings.run_folder.format(arm=arm.dirname, seed=seed)


def train_overrides(settings: CompareSettings, arm: Arm, seed: int, folder: Path, out: Optional[Path] = None) -> List[str]:
    """The child's config arguments: output folder, base, common and arm overrides, then the seed (last wins).
    With ``out``, an override's ``{run:ARM}`` becomes that arm's model folder for ``seed`` (else it stays as written)."""
    config = ["--config", settings.config] if settings.config else []
    mine = list(arm.overrides) if out is None else resolve_runs(
        settings.arms, arm, lambda other: str(run_dir(settings, out, other, seed) / "model"))
    return [*config, f"train.output_dir={folder}", *settings.base_overrides, *settings.overrides, *mine,
            f"train.seed={seed}"]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _identity(settings: CompareSettings, arm: Arm, seed: int, folder: Path) -> Dict[str, Any]:
    args = [a for a in train_overrides(settings, arm, seed, folder) if not a.startswith("train.output_dir=")]
    return {"arm": arm.name, "seed": seed, "train_args": args,  # not the folder: the same runs under another path
            "evaluation": _jsonable(asdict(settings.evaluation))}


def check_reusable(settings: CompareSettings, out: Path) -> None:
    """Refuse, before anything trains, a run folder trained with other arguments than this comparison gives it.

    Raises:
        CompareError: naming the folder.
    """
    for seed in settings.seeds:
        for arm in settings.arms:
            folder = run_dir(settings, out, arm, seed)
            saved = folder / "run.json"
            if saved.is_file():
                before = json.loads(saved.read_text()).get("train_args")
                if before != _identity(settings, arm, seed, folder)["train_args"]:
                    raise CompareError(f"'{folder}' was trained with other arguments ({' '.join(before or [])}); "
                                       "delete it or choose another --out")


def is_trained(folder: Path) -> bool:
    """Whether a run folder holds a finished training (its model folder and summary)."""
    from ..pipelines.prior_pipeline import is_prior_folder

    model = folder / "model"
    return ((model / "zeroshot_index.json").is_file() or is_prior_folder(model)) and (folder / "train_summary.json").is_file()


def scored(folder: Path) -> bool:
    """Whether a run's model is evaluated: every model but a diffusion prior (``method=prior``), which neither
    classifies nor generates; its arm exists to be read by a later one (``model.rleg.prior={run:ARM}``)."""
    from ..pipelines.prior_pipeline import is_prior_folder

    return not is_prior_folder(folder / "model")


def train_run(settings: CompareSettings, arm: Arm, seed: int, folder: Path, out: Path) -> None:
    """Train one run in a child process, its output to ``<folder>/train.log``.

    Raises:
        RuntimeError: the child failed; the message is its last error line.
    """
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "train.log"
    cmd = [*settings.train_command, *train_overrides(settings, arm, seed, folder, out)]
    with log.open("w") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=dict(settings.env) if settings.env else None).returncode
    if code or not is_trained(folder):
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:") or "Error" in line]
        raise RuntimeError(f"training failed (exit {code}), see {log}: {(errors or lines or ['no output'])[-1].strip()}")


def evaluate_run(folder: Path, options: EvaluationOptions) -> Dict[str, Any]:
    """Evaluate a run's model with :func:`~diffdis.eval.api.evaluate_model` and write ``<folder>/eval``
    (``metrics.json``, ``report.md``); returns the flat metrics."""
    start = time.perf_counter()
    result = evaluate_model(folder / "model", options)
    report(result, folder / "eval", time.perf_counter() - start)
    return dict(result["metrics"])


def read_run(folder: Path) -> Dict[str, Any]:
    """A finished run's metrics (``eval/metrics.json``) and cost and steps (``train_summary.json``)."""
    summary = json.loads((folder / "train_summary.json").read_text())
    metrics = json.loads((folder / "eval" / "metrics.json").read_text())["metrics"]
    cost = {key: summary.get(key) for key in COST_KEYS}
    return {"metrics": metrics, "cost": cost, "steps": summary["global_step"]}


def run_one(settings: CompareSettings, out: Path, arm: Arm, seed: int) -> Dict[str, Any]:
    """Train (unless trained), evaluate (unless evaluated with the same options) and read one run; a failure
    is returned as ``status: "failed"`` with its error, never raised."""
    folder = run_dir(settings, out, arm, seed)
    record: Dict[str, Any] = {"arm": arm.name, "seed": seed, "dir": str(folder), "status": "ok", "error": None,
                              "trained": False, "evaluated": False}
    identity = _identity(settings, arm, seed, folder)
    saved = folder / "run.json"
    try:
        if not is_trained(folder):
            folder.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(identity, indent=1) + "\n")
            train_run(settings, arm, seed, folder, Path(out))
            record["trained"] = True
        previous = json.loads(saved.read_text()) if saved.is_file() else {}
        metrics = folder / "eval" / "metrics.json"
        if not scored(folder):  # nothing to evaluate: its row shows its cost only
            metrics.parent.mkdir(parents=True, exist_ok=True)
            metrics.write_text(json.dumps({"metrics": {}, "note": "a diffusion prior: nothing to evaluate"}) + "\n")
        elif not metrics.is_file() or previous.get("evaluation", identity["evaluation"]) != identity["evaluation"]:
            try:
                evaluate_run(folder, settings.evaluation)
            except Exception as err:  # noqa: BLE001  (one run's failure must not stop the others)
                (folder / "eval.log").write_text(traceback.format_exc())
                raise RuntimeError(f"evaluation failed, see {folder / 'eval.log'}: {type(err).__name__}: "
                                   f"{str(err).splitlines()[0] if str(err) else ''}") from None
            saved.write_text(json.dumps({**previous, **identity}, indent=1) + "\n")
            record["evaluated"] = True
        record.update(read_run(folder))
    except RuntimeError as err:
        record.update(status="failed", error=str(err))
    return record


def seed_runs(settings: CompareSettings, out: Path, seed: int, log: Callable[[str], None] = print,
              start: Optional[float] = None) -> List[Dict[str, Any]]:
    """Every arm of one seed, in order (an arm may read an earlier arm's model); one record per run."""
    start = time.perf_counter() if start is None else start
    runs = []
    for arm in settings.arms:
        log(f"[{(time.perf_counter() - start) / 60:5.1f} min] {arm.name}, seed {seed} -> {run_dir(settings, out, arm, seed)}")
        record = run_one(settings, out, arm, seed)
        if record["status"] != "ok":
            log(f"  failed ({arm.name}, seed {seed}): {record['error']}")
        runs.append(record)
    return runs


def _init_worker(threads: int) -> None:
    """A worker process of a parallel comparison: ``threads`` for the evaluations it runs, and no loading bars
    (several workers' bars would interleave in one console; the parent logs each run's start and failure)."""
    import diffusers
    import torch
    import transformers

    torch.set_num_threads(threads)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def run_all(settings: CompareSettings, out: Path, log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """Every arm for every seed; one record per run, in seed then arm order.

    One run at a time, seed by seed (so a partial comparison covers every arm), or, with ``settings.jobs`` above 1,
    that many runs at once in worker processes, each run's evaluation and training child with an equal share of the
    cores (``cpu_count // jobs`` threads): on a 2-core machine ``jobs=2`` keeps both cores busy with single-thread
    runs, whatever the number of seeds. The runs of arms that others read (``{run:ARM}``) start first, then the
    others in seed then arm order; a reading arm starts once its source's run of the same seed has ended.
    """
    check_reusable(settings, out)
    start = time.perf_counter()
    if settings.jobs <= 1:
        return [record for seed in settings.seeds for record in seed_runs(settings, out, seed, log, start)]
    return _run_parallel(settings, out, log, start)


def _run_parallel(settings: CompareSettings, out: Path, log: Callable[[str], None], start: float) -> List[Dict[str, Any]]:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    threads = max(1, (os.cpu_count() or 1) // settings.jobs)
    env = dict(settings.env if settings.env is not None else os.environ, OMP_NUM_THREADS=str(threads))
    worker = CompareSettings(**{**settings.__dict__, "env": env, "jobs": 1})
    needs = {arm.name: set(RUN_REF.findall(" ".join(arm.overrides))) for arm in settings.arms}
    sources = set().union(*needs.values())  # arms read by others go first, so that no reader waits at the end
    todo = [(seed, arm) for first in (True, False) for seed in settings.seeds for arm in settings.arms
            if (arm.name in sources) == first]
    ended: Dict[Any, Dict[str, Any]] = {}
    log(f"{len(todo)} runs, {settings.jobs} at a time, {threads} thread(s) each")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(settings.jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
        running: Dict[Any, Any] = {}
        while todo or running:
            for seed, arm in list(todo):  # the first runs whose sources have ended, up to `jobs` at once
                if len(running) >= settings.jobs:
                    break
                if all((seed, name) in ended for name in needs[arm.name]):
                    todo.remove((seed, arm))
                    log(f"[{(time.perf_counter() - start) / 60:5.1f} min] {arm.name}, seed {seed} -> "
                        f"{run_dir(settings, out, arm, seed)}")
                    running[pool.submit(run_one, worker, out, arm, seed)] = (seed, arm)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                seed, arm = running.pop(future)
                record = ended[(seed, arm.name)] = future.result()
                if record["status"] != "ok":
                    log(f"  failed ({arm.name}, seed {seed}): {record['error']}")
    return [ended[(seed, arm.name)] for seed in settings.seeds for arm in settings.arms]


def run_values(record: Mapping[str, Any]) -> Dict[str, float]:
    """The numbers of one run to aggregate: every metric, the cost keys and ``steps`` (None and non-numbers left out)."""
    values = {**record.get("metrics", {}), **record.get("cost", {}), "steps": record.get("steps")}
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """``mean``, sample ``std`` (0 for one value) and ``n``."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def aggregate(runs: Sequence[Mapping[str, Any]], arms: Sequence[str]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``{arm: {metric: {mean, std, n}}}`` over the arm's successful runs (an arm without one maps to ``{}``)."""
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for arm in arms:
        per_key: Dict[str, List[float]] = {}
        for record in runs:
            if record["arm"] == arm and record.get("status", "ok") == "ok":
                for key, value in run_values(record).items():
                    per_key.setdefault(key, []).append(value)
        out[arm] = {key: mean_std(values) for key, values in per_key.items()}
    return out


def git_commit(folder: Optional[Path] = None) -> Optional[str]:
    """The commit of the checkout holding this package (``+dirty`` with uncommitted changes), or None."""
    folder = folder or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def settings_record(settings: CompareSettings) -> Dict[str, Any]:
    """The settings as JSON: arms, seeds, config, overrides, evaluation options, the training command."""
    return {"arms": [{"name": a.name, "overrides": list(a.overrides), "folder": a.dirname} for a in settings.arms],
            "seeds": list(settings.seeds), "config": settings.config, "overrides": list(settings.overrides),
            "base_overrides": list(settings.base_overrides), "train_command": list(settings.train_command),
            "jobs": settings.jobs, "evaluation": _jsonable(asdict(settings.evaluation)), "run_folder": settings.run_folder}


def run_comparison(settings: CompareSettings, out: Path, command: str = "", log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run every arm and seed, aggregate, and write ``compare.json``, ``compare.md`` and ``compare.png`` to ``out``.

    Args:
        settings: arms, seeds, config and overrides, evaluation options and the training command.
        out: the output folder (run folders inside).
        command: the command line, recorded in the outputs.
        log: where progress lines go.

    Returns:
        The content of ``compare.json``: ``command``, ``commit``, ``machine`` (where it ran: CPU, torch's CPU
        kernel level, usable CPUs; step times and last digits depend on it), ``settings``, ``runs`` (one record per run:
        ``arm``, ``seed``, ``status``, ``error``, ``metrics``, ``cost``, ``steps``), ``aggregate`` (``{arm: {metric:
        {mean, std, n}}}``), ``columns`` and ``table_md`` (the table of ``compare.md``), ``failed`` and ``minutes``.

    Raises:
        CompareError: a run folder trained with other arguments (before anything trains).
    """
    from .report import write_outputs

    start = time.perf_counter()
    commit = git_commit()  # before the runs: the checkout may move while they train
    runs = run_all(settings, Path(out), log)
    names = [a.name for a in settings.arms]
    result = {"command": command, "commit": commit, "machine": host_record(),
              "settings": settings_record(settings), "runs": runs,
              "aggregate": aggregate(runs, names), "failed": sum(r["status"] != "ok" for r in runs),
              "minutes": (time.perf_counter() - start) / 60}
    write_outputs(result, Path(out), names)
    return result
