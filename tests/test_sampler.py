"""sampler.py + chat.py: greedy == transformers, continuous batching == batch 1, sampling distribution
(chi-square), batch-invariant per-prompt seeding, log-probs, stop conditions, chat rendering."""
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig  # noqa: E402

from spin_fast.chat import render_prompt, render_prompt_response  # noqa: E402
from spin_fast.hf_io import load_model  # noqa: E402
from spin_fast.sampler import Sampler, SamplingParams, sample_from_logits, uniforms  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STORIES = SHARED / "models" / "stories260K"
PHI3 = SHARED / "tokenizers" / "phi-3-mini-4k-instruct"
needs_stories = pytest.mark.skipif(not (STORIES / "model.safetensors").is_file(), reason="shared stories260K absent")
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n{% else %}"
            "Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}Assistant:{% endif %}")


def tiny_hf(tmp_path, vocab=64, seed=0, std=0.3, eos=(2, 3, 5)):
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, eos_token_id=list(eos), bos_token_id=1)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # large weights: confident, well-separated logits, so argmax has no near-ties
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if "norm" in name else
                    std * torch.randn(p.shape, generator=g))
    hf.save_pretrained(tmp_path)
    return hf, load_model(tmp_path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_hf(tmp_path_factory.mktemp("tiny"))


def rand_prompts(n, vocab, seed, lo=3, hi=20):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [[1] + torch.randint(6, vocab, (m - 1,), generator=g).tolist() for m in lens]


def hf_greedy(hf, prompt, max_new, eos):
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=max_new, do_sample=False, eos_token_id=list(eos), pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers_tiny(tiny):
    hf, ours = tiny
    prompts = rand_prompts(6, 64, seed=1)
    got = Sampler(ours, batch_size=4).generate(prompts, SamplingParams(max_new_tokens=24, greedy=True))
    reasons = set()
    for p, g in zip(prompts, got):
        ref = hf_greedy(hf, p, 24, (2, 3, 5))
        assert g.token_ids == ref
        reasons.add(g.finish_reason)
        assert g.finish_reason == ("stop" if ref[-1] in (2, 3, 5) else "length")
    assert len(got) == 6


def test_greedy_matches_transformers_qwen2_bias(tmp_path):
    from transformers import Qwen2Config
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                      eos_token_id=2, bos_token_id=1)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # q/k/v biases non-zero, so the biased (prepacked) linears are exercised
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.3 * noise)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    prompts = rand_prompts(4, 64, seed=6)
    got = Sampler(ours, batch_size=3).generate(prompts, SamplingParams(max_new_tokens=16, greedy=True))
    for p, g in zip(prompts, got):
        assert g.token_ids == hf_greedy(hf, p, 16, (2,))


def test_bf16_sampling_runs(tiny):
    _, ours = tiny
    import copy
    m = copy.deepcopy(ours).to(torch.bfloat16)
    got = Sampler(m, batch_size=2).generate(rand_prompts(3, 64, seed=7), SamplingParams(max_new_tokens=8, seed=1))
    assert all(1 <= len(g.token_ids) <= 8 for g in got)


@needs_stories
def test_greedy_matches_transformers_stories260k():
    tok = AutoTokenizer.from_pretrained(STORIES)
    hf = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    ours = load_model(STORIES)
    texts = ["Once upon a time", "The dog was", "Lily and Ben went to the", "One day"]
    prompts = [tok(t)["input_ids"] for t in texts]
    got = Sampler(ours, batch_size=3, tokenizer=tok).generate(prompts, SamplingParams(max_new_tokens=48, greedy=True))
    for p, g in zip(prompts, got):
        assert g.token_ids == hf_greedy(hf, p, 48, (2,))
    assert got[0].text.startswith(", there was a little girl named Lily")


def test_continuous_batching_equals_batch_one(tiny):
    _, ours = tiny
    prompts = rand_prompts(11, 64, seed=2)
    for params in (SamplingParams(max_new_tokens=30, greedy=True),
                   SamplingParams(max_new_tokens=30, temperature=0.9, top_p=0.9, seed=3)):
        one = Sampler(ours, batch_size=1).generate(prompts, params)
        many = Sampler(ours, batch_size=4, prefill_tokens=24).generate(prompts, params)
        assert [g.token_ids for g in many] == [g.token_ids for g in one]
        lens = {len(g.token_ids) for g in one}
        assert len(lens) > 2, "degenerate test: lengths not ragged"


