"""model.py + hf_io.py against transformers: logits, packed == per-sequence, save -> HF load, bad folders."""
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config  # noqa: E402

from spin_fast.hf_io import config_from_hf, load_model, save_model  # noqa: E402
from spin_fast.model import CacheArgs, KVCache  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STORIES = SHARED / "models" / "stories260K"
needs_stories = pytest.mark.skipif(not (STORIES / "model.safetensors").is_file(), reason="shared stories260K absent")

TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY, tie_word_embeddings=False),
    "llama-tied": lambda: LlamaConfig(**TINY, tie_word_embeddings=True),
    "llama3-rope": lambda: LlamaConfig(**TINY, rope_parameters=dict(LLAMA3_ROPE)),
    "llama-linear-rope": lambda: LlamaConfig(**TINY, rope_parameters={"rope_type": "linear", "rope_theta": 1e4,
                                                                       "factor": 4.0}),
    "llama-attn-bias": lambda: LlamaConfig(**TINY, attention_bias=True),
    "mistral": lambda: MistralConfig(**TINY, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**TINY, tie_word_embeddings=False),
}


def randomize(model, seed=0):
    """Weights far from init (biases and norms included), so a wrong formula cannot hide behind zeros/ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def make_hf(kind, folder, seed=0):
    hf = randomize(AutoModelForCausalLM.from_config(CONFIGS[kind]()), seed).eval()
    hf.save_pretrained(folder)
    return hf


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf_pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_hf(request.param, folder)
    return request.param, hf, load_model(folder), folder


def test_logits_match_transformers(hf_pair):
    kind, hf, ours, _ = hf_pair
    ids = torch.randint(0, TINY["vocab_size"], (1, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits[0]                                           # (T, V)
        got = ours.logits(ours(ids[0], torch.arange(50)))
    assert ref.abs().max() > 1.0, "degenerate test: logits near zero"
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    assert (ours.lm_head is None) == (kind == "llama-tied")


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_packed_equals_per_sequence(hf_pair, backend):
    _, _, ours, _ = hf_pair
    ours.attn_backend = backend
    g = torch.Generator().manual_seed(2)
    lens = [7, 1, 19, 12]
    seqs = [torch.randint(0, TINY["vocab_size"], (n,), generator=g) for n in lens]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lens])
    with torch.no_grad():
        packed = ours(torch.cat(seqs), pos, cu)                           # (N, H)
        ours.attn_backend = "sdpa"
        single = torch.cat([ours(s, torch.arange(len(s))) for s in seqs])
    torch.testing.assert_close(packed, single, atol=1e-5, rtol=1e-5)


def test_backend_choice():
    from spin_fast.attention import check_backend, resolve_backend
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError, match="must be one of"):
        check_backend("xformers")


@pytest.mark.parametrize("grow_to", [None, 10, 13])
def test_prefill_then_decode_equals_full_forward(hf_pair, grow_to):
    """grow_to: the cache starts just large enough for the prefill and grows (chunked capacity) before decoding."""
    _, _, ours, _ = hf_pair
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, TINY["vocab_size"], (n,), generator=g) for n in (9, 5)]
    with torch.no_grad():
        full = [ours(s, torch.arange(len(s))) for s in seqs]
        cache = KVCache(ours.config, slots=3, max_len=16 if grow_to is None else 8, device="cpu", dtype=torch.float32)
        # prefill all but the last token into slots 2 and 0, then decode the last tokens together
        pre = [s[:-1] for s in seqs]
        cu = torch.tensor([0, len(pre[0]), len(pre[0]) + len(pre[1])], dtype=torch.int32)
        pos = torch.cat([torch.arange(len(p)) for p in pre])
        slots = torch.tensor([2, 0])
        h_pre = ours(torch.cat(pre), pos, cu, cache=CacheArgs(cache, slots, decode=False))
        if grow_to is not None:
            before = [t.clone() for t in cache.k]
            cache.grow(grow_to)
            assert cache.max_len == grow_to and all(t.shape[2] == grow_to for t in cache.k + cache.v)
            assert all(torch.equal(a, b[:, :, :8]) for a, b in zip(before, cache.k))      # kept as written
        h_dec = ours(torch.stack([s[-1] for s in seqs]), torch.tensor([len(p) for p in pre]),
                     cache=CacheArgs(cache, slots, decode=True, kv_len=10))
    torch.testing.assert_close(h_pre[: len(pre[0])], full[0][:-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_dec[0], full[0][-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_dec[1], full[1][-1], atol=1e-5, rtol=1e-5)


def test_save_then_transformers_load(hf_pair, tmp_path):
    _, hf, ours, _ = hf_pair
    save_model(ours, tmp_path / "out", max_shard_bytes=20_000)           # force sharding + index
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=2e-5, rtol=1e-5)
    again = load_model(tmp_path / "out")                                 # and our loader reads the shards
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), again.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_bf16_load_casts():
    if not (STORIES / "model.safetensors").is_file():
        pytest.skip("shared stories260K absent")
    m = load_model(STORIES, dtype=torch.bfloat16)
    assert m.lm_head_weight.dtype == torch.bfloat16
    with torch.no_grad():
        h = m(torch.tensor([1, 403, 407]), torch.arange(3))
    assert h.dtype == torch.bfloat16 and torch.isfinite(h.float()).all()


@needs_stories
def test_stories260k_logits_match_transformers():
    hf = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    ours = load_model(STORIES)
    assert ours.lm_head is None and ours.config.num_kv_heads == 4 and ours.config.num_heads == 8
    assert ours.lm_head_weight is ours.embed_tokens.weight
    ids = torch.randint(3, 512, (1, 120), generator=torch.Generator().manual_seed(5))
    ids[0, 0] = 1
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(ids[0], torch.arange(120))), hf(ids).logits[0],
                                   atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama-tied", "qwen2"])
def test_packed_backward_matches_transformers(kind, tmp_path):
    """Gradients through the packed forward (what the trainer differentiates) equal transformers' ones."""
    hf = make_hf(kind, tmp_path)
    ours = load_model(tmp_path)
    g = torch.Generator().manual_seed(6)
    lens = [9, 14]
    seqs = [torch.randint(0, TINY["vocab_size"], (n,), generator=g) for n in lens]
    ours.requires_grad_(True)
    cu = torch.tensor([0, 9, 23], dtype=torch.int32)
    h = ours(torch.cat(seqs), torch.cat([torch.arange(n) for n in lens]), cu)          # (N, H)
    logp = ours.logits(h).log_softmax(-1)
    loss = sum(logp[cu[i]: cu[i + 1] - 1].gather(1, s[1:, None]).sum() for i, s in enumerate(seqs))
    loss.backward()
    ref = sum(hf(s[None]).logits[0, :-1].log_softmax(-1).gather(1, s[1:, None]).sum() for s in seqs)
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), atol=1e-4, rtol=1e-5)
    for name, p in ours.named_parameters():
        ref_p = hf.get_parameter(name if name.startswith("lm_head") else "model." + name)
        torch.testing.assert_close(p.grad, ref_p.grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@needs_stories
def test_stories260k_save_roundtrip_with_tokenizer(tmp_path):
    ours = load_model(STORIES)
    out = save_model(ours, tmp_path / "s", source_dir=STORIES)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"):
        assert (out / name).is_file()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("Once upon a time")["input_ids"]])
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    assert back.config.tie_word_embeddings and back.config.num_key_value_heads == 4
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref(ids).logits, atol=1e-6, rtol=1e-6)


