"""The built-in demo's task side: a procedurally generated instruction task with checkable answers, a
character-level tokenizer, a randomly initialised tiny Llama, and exact-match scoring with our sampler.

    rows = make_rows(3000, seed=0, kind="mixed")          # ultrachat-schema rows, answers in messages[-1]
    train, heldout = split_rows(rows, 500)                # disjoint: no held-out word is a training word
    tok = build_tokenizer("demo/model")                   # char-level PreTrainedTokenizerFast, saved there
    init_model("demo/model", tok, hidden=64, layers=2)    # random LlamaForCausalLM, HF folder
    exact_match(load_model("demo/model"), tok, heldout)   # {"accuracy", "n", "by_kind", "examples"}

Task: one string transformation of one random lowercase word (3-8 letters), with exactly one right answer:

    reverse: kdfa  -> afdk        sort: kdfa -> adfk        double: kdf -> kkddff
    shift: kdfa    -> legb        (every letter one further in the alphabet, z -> a)

`kind` picks one transformation or "mixed" (all four, uniformly; the default). Alone, `reverse` is too easy
for SPIN to matter (held-out exact match 0.96 after 10 SFT epochs of 3000 rows). Mixed, a hidden-64 2-layer
model (89k parameters) reaches ~0.07 / ~0.5 / ~0.95 held-out exact match after 5 / 10 / 30 epochs (AdamW 3e-3,
cosine, ~70 sequences per step; one seed each), with `sort` the hardest throughout: a short SFT leaves the
model well between 0 and 1, and SPIN room to improve.

Everything here is a pure function of its arguments (and `seed`): no global RNG state is read or changed.
"""
from __future__ import annotations

import hashlib
import json
import random
import string
from pathlib import Path

TRANSFORMS = {
    "reverse": lambda w: w[::-1],
    "sort": lambda w: "".join(sorted(w)),
    "double": lambda w: "".join(c + c for c in w),
    "shift": lambda w: "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in w),
}
KINDS = (*TRANSFORMS, "mixed")
DEFAULT_KIND = "mixed"
MIN_LEN, MAX_LEN = 3, 8

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")          # ids 0..3, in this order
# every character a demo row or chat rendering uses, plus digits and common punctuation (others map to <unk>)
DEFAULT_CHARS = string.ascii_lowercase + string.digits + " :,.;!?'\"-_()\n"
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'][0] }}:{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>a:{% endif %}")


# ---- rows -------------------------------------------------------------------------------------------------------