def test_static_decode_equals_dynamic(tiny):
    """The CUDA-graph step's logic (all slots, full cache length, finished slots computing garbage), run
    eagerly: same tokens and log-probs as the dynamic path."""
    _, ours = tiny
    prompts = rand_prompts(7, 64, seed=8)
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.95, seed=4, return_logprobs=True)
    dyn = Sampler(ours, batch_size=3).generate(prompts, params)
    sta = Sampler(ours, batch_size=3, static_decode=True).generate(prompts, params)
    assert [g.token_ids for g in sta] == [g.token_ids for g in dyn]
    for a, b in zip(sta, dyn):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=1e-5)


def test_seeding_is_batch_and_order_invariant(tiny):
    _, ours = tiny
    prompts = rand_prompts(9, 64, seed=4)
    keys = [100 + i for i in range(9)]
    params = SamplingParams(max_new_tokens=20, temperature=1.2, top_k=20, seed=7)
    ref = Sampler(ours, batch_size=3).generate(prompts, params, keys)
    perm = [4, 0, 8, 2, 6, 1, 7, 3, 5]
    alone = Sampler(ours, batch_size=5).generate([prompts[i] for i in perm], params, [keys[i] for i in perm])
    for j, i in enumerate(perm):
        assert alone[j].token_ids == ref[i].token_ids
    other_seed = Sampler(ours, batch_size=3).generate(prompts, SamplingParams(
        max_new_tokens=20, temperature=1.2, top_k=20, seed=8), keys)
    assert [g.token_ids for g in other_seed] != [g.token_ids for g in ref]


