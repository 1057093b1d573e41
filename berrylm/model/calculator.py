"""The python calculator the chat models call: arithmetic only, by walking a whitelisted AST.

Model output is never given to eval/exec/compile. `ast.parse(mode="eval")` builds a tree, and `_Eval` accepts
only these nodes: int/float literals, + - * / // % ** (binary), unary + -, comparisons (and chains), calls of
the whitelisted functions with positional arguments, and the names pi, e (also spelled math.pi, math.sqrt...).
Everything else (names, attributes, subscripts, strings, lambdas, comprehensions, keywords...) is refused.

Bounds, checked BEFORE the work is done: expression length, AST node count and depth, integer size in bits
(a product or power whose result would exceed MAX_INT_BITS is refused without computing it), factorial
argument, float overflow, NaN/inf results. serve/tools/sandbox.py adds a process with CPU/memory limits and a timeout.

Results are formatted by `format_number`, which is part of the contract with the training data:
ints in plain decimal; integral floats below 1e15 as ints ("6"); other floats with at most 12 significant digits,
trailing zeros removed, plain notation for 1e-6 <= |x| < 1e15 and scientific ("1.5e-07") otherwise.
"""

from __future__ import annotations

import ast
import math
import operator
from decimal import Decimal

MAX_CHARS = 500
MAX_NODES = 300
MAX_DEPTH = 100  # a left-leaning sum of 100 terms is 100 deep
MAX_INT_BITS = 4096
MAX_FACTORIAL = 1000
MAX_ROUND_DIGITS = 15


class CalcError(ValueError):
    """A short message the model can read, e.g. "division by zero"."""


def _check_int(x):
    if isinstance(x, int) and not isinstance(x, bool) and x.bit_length() > MAX_INT_BITS:
        raise CalcError("number too large")
    return x


def _check_float(x):
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        raise CalcError("number too large" if math.isinf(x) else "undefined result")
    return x


def _bits(x) -> float:
    """Rough size of |x| in bits (floats count as their exponent)."""
    if isinstance(x, int):
        return float(max(1, abs(x).bit_length()))
    return math.log2(abs(x)) + 1 if x else 1.0


def _pow(a, b):
    if isinstance(a, int) and isinstance(b, int) and b >= 0:
        if abs(a) > 1 and math.log2(abs(a)) * b > MAX_INT_BITS + 1:  # result bits, estimated before computing
            raise CalcError("number too large")
        return a ** b
    if a == 0 and b < 0:
        raise CalcError("division by zero")
    if a < 0 and not float(b).is_integer():
        raise CalcError("undefined result (fractional power of a negative number)")
    try:
        return float(a) ** float(b)
    except OverflowError:
        raise CalcError("number too large") from None


def _mul(a, b):
    if isinstance(a, int) and isinstance(b, int) and _bits(a) + _bits(b) > MAX_INT_BITS + 1:
        raise CalcError("number too large")
    return a * b


def _div(op):
    def f(a, b):
        if b == 0:
            raise CalcError("division by zero")
        return op(a, b)
    return f


def _truediv(a, b):
    if b == 0:
        raise CalcError("division by zero")
    if isinstance(a, int) and isinstance(b, int) and a % b == 0:
        return a // b
    return a / b


BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: _mul, ast.Div: _truediv,
          ast.FloorDiv: _div(operator.floordiv), ast.Mod: _div(operator.mod), ast.Pow: _pow}
CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
          ast.Gt: operator.gt, ast.GtE: operator.ge}


def _factorial(x):
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    if not isinstance(x, int) or x < 0:
        raise CalcError("factorial needs a non-negative whole number")
    if x > MAX_FACTORIAL:
        raise CalcError(f"factorial argument too large (max {MAX_FACTORIAL})")
    return math.factorial(x)


def _log(x, base=None):
    if x <= 0 or (base is not None and (base <= 0 or base == 1)):
        raise CalcError("math domain error")
    return math.log(x) if base is None else math.log(x, base)


def _sqrt(x):
    if x < 0:
        raise CalcError("math domain error")
    return math.isqrt(x) if isinstance(x, int) and math.isqrt(x) ** 2 == x else math.sqrt(x)


def _round(x, nd=None):
    if nd is None:
        return round(x)
    if not isinstance(nd, int) or abs(nd) > MAX_ROUND_DIGITS:
        raise CalcError(f"round digits must be a whole number within ±{MAX_ROUND_DIGITS}")
    return round(x, nd)


def _float_fn(fn):
    def f(x):
        try:
            return fn(x)
        except OverflowError:
            raise CalcError("number too large") from None
        except ValueError:
            raise CalcError("math domain error") from None
    return f


