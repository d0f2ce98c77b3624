"""Bad input at the command line: `spin_fast.train` and `spin_fast.generate` stop with exit code 2 and ONE line
naming the key / argument / file:row, never a traceback (also under torchrun, where every rank stops); config
value errors name their key; conflicting options are refused and ignored ones reported. On the demo's tiny model
(no ../shared needed); most cases run in process through runtime.run_main, as `python -m` does."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spin_fast import demo
from spin_fast.config import load_config
from spin_fast.generate import main as generate_main
from spin_fast.runtime import run_main
from spin_fast.train import ignored_keys, main as train_main, parse_args

REPO = Path(__file__).resolve().parents[1]
GOOD_ROW = {"prompt_id": "a", "messages": [{"role": "user", "content": "<rev>: abc"},
                                           {"role": "assistant", "content": "cba"}]}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m") / "model"
    demo.init_model(folder, demo.build_tokenizer(folder), hidden=16, layers=1, heads=2, max_positions=128)
    return folder


@pytest.fixture
def files(tmp_path):
    def write(name: str, content) -> Path:
        p = tmp_path / name
        if isinstance(content, bytes):
            p.write_bytes(content)
        elif isinstance(content, str):
            p.write_text(content)
        else:
            p.write_text("".join(json.dumps(r) + "\n" for r in content))
        return p
    return write


def cli(main, argv, capsys, monkeypatch) -> tuple[int, str]:
    """(exit code, stderr) of `python -m spin_fast.X argv`, in process."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: main(argv))
    return exc.value.code, capsys.readouterr().err


def one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def train_args(model, tmp_path, *extra):
    return ["--model", str(model), "--output", str(tmp_path / "out"), "--max-length", "64",
            "--max-prompt-length", "32", "--micro-batch-tokens", "128", "--tokens-per-step", "128",
            "--max-new-tokens", "8", "--train.progress", "false", *extra]


# --- config values name their key ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], "config seed: must be in [0, 2**32), got -1"),
    (["--seed", str(2 ** 40)], "config seed: must be in [0, 2**32)"),
    (["--seed", "9" * 30], "config seed: '999999999999999999999999999999' is out of range"),
    (["--train.max_steps", str(2 ** 70)], "config train.max_steps: "),
    (["--pairs", "p.jsonl", "--data.sft", "s.jsonl"], "config data.pairs and data.sft are both set"),
])
def test_value_errors_name_the_key(argv, message):
    with pytest.raises(ValueError) as e:
        load_config(None, argv)
    assert str(e.value).startswith(message), str(e.value)


