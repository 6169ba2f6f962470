"""Files and tables of an evaluation: report.md and metrics.json, zero-shot results.json and confusion matrices.

The tables are returned as lines of text; the command-line tools print them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch

from ..utils.host import describe_host
from . import zeroshot as zs

PathLike = Union[str, Path]


# ---------------------------------------------------------------------------- zero-shot results
def write_zero_shot_results(out: PathLike, results: Mapping[str, Dict], settings: Mapping[str, Any]) -> Path:
    """``results.json`` (the settings, then every task's result) plus ``confusion_<task>.png`` per classification task.

    Args:
        out: the folder (created if missing).
        results: ``{task: result}`` from :func:`~diffdis.eval.api.zero_shot` and :func:`~diffdis.eval.api.retrieval`.
        settings: written at the top level of ``results.json`` beside ``results``.

    Returns:
        The path of ``results.json``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    serialisable = {}
    for task, res in results.items():
        res = dict(res, metrics=dict(res["metrics"]))
        cm = res["metrics"].pop("confusion_matrix", None)
        if cm is not None:
            zs.save_confusion_matrix_png(cm, res["classnames"], out / f"confusion_{task}.png")
            res["confusion_matrix"] = cm.tolist()
        serialisable[task] = res
    path = out / "results.json"
    path.write_text(json.dumps({**settings, "results": serialisable}, indent=1) + "\n")
    return path


def zero_shot_table(results: Mapping[str, Dict]) -> List[str]:
    """One line per task and metric: accuracy (or recall@k) next to chance."""
    lines = [f"{'task':<14} {'metric':<28} {'value':>7} {'chance':>7}"]
    for task, res in results.items():
        m = res["metrics"]
        if res["task"] == "zeroshot_classification":
            rows = [("acc1", res["chance"]), ("acc5", min(1.0, 5 * res["chance"])), ("mean_per_class_recall", res["chance"])]
        else:
            rows = [(k, res["chance"][k]) for k in m]
        for key, chance in rows:
            if key in m:
                lines.append(f"{task:<14} {key:<28} {m[key]:>7.3f} {chance:>7.3f}")
    return lines


# ---------------------------------------------------------------------------- the report
def _row(name: str, value, reference: str = "") -> str:
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    return f"| {name} | {text} | {reference} |"


def report_table(result: Mapping[str, Any]) -> List[str]:
    """The headline table (markdown): one row per metric, with chance or what the number compares against."""
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


def ablation_section(path: PathLike) -> List[str]:
    """The λ>0 vs λ=0 table written by the ablation (``ablation.json``), as markdown lines."""
    data = json.loads(Path(path).read_text())
    lines = ["## Ablation: DiffDis (λ > 0) against generation only (λ = 0)", "", data.get("summary", ""), ""]
    lines += data.get("table_md", [])
    lines += ["", f"Command: `{data.get('command', '')}`"]
    return lines


def _header(result: Mapping[str, Any], seconds: float) -> List[str]:
    options = result["options"]
    sampling, zero_shot = options.sampling, options.zeroshot
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return [f"# Evaluation report: `{result['model']}`", "",
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {seconds / 60:.1f} min, {result['num_processes']}"
            f" process(es), device {device}"
            + (f" ({describe_host(result['machine'])})." if result.get("machine") else "."),
            f"Sampling: {sampling.scheduler}, {sampling.steps} steps, guidance {sampling.guidance}, seed {sampling.seed}."
            f" Zero-shot: K={_or_saved(zero_shot.steps)} (text-query steps), w={_or_saved(zero_shot.guidance)}."
            f" Set sizes: {result['sizes']}.", ""]


def _or_saved(value: Any) -> str:
    return "as saved with the model" if value is None else str(value)


def report(
    result: Mapping[str, Any],
    out: PathLike,
    seconds: float,
    settings: Optional[Mapping[str, Any]] = None,
    ablation: Optional[PathLike] = None,
) -> Path:
    """Write ``report.md``, ``metrics.json`` and the PNGs of an evaluation to ``out`` (replaced whole, never half-written).

    The files are written to ``<out>.tmp`` and renamed at the end. ``report.md`` holds the headline
    table, the shapes x colours sample grid, the zero-shot confusion matrices, the training curves
    (``curves.png`` beside the model folder, when present) and the ablation table.

    Args:
        result: from :func:`~diffdis.eval.api.evaluate_model`.
        out: the report folder.
        seconds: how long the evaluation took (for the header).
        settings: what produced the result, stored under ``settings`` in ``metrics.json``
            (default: the evaluation options).
        ablation: an ``ablation.json`` whose table the report includes.

    Returns:
        The path of ``report.md``.
    """
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lines = _header(result, seconds) + report_table(result) + [""]
    if result["grid"] is not None:
        result["grid"].save(tmp / "grid.png")
        lines += ["## Samples", "", "One image per prompt \"a {colour} {shape}\" (rows: shapes, columns: colours).", "",
                  "![samples](grid.png)", ""]
    if result["zeroshot"]:
        write_zero_shot_results(tmp / "zeroshot", result["zeroshot"], {"model": result["model"]})
        pngs = sorted((tmp / "zeroshot").glob("confusion_*.png"))
        if pngs:
            lines += ["## Zero-shot confusion matrices", ""] + [f"![{p.stem}](zeroshot/{p.name})" for p in pngs] + [""]
    curves = Path(result["model"]).resolve().parent / "curves.png"
    if curves.is_file():
        shutil.copy(curves, tmp / "curves.png")
        lines += ["## Training curves", "", "![training curves](curves.png)", ""]
    if ablation:
        lines += ablation_section(ablation) + [""]
    metrics = {"metrics": result["metrics"], "fid": result["fid"], "adherence": result["adherence"],
               "sizes": result["sizes"], "timings_s": result["timings_s"], "model": result["model"],
               "machine": result.get("machine"),
               "settings": dict(settings) if settings is not None else asdict(result["options"])}
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str) + "\n")
    (tmp / "report.md").write_text("\n".join(lines) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out / "report.md"
