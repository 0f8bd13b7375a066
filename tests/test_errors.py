"""Every bad spec gets one clear line: file, line, column, op and problem; exit 2; no file touched.

The table below is the record of every bad input tried and the exact message it gets. All of it runs
through `derive generate` against an output directory holding a copy of generated/, in this process:
the command line's `main` for each case, with every warning recorded (a fresh interpreter would print
it). One case also runs as a real `python -m derive` process, exactly as a user's CI would.
"""

import contextlib
import io
import shutil
import subprocess
import sys
import traceback
import warnings

import pytest

from derive.build import render_catalog
from derive.cli import main
from derive.model import SpecError
from derive.spec import parse_catalog

from conftest import GENERATED

SPEC = "bad.toml"


def op(equation, inputs='["x[n, k]"]', extra="", name="bad", reference="x"):
    """A one-op catalog; the equation is on line 3 and starts at column 13."""
    return f'[ops.{name}]\ninputs = {inputs}\nequation = "{equation}"\nreference = "{reference}"\n{extra}'


VALID = op("y[n, k] = tanh(x[n, k])", reference="torch.tanh(x)")
KNOWN_FUNCTIONS = ("Abs, Max, Min, abs, acos, acosh, asin, asinh, atan, atan2, atanh, cos, cosh, erf, exp, log, log1p, "
                   "logsumexp, max, mean, min, sigmoid, sign, sin, sinh, size, softmax, softplus, sqrt, sum, tan, tanh, "
                   "where")
DIFFERENTIABLE_HINT = "(its gradient would be zero everywhere); list only inputs that get a gradient in 'differentiable'"
BALANCED = "x[n]"
for _ in range(8):
    BALANCED = f"({BALANCED} + {BALANCED})"      # 256 leaves, shallow: too many nodes, not too deep

