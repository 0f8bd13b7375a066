"""No code runs from a spec: every string field refuses code, and user text reaches generated code only
inside docstrings, escaped.

Each payload would create a file named `pwned` in the working directory if anything executed it; the
tests run in a temporary directory and assert that the file never appears.
"""

import io
import json
import tokenize

import pytest
import torch

from derive.build import render_catalog
from derive.model import SpecError
from derive.spec import parse_catalog
from derive.testing import load_module, reference

from conftest import half_by_default

MARKER = "pwned"

# Code that would create MARKER if it ran, in every form a template or an `eval` could run it.
PAYLOADS = [
    f"__import__('os').system('touch {MARKER}')",
    f"__import__('pathlib').Path('{MARKER}').touch()",
    f"open('{MARKER}', 'w')",
    f"eval(\"open('{MARKER}', 'w')\")",
    f"exec(\"open('{MARKER}', 'w')\")",
    f"getattr(__builtins__, 'open')('{MARKER}', 'w')",
    "x.__class__.__mro__[-1].__subclasses__()",
    "x.__class__",
    f"(lambda: open('{MARKER}', 'w'))()",
    f"f\"{{open('{MARKER}', 'w')}}\"",
    f"[open('{MARKER}', 'w') for _ in (1,)]",
    f"{{open('{MARKER}', 'w') for _ in (1,)}}",
    f"(m := open('{MARKER}', 'w'))",
    f"{{{{ cycler.__init__.__globals__.os.popen('touch {MARKER}') }}}}",
    f"{{% set _ = cycler.__init__.__globals__.os.popen('touch {MARKER}') %}}",
    "{{ 7 * 7 }}",
    f"torch.save(x, '{MARKER}')",
    f"torch.PyTorchFileWriter('{MARKER}')",
    f"[torch.importlib][0].import_module('os').mkdir('{MARKER}')",
    f"[torch.serialization][0].save(x, '{MARKER}')",
    f"x.numpy().tofile('{MARKER}')",
    f"x.untyped_storage().from_file('{MARKER}', True, 8)",
    "torch.set_num_threads(1)",
    f"torch.nn.functional.torch.save(x, '{MARKER}')",
    "x.add_(1)",
    "breakpoint()",
    "globals()",
]
PAYLOAD_IDS = [f"payload{i}" for i in range(len(PAYLOADS))]


def toml_string(text: str) -> str:
    """A TOML basic string holding `text` exactly (JSON's escapes are TOML's)."""
    return json.dumps(text)


def spec_with(field: str, payload: str) -> str:
    """A valid one-op catalog with `payload` put into one of its string fields."""
    entry = {"name": "bad", "inputs": '["x[n]"]', "equation": toml_string("y[n] = x[n]"),
             "reference": toml_string("torch.relu(x)"), "extra": ""}
    if field == "op name":
        entry["name"] = toml_string(payload)
    elif field == "inputs":
        entry["inputs"] = f"[{toml_string(payload)}]"
    elif field == "equation":
        entry["equation"] = toml_string(payload)
    elif field == "equation right-hand side":
        entry["equation"] = toml_string(f"y[n] = {payload}")
    elif field == "equation left-hand side":
        entry["equation"] = toml_string(f"{payload} = x[n]")
    elif field == "reference":
        entry["reference"] = toml_string(payload)
    elif field == "params":
        entry["extra"] = f"params = {{ {toml_string(payload)} = 1.0 }}\n"
    elif field == "differentiable":
        entry["extra"] = f"differentiable = [{toml_string(payload)}]\n"
    elif field == "integer":
        entry["extra"] = f"integer = [{toml_string(payload)}]\n"
    elif field == "ranges":
        entry["extra"] = f"ranges = {{ {toml_string(payload)} = [0, 1] }}\n"
    elif field == "step_at_zero":
        entry["extra"] = f"step_at_zero = {toml_string(payload)}\n"
    else:
        raise AssertionError(field)
    return (f"[ops.{entry['name']}]\ninputs = {entry['inputs']}\nequation = {entry['equation']}\n"
            f"reference = {entry['reference']}\n{entry['extra']}")


