"""Training methods side by side: every arm trained on the same data, steps, batch and seeds, then evaluated.

    python tools/compare.py --out outputs/compare train.max_steps=600                  # every registered method
    python tools/compare.py --arm diffdis --arm gen_only --arm lam0.1:method=diffdis,loss.lambda_ita=0.1 \\
        --seeds 0 1 train.max_minutes=10                                              # same wall-clock budget
    python tools/compare.py --arms-file arms.yaml --num-processes 2 --eval-args "--quick --skip fid"
    python tools/compare.py --jobs 2 data.name=compositional train.max_steps=1000       # two runs at once (2 cores)

(``diffdis-compare`` or ``python -m diffdis.cli.compare`` from an installed copy.)

Arms. ``--arm NAME`` is the method NAME (``method=NAME``); ``--arm NAME:key=value,key=value`` any config variant
(commas inside [...] belong to the value). ``--arms-file`` reads a YAML file:

    arms:
      diffdis: {method: diffdis}
      gen_only: [method=gen_only]
      lam0.1: {method: diffdis, loss.lambda_ita: 0.1}

An override may read the model of an earlier arm for the same seed: ``{run:ARM}``. Without --arm or --arms-file:
one arm per registered method, rleg reading the diffdis arm's model (model.rleg.generator={run:diffdis}); method=prior
is left out (it needs a CLIP model folder and has nothing to evaluate). RLEG with both generated embeddings:

    python tools/compare.py --arm clip --arm diffdis --arm prior:method=prior,model.prior.clip={run:clip} \
        --arm rleg:method=rleg,model.rleg.generator={run:diffdis},model.rleg.prior={run:prior}

The key=value overrides after the options apply to every arm, before the arm's own (the arm wins). Every arm's
config is loaded before anything trains: an unknown method or key is one `error:` line and exit status 2.

Runs. For each seed and arm, `python -m diffdis.cli.train` (under `accelerate launch` with --num-processes > 1)
trains into <out>/<arm>/seed<k> with train.seed=<k>, exactly train.max_steps steps (train.max_minutes=null,
train.eval_every=0 unless you override them: pass train.max_minutes=M to give every arm the same wall-clock), its
output in train.log. A run that fails is reported and the others go on (exit status 1 at the end). Every model is
then scored by the evaluation API (evaluate_model: zero-shot top-1 per task, retrieval R@1/R@5 both ways, FID and
prompt adherence where the method generates) with the options of --eval-args (those of diffdis-evaluate; default
--quick: smaller sets, and gen_only's diffusion classifier in two rounds), in <run>/eval. A finished run (model and metrics) is reused when the command is repeated; a run folder
trained with other arguments is refused (delete it to redo it).

Outputs in --out: compare.json (every run, mean ± sample std and n per arm and metric, the command, commit and
settings), compare.md (arms as rows, headline metrics as columns, "mean ± std (n)", "—" where a metric does not
apply; trainable parameters, ms per training step and peak memory from each run's train_summary.json) and
compare.png (bars with error bars per metric group).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from diffdis.cli import child_env, module_command

BASE_OVERRIDES = ("train.max_minutes=null", "train.eval_every=0")  # before the user's: same steps, no evaluation cost


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the comparison."""
    p = argparse.ArgumentParser(prog="diffdis-compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", action="append", default=[], metavar="NAME[:key=value,...]",
                   help="an arm (repeat for more): NAME alone is method=NAME (default: every registered method)")
    p.add_argument("--arms-file", default=None, help="YAML file listing the arms (see above); --arm adds to it")
    p.add_argument("--seeds", nargs="+", default=["0", "1", "2"], help="training seeds (default: 0 1 2)")
    p.add_argument("--out", default="outputs/compare", help="output folder (default: outputs/compare)")
    p.add_argument("--config", default=None, help="training config, a YAML file or shipped name (default: tiny)")
    p.add_argument("--num-processes", type=int, default=1,
                   help="processes per training run; above 1 trains under accelerate launch --multi_gpu (default: 1)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained and evaluated at once, each with an equal share of the cores; an arm reading"
                   " another arm's model waits for it (default: 1; on 2 cores --jobs 2 keeps both cores busy with"
                   " single-thread runs)")
    p.add_argument("--eval-args", default="--quick",
                   help="evaluation options, those of diffdis-evaluate (default: '--quick')")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every arm (e.g. train.max_steps=600)")
    return p


def train_command(num_processes: int) -> List[str]:
    """The child that trains one run: ``python -m diffdis.cli.train``, under ``accelerate launch`` for several processes."""
    if num_processes <= 1:
        return module_command("train")
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "-m", "diffdis.cli.train"]


def settings_from_args(args: argparse.Namespace):
    """Validated :class:`~diffdis.experiments.compare.CompareSettings`; raises ``CompareError`` or ``EvaluationError``."""
    from diffdis.cli.options import parse_evaluation_args
    from diffdis.experiments import CompareError, CompareSettings, arms_from_file, default_arms, parse_arm, validate_arms

    # `--seeds 0 1 key=value`: the option swallows the overrides that follow it
    args.overrides = [a for a in args.seeds if "=" in a] + list(args.overrides)
    try:
        seeds = [int(a) for a in args.seeds if "=" not in a]
    except ValueError as err:
        raise CompareError(f"--seeds takes integers: {err}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise CompareError("--seeds needs one or more distinct integers")
    if args.num_processes < 1:
        raise CompareError("--num-processes must be at least 1")
    if args.jobs < 1:
        raise CompareError("--jobs must be at least 1")
    arms = (arms_from_file(args.arms_file) if args.arms_file else []) + [parse_arm(a) for a in args.arm]
    arms = arms or default_arms()
    validate_arms(arms, args.config, [*BASE_OVERRIDES, *args.overrides])
    return CompareSettings(arms=arms, train_command=train_command(args.num_processes), seeds=seeds, config=args.config,
                           overrides=list(args.overrides), base_overrides=BASE_OVERRIDES,
                           evaluation=parse_evaluation_args(args.eval_args), env=child_env(), jobs=args.jobs)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; 0 when every run succeeded, 1 when some failed (the outputs are written), 2 on bad input."""
    from diffdis.eval.api import EvaluationError
    from diffdis.experiments import CompareError, run_comparison

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()  # loading bars of every evaluated model
    transformers.utils.logging.disable_progress_bar()
    try:
        settings = settings_from_args(args)
        out = Path(args.out)
        result = run_comparison(settings, out, command="diffdis-compare " + " ".join(shlex.quote(a) for a in argv))
    except (CompareError, EvaluationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(result["table_md"]))
    print(f"\ncompare.md: {out / 'compare.md'}\ncompare.json: {out / 'compare.json'}\nfigure: {out / 'compare.png'}")
    for run in result["runs"]:
        if run["status"] != "ok":
            print(f"error: {run['arm']}, seed {run['seed']}: {run['error']}", file=sys.stderr)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
