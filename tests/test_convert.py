"""engine/convert.py: official MicroDiT checkpoints -> Tessera run folders.

The official layout is rebuilt here from the formulas of the official code (SonyResearch/micro_diffusion,
micro_diffusion/models/dit.py), independently of models/, so that a drift in our model's names or shapes fails."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.config import ConfigError, load_config
from engine.convert import main
from engine.training.checkpoint import load_model_weights
from engine.training.official_checkpoint import official_state_dict_to_tessera
from models.microdit import MicroDiT
from models.sizes import model_config

ROOT = Path(__file__).resolve().parents[1]
NANO = dict(in_channels=3, caption_channels=384)


# ---- the official layout ----------------------------------------------------------------------------------------

def official_xl_shapes(in_channels: int = 4, caption_channels: int = 1024, tokens: int = 256) -> dict[str, tuple]:
    """Every state-dict entry of the official MicroDiT_XL_2 (use_bias=False), from the official formulas."""
    D, depth, hd, mult, MD, mixer_depth, E, p = 1024, 28, 64, 256, 768, 6, 8, 2
    up = lambda n, m: m * ((n + m - 1) // m)
    s: dict[str, tuple] = {}

    def linear(name, fan_in, fan_out, bias):
        s[f"{name}.weight"] = (fan_out, fan_in)
        if bias:
            s[f"{name}.bias"] = (fan_out,)

    def timm_mlp(name, fan_in, hidden, fan_out):  # fc1 -> act -> LayerNorm(no bias) -> fc2, with biases
        linear(f"{name}.fc1", fan_in, hidden, True)
        s[f"{name}.norm.weight"] = (hidden,)
        linear(f"{name}.fc2", hidden, fan_out, True)

    def feed_forward(name, dim, hidden):  # SwiGLU: int(2·hidden/3) rounded up to multiple_of
        h = up(int(2 * hidden / 3), mult)
        linear(f"{name}.w1", dim, h, False), linear(f"{name}.w2", dim, h, False), linear(f"{name}.w3", h, dim, False)

    def block(name, dim, qkv_ratio, mlp_ratio, moe):
        q = dim if qkv_ratio == 1 else up(int(dim * qkv_ratio), 2 * hd)
        for norm in ("norm1", "norm2", "norm3"):
            s[f"{name}.{norm}.weight"] = (dim,)
        linear(f"{name}.attn.qkv", dim, 3 * q, False), linear(f"{name}.attn.proj", q, dim, False)
        linear(f"{name}.cross_attn.q_linear", dim, dim, False), linear(f"{name}.cross_attn.kv_linear", dim, 2 * dim, False)
        linear(f"{name}.cross_attn.proj", dim, dim, False)
        hidden = int(dim * mlp_ratio)
        if moe:  # FeedForwardECMoe: no 2/3 factor
            h = up(hidden, mult)
            s[f"{name}.mlp.w1"], s[f"{name}.mlp.w2"], s[f"{name}.mlp.gate.weight"] = (E, dim, h), (E, h, dim), (E, dim)
        else:
            feed_forward(f"{name}.mlp", dim, hidden)
        linear(f"{name}.adaLN_modulation.1", D, 6 * dim, True)

    s["x_embedder.proj.weight"], s["x_embedder.proj.bias"] = (D, in_channels, p, p), (D,)
    s["pos_embed"] = (1, tokens, D)
    linear("t_embedder.mlp.0", 512, D, True), linear("t_embedder.mlp.2", D, D, True)
    timm_mlp("y_embedder.y_proj", caption_channels, D, D)
    s["y_emb_preprocess.norm1.weight"] = s["y_emb_preprocess.norm2.weight"] = (D,)
    linear("y_emb_preprocess.attn.qkv", D, 3 * D, False), linear("y_emb_preprocess.attn.proj", D, D, False)
    feed_forward("y_emb_preprocess.mlp", D, 4 * D)
    timm_mlp("pooled_y_emb_process", D, D, D)
    mixer_moe = [i for i in range(1, mixer_depth) if (i + 1) % 2 == 0]
    for i in range(mixer_depth):
        block(f"patch_mixer.{i}", MD, 1.0, 4.0, i in mixer_moe)
    for name, a, b in (("xin", D, MD), ("xout", MD, D), ("y", D, MD)):
        s[f"patch_mixer_map_{name}.0.weight"] = (a,)
        linear(f"patch_mixer_map_{name}.1", a, b, False)
    qkv, mlp = np.linspace(0.5, 1.0, num=depth), np.linspace(0.5, 4.0, num=depth)
    backbone_moe = [i for i in range(depth - 1) if (i + 1) % 2 == 0]
    for i in range(depth):
        block(f"blocks.{i}", D, qkv[i], mlp[i], i in backbone_moe)
    s["mask_token"] = (1, 1, p * p * in_channels)
    s["final_layer.norm_final.weight"] = (D,)
    linear("final_layer.linear", D, p * p * in_channels, True)
    linear("final_layer.adaLN_modulation.1", D, 2 * D, True)
    return s


def official_checkpoint(model: MicroDiT, prefix: str = "dit.") -> dict[str, torch.Tensor]:
    """`model`'s weights as the official code stores them: prefixed, with the pos_embed and mask_token buffers."""
    sd = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    sd[prefix + "pos_embed"] = model.pos_embed.clone()  # (1, N, dim)
    sd[prefix + "mask_token"] = torch.zeros(1, 1, model.cfg.patch_channels)
    return sd


