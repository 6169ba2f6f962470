"""Text-to-image sampling with the generation stream of a DiffDis UNet.

`DiffDisPipeline` is a `diffusers.DiffusionPipeline`: it saves and loads as a folder with
``model_index.json`` and works with any UNet whose forward has the signature and output of
``UNet2DConditionModel.forward`` (the plain UNet, or ``diffdis.models.DualStreamUNet``). It runs in
latent space when a VAE is given, else in pixel space (the "latents" are images in [-1, 1]).

Guidance follows diffusers: ``eps = eps_u + g * (eps_c - eps_u)`` with ``g = guidance_scale``.
DESIGN.md writes the same thing as ``(1 + w) * eps_c - w * eps_u``, so ``w = g - 1``; ``g <= 1``
skips the unconditional pass.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
from pathlib import Path
from typing import Any, Callable, List, Optional, Union

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    ImagePipelineOutput,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..models.components import vae_scale_factor
from .base import CustomComponentsPipeline

logger = logging.getLogger("diffdis.pipelines")

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
GeneratorArg = Optional[Union[torch.Generator, List[torch.Generator]]]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # weight dtypes by name


def scheduler_names() -> dict[str, type]:
    """Names accepted by :func:`make_scheduler` and the scheduler class each one builds."""
    return {
        "ddim": DDIMScheduler,
        "dpm++": DPMSolverMultistepScheduler,
        "dpmsolver": DPMSolverMultistepScheduler,
        "euler": EulerDiscreteScheduler,
        "ddpm": DDPMScheduler,
    }


def make_scheduler(name: str, config: Any) -> SchedulerMixin:
    """Build the scheduler called ``name`` from another scheduler's ``config`` (the noise schedule is kept).

    Args:
        name: one of ``ddim``, ``dpm++`` (alias ``dpmsolver``), ``euler``, ``ddpm`` (case-insensitive).
        config: a scheduler config (``scheduler.config``) or a plain dict.
    """
    classes = scheduler_names()
    key = name.lower()
    if key not in classes:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(classes)}")
    return classes[key].from_config(config)


def unet_downsample_factor(unet: ModelMixin) -> int:
    """How much the UNet shrinks its input along each side: ``2 ** (down blocks - 1)``."""
    for config in (getattr(unet, "config", None), getattr(getattr(unet, "unet", None), "config", None)):
        blocks = getattr(config, "down_block_types", None) if config is not None else None
        if blocks:
            return 2 ** (len(blocks) - 1)
    blocks = getattr(unet, "down_blocks", None)
    return 2 ** (len(blocks) - 1) if blocks is not None else 1


class DiffDisPipeline(CustomComponentsPipeline):
    """Text-to-image generation with classifier-free guidance.

    Args:
        unet: a model with the ``UNet2DConditionModel.forward`` signature (``DualStreamUNet`` or a plain UNet);
            ``unet.config.in_channels`` must be the VAE's latent channels, or 3 in pixel space.
        text_encoder: a CLIP text model; its ``last_hidden_state`` is the cross-attention context.
        tokenizer: pads to ``tokenizer.model_max_length``.
        scheduler: any diffusers scheduler (DDIM, DPM-Solver++, Euler, DDPM...).
        vae: optional ``AutoencoderKL``, or a :class:`~diffdis.models.patch_autoencoder.PatchAutoencoder` (pixel
            space folded into patches); None means pixel space.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        unet: ModelMixin,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        scheduler: SchedulerMixin,
        vae: Optional[ModelMixin] = None,
    ) -> None:
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae)

    # ------------------------------------------------------------------ geometry
    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (1 in pixel space)."""
        return vae_scale_factor(getattr(self, "vae", None))

    @property
    def image_processor(self) -> VaeImageProcessor:
        """Post-processing from [-1, 1] tensors to PIL / numpy / [0, 1] tensors (as Stable Diffusion does)."""
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=True)

    def default_size(self) -> tuple[int, int]:
        """(height, width) in pixels implied by ``unet.config.sample_size``."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    def size_multiple(self) -> int:
        """Height and width must be multiples of this: VAE factor times UNet downsampling."""
        return self.vae_scale_factor * unet_downsample_factor(self.unet)

    # ------------------------------------------------------------------ validation
    def check_inputs(
        self,
        prompts: List[str],
        height: int,
        width: int,
        num_inference_steps: int,
        negative_prompts: Optional[List[str]] = None,
        output_type: str = "pil",
        num_images_per_prompt: int = 1,
        batch_size: Optional[int] = None,
        generator: GeneratorArg = None,
    ) -> None:
        """Raise ``ValueError`` with a one-line message for any input the pipeline cannot sample."""
        if not prompts:
            raise ValueError("no prompts given")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("every prompt must be a string")
        if negative_prompts is not None and len(negative_prompts) != len(prompts):
            raise ValueError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")
        multiple = self.size_multiple()
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(
                f"height and width must be positive multiples of {multiple} (VAE factor {self.vae_scale_factor}"
                f" x UNet downsampling {multiple // self.vae_scale_factor}), got {height}x{width}"
            )
        max_steps = self.scheduler.config.num_train_timesteps
        if not 1 <= num_inference_steps <= max_steps:
            raise ValueError(f"num_inference_steps must be in [1, {max_steps}] for this scheduler, got {num_inference_steps}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        total = len(prompts) * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(f"{len(generator)} generators for {total} images (prompts x images per prompt)")

    # ------------------------------------------------------------------ building blocks
    def encode_prompt(self, prompts: List[str], device: torch.device) -> torch.Tensor:
        """Cross-attention context ``text_encoder(input_ids).last_hidden_state``, shape (B, L, d)."""
        input_ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)  # (B, L)
        # Never `[0]`: CLIPTextModelWithProjection's first output is text_embeds.
        context = self.text_encoder(input_ids).last_hidden_state  # (B, L, d)
        return context.to(dtype=self.unet.dtype)

    def prepare_latents(
        self, batch: int, height: int, width: int, device: torch.device, generator: GeneratorArg
    ) -> torch.Tensor:
        """Initial noise, scaled by the scheduler's ``init_noise_sigma``: (B, C, H / f, W / f)."""
        f = self.vae_scale_factor
        shape = (batch, self.unet.config.in_channels, height // f, width // f)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)  # (B, C, h, w)
        return latents * self.scheduler.init_noise_sigma

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in about [-1, 1], (B, 3, H, W); the identity in pixel space."""
        if self.vae is None:
            return latents
        latents = latents / self.vae.config.scaling_factor  # (B, C, h, w)
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift is not None:
            latents = latents + shift
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]  # (B, 3, H, W)

    def _step_kwargs(self, generator: GeneratorArg, eta: float) -> dict:
        """Only the extra ``scheduler.step`` arguments this scheduler accepts (eta: DDIM only)."""
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def _denoise_batch(
        self,
        prompts: List[str],
        negative_prompts: List[str],
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        generator: GeneratorArg,
        eta: float,
    ) -> torch.Tensor:
        """Sample one batch and return its final latents (B, C, h, w)."""
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        context = self.encode_prompt(prompts, device)  # (B, L, d)
        if do_cfg:
            # Same order as Stable Diffusion: [uncond; cond], so the two pipelines agree bit for bit.
            context = torch.cat([self.encode_prompt(negative_prompts, device), context])  # (2B, L, d)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(len(prompts), height, width, device, generator)  # (B, C, h, w)
        step_kwargs = self._step_kwargs(generator, eta)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if do_cfg else latents  # (2B or B, C, h, w)
            model_input = self.scheduler.scale_model_input(model_input, t)
            eps = self.unet(model_input, t, encoder_hidden_states=context, return_dict=False)[0]
            if do_cfg:
                eps_uncond, eps_cond = eps.chunk(2)  # (B, C, h, w) each
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            latents = self.scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
        return latents

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str]],
        negative_prompt: Optional[Union[str, List[str]]] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        num_images_per_prompt: int = 1,
        height: Optional[int] = None,
        width: Optional[int] = None,
        generator: GeneratorArg = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        batch_size: Optional[int] = None,
    ) -> Union[ImagePipelineOutput, tuple]:
        """Generate images for ``prompt``.

        Args:
            prompt: one prompt or a list.
            negative_prompt: replaces the empty prompt of the unconditional pass (one, or one per prompt).
            num_inference_steps: scheduler steps.
            guidance_scale: ``g`` in ``eps_u + g (eps_c - eps_u)``; DESIGN's ``w`` is ``g - 1``; ``g <= 1`` is unguided.
            num_images_per_prompt: images per prompt, prompt-major order (p0, p0, p1, p1, ...).
            height, width: pixels; default from ``unet.config.sample_size`` times the VAE factor.
            generator: one generator, or one per image (then images do not depend on ``batch_size``).
            eta: DDIM's eta (ignored by other schedulers).
            output_type: ``pil``, ``np`` (B, H, W, 3) in [0, 1], ``pt`` (B, 3, H, W) in [0, 1], or ``latent``.
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
            batch_size: images per UNet batch (guidance doubles it); default all at once.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = list(negative_prompt)
        default_h, default_w = self.default_size()
        height = default_h if height is None else height
        width = default_w if width is None else width
        self.check_inputs(
            prompts, height, width, num_inference_steps, negatives, output_type,
            num_images_per_prompt, batch_size, generator,
        )
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        chunk = batch_size or len(prompts)
        outputs = []
        for start in range(0, len(prompts), chunk):
            part = slice(start, start + chunk)
            gen = generator[part] if isinstance(generator, list) else generator
            latents = self._denoise_batch(
                prompts[part], negatives[part], height, width, num_inference_steps, guidance_scale, gen, eta
            )
            outputs.append(latents if output_type == "latent" else self.decode_latents(latents))
        images = torch.cat(outputs)  # (N, 3, H, W) in [-1, 1], or latents
        images = self.image_processor.postprocess(images, output_type=output_type, do_denormalize=[True] * len(images))
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    # ------------------------------------------------------------------ memory / speed switches
    def enable_xformers_memory_efficient_attention(self, attention_op: Optional[Callable] = None) -> None:
        """Use xFormers attention; needs CUDA and the ``xformers`` package (PyTorch SDPA is the default)."""
        if not torch.cuda.is_available() or importlib.util.find_spec("xformers") is None:
            raise RuntimeError(
                "xformers attention needs a CUDA device and the xformers package; without them the pipeline"
                " already uses PyTorch scaled-dot-product attention"
            )
        super().enable_xformers_memory_efficient_attention(attention_op)

    def _vae_switch(self, method: str) -> None:
        if self.vae is None:
            logger.warning("%s: pixel-space pipeline has no VAE; nothing to do", method)
            return
        getattr(self.vae, method)()

    def enable_vae_slicing(self) -> None:
        """Decode one image at a time (the VAE's ``enable_slicing``); no-op in pixel space."""
        self._vae_switch("enable_slicing")

    def disable_vae_slicing(self) -> None:
        """Undo :meth:`enable_vae_slicing`."""
        self._vae_switch("disable_slicing")

    def enable_vae_tiling(self) -> None:
        """Decode in overlapping tiles (the VAE's ``enable_tiling``); no-op in pixel space."""
        self._vae_switch("enable_tiling")

    def disable_vae_tiling(self) -> None:
        """Undo :meth:`enable_vae_tiling`."""
        self._vae_switch("disable_tiling")


def load_pipeline(
    model_dir: Union[str, os.PathLike], scheduler: str = "ddim", device: Union[str, torch.device] = "cpu", dtype: str = "float32"
) -> DiffDisPipeline:
    """Load a model folder, swap in the named scheduler (same noise schedule) and move it to ``device``.

    Args:
        model_dir: a ``DiffDisPipeline`` folder (with ``model_index.json``), e.g. ``<output_dir>/model``.
        scheduler: a name of :func:`scheduler_names`.
        device: where the weights go.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``.

    Raises:
        ValueError: ``model_dir`` has no ``model_index.json`` (a prior's folder says so).
    """
    from .prior_pipeline import check_not_prior

    check_not_prior(model_dir)
    if not (Path(model_dir) / "model_index.json").is_file():
        raise ValueError(f"{model_dir} is not a diffdis model folder (no model_index.json)")
    pipe = DiffDisPipeline.from_pretrained(model_dir, dtype=DTYPES[dtype])
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    return pipe.to(device)
