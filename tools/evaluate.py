#!/usr/bin/env python
"""One evaluation report for a trained diffdis model: FID, prompt adherence, zero-shot accuracy, retrieval.

    python tools/evaluate.py outputs/tiny/model                   # full: ~5 min on 2 CPU cores
    python tools/evaluate.py outputs/tiny/model --quick           # ~1-2 min, what `make demo` runs
    python tools/evaluate.py outputs/tiny/model --ablation outputs/ablation/ablation.json
    accelerate launch --multi_gpu --num_processes 2 tools/evaluate.py outputs/tiny/model

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
import json
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

PARTS = ("fid", "adherence", "zeroshot", "retrieval")
PRESETS = {  # (fid images, adherence images per combination, zero-shot images, retrieval images)
    "full": (1000, 4, 1000, 500),
    "quick": (500, 2, 600, 200),
    "coco30k": (30000, 0, 0, 0),
}


class CliError(Exception):
    """A bad input: reported as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the evaluation."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="a trained model folder (<output_dir>/model)")
    p.add_argument("--out", default=None, help="report folder (default: <model_dir>/../eval)")
    p.add_argument("--quick", action="store_true", help="smaller sets (same as --preset quick)")
    p.add_argument("--preset", default="full", choices=tuple(PRESETS),
                   help="set sizes: full (1000 FID images, 4 per adherence combination, 1000 zero-shot, 500 retrieval),"
                   " quick (500, 2, 600, 200), coco30k (30,000 FID images, Inception; needs --fid-reference)")
    p.add_argument("--skip", nargs="*", default=[], choices=PARTS, help="parts to leave out")
    p.add_argument("--fid-images", type=int, default=None, help="generated (and real) images for FID")
    p.add_argument("--adherence-per-combo", type=int, default=None, help="images per shape x colour prompt")
    p.add_argument("--zeroshot-samples", type=int, default=None, help="test images for zero-shot accuracy")
    p.add_argument("--retrieval-samples", type=int, default=None, help="validation images for retrieval")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default: 25)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance (default: 3)")
    p.add_argument("--scheduler", default="ddim", help="sampling scheduler (default: ddim)")
    p.add_argument("--zs-steps", type=int, default=10, help="text-query denoising steps K (default: 10)")
    p.add_argument("--zs-guidance", type=float, default=0.0, help="zero-shot guidance w (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of generation and zero-shot noise (default: 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--extractor", default="reference", choices=("reference", "inception"),
                   help="FID feature space (default: reference, the embedded reference classifier)")
    p.add_argument("--inception-weights", default=None, help="local Inception weights file for --extractor inception")
    p.add_argument("--fid-reference", default=None,
                   help="imagefolder with metadata.jsonl (file_name, text) as FID reference (default: embedded test)")
    p.add_argument("--reference-steps", type=int, default=800,
                   help="training steps of the reference classifier when it is not cached yet (default: 800)")
    p.add_argument("--ablation", default=None, help="ablation.json from tools/ablation.py to include in the report")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the accelerator's device)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    return p


# ---------------------------------------------------------------------------- parts
def _sizes(args) -> Tuple[int, int, int, int]:
    preset = "quick" if args.quick else args.preset
    fid, adh, zs_n, ret = PRESETS[preset]
    chosen = (args.fid_images, args.adherence_per_combo, args.zeroshot_samples, args.retrieval_samples)
    sizes = tuple(c if c is not None else d for c, d in zip(chosen, (fid, adh, zs_n, ret)))
    if any(s < 0 for s in sizes):
        raise CliError("set sizes must be >= 0")
    return sizes


