"""Writes bindings/anvil/_C.pyi, the type stubs of the pybind11 module anvil._C, from the module itself: the
signature pybind11 puts on the first line of every function's docstring, the docstrings, the classes' methods,
static methods and properties. tests/python/test_ops_api.py regenerates the text and compares it with the
committed file, so a binding added or changed without rerunning this fails a test.

    PYTHONPATH=build-cpu/python python bindings/stubgen.py          # rewrites bindings/anvil/_C.pyi
    PYTHONPATH=build-cpu/python python bindings/stubgen.py --check  # exit 1 when the file differs
"""
import inspect
import os
import re
import sys

HEADER = '''"""Type stubs of anvil._C (the pybind11 module of bindings/python_module.cpp), written by bindings/stubgen.py
from the module's own signatures; do not edit by hand (tests/python/test_ops_api.py compares them)."""
import collections.abc
import typing

import torch

'''
STUB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "anvil", "_C.pyi")


def _split_top(s, sep=","):
    """Splits s at sep where no bracket or quote is open."""
    parts, depth, quote, cur = [], 0, None, ""
    for ch in s:
        if quote:
            cur += ch
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def _clean_type(t, classes):
    # pybind11 spells a class by its C++ name where the binding came before the class was registered.
    t = re.sub(r"anvil::[a-z_:]*::(\w+)", r"\1", t)
    return t.replace("anvil._C.", "")


def _signature(doc, name, classes, method):
    """'name(a: T, b: U = 1) -> R' (the docstring's first line) -> ('(self, a: T, b: U = ...)', 'R')."""
    first = doc.split("\n", 1)[0].strip()
    m = re.match(rf"{re.escape(name)}\((.*)\)\s*->\s*(.+)$", first)
    if m is None:
        raise ValueError(f"stubgen: {name}: no pybind11 signature in its docstring ({first!r})")
    params = []
    for p in _split_top(m.group(1)):
        if ":" in p.split("=", 1)[0]:
            pname, rest = p.split(":", 1)
            annot, has_default = (rest.split("=", 1)[0], "=" in rest)
            params.append([pname.strip(), _clean_type(annot.strip(), classes), has_default])
        else:  # "self" or "*args"
            params.append([p.split("=", 1)[0].strip(), None, "=" in p])
    # pybind11 allows a required argument after a defaulted one, Python does not: such defaults are dropped.
    seen_required = False
    for p in reversed(params):
        if not p[2]:
            seen_required = True
        elif seen_required:
            p[2] = False
    out = []
    for i, (pname, annot, default) in enumerate(params):
        if method and i == 0:
            out.append("self")
            continue
        s = pname if annot is None else f"{pname}: {annot}"
        out.append(s + (" = ..." if default else ""))
    return "(" + ", ".join(out) + ")", _clean_type(m.group(2).strip(), classes)


def _doc_text(text):
    # A docstring's text as the body of a triple-quoted literal.
    return text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')


def _doc_body(doc):
    return _doc_text(doc.split("\n", 1)[1].strip()) if "\n" in doc else ""


def _emit_def(lines, indent, name, doc, classes, method, decorator=None):
    sig, ret = _signature(doc, name, classes, method)
    body = _doc_body(doc)
    if decorator:
        lines.append(f"{indent}{decorator}")
    if body:
        lines.append(f"{indent}def {name}{sig} -> {ret}:")
        lines.append(f'{indent}    """{body}"""')
        lines.append(f"{indent}    ...")
    else:
        lines.append(f"{indent}def {name}{sig} -> {ret}: ...")


def generate(module):
    names = sorted(n for n in dir(module) if not n.startswith("_"))
    classes = [n for n in names if inspect.isclass(getattr(module, n))]
    lines = [HEADER.rstrip("\n"), ""]
    for name in names:
        obj = getattr(module, name)
        lines.append("")
        if inspect.isclass(obj):
            lines.append(f"class {name}:")
            if obj.__doc__ and obj.__dict__.get("__doc__"):
                lines.append(f'    """{_doc_text(obj.__doc__.strip())}"""')
            members = [k for k in obj.__dict__ if not k.startswith("_") or k in ("__init__", "__call__")]
            for k in sorted(members):
                raw = obj.__dict__[k]
                if isinstance(raw, property):
                    doc = (raw.fget.__doc__ or "") if raw.fget else ""
                    m = re.search(r"->\s*(.+)$", doc.split("\n", 1)[0])
                    ret = _clean_type(m.group(1).strip(), classes) if m else "typing.Any"
                    lines.append("    @property")
                    lines.append(f"    def {k}(self) -> {ret}: ...")
                elif isinstance(raw, staticmethod):
                    _emit_def(lines, "    ", k, getattr(obj, k).__doc__ or "", classes, False, "@staticmethod")
                elif k == "__init__" and not (raw.__doc__ or "").startswith("__init__("):
                    continue  # no constructor bound: Python's default
                else:
                    _emit_def(lines, "    ", k, raw.__doc__ or "", classes, True)
            if lines[-1] == f"class {name}:":
                lines.append("    ...")
        else:
            _emit_def(lines, "", name, obj.__doc__ or "", classes, False)
    return "\n".join(lines) + "\n"


def main(argv):
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]  # the built anvil, not bindings/anvil
    import anvil._C as C
    text = generate(C)
    if "--check" in argv:
        current = open(STUB_PATH).read() if os.path.exists(STUB_PATH) else ""
        if current != text:
            print(f"{STUB_PATH} is out of date: run python bindings/stubgen.py", file=sys.stderr)
            return 1
        return 0
    tmp = STUB_PATH + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, STUB_PATH)
    print(f"wrote {STUB_PATH} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