def test_logprobs_are_untempered_model_logprobs(tiny):
    _, ours = tiny
    prompts = rand_prompts(3, 64, seed=5)
    got = Sampler(ours, batch_size=2).generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.7,
                                                                       return_logprobs=True))
    for p, g in zip(prompts, got):
        seq = torch.tensor(p + g.token_ids)
        with torch.no_grad():
            logp = ours.logits(ours(seq, torch.arange(len(seq)))).log_softmax(-1)       # (T, V)
        want = logp[len(p) - 1: len(seq) - 1].gather(1, torch.tensor(g.token_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(g.logprobs), want, atol=1e-4, rtol=1e-4)


# ---- the distribution of sampled tokens -----------------------------------------------------------------

def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells with zero expected mass must have zero counts."""
    n = counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, f"sampled a token with zero probability: {counts.tolist()}"
    exp = probs[keep].double() * n
    stat = ((counts[keep].double() - exp) ** 2 / exp).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))


def truncated_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Independent statement of the target distribution: sort once, keep the top-k, then the smallest
    prefix whose mass reaches top_p, renormalise."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = p.argsort(descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    k = top_k if top_k > 0 else len(p)
    kept = p[order[:k]] / p[order[:k]].sum()
    mass = 0.0
    for j in range(k):
        keep[order[j]] = True
        mass += float(kept[j])
        if mass >= top_p:
            break
    q = torch.where(keep, p, torch.zeros_like(p))
    return q / q.sum()


LOGITS = torch.tensor([2.0, 1.5, 1.2, 0.5, 0.0, -0.3, -1.0, -2.5])


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.6), dict(temperature=1.5, top_k=3),
                                dict(temperature=1.0, top_p=0.7), dict(temperature=0.8, top_k=5, top_p=0.8)])
def test_sample_distribution_chi_square(kw):
    n = 40000
    params = SamplingParams(seed=11, **kw)
    u = uniforms(params.seed, torch.arange(n), torch.zeros(n, dtype=torch.long))
    toks = sample_from_logits(LOGITS.expand(n, -1).contiguous(), u, params)
    counts = torch.bincount(toks, minlength=8)
    want = truncated_probs(LOGITS, **kw)
    assert chi2_pvalue(counts, want) > 1e-3
    # power: the same counts must reject a visibly different distribution (untruncated, T=1 vs T=2)
    wrong = torch.softmax(LOGITS.double() / (kw["temperature"] * 1.3), -1)
    with pytest.raises(AssertionError):
        assert chi2_pvalue(counts, wrong) > 1e-3


def test_uniforms_deterministic_and_spread():
    key, step = torch.arange(50000), torch.full((50000,), 3)
    u = uniforms(5, key, step)
    assert torch.equal(u, uniforms(5, key, step))
    assert (u > 0).all() and (u < 1).all()
    hist = torch.histc(u.float(), bins=10, min=0, max=1)
    assert chi2_pvalue(hist.long(), torch.full((10,), 0.1)) > 1e-3
    assert not torch.equal(u, uniforms(6, key, step)) and not torch.equal(u, uniforms(5, key, step + 1))


def test_first_tokens_from_sampler_follow_model_distribution(tmp_path):
    _, ours = tiny_hf(tmp_path, vocab=12, std=0.15, eos=(2,))
    prompt = [1, 7, 9, 4]
    with torch.no_grad():
        logits = ours.logits(ours(torch.tensor(prompt), torch.arange(4)))[-1]
    n = 3000
    params = SamplingParams(max_new_tokens=1, temperature=0.8, top_p=0.9, seed=2)
    got = Sampler(ours, batch_size=64, prefill_tokens=256).generate([prompt] * n, params)
    counts = torch.bincount(torch.tensor([g.token_ids[0] for g in got]), minlength=12)
    assert chi2_pvalue(counts, truncated_probs(logits, temperature=0.8, top_p=0.9)) > 1e-3


# ---- stop conditions ------------------------------------------------------------------------------------

@needs_stories
def test_stop_string_and_length():
    tok = AutoTokenizer.from_pretrained(STORIES)
    ours = load_model(STORIES)
    prompts = [tok("Once upon a time")["input_ids"]]
    s = Sampler(ours, batch_size=2, tokenizer=tok)
    g = s.generate(prompts, SamplingParams(max_new_tokens=40, greedy=True, stop_strings=("Lily",)))[0]
    assert g.finish_reason == "stop" and g.text == ", there was a little girl named "
    g = s.generate(prompts, SamplingParams(max_new_tokens=5, greedy=True))[0]
    assert g.finish_reason == "length" and len(g.token_ids) == 5


def test_context_limits(tiny):
    _, ours = tiny
    with pytest.raises(ValueError, match="prompt 1 has 128 tokens"):
        Sampler(ours, batch_size=2).generate([[1, 2], [1] * 128], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        Sampler(ours, batch_size=2).generate([[]], SamplingParams(max_new_tokens=4))
    # a prompt near the context end stops with "length" when the cache is full
    g = Sampler(ours, batch_size=2, eos_token_ids=[]).generate([[1] * 125], SamplingParams(max_new_tokens=10))[0]
    assert g.finish_reason == "length" and len(g.token_ids) == 3


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0),
                                 dict(top_p=1.5), dict(top_k=-1), dict(stop_strings=("",))])
def test_bad_sampling_params(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


# ---- chat rendering -------------------------------------------------------------------------------------

@needs_stories
def test_chat_template_required_and_given():
    tok = AutoTokenizer.from_pretrained(STORIES)
    msgs = [{"role": "user", "content": "Tell me a story."}]
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(tok, msgs)
    ids = render_prompt(tok, msgs, chat_template=TEMPLATE)
    assert tok.decode(ids) == "User: Tell me a story.\nAssistant:"
    full, n_prompt = render_prompt_response(tok, msgs, " Once upon a time.", chat_template=TEMPLATE)
    assert full[:n_prompt] == ids
    assert tok.decode(full[n_prompt:]).startswith(" Once upon a time.")
    assert full[-1] != ids[-1] and 2 in full[n_prompt:]  # the template closes the turn with </s>


@pytest.mark.skipif(not (PHI3 / "tokenizer_config.json").is_file(), reason="shared phi-3 tokenizer absent")
def test_chat_template_from_tokenizer():
    tok = AutoTokenizer.from_pretrained(PHI3)
    ids = render_prompt(tok, [{"role": "user", "content": "What is 2+2?"}])
    text = tok.decode(ids)
    assert "<|user|>" in text and text.rstrip().endswith("<|assistant|>")
    full, n = render_prompt_response(tok, [{"role": "user", "content": "What is 2+2?"}], "4")
    assert full[:n] == ids and "<|end|>" in tok.decode(full[n:])


def test_cpu_threads_restored_and_output_unchanged(tiny):
    """cpu_threads only changes torch's intra-op threads while generating: same tokens, restored after."""
    _, ours = tiny
    prompts = rand_prompts(5, 64, seed=4)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=1)
    before = torch.get_num_threads()
    auto = Sampler(ours, batch_size=2)                      # tiny model: "auto" picks 1 thread
    assert auto.cpu_threads == 1
    a = auto.generate(prompts, params)
    assert torch.get_num_threads() == before
    b = Sampler(ours, batch_size=2, cpu_threads=None).generate(prompts, params)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    with pytest.raises(ValueError, match="cpu_threads"):
        Sampler(ours, cpu_threads=0)


