"""The Accelerate trainer: ``accelerate launch tools/train.py [--config F] [key=value ...]``."""

from __future__ import annotations

import contextlib
import gc
import json
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import datasets
import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from accelerate.utils import broadcast as accelerate_broadcast
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import methods
from ..config import save_config
from ..data.replacing import DataError, ExampleStream, ReplacingDataset, StreamPosition
from ..data.transforms import choose_captions, tokenize
from ..models.components import encode_latents
from ..utils.distributed import new_accelerator
from .build import build_components, build_optimizer, caption_corpus, load_split, make_collator, memory_cache_bytes
from .checkpoint import Counter, GeneratorState, PerProcessState, read_step, register_hooks, resolve_resume, save_checkpoint
from .evaluation import TrainingEvaluator
from .history import History
from .plan import StepPlan, rebuild_lr_schedule

logger = get_logger("diffdis.train")


def make_accelerator(cfg) -> Accelerator:
    """An Accelerator that really uses gloo across CPU processes when CUDA is absent.

    Built on a fresh accelerate state (:func:`~diffdis.utils.distributed.new_accelerator`), so a second run
    in the same process (the demo, in-process tests) gets its own device and mixed precision.
    """
    t = cfg.train
    # parameters without a gradient in some steps: the text stream (generation-only steps) or the frozen text encoder
    unused = methods.get(cfg.method).find_unused_parameters(cfg)
    return new_accelerator(  # a fresh state: an earlier in-process run's device or precision must not carry over
        cpu=not torch.cuda.is_available(),
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with=None if t.report_to == "none" else t.report_to,
        project_config=ProjectConfiguration(project_dir=t.output_dir, logging_dir=str(Path(t.output_dir) / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)],
        dynamo_backend="inductor" if t.compile else "no",
    )


def _configure_speed(cfg, module: methods.Method) -> None:
    if torch.cuda.is_available() and cfg.train.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    module.configure_speed(cfg)


def open_latent_cache(cfg, vae):
    """The rows of ``data.cache_dir`` (checked against this run's VAE and data settings) and their collator."""
    from ..data.cache import LatentCacheCollator, load_latent_cache, manifest_for_config, read_manifest

    if vae is None:
        raise ValueError("data.cache_dir needs a model with an autoencoder (model.use_vae=true or model.patch_size > 1)")
    rows = load_latent_cache(cfg.data.cache_dir, manifest_for_config(cfg, vae))
    return rows, LatentCacheCollator(deterministic=bool(read_manifest(cfg.data.cache_dir)["deterministic"]))


def batch_latents(batch: dict, vae, generator: torch.Generator, device) -> torch.Tensor:
    """The scaled latents (B, C, h, w) of a batch: encoded from its pixels, or drawn from a latent cache's stored
    distribution (the same draw from ``generator`` as encoding would make)."""
    if "latent_mean" not in batch:
        return _to_latents(vae, batch["pixel_values"].to(device), generator)
    from ..data.cache import sample_latents

    mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)  # (B, C, h, w)
    return sample_latents(mean, std, vae.config.scaling_factor, generator, deterministic=bool(batch["deterministic"]))


_to_latents = encode_latents  # the training latents of a batch's pixels (also encoded inside method=unidiff)


@contextlib.contextmanager
def ema_weights(ema: Optional[EMAModel], parameters) -> Iterator[None]:
    """Swap the EMA weights into ``parameters`` for the block (no-op without EMA), then restore the trained ones."""
    if ema is None:
        yield
        return
    parameters = list(parameters)
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


@torch.no_grad()
def validation_losses(accelerator, module, vae, batches, empty_ids, seed: int) -> Dict[str, float]:
    """Mean losses on fixed validation batches with fixed noise, sharded across processes."""
    model = accelerator.unwrap_model(module)
    model.eval()
    gen = torch.Generator(device=accelerator.device).manual_seed(seed)
    keys = model.loss_keys()
    sums = torch.zeros(len(keys) + 1, device=accelerator.device)  # last entry counts batches
    for i, batch in enumerate(batches):
        if i % accelerator.num_processes != accelerator.process_index:
            continue
        pixels = batch["pixel_values"].to(accelerator.device)
        latents = pixels if model.input_space == "pixels" else _to_latents(vae, pixels, gen)
        with accelerator.autocast():
            out = model(latents, batch["input_ids"].to(accelerator.device), empty_ids, gen, gather=False)
        sums += torch.stack([out[k].float() for k in keys] + [torch.ones((), device=accelerator.device)])
    sums = accelerator.reduce(sums, reduction="sum")
    model.train()
    n = max(sums[-1].item(), 1.0)
    return {f"val/{k}": sums[i].item() / n for i, k in enumerate(keys)}


