"""Ablation: DiffDis (λ > 0) against generation only (λ = 0), same data, steps and seeds.

    python tools/ablation.py --out outputs/ablation --seeds 0 1 2 train.max_steps=600
    python tools/evaluate.py outputs/tiny/model --ablation outputs/ablation/ablation.json

(``python -m diffdis.cli.ablation`` and ``diffdis-evaluate`` from an installed copy.)

For every seed, trains the configured model twice (``loss.lambda_ita`` as configured, and 0), each
for exactly ``train.max_steps`` steps (no time budget: both arms see the same number of batches),
then scores both with the evaluation API (``evaluate_model``, options as ``diffdis-evaluate``'s): FID, prompt
adherence and zero-shot accuracy. Writes ``ablation.json`` (every run, and mean ± sample std per arm) and
``ablation.md``. A finished run is reused when the command is repeated (delete its folder to redo it); a run that
fails is reported and the others go on (exit status 1). The loop is the comparison's
(:mod:`diffdis.experiments.compare`, two arms); ``tools/compare.py`` compares any methods or variants.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from diffdis.cli import child_env, module_command

HEADLINE = ("fid", "adherence/shape", "adherence/colour", "adherence/both", "shape/acc1", "colour/acc1")


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the ablation."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/ablation", help="output folder (default: outputs/ablation)")
    p.add_argument("--config", default=None, help="training config (default: the shipped tiny config)")
    p.add_argument("--seeds", nargs="+", default=["0", "1", "2"], help="training seeds (default: 0 1 2)")
    p.add_argument("--lambda-ita", type=float, default=None, help="λ of the DiffDis arm (default: the config's)")
    p.add_argument("--eval-args", default="--quick --skip retrieval",
                   help="arguments of the evaluation (diffdis-evaluate) (default: '--quick --skip retrieval')")
    p.add_argument("overrides", nargs="*", help="key=value overrides for both arms (e.g. train.max_steps=600)")
    return p


def aggregate(runs: List[Dict]) -> Dict[str, Dict[str, float]]:
    """Mean and sample standard deviation (0 for one run) of every headline metric over seeds."""
    from diffdis.experiments import mean_std

    values = {key: [r[key] for r in runs if key in r] for key in HEADLINE}
    return {key: mean_std(v) for key, v in values.items() if v}


def table(arms: Dict[str, Dict[str, Dict[str, float]]]) -> List[str]:
    """Markdown rows: one per metric, one column per arm (mean ± std over seeds)."""
    names = list(arms)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in HEADLINE:
        cells = [f"{arms[n][key]['mean']:.3f} ± {arms[n][key]['std']:.3f}" if key in arms[n] else "–" for n in names]
        label = {"fid": "FID (reference features; lower is better)", "shape/acc1": "zero-shot shape top-1",
                 "colour/acc1": "zero-shot colour top-1"}.get(key, f"prompt {key.replace('/', ' ')}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def summarise(arms: Dict[str, Dict[str, Dict[str, float]]], names: Sequence[str], seeds: Sequence[int]) -> str:
    """One honest sentence per generation metric: which arm is better, and whether the gap exceeds the spread."""
    a, b = names
    parts = []
    for key, lower_better in (("fid", True), ("adherence/both", False)):
        if key not in arms[a] or key not in arms[b]:
            continue
        ma, mb = arms[a][key]["mean"], arms[b][key]["mean"]
        spread = max(arms[a][key]["std"], arms[b][key]["std"])
        better = a if (ma < mb) == lower_better else b
        verdict = "within the seed-to-seed spread" if abs(ma - mb) <= 2 * spread else "larger than twice the seed spread"
        parts.append(f"{key}: {a} {ma:.3f} vs {b} {mb:.3f}, {better} better; the gap ({abs(ma - mb):.3f}) is {verdict}"
                     f" ({len(seeds)} seed(s)).")
    return " ".join(parts)


def run_arms(args: argparse.Namespace, arms: Dict[str, float]) -> Dict[str, List[Dict]]:
    """Train and evaluate both arms for every seed (:func:`diffdis.experiments.run_all`); per arm, one
    ``{"seed", <metrics>, "steps"}`` per run. Raises ``RuntimeError`` naming the failed runs, ``CompareError`` and
    ``EvaluationError`` on bad input."""
    from diffdis.cli.options import parse_evaluation_args
    from diffdis.experiments import Arm, CompareSettings, run_all, validate_arms

    arm_list = [Arm(name, (f"loss.lambda_ita={value}",), folder=f"lambda{value:g}") for name, value in arms.items()]
    base = ("train.max_minutes=null",)
    validate_arms(arm_list, args.config, [*base, *args.overrides])
    settings = CompareSettings(arms=arm_list, train_command=module_command("train"), seeds=args.seeds, config=args.config,
                               overrides=list(args.overrides), base_overrides=base,
                               evaluation=parse_evaluation_args(args.eval_args), run_folder="{arm}_seed{seed}",
                               env=child_env())
    records = run_all(settings, Path(args.out), log=lambda line: print(line, flush=True))
    failed = [f"{r['arm']}, seed {r['seed']}: {r['error']}" for r in records if r["status"] != "ok"]
    if failed:
        raise RuntimeError("; ".join(failed))
    return {name: [{"seed": r["seed"], **r["metrics"], "steps": r["steps"]} for r in records if r["arm"] == name]
            for name in arms}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; 0 on success, 1 when a run fails, 2 on bad input."""
    from diffdis.config import ConfigError, load_config
    from diffdis.eval.api import EvaluationError
    from diffdis.experiments import CompareError

    args = build_parser().parse_args(argv)
    # `--seeds 0 1 key=value` : the option swallows the overrides that follow it
    args.overrides = [a for a in args.seeds if "=" in a] + list(args.overrides)
    try:
        args.seeds = [int(a) for a in args.seeds if "=" not in a]
    except ValueError as err:
        print(f"error: --seeds takes integers: {err}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, list(args.overrides))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    lam = cfg.loss.lambda_ita if args.lambda_ita is None else args.lambda_ita
    if lam <= 0:
        print("error: the DiffDis arm needs λ > 0 (--lambda-ita or loss.lambda_ita)", file=sys.stderr)
        return 2
    arms = {f"DiffDis (λ={lam:g})": lam, "generation only (λ=0)": 0.0}
    start = time.perf_counter()
    try:
        runs = run_arms(args, arms)
    except (CompareError, EvaluationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    out = Path(args.out)
    stats = {name: aggregate(r) for name, r in runs.items()}
    result = {
        "command": "python tools/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seeds": args.seeds, "steps": cfg.train.max_steps, "overrides": list(args.overrides), "eval_args": args.eval_args,
        "runs": runs, "stats": stats, "table_md": table(stats), "summary": summarise(stats, list(arms), args.seeds),
        "minutes": (time.perf_counter() - start) / 60,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"# Ablation: {' vs '.join(arms)}", "", f"{cfg.train.max_steps} steps, seeds {args.seeds}, mean ± std over seeds.",
          "", *result["table_md"], "", result["summary"], "", f"Command: `{result['command']}`"]
    (out / "ablation.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