# --- KV-cache sizing (issue 12, item 1) ------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [4, 7, 128])
def test_chunked_cache_grows_as_used_and_changes_nothing(tiny, chunk):
    """The eager path's cache starts at one chunk and grows by chunks to what the longest live sequence needs:
    the tokens and log-probs are those of the static path (whole capacity up front), for ragged lengths and a chunk
    that divides nothing."""
    _, ours = tiny
    prompts = rand_prompts(9, 64, seed=5, lo=3, hi=30)
    params = SamplingParams(max_new_tokens=25, temperature=1.0, seed=1, return_logprobs=True)
    grow = Sampler(ours, batch_size=3)
    grow.KV_CHUNK = chunk
    sizes, out = [], []
    for g in grow.stream(prompts, params):
        out.append(g)
        sizes.append(grow.cache.max_len)
    sta = Sampler(ours, batch_size=3, static_decode=True).generate(prompts, params)
    out.sort(key=lambda g: g.index)
    assert [g.token_ids for g in out] == [g.token_ids for g in sta]
    for a, b in zip(out, sta):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=1e-5)
    full = max(map(len, prompts)) + params.max_new_tokens
    longest = max(len(p) + len(g.token_ids) for p, g in zip(prompts, out))       # positions ever written + 1
    assert grow.cache.max_len < full or chunk == 128 or longest + chunk > full
    assert grow.cache.max_len <= min(full, -(-longest // chunk) * chunk)          # never more than one chunk spare
    assert sizes == sorted(sizes)                                                 # grows, never reallocated down


def test_auto_batch_size_fills_the_free_memory():
    """generate.batch_size = auto on CUDA, with a fake free-memory number (no GPU needed)."""
    from spin_fast.model import KVCache
    from spin_fast.sampler import auto_batch_size
    from types import SimpleNamespace
    cfg = SimpleNamespace(num_layers=30, num_kv_heads=3, head_dim=64, vocab_size=49152, num_heads=9)   # SmolLM2-135M
    per_tok = KVCache.bytes_per_token(cfg, torch.bfloat16)
    assert per_tok == 2 * 30 * 3 * 64 * 2
    gib = 1 << 30
    n = auto_batch_size(cfg, torch.bfloat16, 768, 8 * gib)
    per_slot = per_tok * 768 + 6 * 4 * 49152 + 4 * 9 * 768
    assert n % 8 == 0 and n * per_slot <= 0.9 * 8 * gib < (n + 8) * per_slot
    assert auto_batch_size(cfg, torch.bfloat16, 768, 16 * gib) >= 2 * n - 8           # linear in the free memory
    assert auto_batch_size(cfg, torch.float32, 768, 8 * gib) < n                      # fp32 K/V: fewer slots
    assert auto_batch_size(cfg, torch.bfloat16, 768, 1 << 20) == 1                     # at least one slot
    assert auto_batch_size(cfg, torch.bfloat16, 16, 1 << 40) == 1024                   # capped
