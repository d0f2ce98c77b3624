"""A first GPU run that cannot fail silently, tested on CPU by simulating the failures through our own hooks:
impl="auto" falls back to the chunked torch path (one warning, recorded) when the Triton kernels fail to compile or
launch, explicit impl="triton" still raises; the sampler's CUDA-graph decode falls back to eager decode (one
warning, recorded) when capture or replay fails, explicit cuda_graphs=True still raises."""
import warnings

import pytest
import torch

from spin_fast.kernels import dispatch, linear_logprobs, loss_impl_report, spin_loss_from_hidden

from helpers import needs_triton, random_packed_batch


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """A process that has not probed Triton yet, whose tensors count as CUDA for impl='auto'."""
    monkeypatch.setattr(dispatch, "_fallback_reason", None)
    monkeypatch.setattr(dispatch, "_probed_ok", set())
    monkeypatch.setattr(dispatch, "_auto_wants_triton", lambda t: True)
    return monkeypatch


def inputs(n=13, h=24, v=37, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::4] = -100
    return hidden, weight, targets


def grads(impl, hidden, weight, targets):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    out = linear_logprobs(h, w, targets, impl=impl)
    out.sum().backward()
    return out.detach(), h.grad, w.grad


@needs_triton
def test_auto_falls_back_to_torch_once_and_records_why(fresh_dispatch):
    from spin_fast.kernels import triton_logprobs

    def broken(*a, **k):
        raise RuntimeError("simulated: PTX assembly aborted due to errors\nmore lines")
    fresh_dispatch.setattr(triton_logprobs, "triton_logprobs_forward", broken)
    hidden, weight, targets = inputs()
    with pytest.warns(RuntimeWarning, match="chunked torch path") as rec:
        out, dh, dw = grads("auto", hidden, weight, targets)
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    base, bdh, bdw = grads("torch", hidden, weight, targets)
    assert torch.equal(out, base) and torch.equal(dh, bdh) and torch.equal(dw, bdw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # once per process: no second warning, no second probe
        grads("auto", hidden, weight, targets)
        s = random_packed_batch(3, 1, 9, 24, 37, torch.float32, seed=1)
        ref = torch.zeros(3)
        spin_loss_from_hidden(s["hidden"], s["weight"], s["targets"], s["seq_index"], s["chosen_index"],
                              s["rejected_index"], ref, ref, num_sequences=s["num_sequences"], impl="auto")
    rep = loss_impl_report("auto", "cuda")
    assert rep["requested"] == "auto" and rep["used"] == "torch"
    assert rep["fallback_reason"] == "RuntimeError: simulated: PTX assembly aborted due to errors"
    assert loss_impl_report("auto", "cpu") == {"requested": "auto", "used": "torch",
                                               "fallback_reason": rep["fallback_reason"]}
    fresh_dispatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="simulated"):  # an explicit choice is never caught
        linear_logprobs(hidden, weight, targets, impl="triton")


@needs_triton
def test_auto_uses_triton_when_the_probe_passes(fresh_dispatch):
    fresh_dispatch.setenv("TRITON_INTERPRET", "1")       # the kernels run in the interpreter on CPU
    calls = []
    real = dispatch._probe_triton
    fresh_dispatch.setattr(dispatch, "_probe_triton", lambda *a: (calls.append(1), real(*a))[1])
    hidden, weight, targets = inputs(n=9, h=16, v=21)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, dh, dw = grads("auto", hidden, weight, targets)
        grads("auto", hidden, weight, targets)
    assert len(calls) == 1                                # one probe per (dtype, H, V, softcap)
    ref, rdh, rdw = grads("triton", hidden, weight, targets)
    assert torch.equal(out, ref) and torch.equal(dh, rdh) and torch.equal(dw, rdw)
    assert loss_impl_report("auto", "cuda") == {"requested": "auto", "used": "triton"}
    assert loss_impl_report("torch", "cuda") == {"requested": "torch", "used": "torch"}


def test_auto_on_cpu_never_probes(monkeypatch):
    monkeypatch.setattr(dispatch, "_probe_triton", lambda *a: pytest.fail("probed on CPU"))
    hidden, weight, targets = inputs()
    out, _, _ = grads("auto", hidden, weight, targets)
    assert torch.equal(out, grads("torch", hidden, weight, targets)[0])


# ---- the sampler: CUDA-graph decode -> eager ------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from spin_fast.hf_io import load_model
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, eos_token_id=[2], bos_token_id=1)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return load_model(folder)


class BrokenReplay:
    def replay(self):
        raise RuntimeError("simulated: operation not permitted when stream is capturing")


@pytest.mark.parametrize("where", ["capture", "replay"])
def test_graph_decode_falls_back_to_eager(tiny_model, monkeypatch, where):
    from spin_fast import sampler as sm
    monkeypatch.setattr(sm, "_GRAPH_WARNED", False)
    monkeypatch.setattr(sm.Sampler, "_graphs_possible", lambda self: True)     # as on a CUDA model

    def capture(self, params):
        if where == "capture":
            raise RuntimeError("simulated: CUDA graph capture failed")
        return BrokenReplay()
    monkeypatch.setattr(sm.Sampler, "_capture", capture)
    prompts = [[1, 5, 9, 4], [1, 7], [1, 3, 3, 8, 11, 6]]
    params = sm.SamplingParams(max_new_tokens=6, temperature=1.0, seed=3, return_logprobs=True)
    s = sm.Sampler(tiny_model, batch_size=2)
    assert s.use_graphs and s.graph_report() == {"requested": "auto", "used": "cuda_graph"}
    with pytest.warns(RuntimeWarning, match="decoding eagerly"):
        got = s.generate(prompts, params)
    rep = s.graph_report()
    assert rep["used"] == "eager" and rep["fallback_reason"].startswith(f"{where}: RuntimeError: simulated")
    want = sm.Sampler(tiny_model, batch_size=2, static_decode=True).generate(prompts, params)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # once: a second sampler's failure is recorded, not re-warned
        s2 = sm.Sampler(tiny_model, batch_size=2)
        assert [g.token_ids for g in s2.generate(prompts, params)] == [g.token_ids for g in want]
        assert s2.graph_report()["used"] == "eager"


def test_explicit_cuda_graphs_still_raise(tiny_model, monkeypatch):
    from spin_fast import sampler as sm
    monkeypatch.setattr(sm.Sampler, "_graphs_possible", lambda self: True)
    s = sm.Sampler(tiny_model, batch_size=2, cuda_graphs="auto")
    s.graphs_requested = True                            # as Sampler(cuda_graphs=True) on a CUDA model

    def capture(self, params):
        raise RuntimeError("simulated capture failure")
    monkeypatch.setattr(sm.Sampler, "_capture", capture)
    with pytest.raises(RuntimeError, match="simulated capture failure"):
        s.generate([[1, 4, 5]], sm.SamplingParams(max_new_tokens=3))