def test_meta_init_loads_every_parameter(hf_pair):
    _, _, ours, _ = hf_pair
    assert all(p.device.type == "cpu" and not p.requires_grad for p in ours.parameters())
    assert ours.inv_freq.device.type == "cpu"


# ---- refusals and bad folders ---------------------------------------------------------------------------

def hf_dict(**over):
    d = {"model_type": "llama", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
    d.update(over)
    return d


@pytest.mark.parametrize("over, needle", [
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
    ({"model_type": "gemma3"}, "text-only checkpoints are gemma3_text"),
    ({"model_type": "llama", "final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0"),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 4}},
     "rope_type 'longrope'"),
    ({"model_type": "phi3", "rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 3,
                                                "original_max_position_embeddings": 16}}, "short_factor of 4"),
    ({"model_type": "phi3", "partial_rotary_factor": 0.75}, "partial_rotary_factor"),
    ({"hidden_act": "relu2"}, "hidden_act 'relu2'"),
    ({"num_key_value_heads": 3}, "multiple of"),
    ({"hidden_size": "32"}, "'hidden_size'"),
])
def test_unsupported_config_refused(over, needle):
    with pytest.raises(ValueError, match="config.json") as e:
        config_from_hf(hf_dict(**over))
    assert needle in str(e.value)
    if "model_type" in str(e.value) or "rope_type" in str(e.value):
        assert "Supported" in str(e.value) and "gemma3_text" in str(e.value)


def test_sliding_windows_per_family():
    """Which layers slide, as transformers' attention modules decide (tests/test_families.py checks the maths)."""
    assert config_from_hf(hf_dict(model_type="mistral", sliding_window=64)).layer_windows == [64, 64]
    assert config_from_hf(hf_dict(model_type="mistral", sliding_window=None)).layer_windows == [None, None]
    q = hf_dict(model_type="qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=1)
    assert config_from_hf(q).layer_windows == [None, 64]
    assert config_from_hf({**q, "use_sliding_window": False}).layer_windows == [None, None]
    g = hf_dict(model_type="gemma3_text", num_hidden_layers=7, sliding_window=16)
    assert config_from_hf(g).layer_windows == [16] * 5 + [None, 16]
    assert config_from_hf(hf_dict(model_type="gemma2", sliding_window=16)).layer_windows == [16, None]


@pytest.fixture
def tiny_folder(tmp_path):
    make_hf("llama", tmp_path)
    return tmp_path


def _rewrite(folder, fn):
    from safetensors.torch import load_file, save_file
    t = load_file(str(folder / "model.safetensors"))
    fn(t)
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_named(tiny_folder):
    _rewrite(tiny_folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(tiny_folder)


def test_misshaped_tensor_named(tiny_folder):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1]
    _rewrite(tiny_folder, shrink)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(15, 32\)"):
        load_model(tiny_folder)


def test_corrupt_safetensors_named(tiny_folder):
    p = tiny_folder / "model.safetensors"
    p.write_bytes(p.read_bytes()[:200])                                   # truncated: header promises more
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt"):
        load_model(tiny_folder)


def test_missing_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)


def test_bad_config_json(tiny_folder):
    (tiny_folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_model(tiny_folder)


def test_missing_shard_named(tiny_folder):
    from safetensors import safe_open
    with safe_open(str(tiny_folder / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    (tiny_folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "model-00002-of-00002.safetensors" for n in names}}))
    (tiny_folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"model-00002-of-00002\.safetensors: shard named in the index does not exist"):
        load_model(tiny_folder)
