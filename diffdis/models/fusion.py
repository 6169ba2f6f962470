"""The dual-stream fusion parts of DiffDis's discrimination stream.

A text token rides along the UNet's encoder half: in every transformer block of the down and mid
blocks it joins the block's self-attention (``attn1``) through :class:`FusionAttnProcessor`, skips
cross-attention, and goes through its own FFN. After the mid block, :class:`PostMidLayer` layers
run over [mid-block image tokens; text token]. With ``one_way`` fusion image tokens never attend
to the text token, so the image side can be recorded once per image (:class:`ImageCache`) and the
text token denoised against the cached keys/values at every step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)  # (B, H, N, C/H)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (B, N, C)


@dataclass
class ImageCache:
    """Image-side keys/values of every fusion layer, recorded in execution order (one_way only)."""

    unet_kv: List[Tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (block idx, K, V)
    post_kv: List[Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def repeat(self, n: int) -> "ImageCache":
        """The same cache with every image repeated ``n`` times along the batch (for noise samples)."""
        rep = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731
        return ImageCache(
            unet_kv=[(i, rep(k), rep(v)) for i, k, v in self.unet_kv],
            post_kv=[(rep(k), rep(v)) for k, v in self.post_kv],
        )

    def cat(self, other: "ImageCache") -> "ImageCache":
        """Concatenate two caches of the same model along the batch (e.g. cond and uncond)."""
        return ImageCache(
            unet_kv=[(i, torch.cat([k, k2]), torch.cat([v, v2])) for (i, k, v), (_, k2, v2) in zip(self.unet_kv, other.unet_kv)],
            post_kv=[(torch.cat([k, k2]), torch.cat([v, v2])) for (k, v), (k2, v2) in zip(self.post_kv, other.post_kv)],
        )


class TextStreamState:
    """Per-forward state the fusion processors share: the running text output and the cache."""

    def __init__(self, cond: torch.Tensor, one_way: bool, record: Optional[ImageCache] = None):
        self.cond = cond  # (B, 1, d_e): e_t + TextTimeEmb(t_e)
        self.h = torch.zeros_like(cond)  # (B, 1, d_e): running text output h_e
        self.one_way = one_way
        self.record = record


class FusionBlock(nn.Module):
    """Text-token parts of one transformer block: FC_in, norms, ``ff_text`` and zero-init FC_out.

    Args:
        text_dim: d_e, the width of the text query.
        block: the UNet's ``BasicTransformerBlock``; its FFN (and FFN norm) is copied as ``ff_text``.
    """

    def __init__(self, text_dim: int, block: nn.Module):
        super().__init__()
        channels = block.norm1.normalized_shape[0]
        self.fc_in = nn.Linear(text_dim, channels)
        self.norm_attn = nn.LayerNorm(channels)
        self.norm_ff = copy.deepcopy(block.norm3)
        self.ff_text = copy.deepcopy(block.ff)
        self.fc_out = nn.Linear(channels, text_dim)

    def copy_from(self, block: nn.Module) -> None:
        """Initialise ``ff_text`` from the block's FFN and zero FC_out (DiT-style zero-init)."""
        self.norm_ff.load_state_dict(block.norm3.state_dict())
        self.ff_text.load_state_dict(block.ff.state_dict())
        nn.init.zeros_(self.fc_out.weight)
        nn.init.zeros_(self.fc_out.bias)

    def text_in(self, state: TextStreamState) -> torch.Tensor:
        return self.fc_in(state.h + state.cond)  # (B, 1, C)

    def text_out(self, x: torch.Tensor, attn_out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Residual attention and FFN updates of the token, then back to d_e (added to h_e)."""
        x = x + attn_out  # (B, 1, C)
        x = x + self.ff_text(self.norm_ff(x))  # (B, 1, C)
        return h + self.fc_out(x)  # (B, 1, d_e)

    def replay(self, attn: nn.Module, k_img: torch.Tensor, v_img: torch.Tensor, state: TextStreamState) -> None:
        """One_way step from cached image keys/values: update ``state.h`` only."""
        x = self.text_in(state)  # (B, 1, C)
        xn = self.norm_attn(x)
        q = _split_heads(attn.to_q(xn), attn.heads)  # (B, H, 1, d)
        k = torch.cat([k_img, _split_heads(attn.to_k(xn), attn.heads)], dim=2)  # (B, H, N+1, d)
        v = torch.cat([v_img, _split_heads(attn.to_v(xn), attn.heads)], dim=2)
        out = _merge_heads(F.scaled_dot_product_attention(q, k, v))  # (B, 1, C)
        out = attn.to_out[1](attn.to_out[0](out))
        state.h = self.text_out(x, out, state.h)


class FusionAttnProcessor:
    """Self-attention processor that lets the text token join ``attn1`` of one transformer block.

    Holds no parameters of its own (they live in :class:`FusionBlock`), so the UNet's state dict and
    its stock processors are untouched; the model swaps these in only for a discrimination pass.
    """

    def __init__(self, index: int, fusion: FusionBlock, holder: "StateHolder"):
        self.index = index
        self.fusion = fusion
        self.holder = holder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or hidden_states.ndim != 3:
            raise RuntimeError("fusion processor expects the self-attention of a BasicTransformerBlock")
        state = self.holder.state
        n = hidden_states.shape[1]
        x = self.fusion.text_in(state)  # (B, 1, C)
        tokens = torch.cat([hidden_states, self.fusion.norm_attn(x)], dim=1)  # (B, N+1, C)
        q = _split_heads(attn.to_q(tokens), attn.heads)  # (B, H, N+1, d)
        k = _split_heads(attn.to_k(tokens), attn.heads)
        v = _split_heads(attn.to_v(tokens), attn.heads)
        if state.one_way:
            img = F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n])  # (B, H, N, d)
            txt = F.scaled_dot_product_attention(q[:, :, n:], k, v)  # (B, H, 1, d)
            out = torch.cat([img, txt], dim=2)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N+1, d)
        if state.record is not None:
            state.record.unet_kv.append((self.index, k[:, :, :n], v[:, :, :n]))
        out = attn.to_out[1](attn.to_out[0](_merge_heads(out)))  # (B, N+1, C)
        state.h = self.fusion.text_out(x, out[:, n:], state.h)
        return out[:, :n]  # (B, N, C)


class StateHolder:
    """A mutable slot for the current :class:`TextStreamState` (one per model, set per pass)."""

    def __init__(self):
        self.state: Optional[TextStreamState] = None


class PostMidLayer(nn.Module):
    """Pre-norm transformer layer over [image tokens; text token] after the mid block."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def _qkv(self, x: torch.Tensor):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        return _split_heads(q, self.heads), _split_heads(k, self.heads), _split_heads(v, self.heads)

    def _finish(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        x = x + self.proj(_merge_heads(out))
        return x + self.mlp(self.norm2(x))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, one_way: bool):
        """img (B, N, C), txt (B, 1, C) -> updated (img, txt, (K_img, V_img))."""
        n = img.shape[1]
        x = torch.cat([img, txt], dim=1)  # (B, N+1, C)
        q, k, v = self._qkv(x)  # (B, H, N+1, d)
        if one_way:
            out = torch.cat(
                [
                    F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n]),
                    F.scaled_dot_product_attention(q[:, :, n:], k, v),
                ],
                dim=2,
            )
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N+1, d)
        x = self._finish(x, out)  # (B, N+1, C)
        return x[:, :n], x[:, n:], (k[:, :, :n], v[:, :, :n])

    def forward_text(self, img: torch.Tensor, txt: torch.Tensor):
        """The text token's output of :meth:`forward` alone (either fusion mode: the text token attends to every
        token), for the last layer, whose image outputs nobody reads: image queries, projections and MLP are skipped.

        img (B, N, C), txt (B, 1, C) -> (updated txt, (K_img, V_img)).
        """
        dim = txt.shape[-1]
        x = self.norm1(torch.cat([img, txt], dim=1))  # (B, N+1, C)
        k, v = F.linear(x, self.qkv.weight[dim:], self.qkv.bias[dim:]).chunk(2, dim=-1)  # (B, N+1, C) each
        q = F.linear(x[:, -1:], self.qkv.weight[:dim], self.qkv.bias[:dim])  # (B, 1, C)
        k, v = _split_heads(k, self.heads), _split_heads(v, self.heads)  # (B, H, N+1, d)
        out = F.scaled_dot_product_attention(_split_heads(q, self.heads), k, v)  # (B, H, 1, d)
        n = img.shape[1]
        return self._finish(txt, out), (k[:, :, :n], v[:, :, :n])

    def replay(self, txt: torch.Tensor, k_img: torch.Tensor, v_img: torch.Tensor) -> torch.Tensor:
        """Text token only, against cached image keys/values: (B, 1, C) -> (B, 1, C)."""
        q, k, v = self._qkv(txt)  # (B, H, 1, d)
        out = F.scaled_dot_product_attention(q, torch.cat([k_img, k], 2), torch.cat([v_img, v], 2))
        return self._finish(txt, out)
