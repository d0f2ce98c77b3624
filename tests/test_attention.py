"""attention.py: the dispatch never lands on SDPA's math kernel on CUDA; every path equals the dense-mask
reference (values and gradients) over GQA shapes (stories260K's 8/4, SmolLM2's 9/3, MHA, MQA) and ugly packs."""
import itertools
from pathlib import Path

import pytest
import torch

from spin_fast.attention import (SplitBounds, _causal, _split_causal, block_causal_mask, choose_attention_path, prepare_varlen,
                                 varlen_attention)

HEADS = [(8, 4), (9, 3), (4, 4), (6, 1)]                 # (H, KV): stories260K, SmolLM2-135M, MHA, MQA
PACKS = [[1], [7, 1, 19, 12], [5, 5, 5, 3], [2, 2], [33]]
TOL = {torch.float32: dict(atol=2e-6, rtol=2e-5), torch.float64: dict(atol=1e-12, rtol=1e-10)}


def sdpa_admissible_on_cuda(dtype, h, kv, d):
    """Which fused SDPA kernel torch's CUDA dispatcher (sdp_utils.cpp) admits for a mask-free causal call:
    flash (fp16/bf16, head_dim % 8 == 0 and <= 256, grouped KV heads allowed) or memory-efficient (fp32 too, but
    no grouped KV heads). None means the math kernel: O(H N^2) fp32 scores."""
    if dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256:
        return "flash"
    if h == kv and d % (8 if dtype != torch.float32 else 4) == 0:
        return "efficient"
    return None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_cuda_dispatch_never_selects_the_math_kernel(dtype, backend):
    for (h, kv), d, packed in itertools.product(HEADS + [(32, 8), (64, 8)], [8, 64, 128, 256, 320], [False, True]):
        kind, expand = choose_attention_path("cuda", dtype, h, kv, d, packed, backend)
        assert kind in ("flex", "causal", "split"), kind
        if kind == "flex":
            continue                                      # FlexAttention: a compiled Triton kernel, not SDPA
        # the SDPA call made: KV heads repeated to H when expand
        if d <= 256:
            assert sdpa_admissible_on_cuda(dtype, h, h if expand else kv, d), (dtype, h, kv, d, kind, expand)
        else:                                             # beyond flash: memory-efficient with full heads
            assert expand or h == kv
    # a packed call through flex stays flex; flash-attn when requested
    assert choose_attention_path("cuda", dtype, 9, 3, 64, True, "flex") == ("flex", False)
    assert choose_attention_path("cuda", dtype, 9, 3, 64, True, "flash") == ("flash_varlen", False)


def test_cpu_dispatch_keeps_sdpa_gqa():
    # CPU: SDPA's own enable_gqa (no repeated KV copy); packs split per sequence, never a dense mask
    assert choose_attention_path("cpu", torch.float32, 8, 4, 8, True, "sdpa") == ("split", False)
    assert choose_attention_path("cpu", torch.float32, 8, 4, 8, False, "sdpa") == ("causal", False)
    assert choose_attention_path("cuda", torch.float32, 8, 4, 8, True, "sdpa") == ("split", True)
    assert choose_attention_path("cuda", torch.bfloat16, 8, 4, 8, True, "sdpa") == ("split", False)


def reference(q, k, v, cu):
    """Dense block-diagonal causal softmax attention in the inputs' dtype: (N, H, D)."""
    n, h, d = q.shape
    g = h // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)                       # (N, H, D)
    s = torch.einsum("nhd,mhd->hnm", q, kk) / d ** 0.5                                  # (H, N, N)
    s = s.masked_fill(~block_causal_mask(cu, n), float("-inf"))
    return torch.einsum("hnm,mhd->nhd", s.softmax(-1), vv)