@pytest.fixture(scope="module")
def nano() -> MicroDiT:
    torch.manual_seed(0)
    model = MicroDiT(model_config("MicroDiT_Nano_4", **NANO)).eval()
    with torch.no_grad():  # zero-initialised layers (gates, final layer) must carry weights too
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


# ---- round trip -------------------------------------------------------------------------------------------------

def outputs(model: MicroDiT) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    B, L, N = 2, 7, model.cfg.num_patches
    x = torch.randn(B, 3, 32, 32, generator=g)
    c_noise = torch.randn(B, generator=g)
    y = torch.randn(B, L, 384, generator=g)
    y_mask = torch.tensor([[True] * L, [True] * 4 + [False] * 3])
    keep_idx = torch.stack([torch.randperm(N, generator=g)[: N // 4] for _ in range(B)])  # (B, K)
    with torch.no_grad():
        return model(x, c_noise, y, y_mask, keep_idx)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_round_trip_gives_identical_outputs(nano, tmp_path, fmt):
    src = tmp_path / f"official.{fmt}"
    if fmt == "pt":  # the Composer trainer's container, with other submodules beside the DiT
        sd = official_checkpoint(nano, "dit.") | {"vae.decoder.conv_in.weight": torch.randn(4, 4)}
        torch.save({"state": {"model": sd, "timestamp": {"batch": 7}}}, src)
        main([str(src), str(tmp_path / "run"), "--step", "5"])
    else:  # run as a script, as users do
        save_file(official_checkpoint(nano, "model._orig_mod."), str(src))
        done = subprocess.run([sys.executable, "engine/convert.py", str(src), str(tmp_path / "run"), "--step", "5"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "MicroDiT_Nano_4" in done.stdout

    cfg = load_config(tmp_path / "run" / "config.yaml")
    assert (cfg.model.name, cfg.model.pos_interp_scale, cfg.data.source) == ("MicroDiT_Nano_4", 1.0, "random")
    assert (cfg.data.image_size, cfg.data.channels, cfg.data.caption_channels) == (32, 3, 384)
    assert cfg.diffusion.sigma_data == 0.9
    mcfg = model_config(cfg.model.name, input_size=cfg.data.image_size, in_channels=cfg.data.channels,
                        caption_channels=cfg.data.caption_channels, pos_interp_scale=cfg.model.pos_interp_scale)
    torch.manual_seed(123)  # different from the original's weights
    model, ema = MicroDiT(mcfg).eval(), MicroDiT(mcfg).eval()
    load_model_weights(tmp_path / "run" / "checkpoints" / "step_00000005", model, ema)
    expected = outputs(nano)
    assert torch.equal(outputs(model), expected)
    assert torch.equal(outputs(ema), expected)


# ---- official XL shapes -----------------------------------------------------------------------------------------

def meta_state(shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


def test_xl_matches_official_layout():
    with torch.device("meta"):
        model = MicroDiT(model_config("MicroDiT_XL_2"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = {k: v for k, v in official_xl_shapes().items() if k not in ("pos_embed", "mask_token")}
    assert ours == official
    # Worked examples of the official formulas (layer-wise scaling, SwiGLU 2/3, MoE, rounding).
    table = {
        "blocks.0.attn.qkv.weight": (3 * 512, 1024),
        "blocks.27.attn.qkv.weight": (3072, 1024),
        "blocks.27.mlp.w1.weight": (2816, 1024),
        "blocks.1.mlp.w1": (8, 1024, 768),
        "patch_mixer.1.mlp.w1": (8, 768, 3072),
        "patch_mixer.0.mlp.w1.weight": (2048, 768),
        "patch_mixer_map_xin.1.weight": (768, 1024),
        "y_emb_preprocess.mlp.w1.weight": (2816, 1024),
        "final_layer.linear.weight": (16, 1024),
    }
    assert {k: ours[k] for k in table} == table
    moe = lambda prefix: sorted(int(k.split(".")[1]) for k in ours if k.startswith(prefix) and k.endswith("gate.weight"))
    assert moe("blocks.") == list(range(1, 27, 2))
    assert moe("patch_mixer.") == [1, 3, 5]
    assert abs(model.num_params() / 1.16e9 - 1) < 0.01


@pytest.mark.parametrize("tokens, input_size, scale", [(256, 32, 1.0), (1024, 64, 2.0)])
def test_size_inference_on_official_xl(tokens, input_size, scale):
    sd = {"model.dit." + k: v for k, v in meta_state(official_xl_shapes(tokens=tokens)).items()}
    converted, cfg, name = official_state_dict_to_tessera({"state": {"model": sd}})
    assert name == "MicroDiT_XL_2"
    assert (cfg.input_size, cfg.pos_interp_scale, cfg.in_channels, cfg.caption_channels) == (input_size, scale, 4, 1024)
    assert "pos_embed" not in converted and "mask_token" not in converted


def test_size_inference_reads_channels():  # e.g. the released 16-channel-latent models
    name = official_state_dict_to_tessera(meta_state(official_xl_shapes(in_channels=16, caption_channels=768)))[2]
    assert name == "MicroDiT_XL_2"


# ---- a converted official run samples end to end ----------------------------------------------------------------

def tiny_1024_wide_encoder(folder: Path) -> Path:
    """A random CLIP text tower of the official encoder's width (1024), one layer, with a small word-level
    tokenizer: built offline, it stands in for apple/DFN5B-CLIP-ViT-H-14-378."""
    import transformers as tf

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "red", "circle", "two", "blue", "squares"]
    tok = tf.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    torch.manual_seed(0)
    model = tf.CLIPTextModel(tf.CLIPTextConfig(vocab_size=len(words), hidden_size=1024, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77))
    folder.mkdir()
    tok.save_pretrained(folder)
    model.eval().save_pretrained(folder)
    return folder


def test_converted_official_checkpoint_samples_with_a_1024_wide_encoder(tmp_path):
    from engine.config import ConfigError
    from engine.sample import main as sample_main

    torch.manual_seed(0)
    official = MicroDiT(model_config("MicroDiT_Nano_4", in_channels=4, caption_channels=1024)).eval()
    with torch.no_grad():
        for p in official.parameters():
            p.add_(0.02 * torch.randn_like(p))
    torch.save({"state": {"model": official_checkpoint(official, "dit.")}}, tmp_path / "official.pt")
    main([str(tmp_path / "official.pt"), str(tmp_path / "run")])
    cfg = load_config(tmp_path / "run" / "config.yaml")
    assert (cfg.data.text_encoder, cfg.data.caption_channels) == ("apple/DFN5B-CLIP-ViT-H-14-378", 1024)

    args = ["--run", str(tmp_path / "run"), "--prompt", "a red circle", "--num", "2", "--steps", "2",
            "--out", str(tmp_path / "grid.png")]
    with pytest.raises(ConfigError, match="data.text_encoder='apple/DFN5B-CLIP-ViT-H-14-378' cannot be loaded"):
        sample_main(args)  # offline: the official encoder is not here, and the error says so
    out = sample_main([*args, "--text-encoder", str(tiny_1024_wide_encoder(tmp_path / "enc"))])
    latents = torch.load(out.with_suffix(".latents.pt"))
    assert out.is_file() and latents.shape == (2, 4, 32, 32) and torch.isfinite(latents).all()


# ---- errors -----------------------------------------------------------------------------------------------------

def test_missing_key_is_named(nano):
    sd = official_checkpoint(nano)
    del sd["dit.blocks.1.mlp.gate.weight"]
    with pytest.raises(ValueError, match=r"closest is MicroDiT_Nano_4.*missing \['blocks\.1\.mlp\.gate\.weight'\]"):
        official_state_dict_to_tessera(sd)


def test_wrong_shape_is_named(nano):
    sd = official_checkpoint(nano)
    sd["dit.blocks.2.attn.proj.weight"] = torch.zeros(128, 8)
    with pytest.raises(ValueError, match=r"wrong shape \['blocks\.2\.attn\.proj\.weight \(checkpoint \(128, 8\)"):
        official_state_dict_to_tessera(sd)


@pytest.mark.parametrize("name, content", [
    ("notes.pt", b"not a checkpoint"), ("notes.safetensors", b"not a checkpoint"), ("other.pt", None),
])
def test_not_a_checkpoint_names_the_file(tmp_path, name, content):
    src = tmp_path / name
    if content is None:  # a valid torch file that holds no MicroDiT
        torch.save({"state": {"model": {"encoder.weight": torch.zeros(2)}}}, src)
    else:
        src.write_bytes(content)
    with pytest.raises(ValueError, match=name):
        main([str(src), str(tmp_path / "run")])
    with pytest.raises(ConfigError, match="missing.pt"):
        main([str(tmp_path / "missing.pt"), str(tmp_path / "run")])
