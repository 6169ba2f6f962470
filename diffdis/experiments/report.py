"""The files of a comparison: ``compare.json``, ``compare.md`` (arms as rows, headline metrics as columns, each
"mean ± std (n)", "—" where a metric does not apply) and ``compare.png`` (bars with error bars per metric group)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from ..utils.host import describe_host

Stats = Mapping[str, Mapping[str, Mapping[str, float]]]  # {arm: {metric: {mean, std, n}}}

RETRIEVAL = (("retrieval/image_retrieval_recall@1", "text→image R@1"), ("retrieval/image_retrieval_recall@5", "text→image R@5"),
             ("retrieval/text_retrieval_recall@1", "image→text R@1"), ("retrieval/text_retrieval_recall@5", "image→text R@5"))
GENERATION = (("fid", "FID ↓"), ("adherence/shape", "adherence shape"), ("adherence/colour", "adherence colour"),
              ("adherence/both", "adherence both"))
COST = (("trainable_parameters", "trainable params (M)"), ("ms_per_step", "ms / step"), ("peak_rss_mb", "peak RSS (MiB)"),
        ("peak_cuda_memory_mb", "peak CUDA (MiB)"))
TASK_ORDER = ("shape", "colour", "colour_shape", "heldout_colour_shape", "seen_colour_shape", "relation", "size",
              "position")  # the embedded tasks, then the compositional ones
SCALE = {"trainable_parameters": 1e-6}  # shown in millions
DIGITS = {"fid": 2, "trainable_parameters": 2, "ms_per_step": 1, "peak_rss_mb": 0, "peak_cuda_memory_mb": 0}


def columns(stats: Stats) -> List[Tuple[str, str, str]]:
    """The headline columns present in any arm, in order, as ``(group, metric, label)``: zero-shot top-1 per task
    (and the relation task's pair accuracy), retrieval R@1/R@5 both ways, FID and prompt adherence, then trainable parameters, ms per step and peak memory."""
    present = {key for arm in stats.values() for key in arm}
    found = {k[: -len("/acc1")] for k in present if k.endswith("/acc1") and not k.startswith("retrieval/")}
    tasks = [t for t in TASK_ORDER if t in found] + sorted(found - set(TASK_ORDER))
    wanted = [("zero-shot top-1", f"{t}/acc1", f"zero-shot {t}") for t in tasks]
    wanted += [("zero-shot top-1", f"{t}/pair_acc", f"{t} pair accuracy") for t in tasks]  # relation: chance 0.5
    wanted += [("retrieval recall", key, label) for key, label in RETRIEVAL]
    wanted += [("FID" if key == "fid" else "prompt adherence", key, label) for key, label in GENERATION]
    wanted += [("peak memory (MiB)" if "peak" in key else label, key, label) for key, label in COST]
    return [c for c in wanted if c[1] in present]


def cell(entry: Mapping[str, float] | None, key: str) -> str:
    """``"mean ± std (n)"`` of one aggregate entry, or "—" when the metric does not apply."""
    if not entry:
        return "—"
    scale, digits = SCALE.get(key, 1.0), DIGITS.get(key, 3)
    return f"{entry['mean'] * scale:.{digits}f} ± {entry['std'] * scale:.{digits}f} ({entry['n']})"


def table(stats: Stats, arms: Sequence[str]) -> List[str]:
    """Markdown lines: one row per arm, one column per headline metric (:func:`columns`)."""
    cols = columns(stats)
    lines = ["| arm | " + " | ".join(label for _, _, label in cols) + " |", "|---|" + "---|" * len(cols)]
    for arm in arms:
        lines.append(f"| {arm} | " + " | ".join(cell(stats.get(arm, {}).get(key), key) for _, key, _ in cols) + " |")
    return lines


def markdown(result: Mapping[str, Any], arms: Sequence[str]) -> List[str]:
    """The whole of ``compare.md``: settings, the table, failed runs, the command and commit."""
    s = result["settings"]
    lines = [f"# Comparison: {', '.join(arms)}", "",
             f"Seeds {s['seeds']}, mean ± sample std (n successful runs) over seeds; common overrides: "
             f"`{' '.join(s['overrides']) or 'none'}`. Arms:", ""]
    lines += [f"- **{a['name']}**: `{' '.join(a['overrides']) or '(the config as is)'}`" for a in s["arms"]]
    lines += ["", *result["table_md"], "", "— : the metric does not apply to the arm's method (or every run of it failed).", ""]
    failed = [r for r in result["runs"] if r["status"] != "ok"]
    if failed:
        lines += ["Failed runs:", ""] + [f"- {r['arm']}, seed {r['seed']}: {r['error']}" for r in failed] + [""]
    lines += [f"Command: `{result['command']}`", f"Commit: `{result['commit'] or 'unknown'}`"]
    if result.get("machine"):  # compare.json files written before it was recorded have none
        lines.append(f"Machine: {describe_host(result['machine'])}")
    lines += ["", "![comparison](compare.png)"]
    return lines


def plot(stats: Stats, arms: Sequence[str], path: Path) -> Path:
    """Bar charts with sample-std error bars, one panel per metric group, one bar per arm and metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: Dict[str, List[Tuple[str, str]]] = {}
    for group, key, label in columns(stats):
        groups.setdefault(group, []).append((key, label))
    ncols = min(4, max(1, len(groups)))
    nrows = -(-max(1, len(groups)) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols + 0.5, 3.4 * nrows), squeeze=False)
    width = 0.8 / max(1, len(arms))
    for ax, (group, metrics) in zip(axes.flat, groups.items()):
        for i, arm in enumerate(arms):
            entries = [stats.get(arm, {}).get(key) for key, _ in metrics]
            scale = [SCALE.get(key, 1.0) for key, _ in metrics]
            means = [e["mean"] * s if e else float("nan") for e, s in zip(entries, scale)]  # no bar where it does not apply
            stds = [e["std"] * s if e else 0.0 for e, s in zip(entries, scale)]
            ax.bar([j + i * width for j in range(len(metrics))], means, width, yerr=stds, capsize=3, label=arm)
        ax.set_xticks([j + width * (len(arms) - 1) / 2 for j in range(len(metrics))])
        ax.set_xticklabels([label for _, label in metrics], rotation=30, ha="right", fontsize=7)
        ax.set_title(group, fontsize=9)
    spare = list(axes.flat)[len(groups):]
    for ax in spare:
        ax.axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if spare:  # the legend in an empty panel, where it hides no bar
        spare[0].legend(handles, labels, loc="center", fontsize=9, title="arm")
        fig.tight_layout()
    else:  # below the panels
        fig.legend(handles, labels, loc="lower center", ncol=min(len(arms), 8), fontsize=7)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(result: Dict[str, Any], out: Path, arms: Sequence[str]) -> None:
    """Add ``columns`` and ``table_md`` to ``result`` and write ``compare.json``, ``compare.md`` and ``compare.png``."""
    out.mkdir(parents=True, exist_ok=True)
    result["columns"] = [{"group": g, "metric": k, "label": label} for g, k, label in columns(result["aggregate"])]
    result["table_md"] = table(result["aggregate"], arms)
    (out / "compare.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "compare.md").write_text("\n".join(markdown(result, arms)) + "\n")
    plot(result["aggregate"], arms, out / "compare.png")
