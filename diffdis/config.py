"""Configuration schema: dataclasses that OmegaConf YAML files and ``key=value`` overrides change.

Every field has a comment; unknown keys and wrong types are errors that name the key
(OmegaConf's structured-config checks, re-raised as :class:`ConfigError`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # the shipped configs, installed with the package
DEFAULT_CONFIG = "tiny"


class ConfigError(ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


@dataclass
class UNetConfig:
    """Arguments of the tiny ``UNet2DConditionModel`` built when no pretrained UNet is given."""

    sample_size: int = 16  # latent (or pixel) side length
    in_channels: int = 3  # 3 in pixel space, 4 with an SD VAE
    out_channels: int = 3
    block_out_channels: List[int] = field(default_factory=lambda: [64, 128])
    down_block_types: List[str] = field(default_factory=lambda: ["DownBlock2D", "CrossAttnDownBlock2D"])
    up_block_types: List[str] = field(default_factory=lambda: ["CrossAttnUpBlock2D", "UpBlock2D"])
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    layers_per_block: int = 1  # resnets per block
    attention_head_dim: int = 4  # number of heads, in diffusers' (SD-1.x) naming
    norm_num_groups: int = 16
    transformer_layers_per_block: int = 1
    addition_embed_type: Optional[str] = None  # "text": the attention-pooled caption is added to the time embedding of every ResNet (a stock diffusers option)
    addition_embed_type_num_heads: int = 64  # heads of that attention pooling (must divide the text encoder's hidden_size)


@dataclass
class TextEncoderConfig:
    """Tiny CLIP text tower built (and trained) when no pretrained text encoder is given."""

    hidden_size: int = 64  # width of the token states c (the UNet's cross_attention_dim)
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    max_length: int = 16  # tokens per caption, with <bos> and <eos>
    projection_dim: int = 64  # d_e: width of the text query e
    vocab_size: int = 256  # upper bound for the tokenizer trained on the captions


@dataclass
class ClipConfig:
    """Image tower of ``method=clip`` and ``method=unidiff``: a ViT built through transformers' ``CLIPModel`` at
    ``data.resolution``; the text tower is the run's text encoder (``model.text_encoder``), both projecting to its
    ``projection_dim``."""

    patch_size: int = 4  # ViT patch side in pixels (data.resolution must be a multiple)
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    logit_scale_init: float = 2.6592  # ln(1/0.07), CLIP's initial temperature
    logit_scale_max: float = 100.0


@dataclass
class RlegConfig:
    """``method=rleg``: CLIP training whose batches gain generated embeddings as extra positives (at least one of
    ``generator`` and ``prior`` is required)."""

    generator: Optional[str] = None  # a trained diffdis model folder: its discrimination stream generates a text embedding per image (frozen); without a prior, its text tower and tokenizer start the CLIP text tower
    weight: float = 0.5  # weight of the contrastive term between images and their generated text embeddings
    steps: Optional[int] = 1  # K of the generation (None: the generator's saved value); 1 against the saved 10: over 3 seeds every figure within 0.021 of K = 10 but relation and one size figure, at 3-4x the steps/s (docs/EXPERIMENTS.md §8)
    prior: Optional[str] = None  # a trained prior folder (method=prior): it generates an image embedding per caption (frozen); its CLIP model starts the trained one (both towers and the tokenizer; model.clip is then unused)
    prior_weight: float = 0.5  # weight of the contrastive term between generated image embeddings and caption features
    prior_steps: Optional[int] = None  # K of the prior's sampler (None: the prior's saved value)


@dataclass
class PriorConfig:
    """``method=prior``: a small diffusion prior that generates a CLIP image embedding from a caption (DALL-E 2's
    prior: x0 prediction), trained on the embeddings of a frozen, trained CLIP model."""

    clip: Optional[str] = None  # a trained CLIP model folder (<output_dir>/model of method=clip, rleg or unidiff), frozen: the space the prior learns
    hidden_size: int = 128  # width of the denoiser (a transformer over [caption, timestep, noisy embedding, query] tokens)
    num_layers: int = 2  # transformer layers
    num_attention_heads: int = 4  # must divide hidden_size
    intermediate_size: int = 512  # MLP width of each layer
    embedding_scale: Optional[float] = None  # the diffusion variable is this x the unit-norm image embedding (None: sqrt(d), unit variance per coordinate)
    num_train_timesteps: int = 1000  # forward process (a diffusers DDPMScheduler; x0 prediction)
    beta_schedule: str = "squaredcos_cap_v2"
    p_uncond: float = 0.1  # caption dropout (a learned null token) for classifier-free guidance
    steps: int = 25  # default DDIM steps of sampling, saved in the model folder
    guidance: float = 1.0  # default guidance g of sampling (u + g(c - u); <= 1: unguided), saved in the model folder


@dataclass
class OneRConfig:
    """The single tower of ``method=oner``: one transformer, shared by image patches and text tokens (the run's
    tokenizer), projecting both to one space (``diffdis.models.single_tower``)."""

    patch_size: int = 4  # image patch side in pixels (data.resolution must be a multiple)
    hidden_size: int = 64  # width of the shared transformer (a multiple of num_attention_heads)
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256  # MLP width
    projection_dim: Optional[int] = None  # joint embedding width; None: model.text_encoder.projection_dim
    logit_scale_init: float = 2.6592  # ln(1/0.07), CLIP's initial temperature
    logit_scale_max: float = 100.0


@dataclass
class ModelConfig:
    """Which components to build or load, and the shape of the discrimination stream."""

    pretrained: Optional[str] = None  # SD-1.x folder or hub id; None builds tiny components
    revision: Optional[str] = None  # hub revision of ``pretrained``
    use_vae: bool = False  # False: diffusion in pixel space (tiny default)
    patch_size: int = 1  # tiny pixel-space models: p > 1 folds p x p pixel patches into channels (the UNet sees 3*p*p channels at resolution/p)
    unet: UNetConfig = field(default_factory=UNetConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)  # method=clip (and the CLIP model of rleg and unidiff)
    rleg: RlegConfig = field(default_factory=RlegConfig)  # method=rleg only
    prior: PriorConfig = field(default_factory=PriorConfig)  # method=prior only
    oner: OneRConfig = field(default_factory=OneRConfig)  # method=oner only
    fusion: str = "joint"  # "joint" (paper) or "one_way" (image tokens never see the text token)
    post_mid_layers: int = 1  # M transformer layers after the mid block
    text_prediction_type: str = "sample"  # the text head predicts e0 ("sample", paper) or noise ("epsilon")
    train_text_encoder: bool = True  # tiny default trains it; SD fine-tuning usually freezes it
    gradient_checkpointing: bool = False  # applies to the generation pass
    enable_xformers: bool = True  # used only where CUDA and xformers are both present


@dataclass
class NoiseConfig:
    """The diffusion process shared by both streams (a diffusers ``DDPMScheduler`` config)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"  # SD uses "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"  # image stream target: "epsilon" or "v_prediction"


