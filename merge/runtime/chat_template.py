"""The folder's chat template, compiled and rendered as transformers does (a sandboxed jinja2 environment with
``trim_blocks``, ``lstrip_blocks``, loop controls, a ``tojson`` that does not escape HTML, ``raise_exception`` and
``strftime_now``), within bounds of time and size.

A chat template comes with the folder, so it is untrusted code; jinja2's sandbox keeps it away from Python's
internals, and this module keeps it from running or growing without end:

- **time**: rendering stops after :data:`MAX_TEMPLATE_SECONDS`. The clock is read on every line of Python that runs
  while the template renders (a trace function, set in the rendering thread for the render only, so a loop with
  an empty body is caught too) and in every sandbox hook below.
- **size**: no single operation may build a string of more than :data:`MAX_TEMPLATE_CHARS` characters or a
  list of more than :data:`MAX_TEMPLATE_ITEMS` items, and the sizes are worked out *before* the operation runs
  (a ``'a' * 10**11`` is refused without allocating anything): ``*``, ``+``, ``%`` and ``~`` (concatenation),
  the string methods that pad, repeat or substitute (``center``, ``ljust``, ``rjust``, ``zfill``,
  ``expandtabs``, ``replace``, ``translate``, ``join``, ``format``) and the filters that do (``center``,
  ``indent``, ``wordwrap``, ``replace``, ``format``, ``join``, ``batch``, ``sum``, ``string``, ``tojson``).
  Numbers are bounded too: ``**`` and ``*`` may not make an integer of more than :data:`MAX_INT_BITS` bits.
- **output**: everything the template outputs, wherever it goes (the result, a macro's or a block's buffer),
  counts against :data:`MAX_TEMPLATE_CHARS`.
- **source**: a template of more than :data:`MAX_TEMPLATE_SOURCE` characters is refused before it is compiled.

Every failure, its own ``raise_exception`` included, is one :class:`MergeError` naming the file the template
came from. While a template renders, a debugger's or coverage's trace function is set aside (and put back after).
"""

from __future__ import annotations

import functools
import json
import math
import re
import string
import sys
import threading
import time
from collections.abc import Sized
from datetime import datetime
from pathlib import Path
from typing import Any

from merge.errors import MergeError

# Rendering the Qwen3-VL template takes about a millisecond; 2 s is a thousand times that (room for a slow or busy
# machine), short enough that a template that never ends is refused within a couple of seconds.
MAX_TEMPLATE_SECONDS = 2.0
# 16 Mi characters: 16 times the text of a prompt that fills Qwen3-VL's 262,144-token context (about 4 characters
# a token), small enough that a string this long costs at most tens of MB.
MAX_TEMPLATE_CHARS = 1 << 24
# Lists a chat template builds hold messages, content parts and tools; jinja2's sandbox already caps range() at
# 100,000 items.
MAX_TEMPLATE_ITEMS = 1 << 20
# An integer of 8192 bits (2466 digits) is still printable (Python refuses past 4300 digits) and cheap to compute.
MAX_INT_BITS = 1 << 13
# Published chat templates are 2 to 20 KB; 256 KiB is ten times the largest, and compiles in about a second
# (compiling takes time in proportion to the source: 15 ms for the 5 KB Qwen3-VL template).
MAX_TEMPLATE_SOURCE = 1 << 18
MAX_TOJSON_INDENT = 64


class TemplateBound(BaseException):
    """A bound of the module docstring was reached. A BaseException, so that no ``except Exception`` inside jinja2
    or a filter takes it for an ordinary error and carries on."""


class TemplateRefusal(Exception):
    """The template's own ``raise_exception(message)``."""


def _chars(n: int, what: str = "a string") -> None:
    if n > MAX_TEMPLATE_CHARS:
        raise TemplateBound(f"builds {what} of {n:,} characters, more than the {MAX_TEMPLATE_CHARS:,} allowed")


def _items(n: int) -> None:
    if n > MAX_TEMPLATE_ITEMS:
        raise TemplateBound(f"builds a list of {n:,} items, more than the {MAX_TEMPLATE_ITEMS:,} allowed")


