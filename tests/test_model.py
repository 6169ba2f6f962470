"""DualStreamUNet: shapes, zero-init equivalence, generation independent of the text stream, caching."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffdis.models import DualStreamUNet
from diffdis.models.components import (
    ComponentError,
    build_text_encoder,
    encode_text,
    load_text_encoder,
    load_tokenizer,
    train_tokenizer,
)


def tiny_unet(seed=0, **extra):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=2,
        norm_num_groups=8,
        cross_attention_dim=24,
        **extra,
    )


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(3, 3, 8, 8, generator=g),
        t=torch.tensor([1, 500, 999]),
        c=torch.randn(3, 5, 24, generator=g),
        e=torch.randn(3, 12, generator=g),
        te=torch.tensor([0, 300, 999]),
    )


def test_zero_init_generation_equals_plain_unet(inputs):
    unet = tiny_unet()
    model = DualStreamUNet.from_unet(unet, text_dim=12)
    ref = unet(inputs["x"], inputs["t"], inputs["c"]).sample
    out = model(inputs["x"], inputs["t"], inputs["c"]).sample
    assert out.shape == (3, 3, 8, 8)
    assert torch.equal(out, ref)
    for block in model.fusion_blocks:  # FC_out zero-initialised, ff_text a copy of ff
        assert block.fc_out.weight.abs().sum() == 0
    first = model._fusion_targets()[0]
    assert torch.equal(model.fusion_blocks[0].ff_text.net[2].weight, first.ff.net[2].weight)
    assert len(model.fusion_blocks) == 3  # two down blocks + mid block, one transformer block each


def test_generation_ignores_text_stream(inputs):
    model = DualStreamUNet.from_unet(tiny_unet(), text_dim=12)
    before = model(inputs["x"], inputs["t"], inputs["c"]).sample
    with torch.no_grad():
        for p in model.new_parameters():
            p.add_(torch.randn_like(p))
    model.forward_text(inputs["e"], inputs["te"], inputs["x"], inputs["c"])  # a text pass in between
    after = model(inputs["x"], inputs["t"], inputs["c"]).sample
    assert torch.equal(before, after)
    # and the text pass left the stock processors in place
    assert all(type(p).__name__ != "FusionAttnProcessor" for p in model.attn_processors.values())


@pytest.mark.parametrize("fusion", ["joint", "one_way"])
def test_text_stream_shapes_and_dependence(inputs, fusion):
    model = DualStreamUNet.from_unet(tiny_unet(), text_dim=12, fusion=fusion)
    with torch.no_grad():
        for b in model.fusion_blocks:  # make the text token matter
            b.fc_out.weight.normal_()
    out = model.forward_text(inputs["e"], inputs["te"], inputs["x"], inputs["c"])
    assert out.shape == (3, 12)
    other = model.forward_text(inputs["e"], inputs["te"], torch.flip(inputs["x"], [0]), inputs["c"])
    assert not torch.allclose(out, other), "the prediction must depend on the image"
    out.sum().backward()
    assert model.text_head.weight.grad is not None and model.unet.conv_in.weight.grad.abs().sum() > 0


def test_one_way_cache_equals_full_pass(inputs):
    model = DualStreamUNet.from_unet(tiny_unet(), text_dim=12, fusion="one_way")
    with torch.no_grad():
        for b in model.fusion_blocks:
            b.fc_out.weight.normal_()
    full = model.forward_text(inputs["e"], inputs["te"], inputs["x"], inputs["c"])
    cache = model.encode_image(inputs["x"], inputs["c"])
    cached = model.forward_text_cached(inputs["e"], inputs["te"], cache)
    assert torch.allclose(full, cached, atol=1e-5)
    twice = model.forward_text_cached(inputs["e"].repeat_interleave(2, 0), inputs["te"].repeat_interleave(2, 0), cache.repeat(2))
    assert torch.allclose(twice[::2], cached, atol=1e-5)
    joint = DualStreamUNet.from_unet(tiny_unet(), text_dim=12, fusion="joint")
    with pytest.raises(ValueError, match="one_way"):
        joint.encode_image(inputs["x"], inputs["c"])


def test_save_load_and_export(tmp_path, inputs):
    model = DualStreamUNet.from_unet(tiny_unet(), text_dim=12, fusion="one_way", post_mid_layers=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "m")
    loaded = DualStreamUNet.from_pretrained(tmp_path / "m")
    assert loaded.config.fusion == "one_way" and loaded.config.in_channels == 3
    args = (inputs["e"], inputs["te"], inputs["x"], inputs["c"])
    assert torch.equal(loaded.forward_text(*args), model.forward_text(*args))
    unet = model.to_unet2d()
    unet.save_pretrained(tmp_path / "u")
    vanilla = UNet2DConditionModel.from_pretrained(tmp_path / "u")
    ref = model(inputs["x"], inputs["t"], inputs["c"]).sample
    assert torch.equal(vanilla(inputs["x"], inputs["t"], inputs["c"]).sample, ref)


def test_text_addition_embedding_in_both_streams(tmp_path, inputs):
    """addition_embed_type="text" (the pooled caption added to the time embedding) stays a stock diffusers
    UNet for generation and export, and the text stream adds it too (trained through it)."""
    unet = tiny_unet(addition_embed_type="text", addition_embed_type_num_heads=4)
    model = DualStreamUNet.from_unet(unet, text_dim=12)
    x, t, c = inputs["x"], inputs["t"], inputs["c"]
    ref = model(x, t, c).sample
    assert torch.equal(ref, unet(x, t, c).sample)
    with torch.no_grad():  # the pooled caption reaches every ResNet: a zero-initialised path would hide it
        unet.add_embedding.proj.weight.normal_()
        model.unet.add_embedding.proj.weight.copy_(unet.add_embedding.proj.weight)
    changed = model(x, t, c).sample
    assert not torch.allclose(changed, ref)
    out = model.forward_text(inputs["e"], inputs["te"], x, c)
    assert out.shape == (3, 12)
    out.sum().backward()
    assert model.unet.add_embedding.proj.weight.grad.abs().sum() > 0
    model.to_unet2d().save_pretrained(tmp_path / "u")
    vanilla = UNet2DConditionModel.from_pretrained(tmp_path / "u")
    assert vanilla.config.addition_embed_type == "text"
    assert torch.equal(vanilla(x, t, c).sample, changed)


def test_tokenizer_and_text_query(tmp_path):
    tok = train_tokenizer(["a red circle", "a blue square on the left"], model_max_length=8)
    assert tok.eos_token_id == 4 and tok.bos_token_id == 3 and tok.pad_token_id == 0
    ids = tok(["a red circle"], padding="max_length", max_length=8, return_tensors="pt").input_ids
    assert ids[0, 0] == 3 and 4 in ids[0].tolist()
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_length=8, projection_dim=6))
    te = build_text_encoder(cfg, tok)
    ctx, q = encode_text(te, ids)
    assert ctx.shape == (1, 8, 16) and q.shape == (1, 6)
    assert torch.allclose(q.norm(dim=-1), torch.ones(1))
    # CLIP pools the eos token: changing padding after eos must not change the query
    ids2 = ids.clone()
    ids2[0, -1] = 1 if ids2[0, -1] == 0 else ids2[0, -1]
    assert torch.allclose(encode_text(te, ids2)[1], q, atol=1e-6)
    tok.save_pretrained(tmp_path / "sd" / "tokenizer")
    assert len(load_tokenizer(str(tmp_path / "sd"))) == len(tok)


def test_pretrained_text_encoder_without_projection_uses_pooled(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=8, bos_token_id=3, eos_token_id=4, pad_token_id=0)
    CLIPTextModel(cfg).save_pretrained(tmp_path / "text_encoder")
    te = load_text_encoder(str(tmp_path))
    assert type(te).__name__ == "CLIPTextModel"
    ctx, q = encode_text(te, torch.tensor([[3, 5, 6, 4, 0, 0, 0, 0]]))
    assert q.shape == (1, 16)


def test_empty_tokenizer_is_an_error(tmp_path):
    with pytest.raises(ComponentError, match="empty"):
        train_tokenizer(["", "   "])
    with pytest.raises(ComponentError):
        load_tokenizer(str(tmp_path / "nothing_here"))
