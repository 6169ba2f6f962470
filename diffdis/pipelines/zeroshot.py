"""Zero-shot inference of DiffDis: generate the image-side text query by denoising (Algorithm 3).

For each image, a text query starts as pure noise ``e_T ~ N(0, I)`` and is denoised in K steps of
a diffusers scheduler (DDIM by default) by the discrimination stream conditioned on the image, with
guidance on the image condition: ``ê = (1 + w) Φ(e_t, t, z) − w Φ(e_t, t, ∅)`` where ``∅`` is a
pure-noise image at ``t_z = T − 1`` (the training-time image dropout). The final query is
L2-normalised and compared with the text queries of class prompts or captions
(:mod:`diffdis.eval.zeroshot`). The cost is O(K) passes per image whatever the number of classes.

Training noises the query as ``e_t = γ·sqrt(ᾱ_t)·e0 + sqrt(1−ᾱ_t)·ε`` (γ = ``loss.text_scale``).
diffusers schedulers assume ``x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε``, so in their parametrisation
``x0 = γ·e0``: an e0 prediction is scaled by γ before ``scheduler.step`` and the final sample
divided by γ. An epsilon prediction is the same in both parametrisations.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tqdm.auto import tqdm

from ..models.components import encode_text, vae_scale_factor
from ..models.dual_stream_unet import DualStreamUNet

logger = logging.getLogger("diffdis.pipelines")

GeneratorArg = Optional[Union[torch.Generator, Sequence[torch.Generator]]]
ModelFn = Callable[..., torch.Tensor]
TEXT_SCHEDULERS = ("ddim", "dpm++")


class ZeroShotModelError(ValueError):
    """A model folder cannot be used for zero-shot inference (e.g. no discrimination stream)."""


# ---------------------------------------------------------------------------- sampler function
@torch.no_grad()
def sample_text_query(
    model_fn: ModelFn,
    x: torch.Tensor,
    scheduler: SchedulerMixin,
    extra_args: Optional[Dict[str, Any]] = None,
    callback: Optional[Callable[[Dict[str, Any]], None]] = None,
    disable: Optional[bool] = None,
) -> torch.Tensor:
    """Deterministic scheduler sampling (DDIM for DiffDis Algorithm 3) of a query x: (N, d) -> (N, d).

    ``model_fn(x, t, **extra_args)`` returns the prediction in the scheduler's parametrisation
    (its ``prediction_type``); ``scheduler.set_timesteps`` must have been called.
    """
    extra_args = extra_args or {}
    for i, t in enumerate(tqdm(scheduler.timesteps, disable=disable, leave=False, desc="text query")):
        pred = model_fn(x, t, **extra_args)  # (N, d)
        out = scheduler.step(pred, t, x)
        x = out.prev_sample  # (N, d)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "denoised": getattr(out, "pred_original_sample", None)})
    return x


def make_text_scheduler(scheduler_config: Dict[str, Any], name: str = "ddim", prediction_type: str = "sample") -> SchedulerMixin:
    """A deterministic scheduler for the text query on the training noise schedule.

    ``trailing`` spacing makes the first step t = T − 1, where ``e_T ~ N(0, I)`` is the right
    start; ``set_alpha_to_one`` makes DDIM's last step return its x0 estimate.
    """
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    config.update(prediction_type=prediction_type, clip_sample=False, thresholding=False, timestep_spacing="trailing")
    key = name.lower()
    if key == "ddim":
        config.update(set_alpha_to_one=True, steps_offset=0)
        return DDIMScheduler.from_config(config)
    if key in ("dpm++", "dpmsolver"):
        config.update(algorithm_type="dpmsolver++", final_sigmas_type="zero")
        return DPMSolverMultistepScheduler.from_config(config)
    raise ValueError(f"unknown text scheduler {name!r}; choose one of {TEXT_SCHEDULERS}")


def _draw(shape: Sequence[int], generator: GeneratorArg, n_per: int = 1) -> torch.Tensor:
    """Standard normal (B*n_per, *shape[1:]) on CPU; a list of generators gives each image its own draws."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator)
    per_image = (n_per, *shape[1:])
    return torch.cat([torch.randn(per_image, generator=g) for g in generator])


