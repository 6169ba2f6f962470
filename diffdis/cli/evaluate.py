"""One evaluation report for a trained diffdis model: FID, prompt adherence, zero-shot accuracy, retrieval.

    diffdis-evaluate outputs/tiny/model                   # full: ~5 min on 2 CPU cores
    diffdis-evaluate outputs/tiny/model --quick           # ~1-2 min, what `make demo` runs
    diffdis-evaluate outputs/tiny/model --ablation outputs/ablation/ablation.json
    accelerate launch --multi_gpu --num_processes 2 -m diffdis.cli.evaluate outputs/tiny/model
    diffdis-evaluate outputs/tiny/model --suite suite.yaml --out bench/   # a benchmark suite instead

--suite FILE runs the zero-shot classification and retrieval tasks a YAML lists (see
diffdis.eval.benchmark_suite) and writes <out>/benchmark.md, <out>/benchmark.json and one CLIP_benchmark
result file per task under <out>/records/; only the zero-shot options (--zs-*, --seed, --batch-size) apply.

Writes <out>/report.md (a table, the shapes x colours sample grid, the zero-shot confusion matrices
and the training curves) and <out>/metrics.json (every number with the settings that produced it).

FID is computed on the embedded test split: images generated from its captions against its real
images, in the feature space of the reference attribute classifier (an offline stand-in for
Inception, cached in ~/.cache/diffdis); pass --extractor inception --inception-weights FILE for the
standard 2048-d Inception features (optional `fid` extra). For real-scale runs, --fid-reference DIR
takes an imagefolder with a metadata.jsonl of {"file_name", "text" or "caption"} (e.g. COCO-30k: 30k captions and
their images) and --preset coco30k sets 30,000 images and Inception features.
Prompt adherence: share of images generated from "a {colour} {shape}" (every combination) whose
shape and colour the reference classifier recognises. Generation work is sharded across processes;
FID and adherence are per-process running sums (feature sums, match counts) added over processes, so
neither the generated nor the real images are kept or gathered (memory does not grow with the set).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch

from diffdis.cli.options import add_evaluation_options, check_evaluation_args, evaluation_options
from diffdis.eval.api import EvaluationError, evaluate_model, report, resolved_settings
from diffdis.eval.benchmark_suite import load_suite, run_suite, suite_provenance, suite_table, write_suite_results
from diffdis.eval.report import report_table
from diffdis.eval.zeroshot import TemplateError
from diffdis.pipelines.zeroshot import ZeroShotModelError
from diffdis.pipelines.zeroshot_pipeline import load_zero_shot_pipeline
from diffdis.utils.distributed import new_accelerator


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the evaluation."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="a trained model folder (<output_dir>/model)")
    p.add_argument("--out", default=None, help="report folder (default: <model_dir>/../eval)")
    p.add_argument("--ablation", default=None, help="ablation.json from tools/ablation.py to include in the report")
    p.add_argument("--suite", default=None, help="YAML of classification and retrieval tasks to run instead of the"
                   " report; writes benchmark.md and benchmark.json (default out: <model_dir>/../benchmark)")
    add_evaluation_options(p)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Raise :class:`EvaluationError` for missing files and contradicting options, before anything loads."""
    if not Path(args.model_dir).is_dir():
        raise EvaluationError(f"model folder '{args.model_dir}' does not exist")
    if args.ablation and not Path(args.ablation).is_file():
        raise EvaluationError(f"ablation file '{args.ablation}' does not exist")
    if args.suite and not Path(args.suite).is_file():
        raise EvaluationError(f"suite file '{args.suite}' does not exist")
    check_evaluation_args(args)


def run_suite_command(args: argparse.Namespace, out: Path, accelerator, command: str = "") -> int:
    """``--suite``: every task of the suite file on the model; the table printed, the files written to ``out``."""
    suite = load_suite(args.suite)  # read before the model, so a bad file fails fast
    options = evaluation_options(args)
    model = load_zero_shot_pipeline(args.model_dir, options.device or accelerator.device)
    settings = resolved_settings(options.zeroshot, model)
    provenance = suite_provenance(args.model_dir, suite, settings, command, accelerator.num_processes,
                                  options.device or accelerator.device)  # before the run: the checkout may move
    records = run_suite(model, suite, settings, accelerator, args.progress, model_name=str(args.model_dir))
    if accelerator.is_main_process:
        path = write_suite_results(out, records, provenance)
        print("\n".join(suite_table(records)))
        print(f"\ntable: {out / 'benchmark.md'}\nrecords: {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns 0, or 2 on bad input with a one-line error."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = build_parser().parse_args(argv)
    out = Path(args.out) if args.out else Path(args.model_dir).resolve().parent / ("benchmark" if args.suite else "eval")
    start = time.perf_counter()
    try:
        check_args(args)
        if not args.progress:  # loading bars of diffusers / transformers; our own bars follow --progress
            import diffusers
            import transformers

            diffusers.utils.logging.disable_progress_bar()
            transformers.utils.logging.disable_progress_bar()
        accelerator = new_accelerator(cpu=(args.device == "cpu") or not torch.cuda.is_available())
        if args.suite:
            return run_suite_command(args, out, accelerator, shlex.join(["diffdis-evaluate", *argv]))
        options = evaluation_options(args)
        result = evaluate_model(args.model_dir, options, accelerator)
    except (EvaluationError, ZeroShotModelError, TemplateError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result["is_main"]:
        settings = {**vars(args), "zeroshot": asdict(options.zeroshot)}  # the options as given, and as resolved
        report(result, out, time.perf_counter() - start, settings=settings, ablation=args.ablation)
        print("\n".join(report_table(result)))
        print(f"\nreport: {out / 'report.md'}\nmetrics: {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