CODE_FIELDS = ["op name", "inputs", "equation", "equation right-hand side", "equation left-hand side",
               "reference", "params", "differentiable", "integer", "ranges", "step_at_zero"]


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert not (tmp_path / MARKER).exists(), "a payload ran"


def test_the_unmodified_spec_is_valid():
    render_catalog(parse_catalog(spec_with("differentiable", "x")))


@pytest.mark.parametrize("field", CODE_FIELDS)
@pytest.mark.parametrize("payload", PAYLOADS, ids=PAYLOAD_IDS)
def test_code_in_a_spec_field_is_refused(field, payload, in_tmp_path):
    with pytest.raises(SpecError) as error:
        render_catalog(parse_catalog(spec_with(field, payload), "bad.toml"))
    message = str(error.value)
    assert message.startswith("bad.toml") and "\n" not in message
    assert not (in_tmp_path / MARKER).exists()


@pytest.mark.parametrize("payload", PAYLOADS, ids=PAYLOAD_IDS)
def test_a_refused_reference_never_reaches_eval(payload, in_tmp_path):
    """Had the whitelist let a reference through, `derive.testing.reference` would evaluate it."""
    with pytest.raises(SpecError, match="reference"):
        parse_catalog(spec_with("reference", payload))
    assert not (in_tmp_path / MARKER).exists()


def test_allowed_references_still_evaluate():
    text = spec_with("reference", "torch.nn.functional.relu(x).unsqueeze(-1).sum(-1, keepdim=False)"
                                    ".reshape(x.shape).to(torch.float32) * 1.0")
    op = parse_catalog(text.replace("y[n] = x[n]", "y[n] = Max(x[n], 0)")).ops[0]
    x = torch.tensor([-1.0, 2.0])
    assert torch.equal(reference(op)(x), torch.relu(x))


DOCS = [
    'a docstring with """triple quotes""" inside',
    "ends with a backslash \\",
    'ends with a quote "',
    "'''single triple quotes'''",
    "backslashes \\n \\x00 \\\\ and \\N{BULLET}",
    "{{ 7 * 7 }} {% if True %}template{% endif %} {# comment #}",
    *PAYLOADS,
]


def code_tokens(source: str) -> list[str]:
    """Every token of generated source that is code: not a comment, docstring or other string."""
    kinds = (tokenize.COMMENT, tokenize.STRING, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
    return [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in kinds]


@pytest.mark.parametrize("doc", half_by_default(DOCS), ids=[f"doc{i}" for i in range(len(DOCS))])
def test_doc_text_is_escaped_into_docstrings_and_never_run(doc, in_tmp_path):
    text = spec_with("differentiable", "x") + f"doc = {toml_string(doc)}\n"
    # each doc is another spec of `bad`: a namespace of its own, or importing it would fail
    files = render_catalog(parse_catalog(text), namespace=f"injection_doc{DOCS.index(doc)}")
    for name in ("bad.py", "broadcast/bad.py"):
        source = files[name]
        unstamped = "\n".join(line for line in source.split("\n")      # the hashes are hex
                               if "Fingerprint:" not in line and not line.startswith("SPEC_DIGEST = "))
        assert "49" not in unstamped            # no template evaluated the doc
        assert MARKER not in " ".join(code_tokens(source))
        path = in_tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(source, encoding="utf-8")
        module = load_module(path)
        assert doc.strip() in module.__doc__
    assert not (in_tmp_path / MARKER).exists()


def test_equation_text_reaches_code_only_as_docstrings():
    """The equation is copied into docstrings; comments (which could hold anything) are refused."""
    with pytest.raises(SpecError, match="comments are not allowed in an equation"):
        parse_catalog(spec_with("equation", 'y[n] = x[n]  # """ + __import__("os")'))
    files = render_catalog(parse_catalog(spec_with("equation", "y[n] = (x[n] +\\\n  x[n])")))
    assert all("\\" not in token for token in code_tokens(files["bad.py"]))