# (id, spec text, the exact message after "derive: error: ")
CASES = [
    # TOML and catalog structure
    ("toml-syntax", "[ops.bad\n",
     "bad.toml:1:9: TOML syntax error: Expected ']' at the end of a table declaration"),
    ("toml-unclosed-array", '[ops.bad]\ninputs = ["x[n]"\n',
     "bad.toml:2: TOML syntax error: Unclosed array"),
    ("duplicate-op", VALID + "\n" + VALID,
     "bad.toml:6: op 'bad': duplicate op name: [ops.bad] is declared twice"),
    ("duplicate-key", VALID + 'equation = "y[n, k] = x[n, k]"\n',
     "bad.toml:5:31: TOML syntax error: key 'equation' is set twice"),
    ("op-names-differ-in-case", VALID + "\n" + VALID.replace("[ops.bad]", "[ops.Bad]"),
     "bad.toml:6: op 'Bad': op names 'bad' and 'Bad' differ only in case; their files would collide on "
     "case-insensitive file systems"),
    ("empty-file", "",
     "bad.toml: empty catalog: no [ops.<name>] tables"),
    ("empty-ops-table", "[ops]\n",
     "bad.toml: empty catalog: no [ops.<name>] tables"),
    ("comments-only", "# nothing here\n",
     "bad.toml: empty catalog: no [ops.<name>] tables"),
    ("unknown-top-level-key", "version = 1\n" + VALID,
     "bad.toml: unknown top-level key(s) ['version']; ops go under [ops.<name>]"),
    ("op-not-a-table", "[ops]\nbad = 3\n",
     "bad.toml: op 'bad': an op must be a table of keys"),
    ("missing-equation", '[ops.bad]\ninputs = ["x[n]"]\nreference = "x"\n',
     "bad.toml:1: op 'bad': missing required key 'equation'"),
    ("unknown-op-key", VALID + "gradient = 1\n",
     "bad.toml:5: op 'bad': unknown key(s) ['gradient']; allowed: ['differentiable', 'doc', 'equation', "
     "'inputs', 'integer', 'layer', 'optional', 'pad', 'pad_value', 'params', 'ranges', 'reference', 'saving', 'sizes']"),
    ("inputs-not-a-list", '[ops.bad]\ninputs = "x[n]"\nequation = "y[n] = x[n]"\nreference = "x"\n',
     "bad.toml:2: op 'bad': 'inputs' must be a non-empty list of strings such as \"x[n, k]\""),
    ("control-character-in-doc", VALID + 'doc = "a\\u0000b"\n',
     "bad.toml:5: op 'bad': 'doc' contains the control character U+0000"),
    # names
    ("op-name-keyword", op("y[n, k] = x[n, k]", name="lambda"),
     "bad.toml:1: op 'lambda': bad op name: 'lambda' is a Python keyword"),
    ("op-name-dunder", op("y[n, k] = x[n, k]", name="__init__"),
     "bad.toml:1: op '__init__': bad op name: '__init__' starts with an underscore (reserved for dunder and "
     "private names)"),
    ("op-name-generated", op("y[n, k] = x[n, k]", name="linear_backward"),
     "bad.toml:1: op 'linear_backward': bad op name: 'linear_backward' collides with generated names (grad_*, "
     "tangent_*, size_*, shared_*, saved_*, *_forward, *_backward, *_jvp)"),
    ("op-name-not-identifier", op("y[n, k] = x[n, k]", name='"my-op"'),
     "bad.toml:1: op 'my-op': bad op name: 'my-op' is not a valid identifier"),
    ("input-keyword", op("y[n] = x[n]", inputs='["class[n]"]'),
     "bad.toml:2: op 'bad': bad input declaration 'class[n]': 'class' is a Python keyword and cannot be a name"),
    ("index-keyword", op("y[n] = x[n]", inputs='["x[for]"]'),
     "bad.toml:2: op 'bad': bad input declaration 'x[for]': 'for' is a Python keyword and cannot be a name"),
    ("input-dunder", op("y[n] = x[n]", inputs='["__x[n]"]'),
     "bad.toml:2: op 'bad': bad input declaration '__x[n]': '__x' starts with an underscore (reserved for "
     "dunder and private names)"),
    ("input-generated-name", op("y[n] = grad_x[n]", inputs='["grad_x[n]"]'),
     "bad.toml:2: op 'bad': bad input declaration 'grad_x[n]': 'grad_x' collides with generated names "
     "(grad_*, tangent_*, size_*, shared_*, saved_*, *_forward, *_backward, *_jvp)"),
    ("input-shadows-torch", op("y[n] = torch[n]", inputs='["torch[n]"]'),
     "bad.toml:2: op 'bad': bad input declaration 'torch[n]': 'torch' shadows a Python or torch name used in "
     "generated code"),
    ("input-declared-twice", op("y[n] = x[n]", inputs='["x[n]", "x[k]"]'),
     "bad.toml:2: op 'bad': input 'x' is declared twice"),
    ("input-declaration-expression", op("y[n] = x[n]", inputs='["x[n + 1]"]'),
     "bad.toml:2: op 'bad': bad input declaration 'x[n + 1]': indices must be names, optionally after a "
     "leading '...'"),
    ("param-keyword", op("y[n] = x[n] * lambda", inputs='["x[n]"]', extra="params = { lambda = 1.0 }\n"),
     "bad.toml:5: op 'bad': bad param name: 'lambda' is a Python keyword"),
    ("param-not-finite", op("y[n] = x[n] * a", inputs='["x[n]"]', extra="params = { a = inf }\n"),
     "bad.toml:5: op 'bad': param 'a' needs a finite number as default"),
    ("result-generated-name", op("grad_y[n] = x[n]", inputs='["x[n]"]'),
     "bad.toml:3:13: op 'bad': bad result name: 'grad_y' collides with generated names (grad_*, tangent_*, "
     "size_*, shared_*, saved_*, *_forward, *_backward, *_jvp)"),
    ("result-named-like-input", op("x[n, k] = x[n, k]"),
     "bad.toml:3: op 'bad': the result 'x' has the name of an input or param"),
    ("index-named-like-result", op("y[n, y] = x[n, y]", inputs='["x[n, y]"]'),
     "bad.toml:3: op 'bad': index 'y' has the name of a tensor or param"),
    # the equation
    ("equation-syntax", op("y[n] = x[n] +", inputs='["x[n]"]'),
     "bad.toml:3:26: op 'bad': equation is not valid syntax: invalid syntax"),
    ("equation-two-statements", op("y[n] = x[n]; z = 1", inputs='["x[n]"]'),
     "bad.toml:3: op 'bad': equation must be one assignment: out[i, ...] = expression"),
    ("unknown-function", op("y[n, k] = frob(x[n, k])"),
     f"bad.toml:3:23: op 'bad': unknown function 'frob' (known: {KNOWN_FUNCTIONS})"),
    ("method-call", op("y[n, k] = x[n, k].exp()"),
     "bad.toml:3:23: op 'bad': only plain function names can be called (no attributes or methods)"),
    ("undeclared-input", op("y[n, k] = z[n, k]"),
     "bad.toml:3:23: op 'bad': unknown name 'z' (not an input, param or index)"),
    ("undeclared-index-on-the-left", op("y[n, j] = x[n, k]"),
     "bad.toml:3:18: op 'bad': index 'j' on the left-hand side is not provided by any right-hand term"),
    ("left-index-no-term-provides", op("y[n, m] = sum(x[n, k], k)", inputs='["x[n, k]", "w[m]"]'),
     "bad.toml:3:18: op 'bad': index 'm' on the left-hand side is not provided by any right-hand term"),
    ("index-with-two-sizes", op("y[n, k] = x[n, k] * w[k, n]", inputs='["x[n, k]", "w[k, m]"]'),
     "bad.toml:3:33: op 'bad': index 'n' is used with two different sizes: 'n' and 'm' (dim of w)"),
    ("input-used-with-two-ranks", op("y[n, k] = x[n, k] + x[n]"),
     "bad.toml:3:33: op 'bad': input 'x' is declared with 2 dim(s) [n, k] but indexed with 1"),
    ("input-indexed-with-extra-dim", op("y[n, k] = x[n, k, j]"),
     "bad.toml:3:23: op 'bad': input 'x' is declared with 2 dim(s) [n, k] but indexed with 3"),
    ("index-as-value", op("y[n, k] = x[n, k] * k"),
     "bad.toml:3:33: op 'bad': index 'k' is a position, not a value: use it as a subscript, compare it with "
     "another index in a where() condition (as in where(k <= t, ...)), or write its size as size(k)"),
    ("index-compared-with-a-value", op("y[n, k] = where(x[n, k] > k, x[n, k], 0)"),
     "bad.toml:3:39: op 'bad': index 'k' is a position, not a value: use it as a subscript, compare it with "
     "another index in a where() condition (as in where(k <= t, ...)), or write its size as size(k)"),
    ("index-without-size", op("y[n, k, t] = where(t <= k + 1, x[n, k], 0)"),
     "bad.toml:3:32: op 'bad': index 't' has no size: no input declares it and it is compared with no single "
     "index that has one (write it as an input's index, or compare it with one, as in where(k <= t, ...))"),
    ("index-condition-always-true", op("y[n, k] = where(k <= k, x[n, k], 0)"),
     "bad.toml:3:29: op 'bad': the condition k <= k is always True: write the branch it picks directly"),
    ("size-of-a-tensor", op("y[n, k] = x[n, k] / size(x)"),
     "bad.toml:3:33: op 'bad': size() takes one index name, as in size(d)"),
    ("batch-dims-mismatch", op("y[n] = x[..., n]", inputs='["x[n]"]'),
     "bad.toml:3:20: op 'bad': input 'x' is declared without batch dims '...' and must be indexed the same way"),
    ("reduction-over-absent-index", op("y[n] = sum(x[n, k], j)"),
     "bad.toml:3:33: op 'bad': sum() over index 'j', which its operand does not use"),
    ("reduction-over-index-twice", op("y = sum(sum(x[n, k], k), k)"),
     "bad.toml:3:38: op 'bad': sum() over index 'k', which its operand does not use"),
    ("reduction-without-index", op("y = sum(x[n, k])"),
     "bad.toml:3:17: op 'bad': sum(expression, index, ...) needs an expression and at least one index"),
    ("seed-shape-bug", op("loss = mean((pred[n, o] - target[n])**2, n)", inputs='["pred[n, o]", "target[n]"]'),
     "bad.toml:3:34: op 'bad': index 'o' of pred is neither on the left-hand side nor summed over: add it to "
     "the result or reduce it with sum/mean (for a size-1 dim, declare pred without it: derive does not "
     "broadcast (N, 1) against (N))"),
    # non-differentiable constructs marked differentiable
    ("atan2-one-argument", op("y[n, k] = atan2(x[n, k])"),
     "bad.toml:3:23: op 'bad': atan2() takes 2 arguments"),
    ("sign-two-arguments", op("y[n, k] = sign(x[n, k], x[n, k])"),
     "bad.toml:3:23: op 'bad': sign() takes one argument"),
    ("inverse-trig-outside-its-domain", op("y[n, k] = x[n, k] * asin(2)"),
     "bad.toml:3:33: op 'bad': constant asin(2) in asin(2) is not a real number (generated code computes in real "
     "floats)"),
    ("floor", op("y[n, k] = floor(x[n, k])"),
     "bad.toml:3:23: op 'bad': 'floor' is not differentiable (its derivative is zero almost everywhere and "
     "undefined at its jumps)"),
    ("comparison-as-value", op("y[n, k] = (x[n, k] > 0) * x[n, k]"),
     "bad.toml:3:24: op 'bad': comparisons are not differentiable; use them only as where(condition, a, b)"),
    ("step-function-through-where", op("y[n, k] = where(x[n, k] > 0, 1, 0)"),
     "bad.toml:3: op 'bad': input 'x' is differentiable but the equation depends on it only through where() "
     f"conditions, and comparisons are not differentiable {DIFFERENTIABLE_HINT}"),
    ("where-condition-without-tensor", op("y[n, k] = where(2 > 1, x[n, k], 0)"),
     "bad.toml:3:29: op 'bad': a where() condition must compare a tensor: one on params and numbers alone "
     "is the same everywhere, so write the branch it picks directly"),
    ("where-condition-not-comparison", op("y[n, k] = where(x[n, k], 1, x[n, k])"),
     "bad.toml:3:29: op 'bad': a where() condition must be one comparison: <, <=, > or >= (or, between "
     "indices, == and !=), or an integer input (true where it is not 0)"),
    ("differentiable-input-unused", op("y[n, k] = x[n, k]", inputs='["x[n, k]", "w[k]"]'),
     f"bad.toml:3: op 'bad': input 'w' is differentiable but the equation does not use it {DIFFERENTIABLE_HINT}"),
    ("constant-result", op("y = sum(x[n, k], n, k) * 0"),
     f"bad.toml:3: op 'bad': input 'x' is differentiable but the equation does not use it {DIFFERENTIABLE_HINT}"),
    ("no-differentiable-input", op("y[n, k] = x[n, k]", extra="differentiable = []\n"),
     "bad.toml:5: op 'bad': no differentiable input: there is no backward to derive"),
    ("differentiable-not-an-input", op("y[n, k] = x[n, k]", extra='differentiable = ["z"]\n'),
     "bad.toml:5: op 'bad': 'differentiable' names 'z', which is not an input"),
    # constants
    ("division-by-zero", op("y[n, k] = x[n, k] / 0"),
     "bad.toml:3:23: op 'bad': division by zero"),
    ("division-by-constant-expression-zero", op("y[n, k] = x[n, k] / (2 - 2.0)"),
     "bad.toml:3:23: op 'bad': division by zero"),
    ("zero-to-negative-power", op("y[n, k] = x[n, k] * 0 ** -1"),
     "bad.toml:3:33: op 'bad': 0 ** (-1) is infinite or undefined"),
    ("log-of-zero", op("y[n, k] = log(0) * x[n, k]"),
     "bad.toml:3:23: op 'bad': log(0) is infinite or undefined"),
    ("constant-overflows", op("y[n, k] = x[n, k] * 1e400"),
     "bad.toml:3:33: op 'bad': number is too large for a float (it overflows to infinity)"),
    ("exponent-too-large", op("y[n, k] = x[n, k] * 10 ** 10 ** 10"),
     "bad.toml:3:33: op 'bad': exponent 10000000000 is too large (the limit is 1000)"),
    ("string-constant", op("y[n, k] = x[n, k] * 'a'"),
     "bad.toml:3:33: op 'bad': constant 'a' is not a number"),
    # size limits
    ("expression-too-long", op("y[n] = " + "x[n] + " * 600 + "x[n]", inputs='["x[n]"]'),
     "bad.toml:3: op 'bad': equation is 4211 characters long; the limit is 4000"),
    ("expression-too-large", op(f"y[n] = {BALANCED}", inputs='["x[n]"]'),
     "bad.toml:3: op 'bad': expression is too large (over 600 syntax nodes)"),
    ("chain-too-deep", op("y[n] = " + " + ".join(["x[n]"] * 60), inputs='["x[n]"]'),
     "bad.toml:3: op 'bad': expression is nested too deeply (over 40 levels; each operator of a chain such "
     "as a + b + c adds one)"),
    ("functions-nested-too-deeply", op("y[n] = " + "exp(" * 45 + "x[n]" + ")" * 45, inputs='["x[n]"]'),
     "bad.toml:3: op 'bad': expression is nested too deeply (over 40 levels; each operator of a chain such "
     "as a + b + c adds one)"),
    ("parentheses-nested-too-deeply", op("y[n] = " + "(" * 250 + "x[n]" + ")" * 250, inputs='["x[n]"]'),
     "bad.toml:3:220: op 'bad': equation is not valid syntax: too many nested parentheses"),
    ("too-many-where", op("y[n] = where(x[n] > 0, x[n], where(x[n] > 1, 2 * x[n], where(x[n] > 2, "
                          "3 * x[n], x[n])))", inputs='["x[n]"]'),
     "bad.toml:3:68: op 'bad': too many where() calls (the limit is 2 per equation)"),
    ("too-many-piecewise-functions", op("y[n] = " + " + ".join(f"Max(x[n], {i})" for i in range(7)),
                                        inputs='["x[n]"]'),
     "bad.toml:3:110: op 'bad': too many piecewise functions: where, Max, Min and Abs together (the limit is 6 "
     "per equation)"),
    # the reference
    ("reference-syntax", op("y[n, k] = x[n, k]", reference="torch.relu(x"),
     "bad.toml:4: op 'bad': reference: not a valid expression: '(' was never closed"),
    ("reference-unknown-name", op("y[n, k] = x[n, k]", reference="numpy.tanh(x)"),
     "bad.toml:4:14: op 'bad': reference: unknown name 'numpy' (only inputs, params and torch)"),
    ("reference-denied-function", op("y[n, k] = x[n, k]", reference="torch.save(x, 'f')"),
     "bad.toml:4:14: op 'bad': reference: 'torch.save' is not an allowed torch function"),
    ("reference-chained-comparison", op("y[n, k] = x[n, k]", reference="(0 < x < 1) * x"),
     "bad.toml:4:15: op 'bad': reference: a chained comparison is not allowed (Python joins a < b < c with 'and', "
     "which a tensor of several elements refuses): write torch.logical_and(a < b, b < c)"),
    ("reference-identity-comparison", op("y[n, k] = x[n, k]", reference="(x is x) * x"),
     "bad.toml:4: op 'bad': reference: 'Is' is not allowed"),
    ("reference-einsum-bad-equation", op("y[n, k] = x[n, k]", reference="torch.einsum('nk;kn', x)"),
     "bad.toml:4:27: op 'bad': reference: string 'nk;kn' is not allowed (only option names such as 'sum', and the "
     "equation of torch.einsum such as 'ij,jk->ik' as its first argument)"),
    ("reference-equation-string-elsewhere", op("y[n, k] = x[n, k]", reference="torch.relu(x, 'nk->kn')"),
     "bad.toml:4:28: op 'bad': reference: string 'nk->kn' is not allowed (only option names such as 'sum', and "
     "the equation of torch.einsum such as 'ij,jk->ik' as its first argument)"),
    # other keys
    ("step-at-zero-retired", op("y[n, k] = Max(x[n, k], 0)", extra="step_at_zero = 0\n"),
     "bad.toml:5: op 'bad': 'step_at_zero' is retired: a kink's value is set where it is written, as the first "
     "argument's share of the gradient at a tie: Max(x[i], 0, tie=0) is relu (0 at 0), Max(x[i], lo, tie=1) is "
     "clamp_min (passes at the bound); without tie= Max and Min split a tie evenly"),
    # tie= on Max and Min
    ("tie-out-of-range", op("y[n, k] = Max(x[n, k], 0, tie=2)"),
     "bad.toml:3:43: op 'bad': Max(a, b, tie=t) takes a number t from 0 to 1: a's share of the gradient where "
     "a == b (b gets 1 - t)"),
    ("tie-not-a-number", op("y[n, k] = Min(x[n, k], 0, tie=s)", extra="params = { s = 0.5 }\n"),
     "bad.toml:3:43: op 'bad': Min(a, b, tie=t) takes a number t from 0 to 1: a's share of the gradient where "
     "a == b (b gets 1 - t)"),
    ("tie-boolean", op("y[n, k] = Max(x[n, k], 0, tie=True)"),
     "bad.toml:3:43: op 'bad': Max(a, b, tie=t) takes a number t from 0 to 1: a's share of the gradient where "
     "a == b (b gets 1 - t)"),
    ("tie-three-arguments", op("y[n, k] = Max(x[n, k], 0, 1, tie=0)"),
     "bad.toml:3:23: op 'bad': tie= needs Max() of exactly two arguments"),
    ("keyword-not-tie", op("y[n, k] = Max(x[n, k], 0, side=0)"),
     "bad.toml:3:23: op 'bad': Max() takes one keyword, tie= (the first argument's share of the gradient where "
     "the two are equal)"),
    ("keyword-on-abs", op("y[n, k] = Abs(x[n, k], tie=0)"),
     "bad.toml:3:23: op 'bad': Abs() takes no keyword arguments"),
    ("ranges-reversed", op("y[n, k] = x[n, k]", extra="ranges = { x = [1, 0] }\n"),
     "bad.toml:5: op 'bad': 'ranges' entry 'x' must name an input and give finite [low, high] with low < high"),
    ("integer-input-unused", op("y[n, k] = x[n, k]", inputs='["x[n, k]", "i[n]"]', extra='integer = ["i"]\n'),
     "bad.toml:5: op 'bad': integer input 'i' is never used"),
    # limits on reading and on the size of what is accepted (bounded work)
    ("toml-nested-too-deeply", "a = " + "[" * 2000 + "]" * 2000 + "\n",
     "bad.toml: TOML nested too deeply (arrays or inline tables inside each other)"),
    ("too-many-ops", "".join(op("y[n] = x[n]", inputs='["x[n]"]', name=f"op{i}") + "\n" for i in range(201)),
     "bad.toml: 201 ops in one catalog; the limit is 200 (split it into several specs)"),
    ("too-many-inputs", op("y[n] = x0[n]", inputs=str([f"x{i}[n]" for i in range(33)]).replace("'", '"')),
     "bad.toml:2: op 'bad': 33 inputs and params; the limit is 32"),
    ("input-rank-too-large", op("y = x[a, b, c, d, e, f, g, h, i]", inputs='["x[a, b, c, d, e, f, g, h, i]"]'),
     "bad.toml:2: op 'bad': input 'x' has 9 indices; the limit is 8"),
    ("result-rank-too-large", op("y[a, b, c, d, e, f, g, h, i] = x[a, b, c, d] * x[e, f, g, h] * w[i]",
                                 inputs='["x[a, b, c, d]", "w[i]"]'),
     "bad.toml:3:13: op 'bad': the result has 9 indices; the limit is 8"),
    ("normalizations-nested-too-deeply", op("y[n, k] = softmax(softmax(softmax(softmax(x[n, k], k), k), k), k)"),
     "bad.toml:3:47: op 'bad': softmax and logsumexp are nested too deeply (inside each other: the limit is 3, "
     "as the derivation's work grows about 2.5x with each)"),
    ("reductions-nested-too-deeply", op("y[n] = " + "sum(" * 7 + "x[n, k]" + ", k)" * 7, inputs='["x[n, k]"]'),
     "bad.toml:3:44: op 'bad': reductions are nested too deeply (sum, mean, logsumexp and softmax inside each "
     "other: the limit is 6, as the derivation's work grows with each)"),
    ("piecewise-inside-softmax", op("y[n, k] = softmax(Max(x[n, k], 0) * Abs(x[n, k]) * Min(x[n, k], 1), k)"),
     "bad.toml:3:64: op 'bad': too many piecewise functions inside softmax or logsumexp (the limit is 2: their "
     "cases multiply in the derivative)"),
    # constants generated code could not hold
    ("constant-not-real", op("y[n, k] = x[n, k] * sqrt(-1)"),
     "bad.toml:3:33: op 'bad': constant I in sqrt(-1) is not a real number (generated code computes in real floats)"),
    ("constant-exp-overflows", op("y[n, k] = x[n, k] * exp(1000)"),
     "bad.toml:3:33: op 'bad': constant exp(1000) in exp(1000) is not a finite float64 (generated code computes "
     "in floats)"),
    ("constant-power-overflows", op("y[n, k] = x[n, k] * 10 ** 400"),
     "bad.toml:3:33: op 'bad': constant 1.00e+400 in 10 ** 400 is not a finite float64 (generated code computes "
     "in floats)"),
    ("constant-quotient-overflows", op("y[n, k] = x[n, k] / 5e-324"),
     "bad.toml:3:23: op 'bad': constant 2.00e+323 in x[n, k] / 5e-324 is not a finite float64 (generated code "
     "computes in floats)"),
    ("integer-beyond-float", op(f"y[n, k] = x[n, k] * {2 ** 1030}"),
     "bad.toml:3:33: op 'bad': number is too large for a float (it overflows to infinity)"),
    # names the generated module defines, and names that only look like ASCII
    ("input-named-like-the-function-class", op("y[n, k] = BadFunction[n, k]", inputs='["BadFunction[n, k]"]'),
     "bad.toml:3: op 'bad': 'BadFunction' is a name the generated module defines for op 'bad' (its function, "
     "Function class or custom op)"),
    ("param-named-like-the-custom-op", op("y[n, k] = x[n, k] * bad_op", extra="params = { bad_op = 1.0 }\n"),
     "bad.toml:3: op 'bad': 'bad_op' is a name the generated module defines for op 'bad' (its function, "
     "Function class or custom op)"),
    ("index-named-like-a-helper", op("y[n, args] = x[n, args]", inputs='["x[n, args]"]'),
     "bad.toml:2: op 'bad': bad input declaration 'x[n, args]': 'args' shadows a Python or torch name used in "
     "generated code"),
    ("homoglyph-name", op("y[n, k] = x[n, k]", inputs='["\u0445[n, k]"]'),
     "bad.toml:2: op 'bad': bad input declaration '\u0445[n, k]': '\u0445' contains '\u0445' (U+0445 CYRILLIC SMALL "
     "LETTER HA); names must be ASCII"),
    # text that reads differently from what it is
    ("right-to-left-override-in-doc", VALID + 'doc = "gradient \u202e of x"\n',
     "bad.toml:5: op 'bad': 'doc' contains the invisible or direction-changing character U+202E (RIGHT-TO-LEFT "
     "OVERRIDE)"),
    ("zero-width-space-in-reference", op("y[n, k] = x[n, k]", reference="x\u200b"),
     "bad.toml:4: op 'bad': 'reference' contains the invisible or direction-changing character U+200B "
     "(ZERO WIDTH SPACE)"),
]
IDS = [case[0] for case in CASES]
assert len(set(IDS)) == len(IDS)

