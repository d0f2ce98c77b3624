"""Chat templates rendered as untrusted code: a sandboxed Jinja environment with a time and a size limit.

A chat template comes with a model folder, so it is someone else's program. It runs in jinja2's
ImmutableSandboxedEnvironment, as transformers renders them (no access to Python internals such as `__class__`,
no mutation of the inputs), with transformers' conventions (trim_blocks, lstrip_blocks, loop controls, the
`{% generation %}` tag, `tojson`, `raise_exception`, `strftime_now`, the special tokens as variables), so a template
renders here exactly as `tokenizer.apply_chat_template` renders it.

The limits are checked cooperatively: a signal (SIGALRM) cannot interrupt a render outside the main thread and a
thread cannot be killed, so the render itself checks a deadline (RENDER_SECONDS) at every loop iteration (each
`for` loop's iterable is wrapped at compile time), function / macro call, attribute and item access, and at every
chunk of output. A single C-level operation cannot be interrupted, so those that could run long or allocate without
bound are checked before they run: `*`, `**`, `+`, `%` on sizes, huge integer arguments to any call or filter, and
values read through attributes (a namespace string doubled in a loop) against RENDER_MAX_CHARS. Exceeding a limit is
a TemplateLimitError, an InputError: a property of the template, it stops the run even with skip_bad_rows.
"""
from __future__ import annotations

import functools
import json
import re
import time
from contextvars import ContextVar
from datetime import datetime

from .errors import InputError

RENDER_SECONDS = 2.0          # per render; real templates take well under a millisecond
RENDER_MAX_CHARS = 1 << 26    # output, and any string / list / integer (in bits) a template builds

_deadline: ContextVar[float | None] = ContextVar("spin_fast_render_deadline", default=None)


class TemplateLimitError(InputError):
    """The template ran past RENDER_SECONDS or built something larger than RENDER_MAX_CHARS."""


def _tick() -> None:
    deadline = _deadline.get()
    if deadline is not None and time.monotonic() > deadline:
        raise TemplateLimitError(f"the chat template ran longer than the render limit of {RENDER_SECONDS} s")


def _too_big(what: str):
    raise TemplateLimitError(f"the chat template builds {what} larger than the limit of {RENDER_MAX_CHARS}")


def _check_size(value) -> None:
    if isinstance(value, (str, list, tuple, dict, bytes)) and len(value) > RENDER_MAX_CHARS:
        _too_big(f"a {type(value).__name__}")
    if isinstance(value, int) and value.bit_length() > RENDER_MAX_CHARS:
        _too_big("an integer")


def _check_binop(op: str, a, b) -> None:
    """Refuse an operation whose one C call would exceed the size limit, before it runs."""
    seq = (str, list, tuple)
    if op == "*":
        if isinstance(a, int) and isinstance(b, seq):
            a, b = b, a
        if isinstance(a, seq) and isinstance(b, int) and len(a) * max(b, 0) > RENDER_MAX_CHARS:
            _too_big(f"a {type(a).__name__}")
        if isinstance(a, int) and isinstance(b, int) and a.bit_length() + b.bit_length() > RENDER_MAX_CHARS:
            _too_big("an integer")
    elif op == "**":
        if isinstance(a, int) and isinstance(b, int) and abs(a) > 1 and b > 0 \
                and b * a.bit_length() > RENDER_MAX_CHARS:
            _too_big("an integer")
    elif op == "+":
        if isinstance(a, seq) and isinstance(b, seq) and len(a) + len(b) > RENDER_MAX_CHARS:
            _too_big(f"a {type(a).__name__}")
    elif op == "%" and isinstance(a, str):
        widths = [int(w) for w in re.findall(r"\d+", a)] + [x for x in (b if isinstance(b, tuple) else (b,))
                                                              if isinstance(x, int)]
        if any(w > RENDER_MAX_CHARS for w in widths):
            _too_big("a formatted string")


def _check_args(args, kwargs) -> None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and abs(v) > RENDER_MAX_CHARS:       # a width / count no template needs
            _too_big("an argument")
        _check_size(v)


def _limited_filter(f):
    @functools.wraps(f)                     # keeps jinja's pass_context / pass_eval_context marker
    def run(*args, **kwargs):
        _tick()
        _check_args(args, kwargs)
        out = f(*args, **kwargs)
        _check_size(out)
        return out
    return run


@functools.lru_cache(maxsize=1)
def _environment():
    import jinja2
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    @jinja2.pass_context                    # a context filter is never constant-folded at compile time
    def loop_guard(_context, iterable):
        for item in iterable:
            _tick()
            yield item

    class GuardedLoops(CodeGenerator):
        """Every `{% for x in ITER %}` iterates ITER|_spin_fast_loop_guard (the deadline checked per item)."""
        def visit_Template(self, node, frame=None):
            for loop in node.find_all(nodes.For):
                loop.iter = nodes.Filter(loop.iter, "_spin_fast_loop_guard", [], [], None, None,
                                         lineno=loop.iter.lineno)
            super().visit_Template(node, frame)

    class GenerationTag(Extension):
        """transformers' `{% generation %}...{% endgeneration %}` (marks assistant text): renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class PlainNamespace(Namespace):
        """namespace() without underscore names (no way to reach Python internals through it)."""
        def __init__(*args, **kwargs):            # Namespace's own signature trick: namespace(self=...) works
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            if any(isinstance(k, str) and k.startswith("_") for k in attrs):
                raise jinja2.exceptions.SecurityError("namespace attributes may not start with '_'")
            Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError("namespace attributes may not start with '_'")
            Namespace.__setitem__(self, name, value)

    class LimitedSandbox(ImmutableSandboxedEnvironment):
        code_generator_class = GuardedLoops
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call(__self, __context, __obj, *args, **kwargs):     # noqa: N805 (jinja's own signature)
            _tick()
            _check_args(args, kwargs)
            return super().call(__context, __obj, *args, **kwargs)

        def call_binop(self, context, operator, left, right):
            _tick()
            _check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

        def getattr(self, obj, attribute):
            _tick()
            out = super().getattr(obj, attribute)
            _check_size(out)
            return out

        def getitem(self, obj, argument):
            _tick()
            out = super().getitem(obj, argument)
            _check_size(out)
            return out

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = LimitedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: _limited_filter(f) for name, f in env.filters.items()}
    env.filters["_spin_fast_loop_guard"] = loop_guard
    env.globals.update(raise_exception=raise_exception, namespace=PlainNamespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """The compiled template (cached per source text); a syntax error raises jinja2.TemplateSyntaxError."""
    return _environment().from_string(source)


def render(source: str, **context) -> str:
    """Render `source` with `context` within the limits (TemplateLimitError beyond them)."""
    template = compile_template(source)
    token = _deadline.set(time.monotonic() + RENDER_SECONDS)
    try:
        pieces, size = [], 0
        for piece in template.generate(**context):
            size += len(piece)
            if size > RENDER_MAX_CHARS:
                _too_big("an output")
            _tick()
            pieces.append(piece)
        return "".join(pieces)
    finally:
        _deadline.reset(token)
