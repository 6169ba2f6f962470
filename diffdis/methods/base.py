"""The interface every training method implements, and the registry that picks one by ``cfg.method``.

A method owns its trainable modules and its objective. The trainer, checkpoints and evaluation speak to a
method only through this interface:

- :meth:`Method.from_config` builds it from a run config and the loaded or built components
  (:class:`diffdis.train.build.Components`), freezing what it does not train;
- ``forward(latents, input_ids, empty_ids, generator, gather=True, step=None)`` returns its named losses for a
  batch, the total under ``"loss"``;
- :attr:`Method.generates` and :attr:`Method.zero_shot` tell the evaluators what it can be scored on (a
  text-to-image pipeline; zero-shot by text queries or by the diffusion classifier);
- :meth:`Method.find_unused_parameters` tells DDP whether some parameters get no gradient in some steps.

- :meth:`Method.text_to_image_pipeline` and :meth:`Method.zero_shot_pipeline` give the inference pipelines
  around its live modules (what evaluation during training scores), and :meth:`Method.save_pretrained` writes
  them as the model folder.

Every method built on the dual-stream UNet saves itself as the same model folder: a ``DiffDisPipeline``
(``model_index.json``) and, over the same component subfolders, a ``DiffDisZeroShotPipeline``
(``zeroshot_index.json``: γ, K, w, the classifier and the method's name).
"""

from __future__ import annotations

import os
from typing import Callable, ClassVar, Dict, List, Type, Union

import torch
from torch import nn

_REGISTRY: Dict[str, Type["Method"]] = {}


class Method(nn.Module):
    """Base class of training methods (see the module docstring for the contract)."""

    name: ClassVar[str] = ""
    #: "text_query" (the discrimination stream denoises a text query) or "diffusion_classifier" (Li et al. 2023)
    zero_shot: ClassVar[str] = "text_query"
    #: what ``forward`` takes as ``latents``: "latents" (the UNet's input space) or "pixels" (images in [-1, 1])
    input_space: ClassVar[str] = "latents"

    @classmethod
    def from_config(cls, cfg, components) -> "Method":
        """Build the method from a run config and its components, with ``requires_grad`` set as it trains them."""
        raise NotImplementedError

    @classmethod
    def find_unused_parameters(cls, cfg) -> bool:
        """Whether some trainable parameters get no gradient in some steps (DDP must then look for them)."""
        return False

    @classmethod
    def trains_generation(cls, loss) -> bool:
        """Whether the method, with the ``loss`` section ``loss``, trains text-to-image generation (FID and prompt
        adherence apply)."""
        return True

    @classmethod
    def trains_discrimination(cls, loss) -> bool:
        """Whether it trains the discrimination stream (text-query zero-shot and retrieval apply)."""
        return cls.zero_shot == "text_query"

    @property
    def generates(self) -> bool:
        return self.trains_generation(self.options)

    @property
    def discriminates(self) -> bool:
        return self.trains_discrimination(self.options)

    def loss_keys(self) -> List[str]:
        """Names of the scalars ``forward`` returns, in logging order (the validation losses)."""
        raise NotImplementedError

    def forward(self, latents: torch.Tensor, input_ids: torch.Tensor, empty_ids: torch.Tensor,
                generator: torch.Generator, gather: bool = True, step=None) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------ training set-up (dual-stream UNet methods)
    def param_groups(self, cfg) -> List[dict]:
        """AdamW parameter groups: the UNet's pretrained (or tiny) weights at ``train.learning_rate``, the new text
        stream at ``train.learning_rate_new`` and the text encoder at ``train.learning_rate_text_encoder`` (unset:
        ``learning_rate``); only trainable parameters, empty groups left out."""
        t = cfg.train
        new_ids = {id(p) for p in self.unet.new_parameters()}
        groups = [
            {"params": [p for p in self.unet.parameters() if id(p) not in new_ids and p.requires_grad], "lr": t.learning_rate},
            {"params": [p for p in self.unet.new_parameters() if p.requires_grad], "lr": t.learning_rate_new or t.learning_rate},
            {"params": [p for p in self.text_encoder.parameters() if p.requires_grad],
             "lr": t.learning_rate_text_encoder or t.learning_rate},
        ]
        return [g for g in groups if g["params"]]

    def checkpoint_modules(self) -> Dict[str, nn.Module]:
        """The modules a checkpoint saves, each as a ``save_pretrained`` folder named by its key."""
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    def configure_speed(self, cfg) -> None:
        """xformers attention (CUDA, where installed and ``model.enable_xformers``) and gradient checkpointing."""
        if cfg.model.enable_xformers and torch.cuda.is_available():
            import importlib.util

            if importlib.util.find_spec("xformers") is not None:
                self.unet.unet.enable_xformers_memory_efficient_attention()
        if cfg.model.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if cfg.model.train_text_encoder:
                self.text_encoder.gradient_checkpointing_enable()

    # ------------------------------------------------------------------ inference (dual-stream UNet methods)
    def text_to_image_pipeline(self, components, scheduler=None):
        """A ``DiffDisPipeline`` around the live modules (``scheduler``: the sampler; default: the noise scheduler)."""
        from ..pipelines import DiffDisPipeline

        return DiffDisPipeline(unet=self.unet, text_encoder=self.text_encoder, tokenizer=components.tokenizer,
                               scheduler=scheduler or components.noise_scheduler, vae=components.vae)

    def zero_shot_pipeline(self, components, cfg):
        """A ``DiffDisZeroShotPipeline`` around the live modules, with the run's γ (``loss.text_scale``), its zero-shot
        defaults (``zeroshot.*``) and the classifier this method provides."""
        from ..pipelines.zeroshot_pipeline import DiffDisZeroShotPipeline

        z = cfg.zeroshot
        return DiffDisZeroShotPipeline(
            unet=self.unet, text_encoder=self.text_encoder, tokenizer=components.tokenizer,
            scheduler=components.noise_scheduler, vae=components.vae, text_scale=cfg.loss.text_scale,
            num_inference_steps=z.steps, guidance_scale=z.guidance, num_noise_samples=z.noise_samples,
            text_scheduler=z.scheduler, classifier="text_query" if self.discriminates else "diffusion_classifier",
            method=self.name, generates=self.generates, resolution=cfg.data.resolution, image_dropout=cfg.loss.p_uncond,
        )

    def save_pretrained(self, folder: Union[str, os.PathLike], components, cfg) -> None:
        """Write the model folder: the text-to-image pipeline with every component, then the zero-shot
        pipeline's index over the same component subfolders."""
        self.text_to_image_pipeline(components).save_pretrained(folder)
        self.zero_shot_pipeline(components, cfg).save_index(folder)


def register(name: str) -> Callable[[Type[Method]], Type[Method]]:
    """Class decorator: make a :class:`Method` available as ``method=<name>``."""

    def add(cls: Type[Method]) -> Type[Method]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method '{name}' is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def available() -> List[str]:
    """Names of the registered methods."""
    return sorted(_REGISTRY)


def get(name: str) -> Type[Method]:
    """The method class registered as ``name``; a ``ValueError`` listing the others when there is none."""
    if name not in _REGISTRY:
        raise ValueError(f"method={name!r} is not one of {available()}")
    return _REGISTRY[name]