# Warnings a fresh interpreter would not print (outside __main__) are not a user's concern.
SILENT_BY_DEFAULT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated_before():
    before = snapshot(GENERATED)
    yield
    assert snapshot(GENERATED) == before, "a bad spec changed the repository's generated/"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, generated_before):
    """A directory with `out/`, a copy of generated/ (what `derive generate` produced before)."""
    folder = tmp_path_factory.mktemp("errors")
    shutil.copytree(GENERATED, folder / "out")
    return folder


@pytest.fixture(scope="module")
def results(workdir):
    """`derive generate --spec bad.toml --out out` for every case, through the command line's `main` in this
    process: its status, what it printed, the warnings it raised and whether out/ stayed as it was."""
    found = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        for case_id, text, _ in CASES:
            (workdir / SPEC).write_text(text, encoding="utf-8")
            before = snapshot(workdir / "out")
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
                    warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    code = main(["generate", "--spec", SPEC, "--out", "out"])
                except BaseException:
                    code = "raised"
                    traceback.print_exc()
            untouched = snapshot(workdir / "out") == before
            if not untouched:     # put the output back, so that the next case starts from it again
                shutil.rmtree(workdir / "out")
                shutil.copytree(GENERATED, workdir / "out")
            found[case_id] = {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
                              "untouched": untouched,
                              "warnings": [str(w.message) for w in caught
                                           if not issubclass(w.category, SILENT_BY_DEFAULT)]}
    return found


