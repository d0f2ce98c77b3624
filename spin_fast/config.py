"""The run configuration: one typed dataclass tree, loaded from YAML and overridden from the command line.

    cfg = load_config("cfg.yaml", ["--train.lr=1e-6", "--data.max_length", "512", "--model", "DIR"])

Every field carries its documentation in `metadata["help"]`; `python -m spin_fast.train --help-config` prints the
reference (the README's config table is generated from it). Errors name the offending key: an unknown key (with the
closest known one), a value of the wrong type, or a value out of range (`Config.validate`).

Short flags of the training-only entry point map onto keys (see ALIASES): `--model DIR` is `--model.path DIR`,
`--pairs FILE` is `--data.pairs FILE`, `--lr` is `--train.lr`, ...
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelCfg:
    path: str | None = _f(None, "Hugging Face model folder of the starting model (the first opponent)")
    dtype: str = _f("float32", "master weight dtype (float32 | bfloat16); the optimizer state has this dtype")
    mixed_precision: str = _f("auto", "compute dtype of forward/backward: auto (bfloat16 on CUDA, float32 on CPU) | "
                                      "bfloat16 | float32; gradients are reduced in float32")
    attn_backend: str = _f("auto", "packed attention: auto | sdpa | flex | flash")
    save_dtype: str = _f("auto", "dtype of saved HF folders: auto (the starting model's) | float32 | bfloat16")


@dataclass
class DataCfg:
    sft: list[str] = _f([], "the SFT data of the SPIN loop: ultrachat-schema rows (`messages` ending on the human "
                            "answer), jsonl/json/parquet files or datasets folders")
    pairs: list[str] = _f([], "training-phase only (no generation): pairs in SPIN's real/generated schema or "
                              "prompt/chosen/rejected (or ultrachat `messages` rows + data.generated)")
    generated: list[str] = _f([], "spin_fast.generate output files holding the rejected responses of `messages` rows")
    max_length: int = _f(1024, "max tokens of prompt + response (SPIN's max_length); longer responses are cut")
    max_prompt_length: int = _f(512, "max prompt tokens; longer prompts keep their end (SPIN's max_prompt_length)")
    chat_template: str | None = _f(None, "Jinja chat template for tokenizers without one")
    skip_bad_rows: bool = _f(False, "skip and count invalid rows instead of stopping at the first")


@dataclass
class LoraCfg:
    rank: int = _f(0, "LoRA rank r of every adapter (0: off, full fine-tuning); the base is frozen and is SPIN's "
                      "reference, so there is never a second model (see spin_fast/lora.py)")
    alpha: float = _f(16.0, "LoRA alpha: the update is (alpha / rank) B A x")
    dropout: float = _f(0.0, "dropout on the adapters' input in [0, 1) (training only)")
    targets: list[str] = _f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                            "decoder-block linear layers given adapters (any of q_proj k_proj v_proj o_proj "
                            "gate_proj up_proj down_proj; commas split names); lm_head is refused")
    save_peft: bool = _f(False, "also write the adapters in PEFT's format (OUTPUT/.../adapter/: adapter_config.json "
                                "+ adapter_model.safetensors) for the iteration's starting model; the HF folder "
                                "always holds the merged weights")


@dataclass
class TrainCfg:
    beta: float = _f(0.1, "SPIN/DPO inverse temperature beta (> 0)")
    loss_type: str = _f("sigmoid", "sigmoid (SPIN's logistic loss) | hinge")
    rpo_alpha: float = _f(0.0, "weight alpha of iterative RPO's NLL term (Pang et al. 2024, eq. 1; their alpha = 1): "
                               "each pair adds alpha * (-log pi(y|x) / |y|) of its human answer; 0: SPIN's loss alone")
    optimizer: str = _f("rmsprop", "rmsprop (the paper's) | adamw")
    lr: float = _f(5e-7, "peak learning rate (> 0)")
    weight_decay: float = _f(0.0, "decoupled (AdamW) / L2 (RMSprop) weight decay")
    adam_betas: list[float] = _f([0.9, 0.999], "AdamW betas")
    rmsprop_alpha: float = _f(0.99, "RMSprop smoothing constant")
    eps: float = _f(1e-8, "optimizer epsilon")
    lr_schedule: str = _f("linear", "linear | cosine | constant, after warmup (decays to 0 at the last step)")
    warmup_ratio: float = _f(0.1, "fraction of the steps with linear warmup from 0, in [0, 1)")
    epochs: int = _f(1, "passes over the pairs per iteration")
    max_steps: int = _f(-1, "stop after this many optimizer steps (-1: all epochs)")
    tokens_per_step: int = _f(65536, "global batch: prompt+chosen+rejected tokens per optimizer step over all ranks "
                                     "(pairs are added in shuffled order until the next would exceed it); set this "
                                     "or train.pairs_per_step, not both")
    pairs_per_step: int = _f(0, "global batch in pairs (the paper's 64), instead of train.tokens_per_step: every step "
                                "holds exactly this many pairs over all ranks, the last of an epoch the remainder "
                                "(merged into the one before when smaller than the world size); 0: off")
    micro_batch_tokens: int = _f(0, "tokens per packed micro-batch per rank (gradient accumulation fills the step "
                                    "with micro-batches of at most this many); 0 or auto: the smallest power of two "
                                    ">= 2 * data.max_length (the longest possible pair)")
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this (0: no clipping, norm still logged)")
    activation_checkpointing: bool = _f(False, "recompute each decoder block in backward: only block inputs are "
                                               "kept (SmolLM2-135M fp32: a step's peak RSS ~4.2 -> ~2.7 GiB, ~20% "
                                               "more CPU time)")
    compile: bool = _f(False, "torch.compile each decoder block")
    impl: str = _f("auto", "loss kernel: auto (triton on CUDA, chunked torch on CPU) | triton | torch | reference")
    logits_budget_mib: int = _f(64, "chunked kernel: MiB of fp32 logits live at once")
    log_every: int = _f(10, "steps between metric flushes (the only host syncs of the loop; one JSONL row per step)")
    tensorboard: bool = _f(False, "also write TensorBoard events to OUTPUT/tb (needs the tensorboard package)")
    progress: bool = _f(True, "tqdm progress bar on rank 0")
    checkpoint_every: int = _f(0, "save a resumable checkpoint (DCP) every this many steps (0: only phase ends)")
    max_bad_steps: int = _f(0, "steps with a non-finite loss or grad norm tolerated per phase (their gradient is "
                               "zeroed on device: no update with RMSprop, momentum only with AdamW); one more stops "
                               "the phase naming the step (0: the first one stops it)")
    lora: LoraCfg = field(default_factory=LoraCfg, metadata={"help": "LoRA SPIN (train.lora.rank > 0)"})


@dataclass
class GenerateCfg:
    max_new_tokens: int = _f(256, "tokens sampled per response (the paper's 256)")
    temperature: float = _f(1.0, "sampling temperature (0: greedy)")
    top_p: float = _f(1.0, "nucleus sampling mass in (0, 1]")
    top_k: int = _f(0, "top-k sampling (0: off)")
    batch_size: int = _f(64, "KV-cache slots per rank (continuous batching); 0 or auto: on CUDA as many as the free "
                             "GPU memory holds (sampler.auto_batch_size), on CPU 64")
    dtype: str = _f("auto", "sampling dtype: auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16")


@dataclass
class SftCfg:
    epochs: int = _f(0, "epochs of supervised fine-tuning before iteration 0 (0: none; the demo trains from scratch); "
                        "with sft.early_stopping_patience, the most epochs")
    lr: float = _f(1e-3, "SFT peak learning rate")
    optimizer: str = _f("adamw", "adamw | rmsprop")
    lr_schedule: str = _f("cosine", "linear | cosine | constant")
    warmup_ratio: float = _f(0.05, "fraction of SFT steps with warmup")
    tokens_per_step: int = _f(65536, "global tokens per SFT optimizer step; set this or sft.examples_per_step")
    examples_per_step: int = _f(0, "global SFT examples per optimizer step, instead of sft.tokens_per_step (0: off)")
    heldout: int = _f(0, "rows of data.sft held out of all training (OUTPUT/data/sft_heldout.jsonl, drawn with the "
                         "seed, disjoint from loop.heldout): the SFT phase's held-out loss after every epoch (0: none)")
    early_stopping_patience: int = _f(0, "stop SFT once the held-out loss has not improved by more than "
                                         "sft.early_stopping_min_delta for this many epochs in a row, and keep the "
                                         "weights of the epoch with the lowest held-out loss; needs sft.heldout "
                                         "(0: off, all sft.epochs run)")
    early_stopping_min_delta: float = _f(0.0, "the smallest fall of the held-out loss (nats per response token) that "
                                              "counts as an improvement for sft.early_stopping_patience")


@dataclass
class LoopCfg:
    iterations: int = _f(3, "SPIN iterations t = start_iteration .. iterations-1")
    start_iteration: int = _f(0, "first iteration to run (its opponent: OUTPUT/iter{t-1}, or model.path for 0)")
    mix_previous: bool = _f(False, "train iteration t on the pairs of t and t-1 (the paper's iterations >= 1)")
    heldout: int = _f(64, "SFT rows held out of training: the discriminator check (and the demo's accuracy)")
    convergence_threshold: float = _f(0.0, "stop when the held-out mean margin falls below this (the opponent "
                                           "can no longer be told from the data; 0: never stop early)")
    continued_sft_baseline: bool = _f(False, "also train continued SFT for the same tokens per iteration (ablation)")
    continued_sft_lr: float = _f(0.0, "peak lr of the continued-SFT baseline (0: sft.lr, the SFT phase's own; "
                                      "train.lr's value gives the equal-lr comparison with SPIN)")

@dataclass
class DemoCfg:
    task: str = _f("hmm", "the built-in demo's task (no model, no data given): hmm (a sparse hidden Markov model, "
                          "p_data known exactly, many valid answers) | exact_match (string transformations)")


@dataclass
class Config:
    model: ModelCfg = field(default_factory=ModelCfg, metadata={"help": "the starting model"})
    data: DataCfg = field(default_factory=DataCfg, metadata={"help": "the training pairs"})
    train: TrainCfg = field(default_factory=TrainCfg, metadata={"help": "the training phase"})
    generate: GenerateCfg = field(default_factory=GenerateCfg, metadata={"help": "the generation phase"})
    sft: SftCfg = field(default_factory=SftCfg, metadata={"help": "an optional SFT phase before iteration 0"})
    loop: LoopCfg = field(default_factory=LoopCfg, metadata={"help": "the SPIN loop"})
    demo: DemoCfg = field(default_factory=DemoCfg, metadata={"help": "the built-in demo (spin_fast.demo_run)"})
    output: str | None = _f(None, "output folder: HF model, metrics.jsonl, summary.json, reference cache")
    seed: int = _f(0, "seed of the data order (and of sampling, in the loop)")
    device: str = _f("auto", "auto (cuda:LOCAL_RANK when available, else cpu) | cpu | cuda")
    ref_cache: str | None = _f(None, "reference log-prob cache file (default OUTPUT/ref_logps.safetensors)")
    resume: bool = _f(False, "continue from the last complete state in OUTPUT (any phase, any iteration); refused "
                             "when a key that changes what was computed differs from OUTPUT/manifest.json")
    resume_force: bool = _f(False, "with resume: continue even though such keys differ (the change is recorded in "
                                   "manifest.json)")

    def validate(self) -> "Config":
        """Range and choice checks; InputError naming the key."""
        t, d, m = self.train, self.data, self.model

        def need(ok: bool, key: str, what: str, value):
            if not ok:
                raise InputError(f"config {key}: {what}, got {value!r}")

        choices = {"model.dtype": (m.dtype, ("float32", "bfloat16")),
                   "model.mixed_precision": (m.mixed_precision, ("auto", "bfloat16", "float32")),
                   "model.attn_backend": (m.attn_backend, ("auto", "sdpa", "flex", "flash")),
                   "model.save_dtype": (m.save_dtype, ("auto", "float32", "bfloat16")),
                   "train.loss_type": (t.loss_type, ("sigmoid", "hinge")),
                   "train.optimizer": (t.optimizer, ("rmsprop", "adamw")),
                   "train.lr_schedule": (t.lr_schedule, ("linear", "cosine", "constant")),
                   "train.impl": (t.impl, ("auto", "triton", "torch", "reference")),
                   "device": (self.device, ("auto", "cpu", "cuda"))}
        for key, (v, allowed) in choices.items():
            need(v in allowed, key, f"must be one of {allowed}", v)
        g, sft, lp = self.generate, self.sft, self.loop
        choices.update({"generate.dtype": (g.dtype, ("auto", "float32", "bfloat16")),
                        "sft.optimizer": (sft.optimizer, ("rmsprop", "adamw")),
                        "sft.lr_schedule": (sft.lr_schedule, ("linear", "cosine", "constant"))})
        for key, (v, allowed) in choices.items():
            need(v in allowed, key, f"must be one of {allowed}", v)
        need(g.max_new_tokens >= 1, "generate.max_new_tokens", "must be >= 1", g.max_new_tokens)
        need(g.temperature >= 0, "generate.temperature", "must be >= 0", g.temperature)
        need(0 < g.top_p <= 1, "generate.top_p", "must be in (0, 1]", g.top_p)
        need(g.top_k >= 0, "generate.top_k", "must be >= 0", g.top_k)
        need(g.batch_size >= 0, "generate.batch_size", "must be >= 1 (0 or auto: sized to the free memory)",
             g.batch_size)
        need(sft.epochs >= 0, "sft.epochs", "must be >= 0", sft.epochs)
        need(sft.lr > 0, "sft.lr", "must be > 0", sft.lr)
        need(0 <= sft.warmup_ratio < 1, "sft.warmup_ratio", "must be in [0, 1)", sft.warmup_ratio)
        need(sft.heldout >= 0, "sft.heldout", "must be >= 0", sft.heldout)
        need(sft.early_stopping_patience >= 0, "sft.early_stopping_patience", "must be >= 0 (0: off)",
             sft.early_stopping_patience)
        need(math.isfinite(sft.early_stopping_min_delta) and sft.early_stopping_min_delta >= 0,
             "sft.early_stopping_min_delta", "must be finite and >= 0", sft.early_stopping_min_delta)
        need(lp.iterations >= 1, "loop.iterations", "must be >= 1", lp.iterations)
        need(0 <= lp.start_iteration < lp.iterations, "loop.start_iteration",
             f"must be in [0, loop.iterations={lp.iterations})", lp.start_iteration)
        need(lp.heldout >= 0, "loop.heldout", "must be >= 0", lp.heldout)
        need(math.isfinite(lp.continued_sft_lr) and lp.continued_sft_lr >= 0, "loop.continued_sft_lr",
             "must be finite and >= 0 (0: sft.lr)", lp.continued_sft_lr)
        need(lp.convergence_threshold >= 0, "loop.convergence_threshold", "must be >= 0", lp.convergence_threshold)
        need(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0", t.checkpoint_every)
        need(t.max_bad_steps >= 0, "train.max_bad_steps", "must be >= 0", t.max_bad_steps)
        need(t.beta > 0, "train.beta", "must be > 0", t.beta)
        from .lora import validate as validate_lora
        validate_lora(t.lora)
        need(math.isfinite(t.rpo_alpha) and t.rpo_alpha >= 0, "train.rpo_alpha", "must be finite and >= 0",
             t.rpo_alpha)
        need(t.lr > 0, "train.lr", "must be > 0", t.lr)
        need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0", t.weight_decay)
        need(len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas), "train.adam_betas",
             "must be two numbers in [0, 1)", t.adam_betas)
        need(0 <= t.rmsprop_alpha < 1, "train.rmsprop_alpha", "must be in [0, 1)", t.rmsprop_alpha)
        need(t.eps > 0, "train.eps", "must be > 0", t.eps)
        need(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)", t.warmup_ratio)
        need(t.epochs >= 1, "train.epochs", "must be >= 1", t.epochs)
        need(t.max_steps == -1 or t.max_steps >= 1, "train.max_steps", "must be -1 or >= 1", t.max_steps)
        need(t.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0", t.max_grad_norm)
        need(t.log_every >= 1, "train.log_every", "must be >= 1", t.log_every)
        need(t.logits_budget_mib >= 1, "train.logits_budget_mib", "must be >= 1", t.logits_budget_mib)
        need(d.max_length >= 2, "data.max_length", "must be >= 2", d.max_length)
        need(1 <= d.max_prompt_length < d.max_length, "data.max_prompt_length",
             f"must be in [1, data.max_length={d.max_length})", d.max_prompt_length)
        # a pair is prompt+chosen + prompt+rejected <= 2 * max_length tokens and is never split
        need(t.micro_batch_tokens >= 0, "train.micro_batch_tokens", "must be >= 1 (0 or auto: derived)",
             t.micro_batch_tokens)
        if t.micro_batch_tokens == 0:
            t.micro_batch_tokens = auto_micro_batch_tokens(d.max_length)
        need(t.micro_batch_tokens >= 2 * d.max_length, "train.micro_batch_tokens",
             f"must hold the longest possible pair, 2 * data.max_length = {2 * d.max_length}", t.micro_batch_tokens)
        given = explicit_keys(self)
        for sec, units, per_step in (("train", "pairs", t.pairs_per_step), ("sft", "examples", sft.examples_per_step)):
            need(per_step >= 0, f"{sec}.{units}_per_step", "must be >= 1 (0: off)", per_step)
            if per_step and f"{sec}.tokens_per_step" in given:
                raise InputError(f"config {sec}.tokens_per_step and {sec}.{units}_per_step are both set "
                                 f"({getattr(self, sec).tokens_per_step}, {per_step}): a step is sized by one of "
                                 f"them; pass one")
        if not t.pairs_per_step:
            need(t.tokens_per_step >= t.micro_batch_tokens, "train.tokens_per_step",
                 f"must be >= train.micro_batch_tokens = {t.micro_batch_tokens}", t.tokens_per_step)
        if not sft.examples_per_step:
            need(sft.tokens_per_step >= t.micro_batch_tokens, "sft.tokens_per_step",
                 f"must be >= train.micro_batch_tokens = {t.micro_batch_tokens}", sft.tokens_per_step)
        need(0 <= self.seed < 2 ** 32, "seed", "must be in [0, 2**32)", self.seed)
        if d.pairs and d.sft:
            raise InputError(f"config data.pairs and data.sft are both set ({d.pairs}, {d.sft}): data.pairs runs "
                             f"the training phase alone on existing pairs, data.sft the SPIN loop; pass one")
        if m.path is not None:
            p = Path(m.path)
            need(p.is_dir() and (p / "config.json").is_file(), "model.path",
                 "must be a Hugging Face model folder (with config.json)", m.path)
        return self

    def check_data_paths(self) -> "Config":
        """Every data path exists (a run would otherwise stop only when it first reads it)."""
        for key in ("data.sft", "data.pairs", "data.generated"):
            for i, path in enumerate(getattr(self.data, key.split(".")[1])):
                if not Path(path).exists():
                    hint = f" (paths are not split at commas: pass several as --{key} a.jsonl b.jsonl)" \
                        if "," in path else ""
                    raise InputError(f"config {key}[{i}]: no such file or folder {path!r}{hint}")
        return self


# --- YAML + CLI ---------------------------------------------------------------------------------------------------

AUTO_KEYS = {"train.micro_batch_tokens", "generate.batch_size"}      # int fields that take "auto" (= 0)
ALIASES = {"pairs_per_step": "train.pairs_per_step", "model": "model.path", "pairs": "data.pairs", "generated": "data.generated", "beta": "train.beta",
           "lr": "train.lr", "epochs": "train.epochs", "max_length": "data.max_length",
           "max_prompt_length": "data.max_prompt_length", "tokens_per_step": "train.tokens_per_step",
           "micro_batch_tokens": "train.micro_batch_tokens", "loss_type": "train.loss_type",
           "optimizer": "train.optimizer", "max_steps": "train.max_steps", "chat_template": "data.chat_template",
           "sft_data": "data.sft", "iterations": "loop.iterations", "max_new_tokens": "generate.max_new_tokens"}


def auto_micro_batch_tokens(max_length: int) -> int:
    """train.micro_batch_tokens = auto: the smallest power of two >= 2 * max_length. A micro-batch must hold the
    longest possible pair (prompt+chosen + prompt+rejected <= 2 * max_length, never split), and activation memory
    grows linearly with the budget, so the smallest legal budget is the memory-safe one; real pairs are shorter than
    2 * max_length, so first-fit packing still puts several in a micro-batch, and matmuls over >= 2k rows are past
    their efficiency knee. The power of two keeps packed shapes regular (compile, kernel tiles): 1024 -> 2048."""
    return 1 << max(0, (2 * max_length - 1).bit_length())


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(key: str, tp, value, *, from_cli: bool, auto: bool = False):
    """`value` as type `tp` (int, float, bool, str, X | None, list[X]); InputError naming `key`. auto: an int field
    that also takes the string "auto" (stored as 0)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (from_cli and isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, inner, value, from_cli=from_cli)
    if origin is list:
        (inner,) = args
        if inner is str and isinstance(value, str):
            # strings are paths, which may hold a comma: one string is one path (YAML `sft: a.jsonl` too);
            # several are several values (--data.sft a.jsonl b.jsonl), a repeated flag or a YAML list
            value = [value]
        elif from_cli and isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]          # numbers: --train.adam_betas=0.9,0.95
        if not isinstance(value, (list, tuple)):
            raise InputError(f"config {key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", inner, v, from_cli=from_cli) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise InputError(f"config {key}: expected true/false, got {value!r}")
    if tp is int:
        if auto and isinstance(value, str) and value.strip().lower() == "auto":
            return 0                                       # the field's documented "derive it" value
        # YAML has real integers: a string there is a mistake; on the CLI every value is a string
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not from_cli):
            raise InputError(f"config {key}: expected an integer, got {type(value).__name__} {value!r}")
        try:
            out = int(value)
        except ValueError:
            raise InputError(f"config {key}: expected an integer, got {value!r:.40}") from None
        if not -2 ** 63 <= out < 2 ** 63:                  # every integer ends up in a C int64 somewhere
            raise InputError(f"config {key}: {value!r:.40} is out of range (a 64-bit integer)")
        return out
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise InputError(f"config {key}: expected a number, got {type(value).__name__} {value!r}")
        try:
            out = float(value)   # strings too: PyYAML reads 5e-6 (no dot) as the string '5e-6'
        except ValueError:
            raise InputError(f"config {key}: expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise InputError(f"config {key}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, (str, Path)) or isinstance(value, bool):
            raise InputError(f"config {key}: expected a string, got {type(value).__name__} {value!r}")
        return str(value)
    raise TypeError(f"config {key}: unsupported field type {tp}")


