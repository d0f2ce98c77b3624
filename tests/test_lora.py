"""LoRA SPIN (spin_fast/lora.py): the adapters' step gradient is autograd of the naive SPIN loss through the same LoRA
model, only adapters move, merged == unmerged forward, 2 gloo ranks (FSDP2, frozen base + trainable adapters in one
group) train what one process does, the merged HF folder and the PEFT-format adapter load in transformers / peft
with our logits. No ../shared needed (the demo's tiny model)."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from spin_fast import demo, lora
from spin_fast.config import LoraCfg, load_config
from spin_fast.errors import InputError

from helpers import demo_model_and_pairs, train_pairs_cli
from test_refcache import tiny_model
from test_trainer import build, cfg_for, naive_step_loss


def lcfg(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj", "o_proj", "down_proj", "gate_proj")):
    return LoraCfg(rank=rank, alpha=alpha, dropout=dropout, targets=list(targets))


def nonzero_b(model, seed=5):
    """B = 0 at init makes every adapter invisible; a random B so a wrong formula cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".lora.B"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def test_config_keys_and_errors():
    c = load_config(None, ["--train.lora.rank", "8", "--train.lora.targets", "q_proj,v_proj", "--train.lora.alpha",
                           "4"])
    assert c.train.lora.rank == 8 and lora.parse_targets(c.train.lora.targets) == ["q_proj", "v_proj"]
    assert load_config(None, []).train.lora.rank == 0                               # off by default
    for bad, key in [(["--train.lora.targets", "lm_head"], "train.lora.targets"),
                     (["--train.lora.targets", "qproj"], "train.lora.targets"),
                     (["--train.lora.alpha", "0"], "train.lora.alpha"),
                     (["--train.lora.dropout", "1"], "train.lora.dropout"),
                     (["--train.lora.rank", "-1"], "train.lora.rank")]:
        with pytest.raises(InputError, match=key.replace(".", r"\.")) as e:
            load_config(None, ["--train.lora.rank", "4", *bad] if "rank" not in bad[0] else bad)
        assert "q_proj" in str(e.value) or "rank" in key or "alpha" in key or "dropout" in key


def test_fresh_adapters_are_the_base_and_merge_equals_unmerged():
    base = tiny_model(seed=0)
    model = copy.deepcopy(base)
    names = lora.attach(model, lcfg())
    assert len(names) == 2 * 5 and all(not p.requires_grad for n, p in model.named_parameters()
                                       if not lora.is_adapter_name(n))
    ids, pos = torch.randint(0, 256, (23,)), torch.arange(23)
    with torch.no_grad():
        # B = 0: the model with fresh adapters IS the base (the reference pi_t): bitwise
        assert torch.equal(model(ids, pos), base(ids, pos))
        nonzero_b(model)
        unmerged = model(ids, pos)
        assert (unmerged - base(ids, pos)).abs().max() > 1e-3
        state = lora.merged_state_dict({n: p.detach() for n, p in model.named_parameters()}, lcfg())
        merged = copy.deepcopy(base)
        merged.load_state_dict(state, strict=False)
        assert set(state) == {n for n, _ in base.named_parameters()}
        torch.testing.assert_close(merged(ids, pos), unmerged, atol=1e-5, rtol=1e-5)
        lora.merge_(model, lcfg())
        torch.testing.assert_close(model(ids, pos), unmerged, atol=1e-5, rtol=1e-5)
        assert not lora.has_adapters(model)