@pytest.mark.parametrize("case_id, text, expected", CASES, ids=IDS)
def test_bad_spec_gets_one_clear_line(results, case_id, text, expected):
    result = results[case_id]
    assert "Traceback" not in result["stderr"], result["stderr"]
    assert result["code"] == 2, result
    assert result["stderr"] == f"derive: error: {expected}\n"
    assert result["stdout"] == ""
    assert result["warnings"] == []
    assert result["untouched"]


def test_messages_name_file_op_and_line():
    """Every message that is about an op names it, and every one about a key has a line."""
    for case_id, _, expected in CASES:
        assert expected.startswith(SPEC), case_id
        if "op '" not in expected:
            assert case_id in {"toml-syntax", "toml-unclosed-array", "duplicate-key", "empty-file",
                               "empty-ops-table", "comments-only", "unknown-top-level-key",
                               "toml-nested-too-deeply", "too-many-ops"}, case_id


def test_a_bad_spec_in_a_real_process(tmp_path, generated_before):
    """One real `python -m derive` process: exit status, stderr and files as a user's CI sees them."""
    _, text, expected = CASES[IDS.index("seed-shape-bug")]
    shutil.copytree(GENERATED, tmp_path / "out")
    (tmp_path / SPEC).write_text(text, encoding="utf-8")
    before = snapshot(tmp_path / "out")
    result = subprocess.run([sys.executable, "-m", "derive", "generate", "--spec", SPEC, "--out", "out"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"derive: error: {expected}\n"
    assert result.stdout == "" and snapshot(tmp_path / "out") == before


def test_check_reports_a_spec_error_with_exit_2(tmp_path, derive_cli):
    (tmp_path / SPEC).write_text(CASES[IDS.index("seed-shape-bug")][1], encoding="utf-8")
    result = derive_cli("check", "--spec", SPEC, "--out", "out", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("derive: error: bad.toml:3:34: op 'bad': index 'o' of pred")
    assert result.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path, derive_cli):
    (tmp_path / SPEC).write_text(CASES[IDS.index("unknown-function")][1], encoding="utf-8")
    for argv in (["--debug", "check"], ["check", "--debug"]):
        result = derive_cli(*argv, "--spec", SPEC, "--out", "out", cwd=tmp_path)
        assert result.returncode == 2
        assert "Traceback" in result.stderr and "unknown function 'frob'" in result.stderr.splitlines()[-1]


def test_missing_and_unreadable_spec_files(tmp_path, derive_cli):
    (tmp_path / "latin1.toml").write_bytes(b"[ops.caf\xe9]\n")
    for spec, message in (("missing.toml", "missing.toml: cannot read spec file: [Errno 2] No such file or "
                                           "directory: 'missing.toml'"),
                          ("latin1.toml", "latin1.toml: cannot read spec file: 'utf-8' codec can't decode byte "
                                          "0xe9 in position 8: invalid continuation byte")):
        result = derive_cli("check", "--spec", spec, "--out", "out", cwd=tmp_path)
        assert (result.returncode, result.stderr) == (2, f"derive: error: {message}\n")


@pytest.mark.parametrize("stage", ["derive", "plan", "lower"])
def test_a_failing_later_stage_becomes_a_spec_error(monkeypatch, tmp_path, stage):
    """Unsupported patterns found after parsing (ValueError in derivation, plan, lowering) name the op and line."""
    import derive.pipeline

    def unsupported(*args, **kwargs):
        raise ValueError("unsupported pattern\nover two lines")

    monkeypatch.setattr(derive.pipeline, stage, unsupported)
    spec = tmp_path / SPEC
    spec.write_text(VALID, encoding="utf-8")
    with pytest.raises(SpecError) as error:
        render_catalog(parse_catalog(VALID, str(spec)))
    assert str(error.value) == (f"{spec}:3: op 'bad': derive cannot handle this equation: "
                                f"unsupported pattern over two lines")
    assert isinstance(error.value.__cause__, ValueError)


def test_an_internal_error_of_a_later_stage_is_one_line_too(monkeypatch):
    import derive.pipeline

    def broken(*args, **kwargs):
        raise KeyError("k'")

    monkeypatch.setattr(derive.pipeline, "plan", broken)
    with pytest.raises(SpecError, match=r"^<spec>: op 'bad': internal error while generating \(KeyError: \"k'\"\); "
                                        r"--debug shows the traceback$"):
        render_catalog(parse_catalog(VALID))


def test_recursion_in_a_later_stage_is_a_clear_limit(monkeypatch):
    import derive.pipeline

    def recurse(*args, **kwargs):
        return recurse()

    monkeypatch.setattr(derive.pipeline, "derive", recurse)
    with pytest.raises(SpecError, match="the equation is too complex to derive"):
        render_catalog(parse_catalog(VALID))


def test_the_valid_base_spec_is_accepted():
    """The table's cases are each one mistake away from a spec that works."""
    files = render_catalog(parse_catalog(VALID, SPEC))
    assert "def bad_backward(grad_y, x" in files["bad.py"]



@pytest.mark.parametrize("namespace, problem", [
    ("class", "namespace 'class' is a Python keyword"),
    ("match", "namespace 'match' is a Python keyword"),
    ("prim", "namespace 'prim' is torch's own"),
    ("aten", "namespace 'aten' is torch's own"),
    ("loaded_libraries", "namespace 'loaded_libraries' is torch's own"),
    ("__init__", "namespace '__init__' starts with an underscore (reserved for torch's private namespaces)"),
    ("opé", "namespace 'opé' is not an ASCII identifier"),
    ("a::b", "namespace 'a::b' is not an ASCII identifier"),
    ("derive", "namespace 'derive' is reserved for the built-in catalog"),
])
def test_a_reserved_namespace_is_refused_in_one_line(tmp_path, monkeypatch, capsys, namespace, problem):
    """By flag and in [tool.derive], for generate and check; nothing is written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / SPEC).write_text(VALID)
    for command in ("generate", "check"):
        assert main([command, "--spec", SPEC, "--out", "out", "--namespace", namespace]) == 2
        assert capsys.readouterr().err == f"derive: error: --namespace: {problem}; choose another\n"
    (tmp_path / "pyproject.toml").write_text(f'[tool.derive]\nspec = "{SPEC}"\nnamespace = "{namespace}"\n')
    assert main(["generate"]) == 2
    in_config = "namespace must be a Python identifier" if namespace == "a::b" else f"{problem}; choose another"
    assert capsys.readouterr().err == f"derive: error: pyproject.toml: [tool.derive]: {in_config}\n"
    assert not (tmp_path / "out").exists() and not (tmp_path / "generated").exists()


def test_the_built_in_catalog_keeps_its_namespace(monkeypatch, capsys, render_once):
    monkeypatch.chdir(GENERATED.parent)
    assert main(["check", "--namespace", "derive"]) == 0