def _bits(n: int) -> None:
    if n > MAX_INT_BITS:
        raise TemplateBound(f"computes a number of {n:,} bits, more than the {MAX_INT_BITS:,} allowed")


def _check_value(value: Any) -> None:
    """A result (or an operand) within the size bounds."""
    if isinstance(value, str | bytes):
        _chars(len(value))
    elif isinstance(value, list | tuple | dict | set):
        _items(len(value))
    elif isinstance(value, int) and not isinstance(value, bool):
        _bits(value.bit_length())


def _weight(value: Any, seen: dict[int, int] | None = None) -> int:
    """Characters ``str(value)`` would have, at least (strings inside containers counted once per reference), so
    that printing a list that holds one long string a million times is refused before ``str`` builds it."""
    if isinstance(value, str | bytes):
        return len(value)
    if not isinstance(value, list | tuple | dict | set):
        return 1
    seen = {} if seen is None else seen
    known = seen.get(id(value))
    if known is not None:
        return known
    seen[id(value)] = 2  # a container that holds itself
    items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
    total = 2
    for item in items:
        total += 2 + _weight(item, seen)
    seen[id(value)] = total
    return total


def _check_printable(value: Any) -> None:
    if isinstance(value, list | tuple | dict | set):
        _chars(_weight(value), "text")


# -- the operations whose result size is known before they run ----------------------------------------------

_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _width(digits: str) -> None:
    value = int(digits) if len(digits) <= 18 else 10**18
    if value > MAX_TEMPLATE_CHARS:
        raise TemplateBound(f"formats with a width or precision of {value:,}, more than the {MAX_TEMPLATE_CHARS:,} "
                            "allowed")


def _check_printf(fmt: str, values: Any) -> None:
    """``fmt % values``: every width and precision, written or given by ``*``, within bounds."""
    starred = False
    for match in _PRINTF.finditer(fmt):
        for group in match.groups():
            if group == "*":
                starred = True
            elif group:
                _width(group)
    if starred:
        for value in values if isinstance(values, tuple) else (values,):
            if isinstance(value, int) and not isinstance(value, bool):
                _width(str(abs(value)))


def _check_str_format(fmt: str, args: tuple, kwargs: dict) -> None:
    """``fmt.format(*args, **kwargs)``: the widths in every field's spec (nested ``{}`` ones from the arguments)."""
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format raises the same when it runs
    nested = False
    for _literal, _name, spec, _conversion in fields:
        if spec:
            nested = nested or "{" in spec
            for digits in re.findall(r"\d+", spec):
                _width(digits)
    if nested:
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool):
                _width(str(abs(value)))


def _count(text: str | bytes, part: str | bytes, count: Any) -> int:
    found = len(text) + 1 if not part else text.count(part)
    return min(found, count) if isinstance(count, int) and count >= 0 else found


def _check_replace(text: Any, old: Any, new: Any, count: Any = -1) -> None:
    if isinstance(text, str | bytes) and isinstance(old, str | bytes) and isinstance(new, str | bytes):
        _chars(len(text) + _count(text, old, count) * max(len(new) - len(old), 0))


def _check_join(separator: Any, values: Any) -> Any:
    """The joined length; ``values`` comes back as a list (a generator is read once, here)."""
    values = values if isinstance(values, list | tuple) else list(values)
    _items(len(values))
    sep = len(separator) if isinstance(separator, str | bytes) else len(str(separator))
    _chars(sum(_weight(v) for v in values) + sep * max(len(values) - 1, 0))
    return values


