"""spin_fast.config: defaults, CLI overrides and aliases, YAML loading, type and range errors that name the key,
the reference table, and the `python -m spin_fast.train` front end (parse_args, --help-config, exit code 2)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("yaml")
from spin_fast.config import (ALIASES, Config, all_keys, apply_overrides, from_yaml,  # noqa: E402
                              load_config, reference_markdown)

REPO = Path(__file__).resolve().parents[1]


def key_error(key: str) -> str:
    """The `match=` pattern of a ValueError that names `key` the way config.py does: 'config KEY: ...'."""
    return rf"config {re.escape(key)}:"


@pytest.fixture
def model_dir(tmp_path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


@pytest.fixture
def write_yaml(tmp_path):
    def write(text: str, name: str = "cfg.yaml") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p
    return write


# --- defaults -------------------------------------------------------------------------------------------------------

def test_defaults_validate_and_match_the_paper():
    cfg = load_config()
    assert isinstance(cfg, Config)
    t, d = cfg.train, cfg.data
    assert t.beta == 0.1
    assert t.lr == 5e-7
    assert t.optimizer == "rmsprop"
    assert t.lr_schedule == "linear"
    assert t.warmup_ratio == 0.1
    assert t.loss_type == "sigmoid"
    assert d.max_length == 1024
    assert d.max_prompt_length == 512
    assert cfg.model.path is None and cfg.output is None and d.pairs == []


def test_list_defaults_are_not_shared_between_instances():
    a, b = Config(), Config()
    a.data.pairs.append("x.jsonl")
    a.train.adam_betas[0] = 0.5
    assert b.data.pairs == [] and b.train.adam_betas == [0.9, 0.999]


def test_all_keys_covers_every_leaf_with_help():
    keys = all_keys()
    for k in ("model.path", "data.pairs", "data.max_length", "train.lr", "train.beta", "output", "seed", "device"):
        assert k in keys
    assert not any(k in ("model", "data", "train") for k in keys)  # sections are not leaves
    assert all(help for (_, _, help) in keys.values()), [k for k, (_, _, h) in keys.items() if not h]


def test_every_alias_targets_a_real_key():
    keys = all_keys()
    assert {a: k for a, k in ALIASES.items() if k not in keys} == {}


# --- CLI overrides ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, key, expected", [
    (["--train.lr=1e-6"], "train.lr", 1e-6),
    (["--train.lr", "1e-6"], "train.lr", 1e-6),
    (["--lr", "1e-6"], "train.lr", 1e-6),
    (["--lr=1e-6"], "train.lr", 1e-6),
    (["--beta", "0.5"], "train.beta", 0.5),
    (["--max-length", "2048"], "data.max_length", 2048),
    (["--max_length=2048"], "data.max_length", 2048),
    (["--max-prompt-length", "256"], "data.max_prompt_length", 256),
    (["--tokens-per-step", "131072"], "train.tokens_per_step", 131072),
    (["--epochs", "3"], "train.epochs", 3),
    (["--optimizer", "adamw"], "train.optimizer", "adamw"),
    (["--train.max-steps", "-1"], "train.max_steps", -1),   # dashes in dotted keys; a negative value is a value
    (["--train.max_steps", "7"], "train.max_steps", 7),
    (["--pairs", "a.jsonl"], "data.pairs", ["a.jsonl"]),
    (["--data.pairs=a,b"], "data.pairs", ["a,b"]),                        # a comma is part of a path
    (["--data.pairs", "a.jsonl,b.parquet"], "data.pairs", ["a.jsonl,b.parquet"]),
    (["--data.pairs", "a.jsonl", "b.parquet", "--lr", "1e-6"], "data.pairs", ["a.jsonl", "b.parquet"]),
    (["--pairs", "a", "--lr", "1e-6", "--pairs=b"], "data.pairs", ["a", "b"]),   # a repeated flag adds
    (["--data.sft=", "--lr", "1e-6"], "data.sft", []),
    (["--train.adam_betas=0.9,0.95"], "train.adam_betas", [0.9, 0.95]),
    (["--train.activation_checkpointing"], "train.activation_checkpointing", True),
    (["--train.activation_checkpointing", "--lr", "1e-6"], "train.activation_checkpointing", True),
    (["--train.activation_checkpointing=false"], "train.activation_checkpointing", False),
    (["--train.activation_checkpointing=true"], "train.activation_checkpointing", True),
    (["--train.progress", "false"], "train.progress", False),
    (["--data.chat_template={{ x }}", "--data.chat_template=none"], "data.chat_template", None),
    (["--chat-template", "{{ x }}", "--chat_template", "null"], "data.chat_template", None),
    (["--output", "out", "--output=none"], "output", None),
    (["--lr=1e-6", "--lr=2e-6"], "train.lr", 2e-6),  # the last one wins
])
def test_cli_override(argv, key, expected):
    cfg = load_config(None, argv)
    section, _, leaf = key.rpartition(".")
    obj = getattr(cfg, section) if section else cfg
    got = getattr(obj, leaf)
    assert got == expected and type(got) is type(expected), (argv, got)


def test_cli_model_alias_sets_path_and_validates_folder(model_dir):
    assert load_config(None, ["--model", str(model_dir)]).model.path == str(model_dir)
    assert load_config(None, [f"--model={model_dir}"]).model.path == str(model_dir)
    assert load_config(None, ["--model.path", str(model_dir)]).model.path == str(model_dir)


def test_apply_overrides_does_not_validate():
    cfg = apply_overrides(Config(), ["--lr=-1"])  # load_config validates; apply_overrides alone only coerces
    assert cfg.train.lr == -1.0


@pytest.mark.parametrize("argv, match", [
    (["--train.lrr=1"], r"unknown key 'train\.lrr' \(did you mean 'train\.lr'\?\)"),
    (["--train.lrr", "1"], r"unknown key 'train\.lrr' \(did you mean 'train\.lr'\?\)"),
    (["--lrr", "1"], r"unknown key 'lrr' \(did you mean 'lr'\?\)"),
    (["--max-lenght", "5"], r"unknown key 'max-lenght' \(did you mean 'max_length'\?\)"),
    (["--train", "1"], r"unknown key 'train'"),
    (["train.lr=1"], r"unexpected argument 'train\.lr=1'"),
    (["--lr"], key_error("train.lr") + r" --lr needs a value"),
    (["--data.max_length"], key_error("data.max_length") + r" --data\.max_length needs a value"),
    (["--train.lr=abc"], key_error("train.lr") + r" expected a number"),
    (["--train.epochs=1.5"], key_error("train.epochs") + r" expected an integer"),
    (["--train.epochs=two"], key_error("train.epochs") + r" expected an integer"),
    (["--train.compile=maybe"], key_error("train.compile") + r" expected true/false"),
    (["--train.adam_betas=0.9,x"], key_error("train.adam_betas[1]") + r" expected a number"),
])
def test_cli_errors_name_the_key(argv, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, argv)


# --- YAML -----------------------------------------------------------------------------------------------------------

def test_yaml_nested_sections_load(write_yaml, model_dir):
    p = write_yaml(f"""