FUNCTIONS = {"sqrt": (_sqrt, 1, 1), "exp": (_float_fn(math.exp), 1, 1), "log": (_log, 1, 2),
             "sin": (_float_fn(math.sin), 1, 1), "cos": (_float_fn(math.cos), 1, 1),
             "tan": (_float_fn(math.tan), 1, 1), "floor": (math.floor, 1, 1), "ceil": (math.ceil, 1, 1),
             "factorial": (_factorial, 1, 1), "abs": (abs, 1, 1), "round": (_round, 1, 2),
             "min": (min, 2, 20), "max": (max, 2, 20)}
CONSTANTS = {"pi": math.pi, "e": math.e}


def _number(x):
    if isinstance(x, bool):
        raise CalcError("unsupported: True/False as a number")
    return x


class _Eval:
    def __init__(self):
        self.nodes = 0

    def __call__(self, node: ast.AST, depth: int = 0):
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise CalcError("expression too long")
        if depth > MAX_DEPTH:
            raise CalcError("expression nested too deeply")
        d = depth + 1
        if isinstance(node, ast.Expression):
            return self(node.body, d)
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise CalcError(f"unsupported: {type(v).__name__} literal")
            return _check_float(_check_int(v))
        if isinstance(node, ast.BinOp) and type(node.op) in BINOPS:
            a, b = _number(self(node.left, d)), _number(self(node.right, d))
            try:
                return _check_float(_check_int(BINOPS[type(node.op)](a, b)))
            except OverflowError:
                raise CalcError("number too large") from None
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            v = _number(self(node.operand, d))
            return -v if isinstance(node.op, ast.USub) else +v
        if isinstance(node, ast.Compare) and all(type(o) in CMPOPS for o in node.ops):
            left = self(node.left, d)
            for op, comp in zip(node.ops, node.comparators):
                right = self(comp, d)
                if not CMPOPS[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.Call):
            name = self._name(node.func)
            if name not in FUNCTIONS:
                raise CalcError(f"unsupported function: {name}")
            if node.keywords:
                raise CalcError("unsupported: keyword arguments")
            fn, lo, hi = FUNCTIONS[name]
            if not lo <= len(node.args) <= hi or any(isinstance(a, ast.Starred) for a in node.args):
                raise CalcError(f"{name} takes {lo}" + (f" to {hi}" if hi > lo else "") + " argument(s)")
            args = [_number(self(a, d)) for a in node.args]
            return _check_float(_check_int(fn(*args)))
        if isinstance(node, (ast.Name, ast.Attribute)):
            name = self._name(node)
            if name in CONSTANTS:
                return CONSTANTS[name]
            raise CalcError(f"unsupported name: {name}")
        if isinstance(node, (ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare)):
            raise CalcError("unsupported operator (use + - * / // % ** and comparisons)")
        raise CalcError(f"unsupported: {type(node).__name__}")

    @staticmethod
    def _name(node: ast.AST) -> str:
        """`sqrt` or `math.sqrt` -> "sqrt"; anything else is refused."""
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "math":
            return node.attr
        raise CalcError("unsupported: attribute access")


def normalise(expression: str) -> str:
    """Unicode operators a model or user may write: × ÷ − and thousands separators are not accepted."""
    return expression.replace("×", "*").replace("÷", "/").replace("−", "-").replace("–", "-").strip()


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression and return the formatted result, or raise CalcError."""
    if not isinstance(expression, str):
        raise CalcError("expression must be a string")
    if len(expression) > MAX_CHARS:
        raise CalcError(f"expression too long (max {MAX_CHARS} characters)")
    expr = normalise(expression)
    if not expr:
        raise CalcError("empty expression")
    if not expr.isascii():
        raise CalcError("unsupported character")
    if "^" in expr:
        raise CalcError("use ** for powers (^ is not supported)")
    if "#" in expr:
        raise CalcError("unsupported: comments")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalcError("syntax error") from None
    try:
        value = _Eval()(tree)
    except ZeroDivisionError:
        raise CalcError("division by zero") from None
    except OverflowError:
        raise CalcError("number too large") from None
    except RecursionError:
        raise CalcError("expression nested too deeply") from None
    except CalcError:
        raise
    except (TypeError, ValueError, ArithmeticError):  # a case the checks above missed: still one short line
        raise CalcError("invalid operands") from None
    return format_number(value)


def format_number(x) -> str:
    """The result string (the contract with the training data; see the module docstring).

    ints -> str(int); integral floats with |x| < 1e15 -> as an int ("6"); other floats rounded to 12
    significant digits, trailing zeros dropped, plain for 1e-6 <= |x| < 1e15, else scientific ("1.5e-07").
    """
    if isinstance(x, (bool, int)):
        return str(x)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    s = f"{x:.12g}"  # 12 significant digits; the rounding may carry into the next power of ten
    v = abs(float(s))
    if v == 0:
        return "0"
    if 1e-6 <= v < 1e15:
        s = format(Decimal(s), "f")  # plain notation of exactly those digits
        return s.rstrip("0").rstrip(".") if "." in s else s
    mant, exp = f"{float(s):.11e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp):+03d}"
