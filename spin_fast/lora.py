"""LoRA SPIN: low-rank adapters on our own model's linear layers, with the frozen base as SPIN's reference.

    y = W x + b + (alpha / r) * B A dropout(x)        A (r, in) Kaiming-uniform(a=sqrt 5), B (out, r) zeros (as PEFT)

Only A and B train (the base has requires_grad False, so the optimizer, its state and the gradients hold adapter
parameters only: the memory saving). Adapters hang off the `Linear` modules as a `lora` submodule, so the base's
parameter names (what hf_io, FSDP and the checkpoints see) do not change; adapter names contain ".lora.".

The reference is the frozen base, so there is never a second model. In SPIN iteration t the reference is
pi_t = the opponent. With LoRA the opponent of iteration t is the model trained in iteration t-1 *with its adapters
merged* (W <- W + (alpha/r) B A): each iteration's training phase saves the merged weights as its HF folder
(merged_state_dict), and the next iteration loads that folder as its frozen base and attaches fresh adapters
(attach). With B = 0 at init the model with fresh adapters computes exactly W x: it IS pi_t, so the reference
cache pass (refcache) runs this same model as it is, before the first step, and the generation phase samples from
the merged folder. The merge happens at the iteration boundary (in the saved folder), never in the live model.

Targets are decoder-block projections only. The LM head is refused: the fused loss kernels read
`model.lm_head_weight` directly (and a tied head is the embedding), so an adapter there would be silently skipped.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from .errors import InputError

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALLOWED_TARGETS = ATTN_TARGETS + MLP_TARGETS
ADAPTER_MARK = ".lora."


class LoraAdapter(nn.Module):
    """The low-rank update (alpha / r) B A dropout(x) of one Linear (in -> out)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float,
                 generator: torch.Generator, device=None, dtype=None):
        super().__init__()
        self.rank, self.scale = rank, alpha / rank
        a = torch.empty(rank, in_features, dtype=torch.float32)
        # PEFT's init: kaiming_uniform_(a=sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in)); drawn on the CPU from a seeded
        # generator so every rank holds the same A (FSDP shards each rank's copy) whatever the device
        bound = 1.0 / math.sqrt(in_features)
        a.uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(a.to(device=device, dtype=dtype))                          # (r, in)
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:                                  # (N, in) -> (N, out)
        return (self.dropout(x) @ self.A.t() @ self.B.t()) * self.scale

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y += (alpha/r) B A dropout(x), in place: y (.., out) is the frozen base's fresh output (its backward
        saves nothing of it). One (N, out) buffer instead of four (B A x, its scaled copy, the sum): measured,
        the out-of-place form raised a step's peak RSS above full fine-tuning's (allocator high-water mark)."""
        h = self.dropout(x).reshape(-1, x.shape[-1]) @ self.A.t()                      # (N, r)
        y.view(-1, y.shape[-1]).addmm_(h, self.B.t(), alpha=self.scale)                 # (N, out)
        return y

    def delta(self) -> torch.Tensor:
        """(out, in): the dense update merged into W."""
        return (self.B @ self.A) * self.scale


def parse_targets(targets) -> list[str]:
    """['q_proj,v_proj', 'o_proj'] -> ['q_proj', 'v_proj', 'o_proj'] (commas split: names, not paths)."""
    out = []
    for t in targets:
        out += [s.strip() for s in str(t).split(",") if s.strip()]
    return out


def validate(lcfg, key: str = "train.lora") -> None:
    """Config-level checks (no model needed); InputError naming the key."""
    if not lcfg.rank:
        return
    if lcfg.rank < 0:
        raise InputError(f"config {key}.rank: must be >= 0 (0: LoRA off), got {lcfg.rank!r}")
    if not (math.isfinite(lcfg.alpha) and lcfg.alpha > 0):
        raise InputError(f"config {key}.alpha: must be > 0, got {lcfg.alpha!r}")
    if not 0 <= lcfg.dropout < 1:
        raise InputError(f"config {key}.dropout: must be in [0, 1), got {lcfg.dropout!r}")
    names = parse_targets(lcfg.targets)
    if not names:
        raise InputError(f"config {key}.targets: empty; allowed: {', '.join(ALLOWED_TARGETS)}")
    for n in names:
        if n not in ALLOWED_TARGETS:
            why = " (the LM head is read directly by the fused loss kernels: not a LoRA target)" \
                if n in ("lm_head", "embed_tokens") else ""
            raise InputError(f"config {key}.targets: {n!r} is not a LoRA target{why}; allowed: "
                             f"{', '.join(ALLOWED_TARGETS)}")


def enabled(lcfg) -> bool:
    return lcfg is not None and bool(lcfg.rank)


def attach(model, lcfg, seed: int = 0) -> list[str]:
    """Freeze every base parameter and give each targeted Linear of every block a fresh adapter (B = 0, so the
    model still computes the base exactly: the reference pi_t). Returns the adapted module names."""
    validate(lcfg)
    for p in model.parameters():
        p.requires_grad_(False)
    names, gen = set(parse_targets(lcfg.targets)), torch.Generator().manual_seed(int(seed))
    done = []
    for mname, mod in model.named_modules():
        leaf = mname.rsplit(".", 1)[-1]
        if leaf in names and hasattr(mod, "lora"):
            w = mod.weight
            mod.lora = LoraAdapter(mod.in_features, mod.out_features, lcfg.rank, lcfg.alpha, lcfg.dropout, gen,
                                   device=w.device, dtype=w.dtype)
            done.append(mname)
    if not done:
        raise InputError(f"config train.lora.targets: {sorted(names)} match no layer of this model; allowed: "
                         f"{', '.join(ALLOWED_TARGETS)}")
    return done


@torch.no_grad()
def init_sharded_(model, lcfg, seed: int = 0) -> None:
    """The adapters of a model attached on meta and sharded (hf_io.load_model_sharded, after to_empty: their
    storage is uninitialised): each rank's shard of A and B gets the rows of the values attach(whole model, seed)
    gives, by redrawing them in the same module order from the same seeded CPU generator. Adapters are tiny
    (r x (in + out) per layer), so one whole adapter at a time on the CPU is no whole model."""
    from .hf_io import shard_rows
    gen = torch.Generator().manual_seed(int(seed))
    for mod in model.modules():
        ad = getattr(mod, "lora", None)
        if ad is None:
            continue
        whole = LoraAdapter(ad.A.shape[1], ad.B.shape[0], lcfg.rank, lcfg.alpha, lcfg.dropout, gen)  # as attach
        for p, src in ((ad.A, whole.A), (ad.B, whole.B)):
            rows = shard_rows(p)
            local = p.to_local() if rows is not None else p
            local.copy_(src if rows is None else src[rows[0]:rows[1]])


def has_adapters(model) -> bool:
    return any(ADAPTER_MARK in n for n, _ in model.named_parameters())


def is_adapter_name(name: str) -> bool:
    return ADAPTER_MARK in name


def merged_state_dict(state: dict[str, torch.Tensor], lcfg) -> dict[str, torch.Tensor]:
    """Whole weights under our names with adapters (".lora.A"/".lora.B") -> plain weights, each targeted
    W <- W + (alpha/r) B A (computed in fp32, cast back to W's dtype): what the next iteration's opponent is."""
    scale = lcfg.alpha / lcfg.rank
    out = {n: t for n, t in state.items() if not is_adapter_name(n)}
    for n in state:
        if n.endswith(".lora.A"):
            mod = n[: -len(".lora.A")]
            a, b = state[n].float(), state[mod + ".lora.B"].float()           # (r, in), (out, r)
            w = out[mod + ".weight"]
            out[mod + ".weight"] = (w.float() + scale * (b @ a)).to(w.dtype)
    return out


@torch.no_grad()
def merge_(model, lcfg) -> None:
    """In place: fold every adapter into its base weight and drop it (a whole, unsharded model)."""
    for mod in model.modules():
        if getattr(mod, "lora", None) is not None:
            mod.weight.add_(mod.lora.delta().to(mod.weight.dtype))
            mod.lora = None


def save_peft(state: dict[str, torch.Tensor], lcfg, model_cfg, out_dir, base_model: str | None = None) -> Path:
    """The adapters in PEFT's format (adapter_config.json + adapter_model.safetensors, keys as
    `base_model.model.<checkpoint module>.lora_A.weight`) for loading onto the iteration's starting model (the
    frozen base) with peft.PeftModel.from_pretrained. Refused for modules the checkpoint stores fused (Phi-3's
    qkv_proj / gate_up_proj): PEFT would need their fused names and shapes."""
    from safetensors.torch import save_file

    from .families import checkpoint_sources
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = [n[: -len(".lora.A")] + ".weight" for n in state if n.endswith(".lora.A")]
    srcs = checkpoint_sources(model_cfg, weights)
    tensors, targets = {}, set()
    for w in weights:
        ck, _, end = srcs[w]
        if end != -1:
            raise InputError(f"config train.lora.save_peft: {w} is stored fused as {ck} in this family's "
                             f"checkpoint; PEFT's format is not supported for it (set save_peft: false)")
        mod = w[: -len(".weight")]
        peft = "base_model.model." + ck[: -len(".weight")]
        tensors[peft + ".lora_A.weight"] = state[mod + ".lora.A"].detach().float().cpu().contiguous()
        tensors[peft + ".lora_B.weight"] = state[mod + ".lora.B"].detach().float().cpu().contiguous()
        targets.add(mod.rsplit(".", 1)[-1])
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": lcfg.rank, "lora_alpha": lcfg.alpha, "lora_dropout": lcfg.dropout,
            "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None}
    (out_dir / "adapter_config.json").write_text(json.dumps(conf, indent=2))
    return out_dir