model:
  path: {model_dir}
  dtype: bfloat16
data:
  pairs: [a.jsonl, b.jsonl]
  max_length: 512
  max_prompt_length: 128
  chat_template: null
train:
  lr: 1.0e-6
  beta: 0.2
  optimizer: adamw
  adam_betas: [0.9, 0.95]
  epochs: 2
  activation_checkpointing: true
  tokens_per_step: 32768
  micro_batch_tokens: 4096
output: out
seed: 3
""")
    cfg = load_config(p)
    assert cfg.model.path == str(model_dir) and cfg.model.dtype == "bfloat16"
    assert cfg.data.pairs == ["a.jsonl", "b.jsonl"]
    assert (cfg.data.max_length, cfg.data.max_prompt_length, cfg.data.chat_template) == (512, 128, None)
    t = cfg.train
    assert (t.lr, t.beta, t.optimizer, t.adam_betas, t.epochs) == (1e-6, 0.2, "adamw", [0.9, 0.95], 2)
    assert t.activation_checkpointing is True and (t.tokens_per_step, t.micro_batch_tokens) == (32768, 4096)
    assert (cfg.output, cfg.seed) == ("out", 3)
    assert t.loss_type == "sigmoid" and t.warmup_ratio == 0.1  # untouched keys keep their defaults


@pytest.mark.parametrize("text, expected", [
    ("train:\n  lr: 5e-6\n", 5e-6),       # PyYAML (YAML 1.1) reads 5e-6 as the STRING '5e-6': it must still work
    ("train:\n  lr: 1\n", 1.0),           # an int for a float field becomes a float
    ("train.lr: 2.0e-6\n", 2e-6),         # a dotted key at the top level
])
def test_yaml_float_spellings(write_yaml, text, expected):
    lr = from_yaml(write_yaml(text)).train.lr
    assert lr == expected and type(lr) is float


def test_yaml_string_none_is_a_string(write_yaml):
    # YAML has a real null; only the CLI maps the words none/null to None
    assert from_yaml(write_yaml("data:\n  chat_template: none\n")).data.chat_template == "none"
    assert from_yaml(write_yaml("data:\n  chat_template: ~\n")).data.chat_template is None


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n", "train: {}\n"])
def test_yaml_empty_is_defaults(write_yaml, text):
    assert from_yaml(write_yaml(text)) == Config()


def test_yaml_then_cli_override_cli_wins(write_yaml):
    p = write_yaml("train:\n  lr: 1.0e-6\n  beta: 0.3\ndata:\n  max_length: 512\n  max_prompt_length: 128\n")
    cfg = load_config(p, ["--lr", "3e-6", "--data.max_prompt_length=256"])
    assert cfg.train.lr == 3e-6 and cfg.data.max_prompt_length == 256   # CLI wins
    assert cfg.train.beta == 0.3 and cfg.data.max_length == 512          # YAML kept where the CLI is silent


def test_yaml_unknown_key_names_file_key_and_suggestion(write_yaml):
    p = write_yaml("train:\n  lrr: 1.0e-6\n")
    with pytest.raises(ValueError, match=re.escape(str(p)) + r".*unknown key 'train\.lrr' \(did you mean 'train\.lr'\?\)"):
        load_config(p)


@pytest.mark.parametrize("text, key, what", [
    ('train:\n  lr: "abc"\n', "train.lr", "expected a number"),
    ("train:\n  lr: true\n", "train.lr", "expected a number"),
    ("train:\n  lr: [1]\n", "train.lr", "expected a number"),
    ("train:\n  lr: {a: 1}\n", "train.lr", "expected a number"),
    ("train:\n  epochs: 1.5\n", "train.epochs", "expected an integer"),  # no silent truncation to 1
    ("train:\n  epochs: '3'\n", "train.epochs", "expected an integer"),  # YAML has real integers
    ("train:\n  epochs: true\n", "train.epochs", "expected an integer"),
    ('train:\n  compile: "yes"\n', "train.compile", "expected true/false"),  # YAML has real booleans
    ("train:\n  compile: 1\n", "train.compile", "expected true/false"),
    ("data:\n  pairs: 5\n", "data.pairs", "expected a list"),        # (a string is one path: test_user_errors)
    ("data:\n  pairs: [a.jsonl, 3]\n", "data.pairs[1]", "expected a string"),
    ("train:\n  adam_betas: 0.9\n", "train.adam_betas", "expected a list"),
    ("output: 5\n", "output", "expected a string"),
    ("model:\n  dtype: true\n", "model.dtype", "expected a string"),
])
def test_yaml_wrong_type_names_file_and_key(write_yaml, text, key, what):
    p = write_yaml(text)
    with pytest.raises(ValueError, match=re.escape(str(p)) + ": " + key_error(key) + " " + what):
        from_yaml(p)


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("3\n", "int")])
def test_yaml_top_level_not_a_mapping(write_yaml, text, kind):
    p = write_yaml(text)
    with pytest.raises(ValueError, match=re.escape(str(p)) + f": a config must be a mapping of sections, got {kind}"):
        from_yaml(p)


@pytest.mark.parametrize("text", ["[]\n", "0\n", "false\n", "''\n"])
def test_yaml_falsy_top_level_not_a_mapping(write_yaml, text):
    p = write_yaml(text)
    with pytest.raises(ValueError, match="a config must be a mapping"):
        from_yaml(p)


@pytest.mark.parametrize("text", ["train: 5\n", "train: [1, 2]\n", "train:\n"])
def test_yaml_section_not_a_mapping_is_not_called_unknown(write_yaml, text):
    p = write_yaml(text)
    try:
        cfg = from_yaml(p)
    except ValueError as e:
        assert "unknown key" not in str(e) and "train" in str(e), str(e)
    else:  # an empty section (`train:` with every key commented out) may also load as the defaults
        assert text == "train:\n" and cfg == Config()


def test_yaml_invalid_syntax_names_file(write_yaml):
    p = write_yaml("train: [1, 2\n")
    with pytest.raises(ValueError, match=re.escape(str(p)) + ": not valid YAML"):
        from_yaml(p)


def test_yaml_missing_file(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(ValueError, match=re.escape(str(p)) + " does not exist"):
        load_config(p)


def test_yaml_values_are_validated(write_yaml):
    p = write_yaml("train:\n  warmup_ratio: 1.5\n")
    with pytest.raises(ValueError, match=key_error("train.warmup_ratio") + " must be in"):
        load_config(p)


# --- validation -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, key, what", [
    (["--train.lr=-1e-6"], "train.lr", "must be > 0"),
    (["--lr=0"], "train.lr", "must be > 0"),
    (["--lr=nan"], "train.lr", "expected a finite number"),
    (["--lr=inf"], "train.lr", "expected a finite number"),
    (["--beta=0"], "train.beta", "must be > 0"),
    (["--beta", "-0.1"], "train.beta", "must be > 0"),
    (["--train.warmup_ratio=1.0"], "train.warmup_ratio", r"must be in \[0, 1\)"),
    (["--train.warmup_ratio=-0.1"], "train.warmup_ratio", r"must be in \[0, 1\)"),
    (["--max-prompt-length=1024"], "data.max_prompt_length", r"must be in \[1, data\.max_length=1024\)"),
    (["--max-prompt-length=2000"], "data.max_prompt_length", r"must be in \[1, data\.max_length=1024\)"),
    (["--max-length=256", "--max-prompt-length=300"], "data.max_prompt_length", r"must be in \[1, data\.max_length=256\)"),
    (["--max-prompt-length=0"], "data.max_prompt_length", "must be in"),
    (["--micro-batch-tokens=2047"], "train.micro_batch_tokens", r"must hold the longest possible pair, 2 \* data\.max_length = 2048"),
    (["--max-length=9000", "--micro-batch-tokens=16384"], "train.micro_batch_tokens", r"must hold the longest possible pair, 2 \* data\.max_length = 18000"),
    (["--tokens-per-step=8192", "--micro-batch-tokens=16384"], "train.tokens_per_step",
     "must be >= train.micro_batch_tokens = 16384"),
    (["--sft.tokens_per_step=1024"], "sft.tokens_per_step", "must be >= train.micro_batch_tokens = 2048"),
    (["--sft.heldout=-1"], "sft.heldout", "must be >= 0"),
    (["--sft.early_stopping_patience=-2"], "sft.early_stopping_patience", "must be >= 0"),
    (["--sft.early_stopping_min_delta=-0.01"], "sft.early_stopping_min_delta", "must be finite and >= 0"),
    (["--loop.continued_sft_lr=-1e-4"], "loop.continued_sft_lr", "must be finite and >= 0"),
    (["--pairs-per-step=-1"], "train.pairs_per_step", "must be >= 1"),
    (["--micro-batch-tokens=-5"], "train.micro_batch_tokens", "must be >= 1"),
    (["--generate.batch_size=-1"], "generate.batch_size", "must be >= 1"),
    (["--optimizer", "sgd"], "train.optimizer", "must be one of"),
    (["--loss-type", "ipo"], "train.loss_type", "must be one of"),
    (["--train.lr_schedule=step"], "train.lr_schedule", "must be one of"),
    (["--model.dtype=float16"], "model.dtype", "must be one of"),
    (["--device=tpu"], "device", "must be one of"),
    (["--epochs=0"], "train.epochs", "must be >= 1"),
    (["--max-steps=0"], "train.max_steps", "must be -1 or >= 1"),
    (["--train.adam_betas=0.9"], "train.adam_betas", "must be two numbers"),
    (["--train.adam_betas=0.9,1.0"], "train.adam_betas", "must be two numbers"),
])
def test_validation_names_the_key(argv, key, what):
    with pytest.raises(ValueError, match=key_error(key) + " " + what):
        load_config(None, argv)


def test_validation_ok_at_the_boundaries():
    cfg = load_config(None, ["--max-length=1024", "--max-prompt-length=1023", "--micro-batch-tokens=2048",
                             "--tokens-per-step=2048", "--train.warmup_ratio=0", "--max-steps=1"])
    assert (cfg.train.micro_batch_tokens, cfg.train.tokens_per_step) == (2048, 2048)


@pytest.mark.parametrize("make", ["missing", "file", "no_config_json"])
def test_model_path_must_be_an_hf_folder(tmp_path, make):
    p = tmp_path / "m"
    if make == "file":
        p.write_text("x")
    elif make == "no_config_json":
        p.mkdir()
    with pytest.raises(ValueError, match=key_error("model.path") + r" must be a Hugging Face model folder"):
        load_config(None, ["--model", str(p)])


# --- reference table ------------------------------------------------------------------------------------------------

def test_reference_markdown_lists_every_key():
    md = reference_markdown()
    lines = md.splitlines()
    assert lines[0].startswith("| key |") and len(lines) == 2 + len(all_keys())
    for key, (_, default, _) in all_keys().items():
        assert f"| `{key}` |" in md, key
        assert f"`{default!r}`" in next(line for line in lines if line.startswith(f"| `{key}` |")), key


def test_reference_markdown_rows_have_four_cells():
    bad = [line for line in reference_markdown().splitlines()
           if len(re.split(r"(?<!\\)\|", line.strip())[1:-1]) != 4]
    assert bad == []


# --- the entry point ------------------------------------------------------------------------------------------------

LLAMA = {"model_type": "llama", "vocab_size": 64, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
         "num_attention_heads": 2, "max_position_embeddings": 4096}


def test_parse_args_in_process(model_dir, write_yaml, tmp_path):
    from spin_fast.train import parse_args
    (model_dir / "config.json").write_text(json.dumps(LLAMA))
    p = write_yaml("train:\n  beta: 0.3\n  lr: 1.0e-6\n")
    (tmp_path / "a.jsonl").write_text("{}\n")
    cfg, demo = parse_args(["--model", str(model_dir), "--output", str(tmp_path / "out"), "--pairs",
                            str(tmp_path / "a.jsonl"),
                            "--config", str(p), "--train.max_steps", "-1", "--lr", "2e-6", "--max-length=2048"])
    assert not demo and cfg.model.path == str(model_dir) and cfg.data.pairs == [str(tmp_path / "a.jsonl")]
    assert (cfg.train.beta, cfg.train.lr, cfg.train.max_steps, cfg.data.max_length) == (0.3, 2e-6, -1, 2048)


@pytest.mark.parametrize("argv, match", [
    (["--pairs", "a.jsonl"], key_error("model.path") + " required"),
    (["--data.sft", "a.jsonl"], key_error("model.path") + " required"),
    (["--model", "MODEL", "--pairs", "a.jsonl"], key_error("output") + " required"),
    (["--model", "MODEL", "--output", "OUT"], key_error("data.sft") + " required"),
])
def test_parse_args_required_keys(model_dir, argv, match):
    # (no arguments at all is the built-in demo, not an error)
    from spin_fast.train import parse_args
    argv = [str(model_dir) if a == "MODEL" else a for a in argv]
    with pytest.raises(ValueError, match=match):
        parse_args(argv)


CLI_RUNS = {
    "help_config": ["--help-config"],
    "unknown_key": ["--train.lrr", "1"],
}


@pytest.fixture(scope="module", autouse=True)
def _cli_procs(request):
    """Start `python -m spin_fast.train ARGS` for every CLI_RUNS entry when the module starts (each one imports
    torch, ~2 s), so they run while the in-process tests do; only when a test that needs them is selected."""
    if not any("cli" in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield {}
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               WORLD_SIZE="1")
    procs = {name: subprocess.Popen([sys.executable, "-m", "spin_fast.train", *args], cwd=REPO, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in CLI_RUNS.items()}
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


@pytest.fixture(scope="module")
def cli(_cli_procs):
    """name -> (exit code, stdout, stderr) of the CLI_RUNS processes."""
    return {name: _finish(p) for name, p in _cli_procs.items()}


def _finish(p: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = p.communicate(timeout=120)
    return p.returncode, stdout, stderr


def test_cli_help_config(cli):
    rc, stdout, stderr = cli["help_config"]
    assert rc == 0, stderr
    assert stdout.strip() == reference_markdown()
    assert "| `train.lr` |" in stdout and "| `data.max_length` |" in stdout


def test_cli_unknown_key_exits_2_without_traceback(cli):
    rc, stdout, stderr = cli["unknown_key"]
    assert rc == 2, (stdout, stderr)
    assert "unknown key" in stderr and "'train.lr'" in stderr and "train.lrr" in stderr
    assert "Traceback" not in stderr and stderr.startswith("error: ")


def test_cli_missing_model_names_model_path(capsys, monkeypatch):
    # in process (a third interpreter would cost another torch import): run_main around parse_args, as __main__ does
    from spin_fast.runtime import run_main
    from spin_fast.train import parse_args
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: parse_args(["--output", "out", "--pairs", "a.jsonl"]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config model.path: required") and "--model" in err and "Traceback" not in err


def test_readme_config_table_is_current():
    # README's reference is generated from the dataclasses; regenerate it when a field changes
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert reference_markdown() in readme, "README.md config table is stale: paste reference_markdown() output"


@pytest.mark.parametrize("recipe", sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_recipes_load_and_validate(recipe):
    cfg = from_yaml(recipe).validate()
    assert cfg.train.beta == 0.1 and cfg.data.max_length >= 2 * cfg.data.max_prompt_length - 1


# --- batch sizes as users state them (issue 12, item 2) ------------------------------------------------------------

@pytest.mark.parametrize("max_length, expected", [(2, 4), (512, 1024), (1000, 2048), (1024, 2048), (1025, 4096),
                                                  (4096, 8192), (3, 8)])
def test_micro_batch_tokens_auto_is_the_smallest_power_of_two_holding_the_longest_pair(max_length, expected):
    argv = [f"--max-length={max_length}", "--max-prompt-length=1"]
    for given in ([], ["--micro-batch-tokens=auto"], ["--micro-batch-tokens", "AUTO"], ["--micro-batch-tokens=0"]):
        cfg = load_config(None, argv + given + [f"--tokens-per-step={expected}"])
        assert cfg.train.micro_batch_tokens == expected >= 2 * max_length > expected // 2


def test_paper_max_length_needs_no_micro_batch_tokens():
    # the paper's lengths alone validate (before: micro_batch_tokens had to be raised by hand)
    cfg = load_config(None, ["--max-length=1024", "--max-prompt-length=512", "--pairs-per-step=64"])
    assert (cfg.train.micro_batch_tokens, cfg.train.pairs_per_step) == (2048, 64)
    cfg = load_config(None, ["--max-length=4096", "--max-prompt-length=512"])          # token mode, default budget
    assert (cfg.train.micro_batch_tokens, cfg.train.tokens_per_step) == (8192, 65536)


def test_explicit_micro_batch_tokens_is_kept_and_checked():
    assert load_config(None, ["--micro-batch-tokens=3000"]).train.micro_batch_tokens == 3000
    with pytest.raises(ValueError, match=key_error("train.micro_batch_tokens") + " must hold the longest"):
        load_config(None, ["--micro-batch-tokens=1000"])


def test_auto_in_yaml(write_yaml):
    cfg = from_yaml(write_yaml("train:\n  micro_batch_tokens: auto\n  pairs_per_step: 64\n"
                               "generate:\n  batch_size: auto\n")).validate()
    assert (cfg.train.micro_batch_tokens, cfg.train.pairs_per_step, cfg.generate.batch_size) == (2048, 64, 0)
    with pytest.raises(ValueError, match=key_error("train.pairs_per_step") + " expected an integer"):
        from_yaml(write_yaml("train:\n  pairs_per_step: auto\n"))         # only the documented keys take auto


@pytest.mark.parametrize("sec, units", [("train", "pairs"), ("sft", "examples")])
def test_tokens_and_units_per_step_are_exclusive(write_yaml, sec, units):
    both = [f"--{sec}.tokens_per_step=65536", f"--{sec}.{units}_per_step=64"]
    with pytest.raises(ValueError, match=re.escape(f"config {sec}.tokens_per_step and {sec}.{units}_per_step are "
                                                   f"both set (65536, 64)")):
        load_config(None, both)                     # even at tokens_per_step's default value: both were given
    with pytest.raises(ValueError, match=f"{sec}.tokens_per_step and {sec}.{units}_per_step"):
        load_config(write_yaml(f"{sec}:\n  tokens_per_step: 4096\n"), both[1:])   # YAML + CLI alike
    cfg = load_config(None, both[1:])
    assert getattr(cfg, sec).__dict__[f"{units}_per_step"] == 64