@dataclass
class LossConfig:
    """Weights and options of L = L_IG + lambda * L_ITA."""

    lambda_ita: float = 1.0  # 0 trains generation only
    min_snr_gamma: Optional[float] = 5.0  # Min-SNR weighting of L_IG; None disables it
    noise_offset: float = 0.0
    text_scale: float = 1.0  # gamma in e_t = gamma*sqrt(a_t)*e_0 + sqrt(1-a_t)*eps (e_0 is unit-norm in d_e dimensions: sqrt(d_e) matches the noise's norm)
    p_uncond: float = 0.0  # image-condition dropout in the discrimination pass: trains the image-free branch that zero-shot guidance w needs (0: w stays 0); 0 against 0.1, 3 seeds: R@1 +0.07/+0.08 and FID -1.6 on every seed (docs/EXPERIMENTS.md §10)
    p_uncond_text: float = 0.1  # caption dropout in the generation pass
    logit_scale_init: float = 14.285714  # 1/0.07: L_ITA's initial logit scale (a new text stream's; a resumed run keeps its own)
    logit_scale_max: float = 100.0
    timestep_sampling: str = "uniform"  # image-stream t: "uniform" or "logit_normal" (t/T = sigmoid(N(timestep_mean, timestep_std)), SD3)
    timestep_mean: float = 0.0  # logit_normal only: > 0 trains noisier timesteps more often
    timestep_std: float = 1.0  # logit_normal only
    text_timestep_sampling: str = "logit_normal"  # L_ITA's text-query t, as timestep_sampling ("uniform": the paper's); mean -1 against uniform, 3 seeds: diffdis held-out colour x shape, position, R@1, FID and shape adherence better on every seed (docs/EXPERIMENTS.md §17)
    text_timestep_mean: float = -1.0  # logit_normal only: < 0 trains less noisy queries more often (median t/T 0.27); +3 (noisy queries only) learned less on every seed
    text_timestep_std: float = 1.0  # logit_normal only
    ita_fraction: float = 1.0  # share of each batch that also takes the discrimination pass (its cost is ~35% of a step)
    ig_fraction: float = 1.0  # share of each batch that takes the generation pass (the discrimination pass sees its own share)
    ita_every: int = 1  # the discrimination pass runs on every k-th step only (whole batch); the others train L_IG alone
    ita_image_grad: bool = True  # false (needs model.fusion=one_way): the discrimination pass reads the image without gradient (the image side learns from L_IG alone) and trains the text stream on the recorded image keys/values: a third of the pass's FLOPs, but zero-shot falls to gen_only's level and the FID gain over gen_only vanishes, 3 seeds (docs/EXPERIMENTS.md §19)