def test_duplicated_yaml_key_is_refused_with_its_line(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text("train:\n  lr: 1.0e-6\n  beta: 0.2\n  lr: 2.0e-6\n")
    with pytest.raises(ValueError, match=rf"^{p}:4: duplicate key 'lr' \(first at line 2, again at line 4\)"):
        load_config(p)
    p.write_text("train:\n  lr: 1.0e-6\ntrain:\n  beta: 0.2\n")                 # a whole section twice
    with pytest.raises(ValueError, match="duplicate key 'train'"):
        load_config(p)


def test_a_yaml_string_is_one_path(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text("data:\n  sft: data/a,b.jsonl\n  pairs: [x.jsonl, y.jsonl]\n")
    cfg = load_config(p, ["--data.pairs=", "--lr", "1e-6"])
    assert cfg.data.sft == ["data/a,b.jsonl"] and cfg.data.pairs == []


def test_a_path_with_a_comma_is_one_path(model, tmp_path, files):
    f = files("a,b.jsonl", [GOOD_ROW] * 3)
    cfg, _ = parse_args(train_args(model, tmp_path, "--data.sft", str(f)))
    assert cfg.data.sft == [str(f)]
    g = files("g.jsonl", [GOOD_ROW])
    cfg, _ = parse_args(train_args(model, tmp_path, "--data.sft", str(f), str(g)))
    assert cfg.data.sft == [str(f), str(g)]
    with pytest.raises(ValueError, match=r"config data.sft\[0\]: no such file or folder .*not split at commas"):
        parse_args(train_args(model, tmp_path, "--data.sft", f"{g},{tmp_path / 'h.jsonl'}"))


def test_ignored_keys_are_named(model, tmp_path, files, capsys, monkeypatch, caplog):
    pairs = files("p.jsonl", "")                                           # stops right after the warning
    cfg, _ = parse_args(train_args(model, tmp_path, "--pairs", str(pairs), "--loop.iterations", "5",
                                   "--generate.max_new_tokens", "9"))
    assert ignored_keys(cfg) == ["generate.max_new_tokens", "loop.iterations"]
    with caplog.at_level(logging.WARNING, logger="spin_fast.train"):
        code, err = cli(train_main, train_args(model, tmp_path, "--pairs", str(pairs), "--loop.iterations", "5"),
                        capsys, monkeypatch)
    assert ("config keys set but ignored with data.pairs (the training phase alone): generate.max_new_tokens, "
            "loop.iterations") in caplog.text
    one_line_error(code, err, f"{pairs}: holds no rows")
    sft = files("s.jsonl", [GOOD_ROW] * 3)
    cfg, _ = parse_args(train_args(model, tmp_path, "--data.sft", str(sft), "--data.generated", str(sft)))
    assert ignored_keys(cfg) == ["data.generated"]


# --- the train entry point: exit 2, one line --------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["max_length > context", "output is a file", "heldout >= rows", "empty data",
                                  "bad row in the loop", "max_new_tokens >= context", "missing data", "bad seed"])
def test_train_cli_user_errors(case, model, tmp_path, files, capsys, monkeypatch):
    sft = files("sft.jsonl", [GOOD_ROW] * 5)
    argv, want = {
        "max_length > context": (train_args(model, tmp_path, "--data.sft", str(sft), "--max-length", "256",
                                            "--micro-batch-tokens", "512", "--tokens-per-step", "512"),
                                 ["config data.max_length: 256 > the model's context 128"]),
        "output is a file": (train_args(model, tmp_path, "--data.sft", str(sft), "--output",
                                        str(files("notes.txt", "x"))), ["config output:", "is an existing file"]),
        "heldout >= rows": (train_args(model, tmp_path, "--data.sft", str(sft), "--loop.heldout", "5"),
                            ["config loop.heldout: 5 held-out rows leave none of the 5 usable rows"]),
        "empty data": (train_args(model, tmp_path, "--data.sft", str(files("e.jsonl", " \n"))),
                       [f"{tmp_path / 'e.jsonl'}: holds no rows"]),
        "bad row in the loop": (train_args(model, tmp_path, "--data.sft", str(files("b.jsonl", [GOOD_ROW, {
            "messages": [GOOD_ROW["messages"][1], GOOD_ROW["messages"][0]]}]))),
                                [f"{tmp_path / 'b.jsonl'}:2: messages[0] has role 'assistant'"]),
        "max_new_tokens >= context": (train_args(model, tmp_path, "--data.sft", str(sft), "--max-new-tokens", "128"),
                                      ["config generate.max_new_tokens: 128 must be < the model's context 128"]),
        "missing data": (train_args(model, tmp_path, "--pairs", str(tmp_path / "nope.jsonl")),
                         ["config data.pairs[0]: no such file or folder"]),
        "bad seed": (train_args(model, tmp_path, "--data.sft", str(sft), "--seed", "-3"), ["config seed:"]),
    }[case]
    code, err = cli(train_main, argv, capsys, monkeypatch)
    one_line_error(code, err, *want)
    assert not (tmp_path / "out" / "manifest.json").exists()                   # stopped before starting a run


# --- the generate entry point -----------------------------------------------------------------------------------------

def gen_args(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--output", str(out), "--max-new-tokens", "4",
            "--no-progress", *extra]