def run_evaluation(accelerator, evaluator: TrainingEvaluator, module, components, ema, history: History, out: Path, step: int,
                   extra: Optional[Dict[str, float]] = None) -> Dict[str, float]:
    """Evaluate with the EMA weights on every process (the evaluator shards its work); log on the main process,
    with ``extra`` (e.g. the training seconds so far) beside the metrics.

    Scalars go to the trackers and the history, the sample grid to ``<out>/eval_samples/step-<N>.png``
    and, when tensorboard is on, to its ``eval/samples`` image.
    """
    model = accelerator.unwrap_model(module)
    with ema_weights(ema, module.parameters()):
        metrics, grid = evaluator(accelerator, model, components, step)
    metrics.update(extra or {})
    if accelerator.is_main_process:
        accelerator.log(metrics, step=step)
        history.add(step, metrics)
        if grid is not None:
            (out / "eval_samples").mkdir(parents=True, exist_ok=True)
            grid.save(out / "eval_samples" / f"step-{step}.png")
            _log_image(accelerator, "eval/samples", np.asarray(grid.convert("RGB")), step)
        logger.info(f"step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()), main_process_only=True)
    return metrics


def _log_image(accelerator, tag: str, image: np.ndarray, step: int) -> None:
    """Add an (H, W, 3) uint8 image to the tensorboard tracker, if there is one."""
    for tracker in accelerator.trackers:
        writer = getattr(tracker, "writer", None) if tracker.name == "tensorboard" else None
        if writer is not None:
            writer.add_image(tag, image, step, dataformats="HWC")
            writer.flush()


def _fixed_batches(cfg, tokenizer, n: int):
    if not cfg.data.validation_split or n <= 0:
        return []
    dataset = load_split(cfg.data, cfg.data.validation_split, streaming=False, num_samples=n * cfg.train.batch_size)
    collate = make_collator(cfg, tokenizer, torch.Generator().manual_seed(cfg.train.seed))
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=False, collate_fn=collate)
    return [b for b in loader if b is not None]