def fid_reference(args, num: int, resolution: int) -> Tuple[List[str], "LazyImages", str]:
    """(captions, real images, reference name) of the FID reference set.

    The real images are a :class:`~diffdis.eval.suite.LazyImages`: sliced like a uint8 (N, 3, R, R)
    tensor, but read only when (and where) a batch is needed, so a 30k-image reference set is never
    held in memory, and not read at all when its statistics are cached.
    """
    from diffdis.eval.suite import LazyImages

    if args.fid_reference:
        folder = Path(args.fid_reference)
        meta = folder / "metadata.jsonl"
        if not meta.is_file():
            raise CliError(f"--fid-reference {folder} has no metadata.jsonl (lines of {{\"file_name\", \"text\"}})")
        rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()][:num]
        if any("file_name" not in r or not isinstance(r.get("text", r.get("caption")), str) for r in rows):
            raise CliError(f"{meta}: every line needs 'file_name' and a 'text' (or 'caption') string")
        paths = [folder / r["file_name"] for r in rows]
        for path in paths:  # headers only: every process fails here, before any of them starts a collective
            _open_reference_image(path).close()
        captions, name = [r.get("text", r.get("caption")) for r in rows], f"{folder.name}-r{resolution}"
        real = LazyImages(lambda i: _reference_image(paths[i], resolution), len(paths))
    else:
        from diffdis.data.embedded import make_embedded_dataset

        ds = make_embedded_dataset("test", num, resolution=resolution)
        captions, name = list(ds["caption"]), f"embedded-test-r{resolution}"
        real = LazyImages(lambda i: ds[i]["image"], len(ds))
    if not captions:
        raise CliError("the FID reference set is empty")
    return captions, real, name


def _open_reference_image(path: Path):
    """The PIL image at ``path`` (lazily decoded); an unreadable file is a CliError."""
    from PIL import Image

    try:
        return Image.open(path)
    except OSError as err:
        raise CliError(f"cannot read reference image {path}: {err}") from None


def _reference_image(path: Path, resolution: int):
    """A reference image, RGB, resized and centre-cropped to ``resolution``."""
    from diffdis.data.transforms import resize_and_crop

    with _open_reference_image(path) as image:
        try:
            return resize_and_crop(image.convert("RGB"), resolution)
        except OSError as err:
            raise CliError(f"cannot read reference image {path}: {err}") from None


def _extractor(args, classifier):
    from diffdis.eval.fid import inception_extractor, reference_extractor

    if args.extractor == "inception":  # main() has checked that --inception-weights names a file
        try:
            return inception_extractor(args.inception_weights)
        except (FileNotFoundError, ModuleNotFoundError) as err:
            raise CliError(str(err)) from None
    return reference_extractor(classifier)


def zeroshot_parts(args, parts: Sequence[str], sizes, accelerator) -> Dict[str, Dict]:
    """Zero-shot classification on every embedded task and retrieval, through tools/zeroshot.py's functions."""
    import zeroshot as zs_tool  # tools/zeroshot.py

    from diffdis.pipelines.zeroshot import load_zero_shot_model

    device = args.device or accelerator.device
    model = load_zero_shot_model(args.model_dir, device)
    common = [args.model_dir, "--steps", str(args.zs_steps), "--guidance", str(args.zs_guidance),
              "--seed", str(args.seed), "--batch-size", str(args.batch_size)] + (["--progress"] if args.progress else [])
    results: Dict[str, Dict] = {}
    with torch.no_grad():
        if "zeroshot" in parts and sizes[2] > 0:
            zargs = zs_tool.build_parser().parse_args(common + ["--task", "all", "--num-samples", str(sizes[2])])
            dataset, column, tasks = zs_tool.load_tasks(zargs, model.resolution)
            load = zs_tool.pixel_loader(dataset, column, model.resolution)
            results.update(zs_tool.classify(model, zargs, tasks, load, len(dataset), accelerator))
        if "retrieval" in parts and sizes[3] > 0:
            rargs = zs_tool.build_parser().parse_args(common + ["--task", "retrieval", "--num-samples", str(sizes[3])])
            results.update(zs_tool.retrieval(model, rargs, model.resolution, accelerator))
    return results