@pytest.mark.parametrize("case", ["empty file", "whitespace file", "output is a folder", "negative temperature",
                                  "top_p 0", "negative seed", "not a model", "invalid UTF-8", "all rows bad",
                                  "broken tokenizer"])
def test_generate_cli_user_errors(case, model, tmp_path, files, capsys, monkeypatch):
    data = files("d.jsonl", [GOOD_ROW] * 2)
    out = tmp_path / "o.jsonl"
    broken = tmp_path / "broken"
    if case == "broken tokenizer":
        import shutil
        shutil.copytree(model, broken)
        (broken / "tokenizer.json").write_text("{not json")
    argv, want = {
        "empty file": (gen_args(model, files("e.jsonl", ""), out), [f"{tmp_path / 'e.jsonl'}: holds no rows"]),
        "whitespace file": (gen_args(model, files("w.jsonl", "\n \n\t\n"), out),
                            [f"{tmp_path / 'w.jsonl'}: holds no rows"]),
        "output is a folder": (gen_args(model, data, tmp_path), ["--output: is a folder"]),
        "negative temperature": (gen_args(model, data, out, "--temperature", "-1"),
                                 ["--temperature: must be finite and >= 0, got -1.0"]),
        "top_p 0": (gen_args(model, data, out, "--top-p", "0"), ["--top-p: must be in (0, 1]"]),
        "negative seed": (gen_args(model, data, out, "--seed", "-1"), ["--seed: must be in [0, 2**63)"]),
        "not a model": (gen_args(tmp_path / "nothing", data, out), ["--model: must be a Hugging Face model folder"]),
        "invalid UTF-8": (gen_args(model, files("u.jsonl", json.dumps(GOOD_ROW).encode() + b"\n\xff\xfe\n"), out),
                          [f"{tmp_path / 'u.jsonl'}:2: invalid UTF-8"]),
        "all rows bad": (gen_args(model, files("b.jsonl", [{"x": 1}, {"prompt": " "}]), out, "--skip-bad-rows"),
                         ["no usable prompts (2 bad rows skipped"]),
        "broken tokenizer": (gen_args(broken, data, out), [f"{broken}: cannot load its tokenizer"]),
    }[case]
    code, err = cli(generate_main, argv, capsys, monkeypatch)
    one_line_error(code, err, *want)
    assert not out.exists() or out.read_text() == ""


def test_generate_skips_undecodable_rows_and_counts_them(model, tmp_path, files, capsys, monkeypatch):
    raw = json.dumps(GOOD_ROW).encode()
    data = files("u.jsonl", raw + b"\n" + raw.replace(b"abc", b"a\xe9c") + b"\n{\n" + raw + b"\n")
    summary = generate_main(gen_args(model, data, tmp_path / "o.jsonl", "--skip-bad-rows", "--greedy"))
    assert summary["rows"] == 4 and summary["generated"] == 2
    assert summary["bad_rows"] == 2 and summary["bad_rows_by_kind"] == {"encoding": 1, "invalid_json": 1}


# --- real processes under torchrun (python -m alone: test_config's CLI runs) -------------------------------------------