def _unknown(key: str, known) -> InputError:
    close = difflib.get_close_matches(key, list(known), n=1)
    return InputError(f"config: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                      + f"; known keys: {', '.join(sorted(known))}")


def all_keys(cls=Config, prefix: str = "") -> dict[str, tuple]:
    """Dotted key -> (type, default, help) for every leaf field."""
    out = {}
    hints = _hints(cls)
    for name, f in _fields(cls).items():
        tp = hints[name]
        if _is_section(tp):
            out.update(all_keys(tp, prefix + name + "."))
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            out[prefix + name] = (tp, default, f.metadata.get("help", ""))
    return out


def set_key(cfg: Config, key: str, value, *, from_cli: bool) -> None:
    keys = all_keys()
    if key not in keys:
        raise _unknown(key, keys)
    *path, leaf = key.split(".")
    obj = cfg
    for p in path:
        obj = getattr(obj, p)
    setattr(obj, leaf, _coerce(key, keys[key][0], value, from_cli=from_cli, auto=key in AUTO_KEYS))
    explicit_keys(cfg).add(key)


def explicit_keys(cfg: Config) -> set[str]:
    """The dotted keys a YAML file or the command line set (even to their default value): presets such as the
    demo's fill in only the others. Kept off the dataclass fields, so it is not part of the config itself."""
    return cfg.__dict__.setdefault("_explicit_keys", set())


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        key = prefix + str(k)
        if _is_section(_hints_for(key)):
            if v is None:                 # an empty section (every key commented out): its defaults
                continue
            if not isinstance(v, dict):
                raise InputError(f"config {key}: a section, must be a mapping of keys, got {type(v).__name__} "
                                 f"{v!r:.60}")
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out


def _hints_for(key: str):
    cls, tp = Config, None
    for part in key.split("."):
        if not _is_section(cls) or part not in _fields(cls):
            return None
        tp = _hints(cls)[part]
        cls = tp
    return tp


def _yaml_loader():
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one, silently)."""
    import yaml

    class NoDuplicatesLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {seen[key] + 1}, again at line "
                                    f"{key_node.start_mark.line + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)
    return NoDuplicatesLoader


def from_yaml(path) -> Config:
    import yaml
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} " + ("is not a file" if path.exists() else "does not exist"))
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_yaml_loader())
    except yaml.constructor.ConstructorError as e:
        where = f":{e.problem_mark.line + 1}" if e.problem_mark is not None else ""
        raise InputError(f"{path}{where}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({e})") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise InputError(f"{path}: not a readable YAML text file ({type(e).__name__})") from None
    if raw is None:                       # an empty file: every default
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a config must be a mapping of sections, got {type(raw).__name__}")
    cfg = Config()
    for key, value in _flatten(raw):
        try:
            set_key(cfg, key, value, from_cli=False)
        except InputError as e:
            raise InputError(f"{path}: {e}") from None
    return cfg


def apply_overrides(cfg: Config, argv: list[str]) -> Config:
    """`--key=value` / `--key value` (dotted keys or ALIASES); `--flag` alone sets a boolean key to true.
    A list of paths (list[str]) takes every value up to the next `--` flag, and a repeated flag adds to it:
    `--data.sft a.jsonl b.jsonl` = `--data.sft a.jsonl --data.sft b.jsonl` (a comma is part of a path)."""
    i = 0
    keys = all_keys()
    lists: dict[str, list] = {}                  # path lists given on this command line (they replace the YAML's)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise InputError(f"config: unexpected argument {arg!r} (overrides look like --train.lr=1e-6)")
        name, eq, value = arg[2:].partition("=")
        key = name.replace("-", "_")
        key = ALIASES.get(key, key)
        if key not in keys:
            raise _unknown(name, set(keys) | set(ALIASES))
        path_list = keys[key][0] == list[str]
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if keys[key][0] is bool and (nxt is None or nxt.startswith("--")):
                value = "true"
            elif nxt is None or nxt.startswith("--"):
                raise InputError(f"config {key}: --{name} needs a value")
            else:
                value = nxt
                i += 1
        if path_list:
            values = [value]
            while not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                values.append(argv[i + 1])
                i += 1
            lists[key] = lists.get(key, []) + [v for v in values if v != ""]      # --data.sft= : none
            set_key(cfg, key, lists[key], from_cli=True)
        else:
            set_key(cfg, key, value, from_cli=True)
        i += 1
    return cfg


def load_config(path=None, overrides: list[str] | None = None) -> Config:
    cfg = from_yaml(path) if path is not None else Config()
    return apply_overrides(cfg, list(overrides or [])).validate()


def reference_markdown() -> str:
    """The config reference as a markdown table (README)."""
    esc = lambda text: str(text).replace("|", "\\|")                       # noqa: E731  (a | inside a cell)
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, (tp, default, help) in all_keys().items():
        name = getattr(tp, "__name__", None) if isinstance(tp, type) else None
        type_name = name or str(tp).replace("typing.", "")
        rows.append(f"| `{key}` | {esc(type_name)} | `{esc(repr(default))}` | {esc(help)} |")
    return "\n".join(rows)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