def run(args) -> Dict:
    """Evaluate and return everything report.md and metrics.json are written from."""
    from accelerate import Accelerator

    import sample as sample_tool  # tools/sample.py

    from diffdis.eval.reference import load_or_train_reference_classifier
    from diffdis.eval.suite import SamplingSettings, adherence_grid, evaluate_adherence, evaluate_fid

    sizes = _sizes(args)
    parts = [p for p in PARTS if p not in args.skip]
    accelerator = Accelerator(cpu=(args.device == "cpu") or not torch.cuda.is_available())
    device = args.device or str(accelerator.device)
    try:
        pipe = sample_tool.load_pipeline(args.model_dir, args.scheduler, device, "float32")
    except (ValueError, OSError) as err:
        raise CliError(str(err).splitlines()[0]) from None
    settings = SamplingSettings(args.steps, args.guidance, args.scheduler, args.seed, args.batch_size)
    height, _ = pipe.default_size()
    out: Dict = {"metrics": {}, "fid": None, "adherence": None, "zeroshot": {}, "grid": None, "timings_s": {}}
    classifier = None
    if ("fid" in parts and args.extractor == "reference") or ("adherence" in parts and sizes[1] > 0):
        t = time.perf_counter()
        classifier = load_or_train_reference_classifier(resolution=16, steps=args.reference_steps)
        out["timings_s"]["reference_classifier"] = time.perf_counter() - t
    if "fid" in parts and sizes[0] > 0:
        t = time.perf_counter()
        captions, real, name = fid_reference(args, sizes[0], height)
        from diffdis.eval.reference import default_cache_dir

        out["fid"] = evaluate_fid(pipe, captions, real, _extractor(args, classifier), name, settings,
                                  default_cache_dir() / "fid_stats", accelerator, args.progress)
        out["metrics"]["fid"] = out["fid"]["fid"]
        out["timings_s"]["fid"] = time.perf_counter() - t
    if "adherence" in parts and sizes[1] > 0:
        t = time.perf_counter()
        metrics, images, prompts = evaluate_adherence(pipe, classifier, sizes[1], settings, accelerator, args.progress)
        out["adherence"] = metrics
        scores = ("shape", "colour", "both", "colour_pixel", "colour_agreement")
        out["metrics"].update({f"adherence/{k}": metrics[f"adherence/{k}"] for k in scores})
        out["grid"] = adherence_grid(images, prompts)
        out["timings_s"]["adherence"] = time.perf_counter() - t
    del pipe
    if "zeroshot" in parts or "retrieval" in parts:
        t = time.perf_counter()
        out["zeroshot"] = zeroshot_parts(args, parts, sizes, accelerator)
        for task, res in out["zeroshot"].items():
            for key, value in res["metrics"].items():
                if key != "confusion_matrix":
                    out["metrics"][f"{task}/{key}"] = value
        out["timings_s"]["zeroshot_and_retrieval"] = time.perf_counter() - t
    out["sizes"] = dict(zip(("fid_images", "adherence_per_combo", "zeroshot_samples", "retrieval_samples"), sizes))
    out["is_main"] = accelerator.is_main_process
    out["num_processes"] = accelerator.num_processes
    return out


# ---------------------------------------------------------------------------- report
def _row(name: str, value, reference: str = "") -> str:
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    return f"| {name} | {text} | {reference} |"


def report_table(result: Dict) -> List[str]:
    """The headline table: one row per metric, with chance or what the number compares against."""
    rows = ["| metric | value | for comparison |", "|---|---|---|"]
    fid = result.get("fid")
    if fid:
        rows.append(_row(f"FID ({fid['feature_extractor']}, {fid['num_fake']} images)", fid["fid"],
                         "0 = the real test images' own statistics"))
    adh = result.get("adherence")
    if adh:
        for k in ("shape", "colour", "both"):
            chance = {"shape": 1 / 6, "colour": 1 / 6, "both": 1 / 36}[k]
            rows.append(_row(f"prompt adherence: {k}", adh[f"adherence/{k}"], f"chance {chance:.3f}"))
        rows.append(_row("prompt adherence: colour by pixel measure", adh["adherence/colour_pixel"], "cross-check"))
    for task, res in result.get("zeroshot", {}).items():
        m = res["metrics"]
        if res["task"] == "zeroshot_classification":
            rows.append(_row(f"zero-shot {task}: top-1", m["acc1"], f"chance {res['chance']:.3f}"))
            if "acc5" in m:
                rows.append(_row(f"zero-shot {task}: top-5", m["acc5"], f"chance {min(1.0, 5 * res['chance']):.3f}"))
        else:
            for k, v in m.items():
                rows.append(_row(f"retrieval: {k}", v, f"chance {res['chance'][k]:.3f}"))
    return rows


