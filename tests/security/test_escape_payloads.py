"""Known sandbox-escape payloads from other Python "safe eval" projects: all rejected, 400.

Each payload comes from a public advisory or issue (cited beside it). None may
compile, run, or answer anything but 400 invalid_expression naming a construct.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

PAYLOADS = [
    # simpleeval #15 (https://github.com/danthedeckie/simpleeval/issues/15): a function's
    # __globals__ reaches the module namespace, then sys.modules.
    "f.__globals__['sys'].modules['os'].system('id')",
    "x.func_globals",
    # simpleeval #138 (https://github.com/danthedeckie/simpleeval/issues/138): a generator's
    # frame hands out f_globals['__builtins__'].exec.
    "foo.bar().gi_frame.f_globals['__builtins__'].exec('raise RuntimeError()')",
    "foo.bar().cr_frame.f_globals",
    # asteval #86 (https://github.com/lmfit/asteval/issues/86): print.__reduce__() returns
    # getattr, which undoes every attribute check.
    "print.__reduce__()[0](print.__reduce__()[1][0], 'symtable')",
    "x.__reduce_ex__(2)",
    # The classic subclass walk reported against many eval sandboxes, e.g.
    # edges #31 (https://github.com/Laboratory-for-Energy-Systems-Analysis/edges/issues/31).
    "().__class__.__bases__[0].__subclasses__()",
    "().__class__.__base__.__subclasses__()[0](['sh', '-c', 'id'])",
    "(1).__class__.__mro__[-1].__subclasses__()",
    # numexpr #323 (https://github.com/pydata/numexpr/issues/323): a lambda with a default
    # argument builds code objects from the subclass list (crashes CPython).
    "(lambda fc=(lambda n: [c for c in ().__class__.__bases__[0].__subclasses__() "
    "if c.__name__ == n][0]): "
    "fc('function')(fc('code')(0,0,0,0,0,b'a',(),(),(),'','',0,b''),{})())()",
    # numexpr #564 (https://github.com/pydata/numexpr/pull/564): a regex sanitizer bypassed;
    # the fix was an AST allow-list. Builtins reached by name:
    "__import__('os').system('id')",
    "eval('1+1')",
    "exec('import os')",
    "compile('1', 'x', 'eval')",
    "open('/etc/passwd')",
    "getattr(x, '__class__')",
    "globals()",
    "vars()",
    "breakpoint()",
    # sympy #24990 (https://github.com/sympy/sympy/issues/24990) and sirepo #1637
    # (https://github.com/radiasoft/sirepo/issues/1637): sympify/lambdify eval their text.
    "print(hello)",
    'Symbol(\'__import__("os").system("id")\')',
    # sympy #10805 (https://github.com/sympy/sympy/issues/10805): attribute access and
    # f-strings are the way out of sympify's eval.
    "f'{x.__class__}'",
    "f'{().__class__.__bases__[0].__subclasses__()}'",
    # hive #715 (https://github.com/aden-hive/hive/issues/715), smolagents #2271
    # (https://github.com/huggingface/smolagents/pull/2271): str.format field paths walk dunders.
    "'{0.__globals__}'.format(f)",
    "'{0.__class__.__bases__[0].__subclasses__}'.format('a')",
    # pandas.eval / DataFrame.query (Checkmarx, "Glass sandbox", on pandas.eval:
    # https://checkmarx.com/zero-post/glass-sandbox-complexity-of-python-sandboxing):
    # local-variable references and method calls on reachable objects.
    "@__builtins__",
    "x.T.__class__.__init__.__globals__['__builtins__']['__import__']('os')",
    'df.query(\'@__import__("os").system("id")\')',
    # Unicode identifiers normalise (NFKC) to other names: a fullwidth exec.
    "\uff45\uff58\uff45\uff43('1')",
    # Walrus, comprehensions, conditionals, lambdas, subscripts: constructs, not math.
    "(y := x)",
    "[c for c in x]",
    "x if x else x",
    "(lambda: 1)()",
    "x[0]",
    "_x + 1",
    "__builtins__",
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_create_jvp_escape_payload_is_400(client: TestClient, payload: str) -> None:
    r = client.post("/jvp", json={"expression": payload, "primals": {"x": 1.0}})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_expression"
    assert error["param"] == "expression"
    assert (
        "not allowed" in error["message"]
        or "Syntax error" in error["message"]
        or ("Unknown function" in error["message"])
    ), error["message"]
