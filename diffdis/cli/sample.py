"""Generate images from text with a trained diffdis model folder.

    diffdis-sample outputs/run/model --prompt "a red circle" --seed 0 1 --steps 50 --out samples/

Writes one PNG per (prompt, seed) named ``p{prompt:03d}_s{seed}.png``, a ``grid.png`` (one row per prompt,
captioned), and ``settings.json`` with everything needed to repeat the run. Each image has its own
generator seeded with its seed, so an image does not depend on the batch size or on the other prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from diffdis.pipelines.text_to_image import DTYPES, load_pipeline, scheduler_names
from diffdis.utils.images import make_grid


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface of the sampler."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="a DiffDisPipeline folder (with model_index.json), e.g. <output_dir>/model")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat the flag for several")
    p.add_argument("--prompts-file", help="text file with one prompt per line (blank lines and # comments skipped)")
    p.add_argument("--negative-prompt", default=None, help="prompt of the unconditional pass (default: empty)")
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds (default: 0)")
    p.add_argument(
        "--num-images-per-prompt", type=int, default=1,
        help="images per prompt and seed S: uses seeds S, S+1, ..., so image names stay unique (default: 1)",
    )
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    p.add_argument(
        "--guidance", type=float, default=3.0,
        help="classifier-free guidance scale g (eps_u + g (eps_c - eps_u); 1 = none; DESIGN's w = g - 1)",
    )
    p.add_argument("--scheduler", default="ddim", choices=sorted(scheduler_names()), help="sampler (default: ddim)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default: 0, deterministic)")
    p.add_argument("--batch-size", type=int, default=None, help="images per UNet batch (default: all at once)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's size)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's size)")
    p.add_argument("--out", default="samples", help="output folder (default: samples)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights dtype (default: float32)")
    p.add_argument(
        "--upscale", type=int, default=0,
        help="nearest-neighbour factor of the grid tiles; 0 = automatic, tiles at least 128 px wide (default: 0)",
    )
    return p


def read_prompts(prompts: Sequence[str], prompts_file: Optional[str]) -> List[str]:
    """``--prompt`` values followed by the lines of ``--prompts-file``."""
    out = [p for p in prompts]
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise ValueError(f"prompts file {path} " + ("is not a regular file" if path.exists() else "does not exist"))
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError:
            raise ValueError(f"prompts file {path} is not UTF-8 text (one prompt per line)") from None
        out += [line for line in lines if line and not line.startswith("#")]
    if not out or any(not p.strip() for p in out):
        raise ValueError("no prompts given (use --prompt or --prompts-file; prompts must not be empty)")
    return out


def expand_seeds(seeds: Sequence[int], num_images_per_prompt: int) -> List[int]:
    """Seeds ``s, s+1, ..., s+n-1`` for every given ``s``, without duplicates, in first-seen order."""
    if num_images_per_prompt < 1:
        raise ValueError(f"--num-images-per-prompt must be >= 1, got {num_images_per_prompt}")
    return list(dict.fromkeys(s + k for s in seeds for k in range(num_images_per_prompt)))


def write_outputs(out: Path, images: list, jobs: list, prompts: List[str], seeds: List[int], upscale: int) -> List[str]:
    """Save the PNGs and the captioned grid (one row per prompt, one column per seed); return the file names."""
    names = []
    for image, (pi, seed) in zip(images, jobs):
        name = f"p{pi:03d}_s{seed}.png"
        image.save(out / name)
        names.append(name)
    factor = upscale or max(1, -(-128 // images[0].width))
    captions = [f"{prompts[pi]} (seed {seed})" for pi, seed in jobs]
    make_grid(images, captions=captions, ncols=len(seeds), upscale=factor).save(out / "grid.png")
    return names


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the sampler; returns 0 on success, 2 on bad input (with a one-line message on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        prompts = read_prompts(args.prompt, args.prompts_file)
        seeds = expand_seeds(args.seed, args.num_images_per_prompt)
        if args.upscale < 0:
            raise ValueError(f"--upscale must be >= 0, got {args.upscale}")
        pipe = load_pipeline(args.model_dir, args.scheduler, args.device, args.dtype)
        default_h, default_w = pipe.default_size()
        height, width = args.height or default_h, args.width or default_w
        jobs = [(pi, seed) for pi in range(len(prompts)) for seed in seeds]
        job_prompts = [prompts[pi] for pi, _ in jobs]
        pipe.check_inputs(job_prompts, height, width, args.steps, batch_size=args.batch_size)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    pipe.set_progress_bar_config(disable=not sys.stderr.isatty())
    generators = [torch.Generator(device="cpu").manual_seed(seed) for _, seed in jobs]
    images = pipe(
        job_prompts,
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=height,
        width=width,
        generator=generators,
        eta=args.eta,
        batch_size=args.batch_size,
        output_type="pil",
    ).images
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = write_outputs(out, images, jobs, prompts, seeds, args.upscale)
    settings = {
        "model_dir": os.path.abspath(args.model_dir),
        "prompts": prompts,
        "negative_prompt": args.negative_prompt,
        "seeds": seeds,
        "steps": args.steps,
        "guidance": args.guidance,
        "scheduler": args.scheduler,
        "scheduler_config": dict(pipe.scheduler.config),
        "eta": args.eta,
        "batch_size": args.batch_size,
        "height": height,
        "width": width,
        "device": args.device,
        "dtype": args.dtype,
        "upscale": args.upscale,
        "files": files,
        "versions": {"torch": torch.__version__, "diffusers": _version("diffusers"), "diffdis": _version("diffdis")},
        "argv": list(argv) if argv is not None else sys.argv[1:],
    }
    (out / "settings.json").write_text(json.dumps(settings, indent=2, default=str))
    print(f"wrote {len(files)} images, grid.png and settings.json to {out}")
    return 0


def _version(package: str) -> str:
    """Installed version of ``package`` (``__version__`` first, so an uninstalled checkout still reports one)."""
    try:
        module = __import__(package)
        return str(getattr(module, "__version__", "unknown"))
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