@dataclass
class UniDiffConfig:
    """Loss weights of ``method=unidiff``: L = w_itc * L_ITC + w_is * L_IS + w_rsc * L_RSC (0 removes a loss).

    L_IS takes its options (min-SNR, timesteps, caption dropout, ``ig_fraction``) from the ``loss`` section."""

    weight_itc: float = 1.0  # image-text contrastive between CLIP image and text features
    weight_is: float = 1.0  # text-to-image diffusion loss of the UNet on CLIP's token states
    weight_rsc: float = 1.0  # reciprocal semantic consistency: pooled mid-block UNet features <-> CLIP image features


@dataclass
class DataConfig:
    """Where image-caption pairs come from."""

    name: Optional[str] = "embedded"  # "embedded", a hub dataset id, a local folder, or "webdataset"
    split: str = "train"
    validation_split: Optional[str] = "validation"
    image_column: str = "image"
    caption_column: str = "text"  # with the default, "caption" and "txt" are also tried
    data_dir: Optional[str] = None
    data_files: Optional[List[str]] = None  # webdataset shards or other files
    streaming: bool = False  # iterate without downloading or loading it whole; split across processes by shard, endless (epochs one after another)
    shuffle_buffer: int = 1000  # streaming: examples in the seeded shuffle buffer (reshuffled each epoch); 0 keeps the stream's order
    resolution: int = 16
    num_train_samples: Optional[int] = None  # embedded: images in the train split
    center_crop: bool = True
    random_flip: bool = False  # flips falsify captions that name positions
    num_workers: int = 0
    memory_cache_mb: float = 1024  # map-style data with center_crop and no random_flip: each decoded, resized image is kept (uint8) after its first use when the whole training set fits in this many MB per process (shared among its DataLoader workers); 0 turns it off
    seed: int = 0  # seed of the embedded dataset
    cache_dir: Optional[str] = None  # latent cache of this data and VAE (tools/cache.py; model.use_vae runs only): latents are drawn from stored encodings instead of encoding every batch


@dataclass
class EMAConfig:
    """Exponential moving average of the model weights (diffusers ``EMAModel``)."""

    use: bool = False
    decay: float = 0.999
    warmup: bool = True  # use_ema_warmup
    inv_gamma: float = 1.0
    power: float = 0.6667


@dataclass
class ZeroShotConfig:
    """Zero-shot inference defaults, saved into the model's zero-shot pipeline (``zeroshot_index.json``) and used by
    evaluation during training; tools/zeroshot.py and tools/evaluate.py can override them per run."""

    steps: int = 10  # K: denoising steps of the image-side text query; K = 1 is 10x cheaper, classification equal, image->text R@1 lower on every seed (docs/EXPERIMENTS.md §17)
    guidance: float = 0.0  # w: (1+w)Φ(e,t,z) − wΦ(e,t,∅) on the image condition; 0 skips the unconditional pass; w != 0 needs loss.p_uncond > 0
    noise_samples: int = 1  # noise draws averaged per image
    scheduler: str = "ddim"  # text-query sampler: "ddim" or "dpm++"