# ---------------------------------------------------------------------------- folder checks
def check_dual_stream_folder(folder: Union[str, Path]) -> None:
    """Raise :class:`ZeroShotModelError` unless ``folder/unet`` holds a ``DualStreamUNet``."""
    config_path = Path(folder) / "unet" / "config.json"
    if not config_path.is_file():
        raise ZeroShotModelError(f"'{folder}' is not a DiffDis model folder: {config_path} is missing")
    class_name = json.loads(config_path.read_text()).get("_class_name")
    if class_name != "DualStreamUNet":
        raise ZeroShotModelError(
            f"'{folder}/unet' is a {class_name}, not a DualStreamUNet: the model has no discrimination stream"
        )


def tokenize(tokenizer, texts: List[str], device: Union[str, torch.device]) -> torch.Tensor:
    """``input_ids`` (B, L) padded to ``tokenizer.model_max_length``."""
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
    return ids.input_ids.to(device)


@torch.no_grad()
def images_to_latents(pixel_values: torch.Tensor, vae: Optional[torch.nn.Module]) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> the UNet's input space (the pixels themselves without a VAE)."""
    if vae is None:
        return pixel_values
    dist = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return dist.mean * vae.config.scaling_factor  # (B, C, h, w); the mean keeps features deterministic


# ---------------------------------------------------------------------------- the sampler
class TextQuerySampler:
    """Generate normalised image-side text queries with the discrimination stream (DiffDis Algorithm 3).

    Args:
        unet: the trained :class:`DualStreamUNet`.
        scheduler_config: the training noise scheduler's config (its ᾱ schedule is reused).
        empty_context: context of the empty prompt, (1, L, d_ctx) (the discrimination pass's ``c``).
        text_scale: γ of the text forward process used in training.
        scheduler: ``"ddim"`` (default) or ``"dpm++"``.
        use_cache: cache image features across steps; default: whenever ``fusion == "one_way"``.
    """

    def __init__(
        self,
        unet: DualStreamUNet,
        scheduler_config: Dict[str, Any],
        empty_context: torch.Tensor,
        text_scale: float = 1.0,
        scheduler: str = "ddim",
        use_cache: Optional[bool] = None,
    ):
        if use_cache and unet.config.fusion != "one_way":
            raise ValueError("use_cache=True needs a model with fusion='one_way'")
        if text_scale <= 0:
            raise ValueError(f"text_scale must be > 0, got {text_scale}")
        self.unet = unet
        self.prediction_type = unet.config.text_prediction_type
        self.scheduler = make_text_scheduler(scheduler_config, scheduler, self.prediction_type)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.empty_context = empty_context  # (1, L, d_ctx)
        self.text_scale = float(text_scale)
        self.use_cache = unet.config.fusion == "one_way" if use_cache is None else bool(use_cache)

    @property
    def cached(self) -> bool:
        """Whether image features are computed once per image and reused at every step."""
        return self.use_cache

    def _to_scheduler(self, pred: torch.Tensor) -> torch.Tensor:
        """Head output -> the scheduler's parametrisation: x0 = γ·e0 (epsilon is unchanged)."""
        return pred * self.text_scale if self.prediction_type == "sample" else pred

    def _conditions(self, latents: torch.Tensor, uncond: Optional[torch.Tensor], n: int):
        """Image conditions for B*n queries (cond first, then uncond when guided): a cache or tensors."""
        b = latents.shape[0]
        ctx = self.empty_context.expand(b, -1, -1)  # (B, L, d)
        zeros = torch.zeros(b, dtype=torch.long, device=latents.device)
        images, t_img = [latents], [zeros]
        if uncond is not None:
            images.append(uncond)
            t_img.append(torch.full_like(zeros, self.num_train_timesteps - 1))
        if self.cached:
            caches = [self.unet.encode_image(img, ctx, t).repeat(n) for img, t in zip(images, t_img)]
            return caches[0] if len(caches) == 1 else caches[0].cat(caches[1])
        rep = lambda x: x.repeat_interleave(n, dim=0)  # noqa: E731
        image = torch.cat([rep(x) for x in images])  # (G*B*n, C, H, W)
        return image, self.empty_context.expand(image.shape[0], -1, -1), torch.cat([rep(t) for t in t_img])

    def _model_fn(self, condition, guidance: float) -> ModelFn:
        """Guided prediction ``(1 + w)Φ(e_t, t, z) − wΦ(e_t, t, ∅)`` in the scheduler's parametrisation."""
        groups = 1 if guidance == 0 else 2
        dtype = self.unet.dtype

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            e_t = torch.cat([x] * groups).to(dtype)  # (G*N, d)
            t_e = torch.full((e_t.shape[0],), int(t), dtype=torch.long, device=x.device)
            if self.cached:
                pred = self.unet.forward_text_cached(e_t, t_e, condition)
            else:
                image, ctx, t_img = condition
                pred = self.unet.forward_text(e_t, t_e, image, ctx, t_img)
            pred = pred.float()  # (G*N, d)
            if groups == 2:
                cond, uncond = pred.chunk(2)
                pred = (1 + guidance) * cond - guidance * uncond
            return self._to_scheduler(pred)

        return model_fn

    @torch.no_grad()
    def __call__(
        self,
        latents: torch.Tensor,
        num_inference_steps: int = 10,
        guidance: float = 0.0,
        num_noise_samples: int = 1,
        generator: GeneratorArg = None,
        noise: Optional[torch.Tensor] = None,
        callback: Optional[Callable[[Dict[str, Any]], None]] = None,
        disable: Optional[bool] = True,
    ) -> torch.Tensor:
        """Image latents (B, C, H, W) -> normalised queries (B, d_e).

        Args:
            latents: clean image latents (pixels in [-1, 1] for pixel-space models).
            num_inference_steps: K.
            guidance: w; 0 skips the unconditional pass.
            num_noise_samples: n; the n normalised queries of an image are averaged and renormalised.
            generator: one generator, or one per image (results then do not depend on batching).
            noise: optional ``e_T`` (B*n, d_e), image-major; overrides the generator's draw.
            callback: called after every step with ``i``, ``t``, ``x`` (the scheduler's sample, x0 = γ·e0).
            disable: hide the progress bar.
        """
        if num_inference_steps < 1 or num_noise_samples < 1:
            raise ValueError("num_inference_steps and num_noise_samples must be >= 1")
        if generator is not None and not isinstance(generator, torch.Generator) and len(generator) != latents.shape[0]:
            raise ValueError(f"got {len(generator)} generators for {latents.shape[0]} images")
        b, n, d = latents.shape[0], num_noise_samples, self.unet.config.text_dim
        latents = latents.to(device=self.unet.device, dtype=self.unet.dtype)
        if noise is None:
            noise = _draw((b * n, d), generator, n)
        uncond = None
        if guidance != 0:
            uncond = _draw((b, *latents.shape[1:]), generator).to(latents)  # ∅: pure noise at t_z = T-1
        x = noise.to(device=latents.device, dtype=torch.float32)  # (B*n, d)
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        model_fn = self._model_fn(self._conditions(latents, uncond, n), guidance)
        x = sample_text_query(model_fn, x, self.scheduler, callback=callback, disable=disable)
        x = x / self.text_scale  # the scheduler's x0 is γ·e0 whatever the head predicts
        queries = F.normalize(x, dim=-1).view(b, n, d)  # (B, n, d)
        return F.normalize(queries.mean(dim=1), dim=-1)  # (B, d)