def _check_string_method(method: Any, args: tuple, kwargs: dict) -> tuple:
    """Bounds for the str (and bytes) methods that can multiply their input; returns the arguments to call with."""
    text, name = method.__self__, method.__name__

    def arg(index: int, key: str, default: Any = None) -> Any:
        return args[index] if len(args) > index else kwargs.get(key, default)

    if name in ("center", "ljust", "rjust", "zfill"):
        width = arg(0, "width", 0)
        if isinstance(width, int):
            _chars(width)
    elif name == "expandtabs":
        size = arg(0, "tabsize", 8)
        if isinstance(size, int):
            tabs = text.count("\t" if isinstance(text, str) else b"\t")
            _chars(len(text) + tabs * max(size, 0))
    elif name == "replace":
        _check_replace(text, arg(0, "old"), arg(1, "new"), arg(2, "count", -1))
    elif name == "translate" and isinstance(arg(0, "table"), dict):
        longest = max((_weight(v) for v in arg(0, "table").values()), default=1)
        _chars(len(text) * max(longest, 1))
    elif name == "join" and args:
        args = (_check_join(text, args[0]), *args[1:])
    return args


# -- filters ------------------------------------------------------------------------------------------------

def _check_filter(name: str, args: tuple, kwargs: dict) -> tuple:
    """Bounds for the filters that can multiply their input (``args`` start with the filtered value)."""
    if not args:
        return args
    value = args[0]

    def arg(index: int, key: str, default: Any = None) -> Any:
        return args[index] if len(args) > index else kwargs.get(key, default)

    if name == "center" and isinstance(arg(1, "width", 80), int):
        _chars(arg(1, "width", 80))
    elif name == "indent" and isinstance(value, str):
        width = arg(1, "width", 4)
        pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        _chars(len(value) + (value.count("\n") + 1) * max(pad, 0))
    elif name == "wordwrap" and isinstance(value, str):
        wrap = arg(3, "wrapstring", None)
        _chars(len(value) + (len(value) + 1) * (len(wrap) if isinstance(wrap, str) else 1))
    elif name == "replace":
        _check_replace(value, arg(1, "old"), arg(2, "new"), arg(3, "count", -1))
    elif name == "format" and isinstance(value, str):
        _check_printf(value, kwargs or args[1:])
    elif name == "join":
        return (_check_join(arg(1, "d", ""), value), *args[1:])
    elif name == "batch" and arg(2, "fill_with") is not None and isinstance(arg(1, "linecount"), int):
        _items(arg(1, "linecount"))
    elif name == "sum" and isinstance(arg(2, "start", 0), list | tuple):
        values = value if isinstance(value, list | tuple) else list(value)
        _items(sum(len(v) for v in values if isinstance(v, Sized)) + len(arg(2, "start", 0)))
        return (values, *args[1:])
    elif name in ("string", "tojson", "pprint"):
        _check_printable(value)
    return args


class _NotNow(Exception):
    """A filter over constants that jinja2 tries while compiling went past a bound: jinja2 then leaves it for the
    render (where it is refused in one line) instead of failing the compile."""


def _bounded_filter(name: str, function: Any, env: Any) -> Any:
    """``function`` with the checks of :func:`_check_filter` before it and a size check of what it returns.
    ``functools.wraps`` keeps jinja2's marks (``jinja_pass_arg``), so the filter gets what it asked for."""
    passes_first = getattr(function, "jinja_pass_arg", None) is not None

    @functools.wraps(function)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        env.tick()
        try:
            # a filter that asks for a context, an eval context or the environment gets it first
            args = (args[0], *_check_filter(name, args[1:], kwargs)) if passes_first else \
                _check_filter(name, args, kwargs)
            result = function(*args, **kwargs)
            _check_value(result)
        except TemplateBound as exc:
            if env.rendering():
                raise
            raise _NotNow(str(exc)) from None
        return result

    return bounded


# -- the environment ----------------------------------------------------------------------------------------

