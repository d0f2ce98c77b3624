"""Untrusted inputs stay inert: chat templates render in a sandbox within a time and size limit (and as
transformers renders them), tokenizers never run code from the model folder, weights are never unpickled, and no
module of ours unpickles or evals anything."""
import ast
import json
import shutil
from pathlib import Path

import pytest

from spin_fast import demo, template
from spin_fast.chat import RenderError, render_text
from spin_fast.data import load_pairs
from spin_fast.errors import InputError
from spin_fast.hf_io import load_model, load_tokenizer
from spin_fast.template import TemplateLimitError

REPO = Path(__file__).resolve().parents[1]
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>&</b> {{ x }}"},
        {"role": "assistant", "content": "  Hello!\n"}, {"role": "user", "content": "2+2?"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return demo.build_tokenizer(tmp_path_factory.mktemp("tok"))


# Our own templates in the styles found in model folders: loop state, namespace, tojson, trimming, the special
# tokens, raise_exception, the generation tag.
TEMPLATES = {
    "chatml": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "llama-ish": "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
                 "{% set rest = messages[1:] %}{% else %}{% set sys = none %}{% set rest = messages %}{% endif %}"
                 "{% for m in rest %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                 "{{ raise_exception('roles must alternate') }}{% endif %}"
                 "{% if m['role'] == 'user' %}[INST] {% if loop.first and sys %}<<SYS>>{{ sys }}<</SYS>> {% endif %}"
                 "{{ m['content'] }} [/INST]{% else %} {% generation %}{{ m['content'] }}{% endgeneration %}"
                 "{{ eos_token }}{% endif %}{% endfor %}",
    "namespace + tojson": "{%- set ns = namespace(n=0, last='') -%}\n{%- for m in messages -%}\n"
                          "  {%- set ns.n = ns.n + 1 -%}{%- set ns.last = m.role -%}\n"
                          "  {{ loop.index }}/{{ loop.length }} {{ m | tojson }}{% if not loop.last %}\n{% endif %}\n"
                          "{%- endfor %}\n{{ ns.n }} {{ ns.last }}{% if add_generation_prompt %} >{% endif %}",
}


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_as_transformers_does(tok, name, add_generation_prompt):
    tpl, conv = TEMPLATES[name], CONV[1:] if name == "llama-ish" and not add_generation_prompt else CONV
    want = tok.apply_chat_template(conv, chat_template=tpl, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert render_text(tok, conv, tpl, add_generation_prompt) == want


def test_real_tokenizer_templates_render_as_transformers_does(shared_data):
    from transformers import AutoTokenizer
    t = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "phi-3-mini-4k-instruct")
    for conv in (CONV, CONV[1:2], CONV[1:3]):
        for agp in (True, False):
            assert render_text(t, conv, None, agp) == t.apply_chat_template(conv, tokenize=False,
                                                                             add_generation_prompt=agp)


@pytest.mark.parametrize("tpl", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}",
    "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
    "{{ namespace(_x=1) }}",
    "{{ raise_exception('template refuses') }}",
])
def test_sandbox_refuses_escapes_as_a_row_error(tok, tmp_path, tpl):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(InputError, match=rf"^{f}:1: chat template failed"):
        load_pairs(f, tok, chat_template=tpl + "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


@pytest.mark.parametrize("tpl, what", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran longer"),
    ("{% macro f(n) %}{% for i in range(50) %}{{ f(n - 1) if n else '' }}{% endfor %}{% endmacro %}{{ f(9) }}",
     "ran longer"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
     "larger than the limit"),
    ("{{ 'a' * 1000000000 }}", "larger than the limit"),
    ("{{ [0] * 1000000000 }}", "larger than the limit"),
    ("{{ 7 ** 99999999999 }}", "larger than the limit"),
    ("{{ '%999999999d' % 1 }}", "larger than the limit"),
    ("{{ 'x' | center(1000000000) }}", "larger than the limit"),
    ("{{ 'x'.ljust(1000000000) }}", "larger than the limit"),
    ("{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}", "larger than the limit"),
])
def test_render_limits_stop_the_template(tok, tmp_path, monkeypatch, tpl, what):
    monkeypatch.setattr(template, "RENDER_SECONDS", 0.3)
    monkeypatch.setattr(template, "RENDER_MAX_CHARS", 1 << 22)
    with pytest.raises(TemplateLimitError, match=what):
        render_text(tok, CONV, tpl)
    # a property of the template, not of a row: it stops the run even when bad rows are skipped
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(TemplateLimitError):
        load_pairs(f, tok, chat_template=tpl, skip_bad_rows=True)


def test_jinja_range_limit_is_a_row_error(tok):
    with pytest.raises(RenderError, match="Range too big"):
        render_text(tok, CONV, "{% for i in range(10000000) %}{% endfor %}")


def test_tokenizer_code_in_the_model_folder_is_never_run(tmp_path):
    folder = tmp_path / "model"
    demo.build_tokenizer(folder)
    marker = tmp_path / "RAN"
    (folder / "evil_tokenizer.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import PreTrainedTokenizerFast\n"
        f"class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", "evil_tokenizer.EvilTokenizer"]}
    cfg["tokenizer_class"] = "EvilTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=rf"^{folder}: cannot load its tokenizer .*contains custom code"):
        load_tokenizer(folder)
    assert not marker.exists()          # (transformers with trust_remote_code=True would have run the file)


def test_pickled_weights_are_refused_not_loaded(tmp_path):
    folder = tmp_path / "model"
    demo.init_model(folder, demo.build_tokenizer(folder), hidden=16, layers=1, heads=2)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")       # only a pickle-format file left
    with pytest.raises(InputError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_model(folder)


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            # the module / object a method is called on: "torch" in torch.load, None for a bare call like eval()
            owner = None if not isinstance(f, ast.Attribute) else f.value.id if isinstance(f.value, ast.Name) else "?"
            kw = {k.arg: k.value for k in node.keywords}
            yield node, owner, name, kw


def test_no_unpickling_eval_or_remote_code_in_our_sources():
    """Static check of spin_fast/ and benchmarks/ (checkpoint.py's DCP metadata is handled there)."""
    bad = []
    sources = [p for p in [*(REPO / "spin_fast").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]
               if p.name != "checkpoint.py"]
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "marshal", "shelve") for n in names):
                    bad.append(f"{path}:{node.lineno}: imports a pickle module")
        for node, owner, name, kw in _calls(tree):
            where = f"{path}:{node.lineno}"
            if owner is None and name in ("eval", "exec", "compile", "__import__"):
                bad.append(f"{where}: {name}()")
            if owner == "torch" and name == "load" and not (isinstance(kw.get("weights_only"), ast.Constant)
                                                            and kw["weights_only"].value is True):
                bad.append(f"{where}: torch.load without weights_only=True")
            if owner == "np" and name == "load" and not (isinstance(kw.get("allow_pickle"), ast.Constant)
                                                         and kw["allow_pickle"].value is False):
                bad.append(f"{where}: np.load without allow_pickle=False")
            if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load") and "Loader" not in kw:
                bad.append(f"{where}: yaml.{name} without a safe Loader")
            if name == "from_pretrained" and not (isinstance(kw.get("trust_remote_code"), ast.Constant)
                                                  and kw["trust_remote_code"].value is False):
                bad.append(f"{where}: from_pretrained without trust_remote_code=False")
    assert bad == []
