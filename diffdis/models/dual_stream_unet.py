"""DualStreamUNet: one UNet for text-to-image generation and image-conditioned text-query denoising."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, FrozenDict, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .fusion import FusionAttnProcessor, FusionBlock, ImageCache, PostMidLayer, StateHolder, TextStreamState

FUSION_MODES = ("joint", "one_way")


def _clean_unet_config(config: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


def move_like(model: ModelMixin, device: torch.device, dtype: torch.dtype) -> ModelMixin:
    """``model`` on ``device`` in ``dtype``, casting only when the dtype changes (diffusers' ``ModelMixin.to``
    warns about float32 modules on every dtype argument, even a float32 model's cast to float32)."""
    model = model.to(device)
    return model if model.dtype == dtype else model.to(dtype=dtype)


class DualStreamUNet(ModelMixin, ConfigMixin):
    """The DiffDis dual-stream UNet.

    The generation stream is a plain ``UNet2DConditionModel`` (``self.unet``); ``forward`` is its
    forward, untouched, so the image branch exports to vanilla diffusers (:meth:`to_unet2d`). The
    discrimination stream (:meth:`forward_text`) denoises a text query conditioned on an image: it
    runs the UNet's ``conv_in``, time embedding, down blocks and mid block with a text token fused
    into every transformer block's self-attention, then ``post_mid_layers`` transformer layers and
    a linear head.

    Args:
        unet_config: the ``UNet2DConditionModel`` config (JSON-serialisable dict).
        text_dim: d_e, the width of the text query.
        fusion: ``"joint"`` (the paper: image and text tokens attend to each other) or ``"one_way"``
            (image tokens ignore the text token, so image features can be cached across steps).
        post_mid_layers: M, transformer layers after the mid block.
        post_mid_heads: attention heads of those layers.
        text_prediction_type: ``"sample"`` (predict e0, the paper) or ``"epsilon"``.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        unet_config: Dict[str, Any],
        text_dim: int = 64,
        fusion: str = "joint",
        post_mid_layers: int = 1,
        post_mid_heads: int = 4,
        text_prediction_type: str = "sample",
    ):
        super().__init__()
        if fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {FUSION_MODES}, got {fusion!r}")
        self.unet = UNet2DConditionModel.from_config(_clean_unet_config(unet_config))
        if self.unet.mid_block is None:
            raise ValueError("DualStreamUNet needs a UNet with a mid block")
        self._holder = StateHolder()
        targets = self._fusion_targets()
        if not targets:
            raise ValueError("the UNet has no transformer blocks in its down/mid blocks to fuse the text token into")
        self.fusion_blocks = nn.ModuleList([FusionBlock(text_dim, blk) for blk in targets])
        mid_dim = self.unet.config.block_out_channels[-1]
        time_dim = self.unet.config.block_out_channels[0]
        self.text_time_proj = Timesteps(time_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.text_time_embedding = TimestepEmbedding(time_dim, text_dim)
        self.post_in = nn.Linear(text_dim, mid_dim)
        self.post_layers = nn.ModuleList([PostMidLayer(mid_dim, post_mid_heads) for _ in range(post_mid_layers)])
        self.post_norm = nn.LayerNorm(mid_dim)
        self.text_head = nn.Linear(mid_dim, text_dim)
        # InfoNCE temperature of L_ITA, learnt with the model (log of 1/0.07, as CLIP)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.initialize_weights()

    # ------------------------------------------------------------------ construction
    def initialize_weights(self) -> None:
        """Copy each block's FFN into ``ff_text`` and zero-init every FC_out (DiT-style)."""
        for fusion, block in zip(self.fusion_blocks, self._fusion_targets()):
            fusion.copy_from(block)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, **kwargs) -> "DualStreamUNet":
        """Wrap a (pretrained) ``UNet2DConditionModel``; the new parts start so that generation is unchanged."""
        model = cls(unet_config=_clean_unet_config(unet.config), **kwargs)
        model.unet.load_state_dict(unet.state_dict())
        model.initialize_weights()
        return move_like(model, unet.device, unet.dtype)

    def to_unet2d(self) -> UNet2DConditionModel:
        """The generative branch as a stand-alone vanilla ``UNet2DConditionModel`` (a copy)."""
        unet = UNet2DConditionModel.from_config(_clean_unet_config(self.unet.config))
        unet.load_state_dict(self.unet.state_dict())
        return move_like(unet, self.device, self.dtype)

    @property
    def config(self) -> FrozenDict:
        """Own config merged over the UNet's, so pipelines can read ``unet.config.in_channels`` etc."""
        inner = dict(self.unet.config) if "unet" in self._modules else {}
        return FrozenDict({**inner, **self._internal_dict})

    def _fusion_targets(self) -> List[nn.Module]:
        """The ``BasicTransformerBlock``s of the down and mid blocks, in execution order."""
        blocks = []
        for down in list(self.unet.down_blocks) + [self.unet.mid_block]:
            for transformer in getattr(down, "attentions", None) or []:
                blocks.extend(getattr(transformer, "transformer_blocks", []))
        return blocks

    # ------------------------------------------------------------------ stock UNet API
    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *args, **kwargs):
        """Generation: exactly ``UNet2DConditionModel.forward`` (the text stream is not involved)."""
        return self.unet(sample, timestep, encoder_hidden_states, *args, **kwargs)

    @property
    def attn_processors(self):
        return self.unet.attn_processors

    def set_attn_processor(self, processor) -> None:
        self.unet.set_attn_processor(processor)

    def set_default_attn_processor(self) -> None:
        self.unet.set_default_attn_processor()

    def set_attention_slice(self, slice_size) -> None:
        self.unet.set_attention_slice(slice_size)

    def enable_gradient_checkpointing(self, *args, **kwargs) -> None:
        self.unet.enable_gradient_checkpointing(*args, **kwargs)

    def disable_gradient_checkpointing(self) -> None:
        self.unet.disable_gradient_checkpointing()

    # ------------------------------------------------------------------ discrimination stream
    def new_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that the plain UNet does not have (the text stream)."""
        return (p for name, p in self.named_parameters() if not name.startswith("unet."))

    def text_condition(self, text_sample: torch.Tensor, text_timestep: torch.Tensor) -> torch.Tensor:
        """e_t + TextTimeEmb(t_e): (B, d_e), (B,) -> (B, 1, d_e)."""
        t = text_timestep.expand(text_sample.shape[0]) if text_timestep.ndim == 1 and text_timestep.numel() == 1 else text_timestep
        temb = self.text_time_embedding(self.text_time_proj(t.flatten()).to(text_sample.dtype))  # (B, d_e)
        return (text_sample + temb).unsqueeze(1)  # (B, 1, d_e)

    @contextmanager
    def _text_stream(self, state: TextStreamState):
        """Install fusion processors on the encoder's ``attn1`` for one pass, then restore."""
        targets = self._fusion_targets()
        saved = [blk.attn1.processor for blk in targets]
        saved_ckpt = [
            (m, m.gradient_checkpointing)
            for block in self._encoder_blocks()
            for m in block.modules()
            if hasattr(m, "gradient_checkpointing")
        ]
        self._holder.state = state
        try:
            for i, (fusion, blk) in enumerate(zip(self.fusion_blocks, targets)):
                blk.attn1.processor = FusionAttnProcessor(i, fusion, self._holder)
            for m, _ in saved_ckpt:  # processors carry state: recomputation would replay it wrongly
                m.gradient_checkpointing = False
            yield state
        finally:
            for blk, proc in zip(targets, saved):
                blk.attn1.processor = proc
            for m, flag in saved_ckpt:
                m.gradient_checkpointing = flag
            self._holder.state = None

    def _encoder_blocks(self) -> List[nn.Module]:
        return list(self.unet.down_blocks) + [self.unet.mid_block]

    def _run_encoder(self, image_sample: torch.Tensor, image_timestep, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """conv_in, time embedding, down blocks and mid block of the UNet -> mid features (B, C, h, w)."""
        unet = self.unet
        if unet.class_embedding is not None or unet.config.addition_embed_type not in (None, "text"):
            raise ValueError(
                "the discrimination stream supports UNets without class embeddings and with addition_embed_type None or 'text'"
            )
        t_emb = unet.get_time_embed(sample=image_sample, timestep=image_timestep)
        emb = unet.time_embedding(t_emb)  # (B, T)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs={})
        if aug is not None:  # "text": the pooled context (the empty prompt here), as the generation pass adds it
            emb = emb + aug  # (B, T)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        encoder_hidden_states = unet.process_encoder_hidden_states(encoder_hidden_states, None)
        h = unet.conv_in(image_sample)  # (B, C0, H, W)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        if getattr(unet.mid_block, "has_cross_attention", False):
            return unet.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)  # (B, C, h, w)
        return unet.mid_block(h, emb)

    def _post_mid(self, mid: torch.Tensor, state: TextStreamState) -> torch.Tensor:
        img = mid.flatten(2).transpose(1, 2)  # (B, h*w, C)
        txt = self.post_in(state.h + state.cond)  # (B, 1, C)
        last = len(self.post_layers) - 1
        for i, layer in enumerate(self.post_layers):
            if i < last:
                img, txt, kv = layer(img, txt, state.one_way)  # (B, h*w, C), (B, 1, C)
            else:  # the image tokens' outputs of the last layer are never read
                txt, kv = layer.forward_text(img, txt)  # (B, 1, C)
            if state.record is not None:
                state.record.post_kv.append(kv)
        return self.text_head(self.post_norm(txt)).squeeze(1)  # (B, d_e)

    def forward_text(
        self,
        text_sample: torch.Tensor,
        text_timestep: torch.Tensor,
        image_sample: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        image_timestep: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Discrimination stream: denoise the text query conditioned on the image.

        Args:
            text_sample: e_t, (B, d_e). text_timestep: t_e, (B,) or scalar tensor.
            image_sample: the image latent (clean, or noise at t=T for the unconditional branch), (B, C, H, W).
            encoder_hidden_states: the context (empty prompt), (B, L, d_ctx).
            image_timestep: t_z, (B,); default 0 (clean image).

        Returns:
            The head's prediction, (B, d_e): e0 or noise per ``config.text_prediction_type``.
        """
        if image_timestep is None:
            image_timestep = torch.zeros(image_sample.shape[0], device=image_sample.device, dtype=torch.long)
        state = TextStreamState(self.text_condition(text_sample, text_timestep), self.config.fusion == "one_way")
        with self._text_stream(state):
            mid = self._run_encoder(image_sample, image_timestep, encoder_hidden_states)
            return self._post_mid(mid, state)

    @torch.no_grad()
    def encode_image(
        self, image_sample: torch.Tensor, encoder_hidden_states: torch.Tensor, image_timestep: Optional[torch.Tensor] = None
    ) -> ImageCache:
        """Record the image side of every fusion layer once (``fusion="one_way"`` only)."""
        if self.config.fusion != "one_way":
            raise ValueError("image features can be cached only with fusion='one_way' (joint fusion mixes them)")
        b = image_sample.shape[0]
        if image_timestep is None:
            image_timestep = torch.zeros(b, device=image_sample.device, dtype=torch.long)
        dim = self.config.text_dim
        zeros = torch.zeros(b, 1, dim, device=image_sample.device, dtype=image_sample.dtype)
        state = TextStreamState(zeros, one_way=True, record=ImageCache())
        with self._text_stream(state):
            mid = self._run_encoder(image_sample, image_timestep, encoder_hidden_states)
            self._post_mid(mid, state)
        return state.record

    def forward_text_cached(self, text_sample: torch.Tensor, text_timestep: torch.Tensor, cache: ImageCache) -> torch.Tensor:
        """One_way discrimination step from an :class:`ImageCache`: (B, d_e) -> (B, d_e); equals :meth:`forward_text`."""
        state = TextStreamState(self.text_condition(text_sample, text_timestep), one_way=True)
        targets = self._fusion_targets()
        for index, k, v in cache.unet_kv:
            self.fusion_blocks[index].replay(targets[index].attn1, k, v, state)
        txt = self.post_in(state.h + state.cond)  # (B, 1, C)
        for layer, (k, v) in zip(self.post_layers, cache.post_kv):
            txt = layer.replay(txt, k, v)
        return self.text_head(self.post_norm(txt)).squeeze(1)  # (B, d_e)