def export_model(components, module: methods.Method, cfg, out_dir: Path, ema: Optional[EMAModel]) -> Path:
    """Write the final model folder (the method's pipelines, EMA weights where EMA is on, and the run's config as a
    record in ``diffdis_config.yaml``), atomically."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if ema is not None:
        ema.store(module.parameters())
        ema.copy_to(module.parameters())
    try:
        module.save_pretrained(tmp, components, cfg)
    finally:
        if ema is not None:
            ema.restore(module.parameters())
    save_config(cfg, tmp / "diffdis_config.yaml")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def _load_checkpoint(accelerator, checkpoint: Path) -> None:
    """``accelerator.load_state`` with a one-line error when the checkpoint does not fit the configured run."""
    try:
        accelerator.load_state(str(checkpoint))
    except ValueError as err:
        if str(err).startswith("resume_from_checkpoint"):  # the load hook's own message (checkpoint.check_fits)
            raise
        raise ValueError(f"resume_from_checkpoint: '{checkpoint}' does not fit this run's optimiser or state ({err}); "
                         "resume with the config the checkpoint was made with") from err


@dataclass
class Run:
    """What a training run holds between its named steps (:func:`setup`, :func:`loop`, :func:`finish`)."""

    cfg: Any
    accelerator: Accelerator
    out: Path
    components: Any
    module: Any  # the method, wrapped by accelerate
    optimizer: Any
    lr_scheduler: Any
    loader: Any
    steps_per_epoch: Optional[int]  # None for a stream
    generator: torch.Generator
    plan: StepPlan
    replaced: Counter  # unusable examples met (and replaced) by this process
    position: StreamPosition  # streaming: where this process's trained batches stopped
    history: History
    empty_ids: torch.Tensor
    ema: Optional[EMAModel] = None
    val_batches: List[dict] = field(default_factory=list)
    evaluator: Optional[TrainingEvaluator] = None
    global_step: int = 0
    loop_seconds: float = 0.0  # wall-clock of this process's training loop (this run only: not before a resume)
    loop_steps: int = 0  # optimiser steps that loop ran
    pause_seconds: float = 0.0  # of loop_seconds, the time spent in validation, evaluation and checkpoints
    reached_step: Optional[int] = None  # the step whose evaluation met every target of train.stop_at


def train(cfg) -> Path:
    """Train the configured method; returns the final model folder."""
    run = setup(cfg)
    loop(run)
    return finish(run)


def setup(cfg) -> Run:
    """Data, components, method, optimiser and checkpointed state; resumed from a checkpoint where one is asked for.

    The output folder is created only once the data and weights have loaded, and its config.yaml written only once
    a resumed checkpoint has loaded: bad input leaves nothing behind.
    """
    accelerator = make_accelerator(cfg)
    t = cfg.train
    out = Path(t.output_dir)
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("FSDP is not supported yet: the text stream's logit_scale is a 0-d parameter, which FSDP cannot shard; "
                         "train with DDP (accelerate launch --multi_gpu, or configs/accelerate/*ddp*.yaml)")
    set_seed(t.seed)
    resume = resolve_resume(out, t.resume_from_checkpoint)
    if t.resume_from_checkpoint == "latest" and resume is None:
        logger.warning(f"resume_from_checkpoint=latest: no checkpoint in {out}; training from step 0", main_process_only=True)
    train_set, collate, components = _data_and_components(cfg, accelerator, out)
    if accelerator.is_main_process:  # only now: bad data or weights leave no output folder behind
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.model.pretrained:
            components.tokenizer.save_pretrained(out / "tokenizer")
    module = methods.build(cfg, components)
    _configure_speed(cfg, module)
    if components.vae is not None:
        components.vae.to(accelerator.device)

    generator = torch.Generator(device=accelerator.device).manual_seed(t.seed * 1000 + accelerator.process_index)
    # captions are drawn in the step from the checkpointed generator (see ImageTextCollator.defer_choice);
    # random crops/flips (off for the embedded data) use the global RNG and are not bit-exact on resume
    iterable = isinstance(train_set, datasets.IterableDataset)
    loader = None
    if not iterable:  # unusable examples are replaced by seeded draws, so every process's batch keeps its size
        keep = 0 if cfg.data.cache_dir else memory_cache_bytes(cfg.data, len(train_set), collate.deterministic)
        examples = train_set if cfg.data.cache_dir else ReplacingDataset(train_set, collate.prepare, seed=t.seed, cache_bytes=keep)
        if keep:
            logger.info(f"decoded images kept in memory after their first epoch ({len(train_set)} examples, at most "
                        f"{keep / 2**20:.0f} MB per {'worker' if cfg.data.num_workers else 'process'}; data.memory_cache_mb)",
                        main_process_only=True)
        loader = DataLoader(  # persistent workers keep their kept images from one epoch to the next
            examples, batch_size=t.batch_size, shuffle=True, drop_last=True, collate_fn=collate, num_workers=cfg.data.num_workers,
            persistent_workers=bool(keep and cfg.data.num_workers),
        )
    optimizer = build_optimizer(cfg, module, accelerator.device)
    lr_scheduler = get_scheduler(
        t.lr_scheduler,
        optimizer,
        num_warmup_steps=t.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=t.max_steps * accelerator.num_processes,
    )
    if loader is not None:
        module, optimizer, loader, lr_scheduler = accelerator.prepare(module, optimizer, loader, lr_scheduler)
    else:  # a stream is split per process by ExampleStream itself, not dispatched from the main process
        module, optimizer, lr_scheduler = accelerator.prepare(module, optimizer, lr_scheduler)
    ema = _ema(cfg, accelerator, module)
    plan, replaced, position = StepPlan(t.max_steps, t.max_minutes), Counter(), StreamPosition()
    _register_state(accelerator, ema, generator, plan, replaced, position)

    empty_ids = components.tokenizer(
        [""], padding="max_length", max_length=components.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(accelerator.device)
    val_batches = _fixed_batches(cfg, components.tokenizer, t.validation_batches) if t.validation_every > 0 else []
    evaluator = None
    if t.eval_every > 0:
        with accelerator.main_process_first():  # the main process trains and caches the reference classifier if absent
            evaluator = TrainingEvaluator.from_config(cfg, accelerator)
    global_step = _restore(accelerator, resume, ema, plan, lr_scheduler, t) if resume is not None else 0
    if accelerator.is_main_process:  # only now: a checkpoint that does not fit leaves the folder's config as it was
        save_config(cfg, out / "config.yaml")
    if accelerator.is_main_process and t.report_to != "none":
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in _flatten(OmegaConf.to_container(cfg, resolve=True)).items()}
        accelerator.init_trackers("diffdis", config=flat)

    if iterable:
        stream = ExampleStream(train_set, collate.prepare, accelerator.process_index, accelerator.num_processes, seed=t.seed,
                               shuffle_buffer=cfg.data.shuffle_buffer, start=position.states)
        loader = DataLoader(stream, batch_size=t.batch_size, drop_last=True, collate_fn=collate, num_workers=cfg.data.num_workers)
    steps_per_epoch = None if iterable else len(loader) // t.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ValueError(f"the training set has fewer than {t.batch_size * accelerator.num_processes} examples: lower train.batch_size")
    history = History(out / "logs" / "history.jsonl", enabled=accelerator.is_main_process, resume_step=global_step)
    logger.info(f"training {sum(p.numel() for p in module.parameters()) / 1e6:.2f} M parameters for {t.max_steps} steps", main_process_only=True)
    return Run(cfg, accelerator, out, components, module, optimizer, lr_scheduler, loader, steps_per_epoch, generator, plan,
               replaced, position, history, empty_ids, ema, val_batches, evaluator, global_step)


def _data_and_components(cfg, accelerator, out: Path):
    """The training examples, their collator and the components (a tiny model's tokenizer is trained on the captions)."""
    cached = bool(cfg.data.cache_dir)  # latents encoded once by tools/cache.py
    train_set = None if cached else load_split(cfg.data, cfg.data.split, num_samples=cfg.data.num_train_samples)
    tokenizer_saved = (out / "tokenizer" / "tokenizer.json").is_file()
    captions = None if cfg.model.pretrained or tokenizer_saved or cached else caption_corpus(train_set)
    components = build_components(cfg, captions, tokenizer_dir=out / "tokenizer")
    if cached:
        train_set, collate = open_latent_cache(cfg, components.vae)
    else:
        collate = make_collator(cfg, components.tokenizer, defer_choice=True)
        check_usable(accelerator, train_set, collate.prepare, isinstance(train_set, datasets.IterableDataset))
    return train_set, collate, components


def _ema(cfg, accelerator, module) -> Optional[EMAModel]:
    e = cfg.train.ema
    if not e.use:
        return None
    # foreach: one multi-tensor update instead of a Python loop over every tensor (tiny UNet on 2 CPU cores: 4.8 -> 2.6 ms an update)
    ema = EMAModel(accelerator.unwrap_model(module).parameters(), decay=e.decay, use_ema_warmup=e.warmup, inv_gamma=e.inv_gamma,
                   power=e.power, foreach=True)
    ema.to(accelerator.device)
    return ema


def _register_state(accelerator, ema, generator, plan, replaced, position) -> None:
    """Everything a checkpoint saves besides the model, optimiser and schedule (order matters to old checkpoints)."""
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    accelerator.register_for_checkpointing(PerProcessState(GeneratorState(generator), accelerator, "generator"))
    accelerator.register_for_checkpointing(plan)
    accelerator.register_for_checkpointing(PerProcessState(replaced, accelerator, "replaced-examples"))
    accelerator.register_for_checkpointing(PerProcessState(position, accelerator, "stream position"))
    register_hooks(accelerator)


def _restore(accelerator, resume: Path, ema, plan, lr_scheduler, t) -> int:
    """Load a checkpoint; returns its step."""
    _load_checkpoint(accelerator, resume)
    if ema is not None:  # EMAModel.load_state_dict keeps the loaded (CPU) shadow weights where they were loaded
        ema.to(accelerator.device)
    step = read_step(resume)
    logger.info(f"resumed from {resume} at step {step}", main_process_only=True)
    if plan.total != t.max_steps:  # a time-fitted plan made before the checkpoint
        rebuild_lr_schedule(lr_scheduler, t.lr_scheduler, t.lr_warmup_steps, plan.total, accelerator.num_processes)
    return step


def loop(run: Run) -> None:
    """Train until the plan's last step or the time budget: a step per batch, then logging, validation,
    evaluation and checkpoints at their intervals."""
    t, accelerator = run.cfg.train, run.accelerator
    progress = tqdm(total=run.plan.total, initial=run.global_step, disable=not accelerator.is_local_main_process, desc="train")
    batches = training_batches(accelerator, run.loader, run.steps_per_epoch, run.global_step, t.gradient_accumulation_steps)
    clock = {"start": time.perf_counter(), "tic": time.perf_counter(), "tic_step": run.global_step, "steps_run": 0}
    latest: Dict[str, torch.Tensor] = {}
    if run.global_step < run.plan.total:  # the batches never end: the loop stops at the planned step or the time budget
        for batch in batches:
            latest = _latest_losses(latest, train_step(run, batch), run.cfg.loss.lambda_ita)
            if not accelerator.sync_gradients:
                continue
            run.global_step += 1
            clock["steps_run"] += 1
            progress.update(1)
            _fit_plan(run, clock, progress)
            if run.ema is not None:
                run.ema.step(accelerator.unwrap_model(run.module).parameters())
            if _after_step(run, latest, clock, progress):
                break
    progress.close()
    run.loop_seconds, run.loop_steps = time.perf_counter() - clock["start"], clock["steps_run"]


def training_seconds(run: Run, clock: dict) -> float:
    """Seconds of this run's loop so far spent training: its wall-clock less validation, evaluation and checkpoints."""
    return time.perf_counter() - clock["start"] - run.pause_seconds


def train_step(run: Run, batch: dict) -> Dict[str, torch.Tensor]:
    """Forward, backward and optimiser step (under gradient accumulation) on one batch; returns its losses."""
    accelerator, t = run.accelerator, run.cfg.train
    run.replaced.value += int(batch.get("num_replaced", 0))
    with accelerator.accumulate(run.module):
        pixels = methods.get(run.cfg.method).input_space == "pixels"
        latents = batch["pixel_values"].to(accelerator.device) if pixels else batch_latents(
            batch, run.components.vae, run.generator, accelerator.device)  # (B, C, h, w)
        captions = choose_captions(batch["caption_options"], run.generator)
        input_ids = tokenize(run.components.tokenizer, captions).to(accelerator.device)
        losses = run.module(latents, input_ids, run.empty_ids, run.generator, step=run.global_step)
        accelerator.backward(losses["loss"])
        if accelerator.sync_gradients and t.max_grad_norm > 0:
            accelerator.clip_grad_norm_(run.module.parameters(), t.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.position.update(batch.get("stream_state"))
    return losses


def _fit_plan(run: Run, clock: dict, progress) -> None:
    """With a time budget, fit the number of steps to the measured speed (every process agrees on the main one's)."""
    plan, t = run.plan, run.cfg.train
    if plan.planned:
        return
    previous = plan.total
    message = plan.observe(clock["steps_run"], run.global_step, time.perf_counter() - clock["start"])
    if message is None:
        return
    total = torch.tensor([plan.total], device=run.accelerator.device)
    plan.total = int(accelerate_broadcast(total).item())
    if plan.total != previous:
        rebuild_lr_schedule(run.lr_scheduler, t.lr_scheduler, t.lr_warmup_steps, plan.total, run.accelerator.num_processes)
        progress.total = plan.total
        progress.refresh()
    logger.info(message, main_process_only=True)


def _after_step(run: Run, latest: Dict[str, torch.Tensor], clock: dict, progress) -> bool:
    """Log, validate, evaluate and checkpoint when due; True when training should stop."""
    t, accelerator, step, last = run.cfg.train, run.accelerator, run.global_step, run.plan.total
    if step % t.log_every == 0 or step == last:
        _log_training(run, latest, clock, progress)
    paused = time.perf_counter()
    if run.val_batches and (step % t.validation_every == 0 or step == last):
        with ema_weights(run.ema, run.module.parameters()):
            val = validation_losses(accelerator, run.module, run.components.vae, run.val_batches, run.empty_ids, seed=t.seed + 12345)
        accelerator.log(val, step=step)
        run.history.add(step, val)
        logger.info(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in val.items()), main_process_only=True)
    reached = False
    if run.evaluator is not None and (step % t.eval_every == 0 or step == last):
        seconds = training_seconds(run, clock) - (time.perf_counter() - paused)
        metrics = run_evaluation(accelerator, run.evaluator, run.module, run.components, run.ema, run.history, run.out,
                                 step, {"eval/train_seconds": seconds})
        reached = run.evaluator.reached(metrics)  # every process has the same metrics: they all stop together
        if reached:
            run.reached_step = step
            logger.info(f"step {step}: every target of train.stop_at reached after {seconds:.0f} s of training; stopping",
                        main_process_only=True)
    if t.checkpointing_steps and step % t.checkpointing_steps == 0 and step < last and not reached:
        save_checkpoint(accelerator, run.out, step, t.checkpoints_total_limit)
    run.pause_seconds += time.perf_counter() - paused
    if reached:
        return True
    out_of_time = False
    if t.max_minutes and step % t.log_every == 0:  # all processes agree on when to stop
        late = torch.tensor(float(time.perf_counter() - clock["start"] > 60 * t.max_minutes), device=accelerator.device)
        out_of_time = accelerator.reduce(late, reduction="sum").item() > 0
    return step >= last or out_of_time


def _log_training(run: Run, latest: Dict[str, torch.Tensor], clock: dict, progress) -> None:
    t, accelerator, step = run.cfg.train, run.accelerator, run.global_step
    elapsed = time.perf_counter() - clock["tic"]
    logs = {f"train/{k}": accelerator.reduce(v.float(), reduction="mean").item() for k, v in latest.items()}
    logs["train/lr"] = run.lr_scheduler.get_last_lr()[0]
    replaced = torch.tensor(float(run.replaced.value), device=accelerator.device)
    logs["train/replaced_examples"] = accelerator.reduce(replaced, reduction="sum").item()
    logs["train/steps_per_s"] = (step - clock["tic_step"]) / max(elapsed, 1e-9)
    logs["train/images_per_s"] = logs["train/steps_per_s"] * t.batch_size * accelerator.num_processes * t.gradient_accumulation_steps
    logs["train/seconds"] = training_seconds(run, clock)
    clock["tic"], clock["tic_step"] = time.perf_counter(), step
    accelerator.log(logs, step=step)
    run.history.add(step, logs)
    progress.set_postfix(loss=f"{logs['train/loss']:.4f}")


def finish(run: Run) -> Path:
    """Write the final model folder (EMA weights where EMA is on), the curves and ``train_summary.json``."""
    accelerator, t = run.accelerator, run.cfg.train
    accelerator.wait_for_everyone()
    final = accelerator.unwrap_model(run.module)
    # one checksum per process: DDP must keep the replicas identical
    checksum = torch.stack([p.detach().double().sum() for p in final.parameters()]).sum()
    checksums = accelerator.gather(checksum.reshape(1).to(accelerator.device)).tolist()
    replaced = [int(v) for v in accelerator.gather(torch.tensor([run.replaced.value], device=accelerator.device)).tolist()]
    cost = resource_summary(run, final)
    model_dir = run.out / "model"
    if accelerator.is_main_process:
        export_model(run.components, final, run.cfg, model_dir, run.ema)
        run.history.plot(run.out / "curves.png")
        summary = {
            "global_step": run.global_step,
            "planned_steps": run.plan.total,
            "configured_steps": t.max_steps,
            "num_processes": accelerator.num_processes,
            "replica_param_checksums": checksums,
            "num_skipped_examples": sum(replaced),  # unusable examples met, each replaced by a usable one
            "num_skipped_examples_per_process": replaced,
            "metrics": run.history.summary(),
            **cost,
        }
        (run.out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    _shut_down(run, final)
    return model_dir


def resource_summary(run: Run, final: torch.nn.Module) -> Dict[str, Any]:
    """What the run cost: parameters, time per step and peak memory (the largest of every process's); collective.

    ``ms_per_step`` is the training loop's wall-clock (with its logging, validation and evaluation) divided by the
    steps it ran; ``peak_rss_mb`` the process's maximum resident set size; ``peak_cuda_memory_mb``
    ``torch.cuda.max_memory_allocated`` (None off CUDA).
    """
    accelerator = run.accelerator
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)  # MiB
    cuda = accelerator.device.type == "cuda"
    peaks = torch.tensor([rss, torch.cuda.max_memory_allocated(accelerator.device) / 2**20 if cuda else 0.0],
                         dtype=torch.float64, device=accelerator.device)
    peaks = accelerator.gather(peaks.reshape(1, 2)).reshape(-1, 2).max(dim=0).values.tolist()
    return {
        "trainable_parameters": sum(p.numel() for p in final.parameters() if p.requires_grad),
        "total_parameters": sum(p.numel() for p in final.parameters()),
        "train_loop_seconds": run.loop_seconds,
        "train_loop_steps": run.loop_steps,
        "train_seconds": run.loop_seconds - run.pause_seconds,  # the loop less validation, evaluation and checkpoints
        "stopped_at_target_step": run.reached_step,  # train.stop_at: the step whose evaluation met every target
        "ms_per_step": 1000 * run.loop_seconds / run.loop_steps if run.loop_steps else None,
        "peak_rss_mb": peaks[0],
        "peak_cuda_memory_mb": peaks[1] if cuda else None,
        "device": accelerator.device.type,
    }


def _shut_down(run: Run, final: torch.nn.Module) -> None:
    """Finish the trackers and destroy the process group, the DDP wrapper first.

    DDP's reducer holds the process group; when the reducer is its last holder, the group is destroyed while the
    GIL is held, and a gloo worker thread still releasing the tensors of the last collectives waits for the GIL
    forever: the process hangs at exit after training has finished (seen under CPU load with two processes). Freed
    here while ``torch.distributed`` still holds the group, the reducer only drops a reference; the group is then
    destroyed by ``destroy_process_group``, whose binding releases the GIL.
    """
    run.module = final  # the DDP wrapper's last references: the run and the accelerator
    run.accelerator.free_memory()  # drops the accelerator's models, optimisers and schedulers
    gc.collect()  # the wrapper is in reference cycles (hooks)
    run.accelerator.end_training()  # trackers; destroy_process_group()


def check_usable(accelerator, dataset, prepare, iterable: bool) -> None:
    """Stop every process with one error when any process's part of the data has no usable example.

    Each process draws its first prepared example (a map-style dataset through :class:`ReplacingDataset`'s
    draws, a stream through its own part); the outcome is agreed across processes before any training
    collective, so a process with nothing readable cannot leave the others waiting.
    """
    error: Optional[DataError] = None
    try:
        if iterable:
            next(iter(ExampleStream(dataset, prepare, accelerator.process_index, accelerator.num_processes, shuffle_buffer=0)))
        else:
            ReplacingDataset(dataset, prepare)[0]
    except DataError as err:
        error = err
    except StopIteration:
        error = DataError(f"process {accelerator.process_index}'s part of the training stream is empty")
    failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), reduction="sum").item()
    if error is not None:
        raise error
    if failed:
        raise DataError(f"{int(failed)} other process(es) found no usable example in their part of the data (see their error)")


def training_batches(accelerator, loader, steps_per_epoch: Optional[int], global_step: int, accumulation: int) -> Iterator[dict]:
    """Batches from ``global_step`` on, epoch after epoch (a map-style loader skips what a resumed run has trained;
    a stream continues from its own position and never ends)."""
    if steps_per_epoch is None:
        yield from loader
        return
    epoch, skip = divmod(global_step, steps_per_epoch)
    skip *= accumulation
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from (accelerator.skip_first_batches(loader, skip) if skip else loader)
        skip, epoch = 0, epoch + 1


def _latest_losses(latest: Dict[str, torch.Tensor], losses: Dict[str, torch.Tensor], lambda_ita: float) -> Dict[str, torch.Tensor]:
    """The latest value of every loss term (steps without the discrimination pass keep the last L_ITA), total recomputed."""
    latest = {**latest, **{k: v.detach() for k, v in losses.items()}}
    if "loss_ita" in latest and "loss_ita" not in losses:
        latest["loss"] = latest["loss_ig"] + lambda_ita * latest["loss_ita"]
    return latest


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out