# ---------------------------------------------------------------------------- diffusion classifier
@torch.no_grad()
def diffusion_classifier_logits(
    unet,
    latents: torch.Tensor,
    class_contexts: torch.Tensor,
    noise_scheduler,
    num_timesteps: int = 10,
    generator=None,
    class_batch_size: int = 64,
    keep: Optional[int] = None,
    first_timesteps: int = 2,
) -> torch.Tensor:
    """Diffusion classifier (Li et al. 2023): logits = −mean denoising error per class prompt.

    Each image is noised at ``num_timesteps`` evenly spaced timesteps with the same noise for every
    class; the error ``‖target − U(z_t, t, c_k)‖²`` is averaged over timesteps. Cost:
    classes × timesteps UNet passes per image.

    With ``keep`` (the paper's adaptive evaluation, in two rounds), every class is first scored on
    ``first_timesteps`` of the timesteps, the midpoints of as many equal parts of them (the ends of the range,
    nearly clean and nearly pure noise, tell classes apart least); only each image's ``keep`` best classes
    are then scored on the others. Cost: K·first + keep·(num_timesteps − first) passes per image. A kept
    class's logit is exactly its exhaustive logit (same timesteps, same noise); a class dropped after the
    first round gets its first-round logit minus 1e4, so it ranks below every kept class and in its
    first-round order among the dropped.

    Args:
        unet: the generation UNet (``DualStreamUNet`` or ``UNet2DConditionModel``).
        latents: clean latents (B, C, H, W).
        class_contexts: (K, L, d) context of one prompt per class.
        noise_scheduler: the training noise scheduler (its ``prediction_type`` sets the target).
        generator: one generator or one per image.
        class_batch_size: classes per UNet call, each with every image of the batch.
        keep: classes kept after the first round (None, or ``keep >= K``: every class at every timestep).
        first_timesteps: timesteps of the first round (with ``keep``); 1 <= first_timesteps <= num_timesteps.

    Returns:
        (B, K) logits (negative errors): the lowest error wins.
    """
    b, k = latents.shape[0], class_contexts.shape[0]
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if keep is not None and not 1 <= first_timesteps <= num_timesteps:
        raise ValueError(f"first_timesteps must be in [1, {num_timesteps}], got {first_timesteps}")
    device, dtype = unet.device, unet.dtype
    num_train = noise_scheduler.config.num_train_timesteps
    ts = torch.linspace(0, num_train - 1, num_timesteps + 2)[1:-1].round().long()  # interior, evenly spaced
    shape = (num_timesteps, *latents.shape[1:])
    if generator is None or isinstance(generator, torch.Generator):
        noise = torch.randn((b, *shape), generator=generator)
    else:
        noise = torch.stack([torch.randn(shape, generator=g) for g in generator])  # (B, N, C, H, W)
    latents = latents.to(device=device, dtype=torch.float32)
    class_contexts = class_contexts.to(device=device, dtype=dtype)
    all_classes = torch.arange(k, device=device).expand(b, k)  # (B, K)
    if keep is None or keep >= k or first_timesteps == num_timesteps:
        errors = _class_errors(unet, latents, noise, ts, range(num_timesteps), all_classes, class_contexts,
                               noise_scheduler, class_batch_size)
        return -(errors / num_timesteps)  # (B, K)
    first = ((torch.arange(first_timesteps) + 0.5) * num_timesteps / first_timesteps).long().tolist()  # mid-range
    rest = [j for j in range(num_timesteps) if j not in first]
    first_err = _class_errors(unet, latents, noise, ts, first, all_classes, class_contexts, noise_scheduler,
                              class_batch_size)  # (B, K)
    kept = first_err.topk(keep, dim=1, largest=False).indices  # (B, keep)
    rest_err = _class_errors(unet, latents, noise, ts, rest, kept, class_contexts, noise_scheduler, class_batch_size)
    logits = -(first_err / len(first)) - 1e4  # dropped classes: first-round logit, below every kept class
    kept_err = first_err.gather(1, kept) + rest_err  # (B, keep): the sum over all timesteps
    return logits.scatter(1, kept, -(kept_err / num_timesteps))  # (B, K)