def _row(prompt: str, answer: str) -> dict:
    return {"prompt_id": hashlib.sha256(prompt.encode()).hexdigest()[:16], "prompt": prompt,
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def make_rows(n: int, seed: int, kind: str = DEFAULT_KIND, min_len: int = MIN_LEN,
              max_len: int = MAX_LEN) -> list[dict]:
    """n rows {"prompt_id", "prompt", "messages": [user prompt, assistant answer]} in the ultrachat schema.

    Prompts are "<op>: <word>" with a random lowercase word of min_len..max_len letters (uniform length, then
    uniform letters); every word occurs at most once in the result, so any split of it is disjoint by word.
    Deterministic: the same (n, seed, kind, min_len, max_len) gives the same rows, in the same order.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    capacity = sum(26 ** k for k in range(min_len, max_len + 1))
    if n > capacity // 2:
        raise ValueError(f"n={n} distinct words of {min_len}-{max_len} letters: too many (at most {capacity // 2})")
    rng = random.Random(f"spin_fast.demo/{kind}/{seed}")
    ops = list(TRANSFORMS) if kind == "mixed" else [kind]
    rows, seen = [], set()
    while len(rows) < n:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(min_len, max_len)))
        op = rng.choice(ops)
        if word in seen:
            continue
        seen.add(word)
        rows.append(_row(f"{op}: {word}", TRANSFORMS[op](word)))
    return rows


def parse_prompt(prompt: str) -> tuple[str, str]:
    """("reverse", "kdfa") from "reverse: kdfa"; ValueError when it is not a demo prompt."""
    op, sep, word = prompt.partition(": ")
    if not sep or op not in TRANSFORMS or not word:
        raise ValueError(f"not a demo prompt (expected '<{'|'.join(TRANSFORMS)}>: <word>'): {prompt!r}")
    return op, word


def answer_of(row: dict) -> str:
    """The one correct answer of a row, recomputed from its prompt (so also valid for rows whose last message
    is a model's response, e.g. spin_fast.generate output)."""
    prompt = row.get("prompt") or row["messages"][0]["content"]
    op, word = parse_prompt(prompt)
    return TRANSFORMS[op](word)


def split_rows(rows: list[dict], n_heldout: int) -> tuple[list[dict], list[dict]]:
    """(train, heldout): the last n_heldout rows are held out; training rows whose prompt or word also occurs
    in the held-out set are dropped (none for make_rows output, whose words are distinct)."""
    if not 0 <= n_heldout <= len(rows):
        raise ValueError(f"n_heldout={n_heldout} out of range for {len(rows)} rows")
    heldout = rows[len(rows) - n_heldout:]
    held_words = {parse_prompt(r["prompt"])[1] for r in heldout}
    held_prompts = {r["prompt"] for r in heldout}
    train = [r for r in rows[:len(rows) - n_heldout]
             if r["prompt"] not in held_prompts and parse_prompt(r["prompt"])[1] not in held_words]
    return train, heldout


def write_jsonl(path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def write_demo_data(folder, n_train: int, n_heldout: int, seed: int, kind: str = DEFAULT_KIND) -> tuple[Path, Path]:
    """folder/train.jsonl (n_train rows) and folder/heldout.jsonl (n_heldout rows, no word shared with train)."""
    train, heldout = split_rows(make_rows(n_train + n_heldout, seed, kind), n_heldout)
    folder = Path(folder)
    return write_jsonl(folder / "train.jsonl", train), write_jsonl(folder / "heldout.jsonl", heldout)


# ---- tokenizer --------------------------------------------------------------------------------------------------

def build_tokenizer(folder=None, chars: str = DEFAULT_CHARS, chat_template: str = CHAT_TEMPLATE,
                    model_max_length: int = 128):
    """A character-level transformers.PreTrainedTokenizerFast (saved to `folder` with save_pretrained when
    given, so AutoTokenizer.from_pretrained(folder) reloads it).

    Vocabulary: <pad> 0, <s> 1, </s> 2, <unk> 3, then one token per character of `chars`. The special tokens
    are matched whole in text (the chat template writes them), every other character is its own token, and
    decoding joins tokens back with nothing in between.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "".join(dict.fromkeys(chars))                                   # unique, order kept
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")   # every char, \n too
    core.decoder = decoders.Fuse()                                           # "".join(tokens)
    core.add_special_tokens(list(SPECIAL_TOKENS))                            # matched before pre-tokenizing
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", chat_template=chat_template, clean_up_tokenization_spaces=False,
                                  model_max_length=model_max_length)
    if folder is not None:
        tok.save_pretrained(str(folder))
    return tok


# ---- model ------------------------------------------------------------------------------------------------------

def init_model(folder, tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int | None = None,
               intermediate: int | None = None, max_positions: int = 128, tie_word_embeddings: bool = False,
               seed: int = 0) -> Path:
    """A randomly initialised LlamaForCausalLM (fp32) saved as an HF folder, with the tokenizer and the
    bos/eos/pad ids in config.json and generation_config.json. intermediate defaults to 2 * hidden (SwiGLU).
    Parameters: hidden=64, layers=2, heads=4, the default 54-token vocabulary, untied:
    2 * 54 * 64 + 2 * (4 * 64^2 + 3 * 64 * 128 + 2 * 64) + 64 = 89,152. Returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                      head_dim=hidden // heads, max_position_embeddings=max_positions, rms_norm_eps=1e-5,
                      tie_word_embeddings=tie_word_embeddings, hidden_act="silu", **ids)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):                             # seeded, caller's RNG untouched
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config = GenerationConfig(**ids)
    folder = Path(folder)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


# ---- scoring ----------------------------------------------------------------------------------------------------

def score(rows: list[dict], responses: list[str], n_examples: int = 8) -> dict:
    """Exact match of responses[i].strip() with answer_of(rows[i]): {"accuracy", "n", "by_kind" (op ->
    accuracy), "examples" (the first n_examples as {prompt, expected, response, correct})}."""
    if len(rows) != len(responses):
        raise ValueError(f"{len(rows)} rows but {len(responses)} responses")
    correct, by_kind, examples = 0, {}, []
    for row, resp in zip(rows, responses):
        want = answer_of(row)
        ok = resp.strip() == want
        correct += ok
        k = by_kind.setdefault(parse_prompt(row["prompt"])[0], [0, 0])
        k[0] += ok
        k[1] += 1
        if len(examples) < n_examples:
            examples.append({"prompt": row["prompt"], "expected": want, "response": resp, "correct": ok})
    return {"accuracy": correct / max(len(rows), 1), "n": len(rows),
            "by_kind": {op: c / t for op, (c, t) in sorted(by_kind.items())}, "examples": examples}


def exact_match(model, tokenizer, rows: list[dict], *, batch_size: int = 64, max_new_tokens: int | None = None,
                n_examples: int = 8, sampler=None) -> dict:
    """Greedy-decode every row's prompt (messages[:-1], rendered by chat.render_prompt) with our Sampler and
    score the responses (see `score`). model: a spin_fast Transformer in eval mode (a plain one per rank under
    torch.distributed: prompts are split over the ranks by sampler.generate_sharded and the result is the same
    on every rank). max_new_tokens: default the longest answer's token count + 4 (generation stops at </s>).
    sampler: reuse a Sampler (else one is built with batch_size and the tokenizer's eos)."""
    from .chat import encode, render_prompt
    from .sampler import Sampler, SamplingParams, generate_sharded

    if not rows:
        return score([], [], n_examples)
    prompts = [render_prompt(tokenizer, r["messages"][:-1]) for r in rows]            # (R,) lists of ids
    if max_new_tokens is None:
        max_new_tokens = max(len(encode(tokenizer, answer_of(r))) for r in rows) + 4
    if sampler is None:
        sampler = Sampler(model, batch_size=batch_size, eos_token_ids=[tokenizer.eos_token_id], tokenizer=tokenizer)
    gens = generate_sharded(sampler, prompts, SamplingParams(max_new_tokens=max_new_tokens, greedy=True))
    return score(rows, [g.text for g in gens], n_examples)