@dataclass
class EvalZeroShotConfig:
    """A labelled dataset classified zero-shot during training (``train.eval_zeroshot``), read as ``tools/zeroshot.py
    --dataset`` reads it. Without one, runs on the procedural data are scored on the embedded shape/colour tasks."""

    dataset: Optional[str] = None  # a local folder (class subfolders or imagefolder with a label column) or a hub id
    task: str = "auto"  # a built-in task's class names and templates (e.g. cifar10), or auto (the dataset's labels)
    split: Optional[str] = None  # default: test (a plain folder: its single split)
    image_column: str = "image"
    label_column: str = "label"
    classnames: Optional[str] = None  # a file of class names, one per line, in label order
    templates: Optional[str] = None  # a file of prompt templates with {c}, one per line


@dataclass
class TrainConfig:
    """Optimisation, precision, checkpoints and logging."""

    output_dir: str = "outputs/tiny"
    seed: int = 0
    max_steps: int = 1000
    max_minutes: Optional[float] = None  # wall-clock budget: max_steps is lowered to fit at the measured speed (LR schedule rescaled); hard stop at the budget
    batch_size: int = 32  # per process
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3  # pretrained parameters (and all of a tiny model)
    learning_rate_new: Optional[float] = None  # new parameters (text stream); None: learning_rate
    learning_rate_text_encoder: Optional[float] = None  # the text encoder, when trained; None: learning_rate
    weight_decay: float = 0.01
    weight_decay_1d: bool = True  # decay parameters of fewer than 2 dimensions too (biases, norm scales, logit scales); False exempts them, as open_clip and timm do
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_epsilon: float = 1e-8
    adam_fused: Optional[bool] = None  # None: torch's fused AdamW kernel where it has one for the parameters (CPU, CUDA: the same update in one kernel, 2.9x faster on CPU); False: torch's default loop
    lr_scheduler: str = "cosine"  # any name diffusers' get_scheduler knows
    lr_warmup_steps: int = 50
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "no", "fp16", "bf16"
    allow_tf32: bool = True
    compile: bool = False  # torch.compile the model
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpointing_steps: int = 500
    checkpoints_total_limit: Optional[int] = 2
    resume_from_checkpoint: Optional[str] = None  # "latest" or a checkpoint folder
    log_every: int = 10
    validation_every: int = 200  # steps between validation-loss evaluations; 0 disables
    validation_batches: int = 4
    eval_every: int = 0  # steps between evaluations during training (sample grid, adherence, zero-shot, retrieval); 0 disables
    validation_prompts: Any = None  # the sample grid's prompts at each evaluation: a list, or a text file with one per line; None: the shapes x colours grid on procedural data, else the first validation captions
    eval_grid_size: int = 16  # prompts of the sample grid taken from the validation captions when validation_prompts is None
    eval_adherence_per_combo: int = 1  # images per shape x colour prompt (36 prompts) for prompt adherence (procedural data only); 0 skips
    eval_zeroshot_samples: int = 120  # images classified zero-shot: the embedded shape/colour tasks, or train.eval_zeroshot.dataset's; 0 skips
    eval_zeroshot: EvalZeroShotConfig = field(default_factory=EvalZeroShotConfig)
    eval_retrieval_samples: int = 0  # validation images (with their captions) for image<->text retrieval R@1/5/10; 0 skips
    eval_steps: int = 20  # DDIM sampling steps of the evaluation images
    eval_guidance: float = 3.0  # classifier-free guidance scale of the evaluation images (diffusers' g; <= 1 is unguided)
    eval_batch_size: int = 64  # images per batch and process during evaluation
    stop_at: Optional[Dict[str, float]] = None  # stop at the first evaluation where every named figure reaches its value, e.g. {adherence_shape: 1.0, zeroshot_shape: 1.0} (names as logged, without eval/)
    report_to: str = "tensorboard"  # "tensorboard", "wandb", "all" or "none"