def _environment():
    """A jinja2 sandbox with the bounds of the module docstring (jinja2 is imported only here)."""
    import jinja2
    import jinja2.ext
    from jinja2.compiler import CodeGenerator
    from jinja2.runtime import markup_join, str_join
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class NoIncludes(jinja2.BaseLoader):
        """A chat template is one file: ``include``, ``import`` and ``extends`` find nothing."""

        def get_source(self, environment, template):
            raise jinja2.TemplateNotFound(template)

    class BoundedCode(CodeGenerator):
        """``a ~ b ~ ...`` calls :meth:`Bounded.concat_values`, which checks the total before joining."""

        def visit_Concat(self, node, frame) -> None:
            self.write("environment.concat_values((")
            for item in node.nodes:
                self.visit(item, frame)
                self.write(", ")
            self.write("), context.eval_ctx.autoescape)")

    class Bounded(ImmutableSandboxedEnvironment):
        code_generator_class = BoundedCode
        intercepted_binops = frozenset({"*", "+", "%", "**"})

        def __init__(self) -> None:
            super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols],
                             loader=NoIncludes(), finalize=self.output)
            self.state = threading.local()  # per render: deadline, characters output

        # -- clock and output ------------------------------------------------------------------------------
        def rendering(self) -> bool:
            return getattr(self.state, "deadline", None) is not None

        def tick(self) -> None:
            deadline = getattr(self.state, "deadline", None)
            if deadline is not None and time.monotonic() > deadline:
                raise TemplateBound(f"took more than {MAX_TEMPLATE_SECONDS:g} s to render (a loop without end?)")

        def count_output(self, n: int) -> None:
            total = getattr(self.state, "output", 0) + n
            self.state.output = total
            if total > MAX_TEMPLATE_CHARS:
                raise TemplateBound(f"output passes {MAX_TEMPLATE_CHARS:,} characters")

        def output(self, value: Any) -> Any:
            """``finalize``: every ``{{ ... }}`` goes through here, whether to the result or into a buffer."""
            self.tick()
            _check_printable(value)
            self.count_output(len(value) if isinstance(value, str) else len(str(value)))
            return value

        def concat(self, values) -> str:  # a macro's, a block's or a {% filter %}'s buffer, joined
            values = values if isinstance(values, list) else list(values)
            _chars(sum(len(v) for v in values), "text")
            return "".join(values)

        def concat_values(self, values: tuple, autoescape: bool) -> str:
            _chars(sum(_weight(v) for v in values))
            return markup_join(values) if autoescape else str_join(values)

        # -- the sandbox's hooks ---------------------------------------------------------------------------
        def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
            self.tick()
            self.check_binop(operator, left, right)
            result = super().call_binop(context, operator, left, right)
            _check_value(result)
            return result

        @staticmethod
        def check_binop(operator: str, left: Any, right: Any) -> None:
            def is_int(x: Any) -> bool:
                return isinstance(x, int) and not isinstance(x, bool)

            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, str | bytes) and is_int(n):
                        _chars(len(seq) * max(n, 0))
                    elif isinstance(seq, list | tuple) and is_int(n):
                        _items(len(seq) * max(n, 0))
                        _chars(_weight(seq) * max(n, 0), "text")
                if is_int(left) and is_int(right):
                    _bits(left.bit_length() + right.bit_length())
            elif operator == "+":
                if isinstance(left, str | bytes) and isinstance(right, str | bytes):
                    _chars(len(left) + len(right))
                elif isinstance(left, list | tuple) and isinstance(right, list | tuple):
                    _items(len(left) + len(right))
            elif operator == "**":
                if is_int(left) and is_int(right) and right > 0 and abs(left) > 1:
                    _bits(int(right * math.log2(abs(left))))
            elif operator == "%" and isinstance(left, str):
                _check_printf(left, right)

        def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # jinja2's signature
            __self.tick()
            if isinstance(getattr(__obj, "__self__", None), str | bytes) and hasattr(__obj, "__name__"):
                args = _check_string_method(__obj, args, kwargs)
            result = super().call(__context, __obj, *args, **kwargs)
            _check_value(result)
            return result

        def wrap_str_format(self, value: Any):
            """``str.format`` and ``format_map`` (which jinja2 wraps when they are looked up): widths bounded."""
            wrapped = super().wrap_str_format(value)
            if wrapped is None:
                return None
            text = value.__self__

            @functools.wraps(wrapped)
            def bounded(*args: Any, **kwargs: Any) -> str:
                self.tick()
                if value.__name__ == "format_map" and len(args) == 1 and isinstance(args[0], dict):
                    _check_str_format(text, (), args[0])
                else:
                    _check_str_format(text, args, kwargs)
                _chars(len(text) + sum(_weight(v) for v in (*args, *kwargs.values())))
                result = wrapped(*args, **kwargs)
                _check_value(result)
                return result

            return bounded

    class BoundedNamespace(Namespace):
        """``namespace()``: what a loop keeps between iterations is within the size bounds too."""

        def __setitem__(self, name: str, value: Any) -> None:
            _check_value(value)
            super().__setitem__(name, value)

    def raise_exception(message: Any) -> None:
        raise TemplateRefusal(str(message))

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        size = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
        if size > MAX_TOJSON_INDENT:
            raise TemplateBound(f"asks tojson for an indent of {size:,}, more than the {MAX_TOJSON_INDENT} allowed")
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = Bounded()
    env.filters["tojson"] = tojson
    env.filters = {name: _bounded_filter(name, f, env) for name, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = BoundedNamespace
    return env


def _problem(exc: BaseException) -> str:
    """What went wrong, as the end of a sentence that starts with the template's file."""
    import jinja2

    text = " ".join(str(exc).split())
    if isinstance(exc, TemplateBound):
        return f"the chat template {text}"
    if isinstance(exc, TemplateRefusal):
        return f"the chat template refused the conversation: {text}"
    if isinstance(exc, jinja2.TemplateNotFound):
        return f"the chat template includes {exc.name!r}; a chat template is one file"
    if isinstance(exc, jinja2.exceptions.SecurityError):
        return f"the sandbox refuses what the chat template does ({text.rstrip('.')})"
    if isinstance(exc, RecursionError):
        return "the chat template recurses too deeply"
    if isinstance(exc, MemoryError):
        return "the chat template ran out of memory"
    if isinstance(exc, jinja2.UndefinedError):
        return f"the chat template fails: {text}"
    return f"the chat template fails ({type(exc).__name__}: {text or 'no message'})"


class ChatTemplate:
    """A chat template compiled in the bounded sandbox; :meth:`render` within the bounds of the module docstring.
    ``where``: the file it came from (every error names it)."""

    def __init__(self, source: str, where: Path | str = "chat_template.jinja"):
        import jinja2

        self.where = where
        if len(source) > MAX_TEMPLATE_SOURCE:
            raise MergeError(f"{where}: a chat template of {len(source):,} characters, more than the "
                             f"{MAX_TEMPLATE_SOURCE:,} one may have")
        self.environment = _environment()
        try:
            self.template = self.environment.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise MergeError(f"{where}: the chat template does not compile ({exc.message}, line {exc.lineno})"
                             ) from None
        except (Exception, RecursionError) as exc:  # a parser or Python's compiler giving up on absurd nesting
            raise MergeError(f"{where}: the chat template does not compile ({type(exc).__name__}: {exc})") from None

    def render(self, **context: Any) -> str:
        """The template's text for ``context``; a MergeError naming the file for anything that goes wrong."""
        state = self.environment.state
        deadline = time.monotonic() + MAX_TEMPLATE_SECONDS
        state.deadline, state.output = deadline, 0

        def trace(frame, event, arg):  # every line of Python the render runs: a loop cannot outrun the clock
            if time.monotonic() > deadline:
                raise TemplateBound(f"took more than {MAX_TEMPLATE_SECONDS:g} s to render (a loop without end?)")
            return trace

        previous = sys.gettrace()
        sys.settrace(trace)
        try:
            parts, size = [], 0
            for part in self.template.generate(**context):
                size += len(part)
                if size > MAX_TEMPLATE_CHARS:
                    raise TemplateBound(f"output passes {MAX_TEMPLATE_CHARS:,} characters")
                parts.append(part)
            return "".join(parts)
        except (Exception, TemplateBound) as exc:
            raise MergeError(f"{self.where}: {_problem(exc)}") from None
        finally:
            sys.settrace(previous)
            state.deadline = None