@pytest.mark.parametrize("micro_batch_tokens", [600, 200])
def test_lora_step_gradient_is_autograd_of_naive_loss_and_only_adapters_move(tmp_path, micro_batch_tokens):
    cfg = cfg_for(micro_batch_tokens=micro_batch_tokens)
    model = tiny_model(seed=0)
    lora.attach(model, lcfg(), seed=1)
    nonzero_b(model)                                    # else dL/dA = 0 and the A half of the check is empty
    trainer, pairs = build(tmp_path, cfg, model=model, ref_model=tiny_model(seed=1))
    assert all(lora.is_adapter_name(n) for g in trainer.optimizer.param_groups for p in g["params"]
               for n, q in model.named_parameters() if q is p)       # the optimizer holds adapters only
    step = trainer.steps[0]
    vec = sum(trainer.task.micro_batch(trainer.model, mb, len(step.units)) for mb in step.micro_batches[0])
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == {n for n, _ in model.named_parameters() if lora.is_adapter_name(n)}

    oracle = copy.deepcopy(model).double()
    oracle.init_rope()
    oracle.zero_grad(set_to_none=True)
    loss = naive_step_loss(oracle, trainer.task.ref_chosen.double(), trainer.task.ref_rejected.double(), pairs,
                           step.units.tolist(), cfg.beta)
    loss.backward()
    torch.testing.assert_close(vec[0].double(), loss.detach(), atol=1e-5, rtol=1e-5)
    for n, p in oracle.named_parameters():
        if lora.is_adapter_name(n):
            assert p.grad.abs().max() > 0, n
            torch.testing.assert_close(got[n].double(), p.grad, atol=2e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.optimizer.step()
    for n, p in model.named_parameters():
        if lora.is_adapter_name(n):
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n                          # the base: bitwise unchanged


# --- the real path: spin_fast.train, 1 process and 2 gloo ranks (FSDP2) -------------------------------------------

ARGS = ["--max-length", "40", "--max-prompt-length", "24", "--tokens-per-step", "180", "--micro-batch-tokens", "80",
        "--lr", "1e-2", "--train.warmup_ratio", "0", "--train.optimizer", "adamw", "--train.max_steps", "3",
        "--train.log_every", "2", "--train.progress", "false", "--train.lora.rank", "4", "--train.lora.alpha", "8",
        "--train.lora.targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "--train.lora.save_peft", "true"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    model, pairs = demo_model_and_pairs(root, 24)
    train_pairs_cli(model, pairs, root / "one", 1, ARGS)
    train_pairs_cli(model, pairs, root / "two", 2, ARGS)
    return root


@pytest.mark.slow
def test_two_ranks_fsdp2_lora_equal_one_process_and_save_merged(runs):
    start, one, two = (load_file(str(runs / d / "model.safetensors")) for d in ("model", "one", "two"))
    assert set(one) == set(start) and not any(".lora" in k for k in one)    # plain HF weights, merged
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    assert moved > 1e-3, moved
    untouched = [k for k in one if "norm" in k or "embed" in k]
    assert untouched and all(torch.equal(one[k], start[k]) for k in untouched)   # frozen: not targets
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    assert diff <= 1e-6, (diff, moved)


@pytest.mark.slow
def test_merged_folder_and_peft_adapter_load_with_equal_logits(runs):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    from spin_fast.hf_io import load_model
    cfg = json.loads((runs / "one" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and "q_proj" in cfg["target_modules"]
    keys = load_file(str(runs / "one" / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    vocab = json.loads((runs / "model" / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (1, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged_hf = AutoModelForCausalLM.from_pretrained(str(runs / "one"), dtype=torch.float32).eval()
        base = AutoModelForCausalLM.from_pretrained(str(runs / "model"), dtype=torch.float32)
        with_adapter = peft.PeftModel.from_pretrained(base, str(runs / "one" / "adapter")).eval()
        ours = load_model(runs / "one", dtype=torch.float32)
        z_ours = ours.logits(ours(ids[0], torch.arange(17)))                        # (17, V)
        z_merged = merged_hf(ids).logits[0]
        z_peft = with_adapter(ids).logits[0]
        z_base = load_model(runs / "model", dtype=torch.float32)
        z_base = z_base.logits(z_base(ids[0], torch.arange(17)))
    assert (z_ours - z_base).abs().max() > 1e-4                 # the adapter changed the logits: the test can fail
    torch.testing.assert_close(z_merged, z_ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z_peft, z_ours, atol=1e-4, rtol=1e-4)


# --- the SPIN loop with LoRA: generate -> cache -> train -> save, twice -------------------------------------------

@pytest.mark.slow
def test_loop_with_lora_two_iterations(tmp_path):
    """Iteration 1's base and reference is iteration 0's merged folder: its first step is ln 2 (fresh adapters,
    B = 0, against a cache of the same model), only targeted weights move, every folder reloads in transformers."""
    from transformers import AutoModelForCausalLM
    tok = demo.build_tokenizer(tmp_path / "model")
    demo.init_model(tmp_path / "model", tok, hidden=32, layers=2, heads=4, seed=0)
    rows = demo.write_jsonl(tmp_path / "rows.jsonl", demo.make_rows(40, seed=0))
    out = tmp_path / "out"
    argv = ["--model", str(tmp_path / "model"), "--data.sft", str(rows), "--output", str(out),
            "--loop.iterations", "2", "--loop.heldout", "8", "--generate.max_new_tokens", "12", "--max-length", "40",
            "--max-prompt-length", "24", "--tokens-per-step", "400", "--micro-batch-tokens", "400", "--lr", "1e-2",
            "--train.optimizer", "adamw", "--train.warmup_ratio", "0", "--train.progress", "false",
            "--generate.batch_size", "16", "--train.lora.rank", "4", "--train.lora.targets", "q_proj,v_proj,down_proj",
            "--train.lora.save_peft", "true"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env.pop("SPIN_FAST_FAULT", None)
    r = subprocess.run([sys.executable, "-m", "spin_fast.train", *argv], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    w = [load_file(str(d / "model.safetensors")) for d in (tmp_path / "model", out / "iter0", out / "iter1")]
    for t in (0, 1):
        first = json.loads((out / f"iter{t}" / "metrics.jsonl").read_text().splitlines()[0])
        assert first["loss"] == pytest.approx(0.6931, abs=1e-4)             # the reference = the frozen base
        assert (out / f"iter{t}" / "adapter" / "adapter_model.safetensors").is_file()
        moved = {k for k in w[t] if not torch.equal(w[t][k], w[t + 1][k])}
        assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for k in moved)
        AutoModelForCausalLM.from_pretrained(str(out / f"iter{t}"))              # a plain HF folder