@dataclass
class Config:
    """The whole run."""

    method: str = "diffdis"  # training method: diffdis, gen_only, disc_only, clip, unidiff, rleg, oner or prior
    model: ModelConfig = field(default_factory=ModelConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    unidiff: UniDiffConfig = field(default_factory=UniDiffConfig)  # method=unidiff only


_CHOICES = {
    "model.fusion": ("joint", "one_way"),
    "model.text_prediction_type": ("sample", "epsilon"),
    "noise.prediction_type": ("epsilon", "v_prediction"),
    "loss.timestep_sampling": ("uniform", "logit_normal"),
    "loss.text_timestep_sampling": ("uniform", "logit_normal"),
    "model.unet.addition_embed_type": (None, "text"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.report_to": ("tensorboard", "wandb", "all", "none"),
    "zeroshot.scheduler": ("ddim", "dpm++"),
}


def list_configs() -> List[str]:
    """Names of the shipped configs in ``diffdis/configs/`` (usable as ``--config NAME``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """Map a shipped config name or a YAML path to a file, or raise :class:`ConfigError`."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"config '{name_or_path}' not found: give a YAML path or one of {list_configs()}")


def _validate(cfg: Config) -> None:
    from .methods import available  # the registry imports the models; the schema itself does not

    if cfg.method not in available():
        raise ConfigError(f"method={cfg.method!r} is not one of {available()}")
    for key, allowed in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")
    if not cfg.data.name:
        raise ConfigError("data.name is required: 'embedded', a hub dataset id, a local folder, or 'webdataset'")
    if cfg.train.max_steps < 1 or cfg.train.batch_size < 1:
        raise ConfigError("train.max_steps and train.batch_size must be at least 1")
    if not cfg.loss.text_scale > 0.0:
        raise ConfigError(f"loss.text_scale={cfg.loss.text_scale} must be > 0")
    if not cfg.loss.logit_scale_init > 0.0:
        raise ConfigError(f"loss.logit_scale_init={cfg.loss.logit_scale_init} must be > 0")
    if not 0.0 < cfg.loss.ita_fraction <= 1.0:
        raise ConfigError(f"loss.ita_fraction={cfg.loss.ita_fraction} must be in (0, 1]")
    if not 0.0 < cfg.loss.ig_fraction <= 1.0:
        raise ConfigError(f"loss.ig_fraction={cfg.loss.ig_fraction} must be in (0, 1]")
    w = cfg.unidiff
    if min(w.weight_itc, w.weight_is, w.weight_rsc) < 0 or w.weight_itc + w.weight_is + w.weight_rsc == 0:
        raise ConfigError("unidiff.weight_itc, weight_is and weight_rsc must be >= 0, not all 0")
    if cfg.loss.ita_every < 1:
        raise ConfigError(f"loss.ita_every={cfg.loss.ita_every} must be at least 1")
    if not cfg.loss.ita_image_grad and cfg.model.fusion != "one_way":
        raise ConfigError("loss.ita_image_grad=false needs model.fusion=one_way: with joint fusion the image tokens attend to"
                          " the text token, so the image side cannot be computed without it")
    if not cfg.loss.ita_image_grad and cfg.method == "disc_only":
        raise ConfigError("loss.ita_image_grad=false with method=disc_only would leave the image features untrained"
                          " (nothing else trains them): use method=diffdis")
    p = cfg.model.patch_size
    if p < 1 or cfg.data.resolution % p:
        raise ConfigError(f"model.patch_size={p} must be at least 1 and divide data.resolution={cfg.data.resolution}")
    if p > 1 and (cfg.model.pretrained or cfg.model.use_vae):
        raise ConfigError("model.patch_size > 1 is for tiny pixel-space models; pretrained models use their VAE")
    for key in ("timestep_std", "text_timestep_std"):
        if getattr(cfg.loss, key) <= 0:
            raise ConfigError(f"loss.{key}={getattr(cfg.loss, key)} must be > 0")
    u = cfg.model.unet
    if u.addition_embed_type and cfg.model.text_encoder.hidden_size % u.addition_embed_type_num_heads:
        raise ConfigError(
            f"model.unet.addition_embed_type_num_heads={u.addition_embed_type_num_heads} must divide"
            f" model.text_encoder.hidden_size={cfg.model.text_encoder.hidden_size}"
        )
    _validate_evaluation(cfg)


def _validate_evaluation(cfg: Config) -> None:
    t = cfg.train
    if min(t.eval_every, t.eval_adherence_per_combo, t.eval_zeroshot_samples, t.eval_retrieval_samples, t.eval_grid_size) < 0:
        raise ConfigError("train.eval_every, train.eval_grid_size, train.eval_adherence_per_combo, train.eval_zeroshot_samples"
                          " and train.eval_retrieval_samples must be >= 0")
    if t.eval_steps < 1 or t.eval_batch_size < 1:
        raise ConfigError("train.eval_steps and train.eval_batch_size must be at least 1")
    z = cfg.zeroshot
    if z.steps < 1 or z.noise_samples < 1:
        raise ConfigError("zeroshot.steps and zeroshot.noise_samples must be at least 1")
    if z.guidance != 0 and cfg.loss.p_uncond == 0:
        raise ConfigError(f"zeroshot.guidance={z.guidance} needs the image-free branch, which loss.p_uncond=0 does not train:"
                          " set zeroshot.guidance=0 or loss.p_uncond > 0")
    check_evaluation_data(cfg)


PROCEDURAL_DATA = ("embedded", "compositional")  # drawn in memory; the reference classifier knows their shapes and colours


def validation_prompts(cfg) -> Optional[List[str]]:
    """``train.validation_prompts`` as a list of prompts (None when unset).

    Raises:
        ConfigError: a missing or empty file, an empty list, or a value that is neither a list nor a file name.
    """
    value = cfg.train.validation_prompts
    if value is None:
        return None
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"train.validation_prompts: '{value}' is not a file (give a file with one prompt per line, or a list)")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    elif OmegaConf.is_list(value) or isinstance(value, (list, tuple)):
        prompts = [str(p).strip() for p in value if str(p).strip()]
    else:
        raise ConfigError(f"train.validation_prompts must be a list of prompts or a file, got {value!r}")
    if not prompts:
        raise ConfigError(f"train.validation_prompts ({value}) holds no prompt")
    return prompts


def check_evaluation_data(cfg) -> None:
    """Raise :class:`ConfigError` for evaluation settings that cannot work, before anything trains: unreadable
    ``train.validation_prompts``, retrieval without a validation split, or ``train.eval_zeroshot.dataset`` files that
    do not exist. Prompt adherence needs the procedural data (the reference classifier knows only their shapes and
    colours); on other data it is left out and the sample grid uses the prompts or the validation captions."""
    t = cfg.train
    if t.eval_every <= 0:
        if t.stop_at:
            raise ConfigError("train.stop_at needs train.eval_every > 0: the targets are checked at each evaluation")
        return
    validation_prompts(cfg)
    if t.stop_at is not None and not t.stop_at:
        raise ConfigError("train.stop_at is empty: name at least one evaluation figure and its target, e.g. {zeroshot_shape: 0.9}")
    if t.eval_retrieval_samples > 0 and cfg.data.name not in PROCEDURAL_DATA and not cfg.data.validation_split:
        raise ConfigError("train.eval_retrieval_samples needs data.validation_split (retrieval reads the validation captions)")
    z = t.eval_zeroshot
    for key in ("classnames", "templates"):
        if z[key] and not Path(z[key]).expanduser().is_file():
            raise ConfigError(f"train.eval_zeroshot.{key}: '{z[key]}' is not a file")


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Build the run configuration.

    Args:
        path: a YAML file or the name of a shipped config; ``None`` uses ``diffdis/configs/tiny.yaml``.
        overrides: ``key=value`` strings (OmegaConf dotlist), applied last.

    Returns:
        A structured ``DictConfig`` typed by :class:`Config` (attribute access, type-checked).

    Raises:
        ConfigError: naming the unknown key, wrong type, or bad value.
    """
    schema = OmegaConf.structured(Config)
    file = resolve_config_path(path or DEFAULT_CONFIG)
    try:
        cfg = OmegaConf.merge(schema, OmegaConf.load(file))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None)
        first = str(err).splitlines()[0]
        raise ConfigError(f"invalid config key '{key}' ({file.name}): {first}") from None
    if cfg.train.mixed_precision == "False":  # YAML 1.1 reads a bare `no` as false, which the str field keeps as "False"
        cfg.train.mixed_precision = "no"
    _validate(cfg)
    return cfg


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically: temp file, then rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tmp.replace(path)