def ablation_section(path: Path) -> List[str]:
    """The λ>0 vs λ=0 table written by tools/ablation.py."""
    data = json.loads(path.read_text())
    lines = ["## Ablation: DiffDis (λ > 0) against generation only (λ = 0)", "", data.get("summary", ""), ""]
    lines += data.get("table_md", [])
    lines += ["", f"Command: `{data.get('command', '')}`"]
    return lines


def write_report(result: Dict, args, out: Path, seconds: float) -> None:
    """report.md, metrics.json and the PNGs, written to a temporary folder then moved to ``out``."""
    import zeroshot as zs_tool

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lines = [f"# Evaluation report: `{args.model_dir}`", "",
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {seconds / 60:.1f} min, {result['num_processes']}"
             f" process(es), device {args.device or ('cuda' if torch.cuda.is_available() else 'cpu')}.",
             f"Sampling: {args.scheduler}, {args.steps} steps, guidance {args.guidance}, seed {args.seed}."
             f" Zero-shot: K={args.zs_steps} text-query steps, w={args.zs_guidance}. Set sizes: {result['sizes']}.", ""]
    lines += report_table(result) + [""]
    if result["grid"] is not None:
        result["grid"].save(tmp / "grid.png")
        lines += ["## Samples", "", "One image per prompt \"a {colour} {shape}\" (rows: shapes, columns: colours).", "",
                  "![samples](grid.png)", ""]
    if result["zeroshot"]:
        zs_tool.write_results(tmp / "zeroshot", result["zeroshot"], {"model": str(args.model_dir)})
        pngs = sorted((tmp / "zeroshot").glob("confusion_*.png"))
        if pngs:
            lines += ["## Zero-shot confusion matrices", ""] + [f"![{p.stem}](zeroshot/{p.name})" for p in pngs] + [""]
    curves = Path(args.model_dir).resolve().parent / "curves.png"
    if curves.is_file():
        shutil.copy(curves, tmp / "curves.png")
        lines += ["## Training curves", "", "![training curves](curves.png)", ""]
    if args.ablation:
        lines += ablation_section(Path(args.ablation)) + [""]
    metrics = {"metrics": result["metrics"], "fid": result["fid"], "adherence": result["adherence"],
               "sizes": result["sizes"], "timings_s": result["timings_s"], "model": str(args.model_dir),
               "settings": {k: v for k, v in vars(args).items()}}
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str) + "\n")
    (tmp / "report.md").write_text("\n".join(lines) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns 0, or 2 on bad input with a one-line error."""
    from diffdis.eval.zeroshot import TemplateError
    from diffdis.pipelines.zeroshot import ZeroShotModelError

    args = build_parser().parse_args(argv)
    out = Path(args.out) if args.out else Path(args.model_dir).resolve().parent / "eval"
    start = time.perf_counter()
    try:
        if not Path(args.model_dir).is_dir():
            raise CliError(f"model folder '{args.model_dir}' does not exist")
        if args.ablation and not Path(args.ablation).is_file():
            raise CliError(f"ablation file '{args.ablation}' does not exist")
        if args.preset == "coco30k" and not args.fid_reference:
            raise CliError("--preset coco30k needs --fid-reference DIR (captions and images of the reference set)")
        if args.preset == "coco30k":
            args.extractor = "inception"
        if args.extractor == "inception" and "fid" not in args.skip:
            if not args.inception_weights:
                raise CliError("--extractor inception needs --inception-weights FILE (nothing can be downloaded)")
            if not Path(args.inception_weights).expanduser().is_file():
                raise CliError(f"Inception weights not found at {args.inception_weights}; put the"
                               " pt_inception-2015-12-05 weights file there (torch-fidelity releases)")
        if not args.progress:  # loading bars of diffusers / transformers; our own bars follow --progress
            import diffusers
            import transformers

            diffusers.utils.logging.disable_progress_bar()
            transformers.utils.logging.disable_progress_bar()
        result = run(args)
    except (CliError, ZeroShotModelError, TemplateError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result["is_main"]:
        write_report(result, args, out, time.perf_counter() - start)
        print("\n".join(report_table(result)))
        print(f"\nreport: {out / 'report.md'}\nmetrics: {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