def _class_errors(unet, latents, noise, ts, steps, classes, class_contexts, noise_scheduler, class_batch_size):
    """Summed denoising error (B, n) of each image against its classes ``classes`` (B, n) over the timesteps
    ``ts[j]`` for j in ``steps``, each with its noise ``noise[:, j]``."""
    b, n = classes.shape
    device = latents.device
    pred_type = noise_scheduler.config.prediction_type
    errors = torch.zeros(b, n, device=device)
    per_call = max(1, class_batch_size)
    for j in steps:
        t = int(ts[j])
        eps = noise[:, j].to(device)  # (B, C, H, W), shared by all classes
        t_b = torch.full((b,), t, dtype=torch.long, device=device)
        noisy = noise_scheduler.add_noise(latents, eps, t_b)
        target = noise_scheduler.get_velocity(latents, eps, t_b) if pred_type == "v_prediction" else eps
        if pred_type == "sample":
            target = latents
        for c0 in range(0, n, per_call):
            cls = classes[:, c0 : c0 + per_call]  # (B, n')
            m = cls.shape[1]
            ctx = class_contexts[cls.reshape(-1)]  # (B*n', L, d), image-major
            x = noisy.repeat_interleave(m, dim=0).to(unet.dtype)  # (B*n', C, H, W)
            pred = unet(x, t_b.repeat_interleave(m), ctx).sample.float()
            err = (pred - target.repeat_interleave(m, dim=0)).pow(2).flatten(1).mean(dim=1)  # (B*n',)
            errors[:, c0 : c0 + m] += err.view(b, m)
    return errors


def class_contexts(
    text_encoder, tokenizer, classnames: Sequence[str], template: str, device, batch_size: int = 256
) -> torch.Tensor:
    """Context (K, L, d) of one prompt per class (the diffusion classifier's conditions)."""
    prompts = [template.format(c) for c in classnames]
    with torch.no_grad():
        out = [
            encode_text(text_encoder, tokenize(tokenizer, prompts[i : i + batch_size], device))[0]
            for i in range(0, len(prompts), batch_size)
        ]
    return torch.cat(out)