def qkv(lens, h, kv, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lens)
    mk = lambda heads: torch.randn(n, heads, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return mk(h), mk(kv), mk(kv), cu


def grads(out, inputs, seed=1):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * w).sum(), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("expand", [False, True])           # True: what CUDA runs where flash cannot (fp32)
@pytest.mark.parametrize("h,kv", HEADS)
@pytest.mark.parametrize("lens", PACKS, ids=str)
def test_split_and_causal_paths_equal_the_dense_reference(lens, h, kv, expand, dtype):
    d = 8
    q, k, v, cu = qkv(lens, h, kv, d, dtype)
    ref = reference(q, k, v, cu)
    if len(lens) == 1:
        t = lambda x: x.transpose(0, 1).unsqueeze(0)
        got = _causal(t(q), t(k), t(v), expand).squeeze(0).transpose(0, 1)
    else:
        got = _split_causal(q, k, v, SplitBounds(cu.tolist()), expand)
    torch.testing.assert_close(got, ref, **TOL[dtype])
    for a, b in zip(grads(got, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("h,kv", [(8, 4), (9, 3)])
def test_varlen_attention_with_prepared_bounds(backend, h, kv):
    lens = [7, 1, 19, 12]
    q, k, v, cu = (x.detach() for x in qkv(lens, h, kv, 16, torch.float32))   # (eager flex: no backward on CPU)
    ref = reference(q, k, v, cu)
    for cu_host in (None, cu.numpy()):                    # bounds read from the tensor, or given on the host
        prepared = prepare_varlen(cu, q.shape[0], backend, cu_host)
        got = varlen_attention(q, k, v, cu, max(lens), backend, prepared)
        torch.testing.assert_close(got, ref, atol=2e-6, rtol=2e-5)


def test_split_path_does_not_recompile_a_compiled_block_per_pack():
    # the per-pack host bounds must not become guards of a torch.compile'd block (one graph set for every pack)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def block(q, k, v, prepared):
        return varlen_attention(q * 1.5, k, v, None, None, "sdpa", prepared) + 1.0
    compiled = torch.compile(block, backend=counting_backend, dynamic=True)
    torch._dynamo.reset()
    outs = []
    for lens in ([7, 1, 19, 12], [3, 9], [5, 5, 5, 3, 2], [11, 4, 6]):
        q, k, v, cu = qkv(lens, 8, 4, 8, torch.float32)
        with torch.no_grad():
            got = compiled(q, k, v, prepare_varlen(cu, q.shape[0], "sdpa"))
            torch.testing.assert_close(got, reference(q * 1.5, k, v, cu) + 1.0, atol=2e-6, rtol=2e-5)
        outs.append(len(graphs))
    # graphs of the first pack (before / after the eager attention), then none for later packs
    assert outs[-1] == outs[0], outs
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the math-kernel ban is checked by torch there)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("h,kv,d", [(8, 4, 8), (9, 3, 64), (32, 8, 128)])
@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_cuda_runs_without_the_math_kernel(dtype, h, kv, d, backend):
    """On CUDA with SDPA's math kernel forbidden: a fallback raises instead of running silently."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for lens in ([300], [7, 1, 190, 120, 64, 64]):
        q, k, v, cu = qkv(lens, h, kv, d, dtype)
        q, k, v = (x.detach().cuda().requires_grad_(True) for x in (q, k, v))
        cu = cu.cuda()
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            got = varlen_attention(q, k, v, cu, max(lens), backend)
            g = grads(got, (q, k, v))
        ref = reference(*(x.detach().double().cpu() for x in (q, k, v)), cu.cpu())              # fp64 oracle
        tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.double().cpu(), ref, **tol)
        assert all(torch.isfinite(x).all() for x in g)


STORIES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "models" / "stories260K"


@pytest.mark.skipif(not (STORIES / "model.safetensors").is_file(), reason="shared stories260K absent")
def test_stories260k_packed_equals_transformers_per_sequence():
    # 8 query / 4 KV heads, head_dim 8: the packed split path against transformers' own per-sequence logits
    transformers = pytest.importorskip("transformers")
    from spin_fast.hf_io import load_model
    hf = transformers.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    ours = load_model(STORIES, attn_backend="sdpa")
    g = torch.Generator().manual_seed(0)
    lens = [13, 1, 40, 13, 13, 7]
    seqs = [torch.randint(0, 512, (n,), generator=g) for n in lens]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    with torch.no_grad():
        got = ours.logits(ours(torch.cat(seqs), torch.cat([torch.arange(n) for n in lens]), cu,
                               cu_seqlens_host=cu.tolist()))
        ref = torch.cat([hf(s[None]).logits[0] for s in seqs])
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
