"""Training history: a JSON-lines log on disk, a summary, and PNG curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple


def steps_to_minutes(clock: List[tuple]) -> Tuple[Callable, Callable]:
    """(step -> minutes, minutes -> step) through the points ``clock`` = [(step, seconds), ...] and (0, 0), linear
    between them and continued at the mean rate past both ends, so that an axis's margins map one to one (clamped
    ends would pile several minute ticks onto the last step)."""
    import numpy as np

    steps, minutes = np.array([0] + [s for s, _ in clock], float), np.array([0] + [v / 60 for _, v in clock])
    far, rate = 100 * steps[-1], minutes[-1] / steps[-1]
    steps, minutes = np.r_[-far, steps, far], np.r_[-far * rate, minutes, minutes[-1] + (far - steps[-1]) * rate]
    return (lambda x: np.interp(x, steps, minutes)), (lambda m: np.interp(m, minutes, steps))


class History:
    """Appends ``{"step": n, **metrics}`` lines to ``path`` (main process only) and plots them."""

    def __init__(self, path: Path, enabled: bool = True, resume_step: int = 0):
        self.path = Path(path)
        self.enabled = enabled
        self.rows: List[Dict[str, float]] = []
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.is_file():  # keep what an earlier (resumed) run logged up to its checkpoint
                old = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
                self.rows = [r for r in old if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def add(self, step: int, metrics: Dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def series(self, key: str) -> List[tuple]:
        return [(r["step"], r[key]) for r in self.rows if key in r]

    def keys(self) -> List[str]:
        """Every metric name logged so far, sorted."""
        return sorted({k for r in self.rows for k in r if k != "step"})

    def summary(self) -> Dict[str, Dict[str, Optional[float]]]:
        """First and last logged value of every metric."""
        out = {}
        for k in self.keys():
            s = self.series(k)
            out[k] = {"first_step": s[0][0], "first": s[0][1], "last_step": s[-1][0], "last": s[-1][1]}
        return out

    def plot(self, path: Path) -> Optional[Path]:
        """Loss and accuracy curves as a PNG (train and validation), or None with nothing logged."""
        if not self.enabled or not self.rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [("loss_ig", "L_IG (image generation)"), ("loss_ita", "L_ITA (image-text alignment)"), ("acc_i2t", "in-batch image->text accuracy"),
                  ("cosine", "cosine of predicted and true embedding")]
        panels = [(k, title) for k, title in panels if self.series(f"train/{k}") or self.series(f"val/{k}")]
        if not any(k.startswith("loss") for k, _ in panels):  # none of the named loss terms (method=prior): the total
            panels.insert(0, ("loss", "training loss"))
        evals = [k for k in self.keys() if k.startswith("eval/") and not k.endswith("seconds")]  # figures in [0, 1]
        fig, axes = plt.subplots(1, len(panels) + bool(evals), figsize=(5 * (len(panels) + bool(evals)), 3.6), squeeze=False)
        if evals:  # evaluation during training (train.eval_every): adherence and zero-shot accuracy
            ax = axes[0][-1]
            for key in evals:
                ax.plot(*zip(*self.series(key)), "o-", label=key[len("eval/"):], markersize=3)
            ax.set_title("evaluation during training")
            ax.set_xlabel("step")
            ax.set_ylim(0, 1.02)
            clock = self.series("eval/train_seconds")
            if len(clock) >= 2:  # the same points against training wall-clock (evaluations excluded), on top
                top = ax.secondary_xaxis("top", functions=steps_to_minutes(clock))
                top.set_xlabel("training minutes (evaluations excluded)", fontsize=8)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        for ax, (key, title) in zip(axes[0], panels):
            for split, style in (("train", "-"), ("val", "o-")):
                s = self.series(f"{split}/{key}")
                if s:
                    ax.plot(*zip(*s), style, label=split, markersize=3)
            ax.set_title(title)
            ax.set_xlabel("step")
            if key.startswith("loss"):
                ax.set_yscale("log")
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return Path(path)
