"""MicroDiT structure: sizes, FLOPs, masking, adaLN-Zero identity, MoE placement, patchify round trip."""
import torch
import pytest

from models.flops import forward_flops_per_image, kept_tokens
from models.microdit import MicroDiT
from models.sizes import build_model, model_config

NANO = dict(in_channels=3, caption_channels=24)


def meta_model(name, attention_backend="auto", **kw):
    with torch.device("meta"):
        return build_model(model_config(name, **kw), {"attention": attention_backend})


def test_microdit_xl_has_about_1_16b_parameters():
    assert abs(meta_model("MicroDiT_XL_2").num_params() / 1.16e9 - 1) < 0.01


def test_dit_xl_has_about_675m_parameters_and_118_6_gflops():
    cfg = model_config("DiT_XL_2")
    assert abs(meta_model("DiT_XL_2").num_params() / 675e6 - 1) < 0.01
    macs = forward_flops_per_image(cfg, caption_len=77) / 2  # the DiT paper counts a multiply-add once
    assert abs(macs / 118.6e9 - 1) < 0.01


@pytest.mark.parametrize("name", ["MicroDiT_Nano_4", "MicroDiT_Nano_2", "MicroDiT_Mini_4", "MicroDiT_Micro_4"])
@pytest.mark.parametrize("size", [16, 32])
def test_cpu_sizes_denoise_a_batch_at_both_reference_resolutions_with_a_pixel_head(name, size):
    """The CPU sizes run where the reference runs them: 16 px (phase 1) and 32 px (phase 2), with a pixel head, and
    every weight gets a gradient (a head width or depth that does not divide would fail to build or leave one out)."""
    torch.manual_seed(0)
    model = build_model(model_config(name, input_size=size, pixel_head=32, **NANO))
    for p in model.parameters():  # off the identity init, so every weight is on the gradient's path
        p.data.normal_(0, 0.05)
    x, y = torch.randn(2, 3, size, size), torch.randn(2, 5, 24)
    out = model(x, torch.rand(2), y, torch.ones(2, 5, dtype=torch.bool))  # (B, tokens, p * p * C)
    patch = model.cfg.patch_size
    assert out.shape == (2, (size // patch) ** 2, patch * patch * 3) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_mini_and_micro_have_more_parameters_than_nano_and_the_same_tokens():
    nano, mini, micro = (meta_model(n, pixel_head=32, **NANO)
                         for n in ("MicroDiT_Nano_4", "MicroDiT_Mini_4", "MicroDiT_Micro_4"))
    assert micro.cfg.patch_size == mini.cfg.patch_size == nano.cfg.patch_size
    assert (mini.cfg.dim, mini.cfg.depth) == (192, nano.cfg.depth)  # Nano widened only
    assert 1.5 * nano.num_params() < mini.num_params() < 2 * nano.num_params()
    assert 4 * nano.num_params() < micro.num_params() < 5 * nano.num_params()


def token_path_flops(model, tokens: int, caption_len: int) -> int:
    """FLOPs of what runs after the mask on `tokens` tokens: mixer->backbone projection, backbone, final layer."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.cfg
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        h = model.patch_mixer_map_xout(torch.empty(1, tokens, cfg.mixer_dim))
        y, c = torch.empty(1, caption_len, cfg.dim), torch.empty(1, cfg.dim)
        for block in model.blocks:
            h = block(h, y, None, c)
        model.final_layer(h, c)
    return counter.get_total_flops()


def test_masking_cuts_flops_and_layerwise_scaling_grows_width():
    """Deferred masking: the masked forward costs the full one minus the token path on N tokens plus the token path
    on the K kept ones (the mixer, captions and timestep cost the same), computed here part by part."""
    cfg = model_config("MicroDiT_XL_2")
    full, masked = forward_flops_per_image(cfg, 77, 0.0), forward_flops_per_image(cfg, 77, 0.75)
    m = meta_model("MicroDiT_XL_2", attention_backend="torch")
    N, K = cfg.num_patches, kept_tokens(cfg.num_patches, 0.75)
    assert masked == full - token_path_flops(m, N, 77) + token_path_flops(m, K, 77)
    m = meta_model("MicroDiT_XL_2")
    widths = [b.attn.qkv.out_features for b in m.blocks]
    assert widths[0] < widths[-1] and widths == sorted(widths)


def test_moe_placement_every_second_block_not_last():
    m = meta_model("MicroDiT_XL_2")
    moe = [i for i, b in enumerate(m.blocks) if hasattr(b.mlp, "gate")]
    assert moe == list(range(1, 27, 2))
    assert [i for i, b in enumerate(m.patch_mixer) if hasattr(b.mlp, "gate")] == [1, 3, 5]


@pytest.mark.parametrize("N,r,K", [(64, 0.5, 32), (256, 0.75, 64), (1024, 0.75, 256), (7, 0.9, 1), (1, 0.5, 1),
                                   (10, 0.75, 2), (256, 0.0, 256), (256, 0.7, 76), (10, 0.85, 1)])
def test_kept_tokens_truncates_as_the_official_code(N, r, K):
    assert kept_tokens(N, r) == K  # int(N·(1 - r)) as micro_diffusion's get_mask; at least one token


def small_model(**kw):
    torch.manual_seed(0)
    return build_model(model_config("MicroDiT_Nano_4", **NANO, **kw))


def inputs(model, B=2, L=5):
    cfg = model.cfg
    x = torch.randn(B, cfg.in_channels, cfg.input_size, cfg.input_size)
    y = torch.randn(B, L, cfg.caption_channels)
    mask = torch.arange(L)[None] < torch.tensor([[L], [2]])
    return x, torch.randn(B), y, mask


def test_blocks_are_identity_at_init():
    model = small_model()
    x, t, y, mask = inputs(model)
    c = torch.randn(2, model.cfg.dim)
    for block in list(model.patch_mixer) + list(model.blocks):
        width = block.norm1.normalized_shape[0]
        h = torch.randn(2, 10, width)
        y_in = torch.randn(2, 5, width)
        assert torch.equal(block(h, y_in, mask, c), h)
    assert torch.equal(model(x, t, y, mask), torch.zeros(2, model.cfg.num_patches, model.cfg.patch_channels))


def test_official_init_draws_what_identity_zeroes():
    """model.init=official: each cross-attention output ~ trunc N(0, the block's output std) as in the official
    code, the patch-embedding bias PyTorch's conv default U(±1/sqrt(fan_in)); identity keeps both at zero."""
    official, identity = small_model(init="official"), small_model(init="identity")
    depth, p, c = official.cfg.depth, official.cfg.patch_size, official.cfg.in_channels
    stds = [0.02 / (2 * (i + 1)) ** 0.5 for i in range(depth)] + [0.02 / (2 * depth) ** 0.5] * official.cfg.mixer_depth
    for std, block in zip(stds, list(official.blocks) + list(official.patch_mixer)):
        w = block.cross_attn.proj.weight
        assert abs(w.std().item() / std - 1) < 0.05 and abs(w.mean().item()) < 0.1 * std
    bound = 1 / (c * p * p) ** 0.5
    bias = official.x_embedder.proj.bias
    assert bias.abs().max() <= bound and bias.abs().mean() > bound / 4  # U(-b, b) has mean |x| = b / 2
    assert all(not b.cross_attn.proj.weight.any() for b in list(identity.blocks) + list(identity.patch_mixer))
    assert not identity.x_embedder.proj.bias.any()
    with pytest.raises(ValueError, match="model.init='zeros' must be"):
        small_model(init="zeros")


def test_kept_token_path_equals_reference_gather():
    """Deferred masking: the masked forward equals running the mixer on ALL tokens, then keeping rows by hand and
    running the projection, backbone and final layer on them (a gather before the mixer would differ)."""
    model = small_model()
    for p in model.parameters():  # leave the zero init so the output depends on everything
        p.data.normal_(0, 0.05)
    x, t, y, mask = inputs(model)
    N = model.cfg.num_patches
    K = kept_tokens(N, 0.75)
    keep = torch.stack([torch.randperm(N)[:K].sort().values for _ in range(2)])
    out = model(x, t, y, mask, keep)
    assert out.shape == (2, K, model.cfg.patch_channels)

    seen = {}
    hooks = [model.patch_mixer[-1].register_forward_hook(lambda m, a, o: seen.update(mixer_out=o)),  # returns None
             model.blocks[0].register_forward_pre_hook(lambda m, a: seen.update(block_args=a[1:]))]
    model(x, t, y, mask)  # unmasked: the mixer's output for all N tokens, and the backbone's (y, y_mask, c)
    for h in hooks:
        h.remove()
    assert seen["mixer_out"].shape[1] == N
    h = torch.stack([seen["mixer_out"][b, keep[b]] for b in range(2)])  # (2, K, mixer width), kept rows by hand
    h = model.patch_mixer_map_xout(h)
    for block in model.blocks:
        h = block(h, *seen["block_args"])
    torch.testing.assert_close(out, model.final_layer(h, seen["block_args"][-1]))


def test_padding_of_caption_is_ignored():
    model = small_model()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x, t, y, mask = inputs(model)
    y2 = y.clone()
    y2[1, 2:] = torch.randn_like(y2[1, 2:]) * 10  # only padded positions of sample 1 change
    torch.testing.assert_close(model(x, t, y2, mask), model(x, t, y, mask))


def test_without_the_pooled_caption_only_cross_attention_reads_the_caption():
    """model.pooled_caption=False: the adaLN condition is the noise level alone, the caption still changes the output
    (through cross-attention), and every weight that is built gets a gradient."""
    model = small_model(pooled_caption=False)
    assert not hasattr(model, "pooled_y_emb_process")
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x, t, y, mask = inputs(model)
    other = torch.randn_like(y)
    assert torch.equal(model.embed(x, t, y, mask)[2], model.embed(x, t, other, mask)[2])
    assert not torch.allclose(model(x, t, other, mask), model(x, t, y, mask))
    model(x, t, y, mask).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()] == []
    pooled = small_model()  # the default adds the caption's mean to the condition
    assert not torch.equal(pooled.embed(x, t, y, mask)[2], pooled.embed(x, t, other, mask)[2])


def test_patchify_round_trip_and_token_order_matches_patch_embed():
    model = small_model()
    x = torch.randn(2, 3, 32, 32)
    tokens = model.patchify(x)
    assert torch.equal(model.unpatchify(tokens), x)
    # token n holds the patch at row n // g, column n % g: the order of PatchEmbed's flatten
    p, g = model.cfg.patch_size, 32 // model.cfg.patch_size
    n = 2 * g + 5
    patch = x[:, :, 2 * p:3 * p, 5 * p:6 * p]  # (B, C, p, p)
    assert torch.equal(tokens[:, n], patch.permute(0, 2, 3, 1).reshape(2, -1))


def test_bad_model_config_names_the_key():
    with pytest.raises(ValueError, match="model.input_size"):
        MicroDiT(model_config("MicroDiT_Nano_4", input_size=30))
    with pytest.raises(ValueError, match="model.name: unknown size"):
        model_config("MicroDiT_Huge_9")


def test_pixel_head_starts_as_the_identity_and_learns_from_the_first_step():
    """A fresh pixel head leaves the transformer's output unchanged; its last convolution gets a gradient at once."""
    plain, headed = small_model(), small_model(pixel_head=16)
    missing, unexpected = headed.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("pixel_head.") for k in missing)
    with torch.no_grad():  # a trained transformer: non-zero output the head must pass through unchanged
        for m in (plain, headed):
            torch.manual_seed(1)
            m.final_layer.linear.weight.normal_(0, 0.1)
    x, t, y, mask = inputs(plain)
    out = plain(x, t, y, mask)
    assert out.abs().min() > 0
    torch.testing.assert_close(headed(x, t, y, mask), out, rtol=0, atol=0)
    headed(x, t, y, mask).square().sum().backward()
    assert headed.pixel_head.conv_out.weight.grad.abs().sum() > 0


def test_pixel_head_refuses_deferred_masking():
    model = small_model(pixel_head=8)
    x, t, y, mask = inputs(model)
    with pytest.raises(ValueError, match="mask_ratio=0"):
        model(x, t, y, mask, torch.zeros(2, 4, dtype=torch.long))


def test_pixel_head_sees_across_patch_borders():
    """With trained (random) head weights, an output pixel depends on the input pixel just across its patch border
    through the head alone (the transformer's path is cut by zeroing its output layer)."""
    model = small_model(pixel_head=8)
    with torch.no_grad():
        for conv in (model.pixel_head.conv_out, *(b.conv2 for b in model.pixel_head.blocks)):
            conv.weight.normal_(0, 0.1)
    x, t, y, mask = inputs(model)
    x.requires_grad_(True)
    img = model.unpatchify(model(x, t, y, mask))
    p = model.cfg.patch_size
    img[:, :, p - 1, p - 1].sum().backward()  # the last pixel of patch (0, 0)
    assert x.grad[:, :, p, p].abs().sum() > 0  # the first pixel of patch (1, 1)


def test_pixel_head_channels_last_on_cpu_computes_what_nchw_does(monkeypatch):
    """The head's convolutions run on channels-last tensors on a CPU (a speed choice): forward and every gradient
    agree with the NCHW layout on fresh random weights and inputs, and the layout really is the one asked for."""
    from models.pixel_head import PixelHead

    torch.manual_seed(0)
    head = PixelHead(3, 16, 2, 32)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.2)
    out, x, c = torch.randn(4, 3, 12, 12, requires_grad=True), torch.randn(4, 3, 12, 12), torch.randn(4, 32)
    layouts = []
    head.blocks[0].conv1.register_forward_hook(
        lambda mod, args, res: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    results = {}
    for channels_last in (False, True):
        monkeypatch.setattr(PixelHead, "channels_last_on_cpu", channels_last)
        y = head(out, x, c)
        results[channels_last] = (y, *torch.autograd.grad(y.square().sum(), [out, *head.parameters()]))
    assert layouts == [False, True]
    for nchw, channels_last in zip(results[False], results[True]):
        torch.testing.assert_close(channels_last, nchw, rtol=1e-5, atol=1e-5)