@pytest.mark.slow
def test_torchrun_every_rank_stops(model, tmp_path, files):
    """Under torchrun (2 CPU ranks) bad input stops every rank (the test would time out otherwise) with one line and
    no traceback from our code (torchrun's launcher prints its own failure report): a bad row every rank reads
    (train), and an output file only rank 0 reads (generate: rank 0 broadcasts the verdict)."""
    bad = files("b.jsonl", [GOOD_ROW] * 4 + [{"messages": [{"role": "user", "content": "q"}]}])
    foreign = files("foreign.jsonl", "not a generated row\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    runs = {"train": launch + ["spin_fast.train", *train_args(model, tmp_path, "--data.sft", str(bad),
                                                              "--loop.heldout", "1")],
            "generate": launch + ["spin_fast.generate", *gen_args(model, files("d.jsonl", [GOOD_ROW] * 2), foreign)]}
    procs = {k: subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, cmd in runs.items()}
    want = {"train": f"{bad}:5: field 'messages' must end with an assistant turn (the answer), ends with 'user'",
            "generate": f"{foreign}:1: not a row written by spin_fast.generate"}
    for name, p in procs.items():
        _, err = p.communicate(timeout=300)
        assert p.returncode != 0
        # each rank prints its line, unless torchrun stopped it first (the first rank out ends the others)
        ours = [ln.split(": ", 1) for ln in err.splitlines() if ln.startswith("error")]
        assert any(what.startswith(want[name]) for _, what in ours), err
        assert all(who in ("error", "error (rank 1)") and (what.startswith(want[name])
                                                           or what.startswith("stopped: another rank stopped"))
                   for who, what in ours), err
        assert "spin_fast/" not in "".join(ln for ln in err.splitlines() if ln.strip().startswith("File ")), err


# --- what a run computed is never silently mixed up (issue 13) ----------------------------------------------------

def _pairs(files, n=8):
    return files("pairs.jsonl", [{"prompt": [{"role": "user", "content": f"<rev>: ab{chr(97 + i)}"}],
                                  "chosen": [{"role": "assistant", "content": f"{chr(97 + i)}ba"}],
                                  "rejected": [{"role": "assistant", "content": "xyz"}]} for i in range(n)])


def test_finished_pairs_run_resumed_with_a_changed_key_is_refused(model, tmp_path, files, capsys, monkeypatch):
    # a finished --pairs run re-reports its summary on --resume; with a changed lr that summary is not the new
    # setup's result: refused naming the key (as for an interrupted run), unless --resume-force
    argv = train_args(model, tmp_path, "--pairs", str(_pairs(files)), "--lr", "1e-3")
    first = train_main(argv)
    assert train_main(argv + ["--resume"]) == first
    code, err = cli(train_main, argv + ["--resume", "--lr", "2e-3"], capsys, monkeypatch)
    one_line_error(code, err, "--resume: train.lr differs", "(0.001 there, 0.002 now)")
    assert train_main(argv + ["--resume", "--lr", "2e-3", "--resume-force"]) == first


def test_divergence_is_one_line_exit_2_and_publishes_nothing(model, tmp_path, files, capsys, monkeypatch):
    argv = train_args(model, tmp_path, "--pairs", str(_pairs(files)), "--lr", "1e4", "--train.log_every", "1")
    code, err = cli(train_main, argv, capsys, monkeypatch)
    one_line_error(code, err, "training diverged at step", "train.lr")
    assert not (tmp_path / "out").exists()


def test_a_config_key_added_since_the_run_started_compares_as_its_default():
    # an older run's manifest lacks a key added to the config later: not a difference while the key keeps its
    # default (the message named train.pairs_per_step "null there, 0 now" instead of what really changed)
    from spin_fast import manifest
    from spin_fast.config import Config, to_dict
    new = {"inputs": {}, "config": to_dict(Config()), "code_version": "v"}
    old = json.loads(json.dumps(new))
    del old["config"]["train"]["max_grad_norm"], old["config"]["generate"]["top_k"]
    assert manifest.differences(old, new) == []
    new["config"]["train"]["max_grad_norm"] = 0.5
    assert manifest.differences(old, new) == [("train.max_grad_norm", 1.0, 0.5)]


def test_demo_refuses_a_huge_heldout_at_once(tmp_path, capsys, monkeypatch):
    # the demo builds N_TRAIN + loop.heldout distinct rows: 100000 made it search silently for many minutes
    code, err = cli(train_main, ["--output", str(tmp_path / "d"), "--loop.heldout", "100000"], capsys, monkeypatch)
    one_line_error(code, err, "config loop.heldout: the demo holds out 0 .. 3000 rows", "got 100000")
    assert not (tmp_path / "d" / "demo_assets").exists()
