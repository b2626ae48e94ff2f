"""The emulated cuDNN Frontend (tests/emulated_gpu/cudnn) against the real one: the same API, so that what CI passes on
the emulator calls the real Frontend correctly.

The emulator stands where `nvidia-cudnn-frontend` stands on a GPU machine, and every GPU code path of cupynet runs
on it in CI. A call it accepts but the real module refuses (a misspelt keyword, a keyword where pybind11 takes
the argument by position only, a function a newer Frontend dropped) would pass CI and first fail on a GPU. So
every public function, method and enum member the emulator has must exist in the installed Frontend, with
parameters that take what the emulator's take:

  * each emulated parameter is either a named parameter of the real function (one of its pybind11 overloads, or
    its Python signature where the Frontend wraps it in Python), or, where the real overload names it `argN`
    (pybind11's position-only arguments), position-only in the emulator too (declared before a `/`), so that
    cupynet's calls cannot pass it by keyword;
  * every parameter the real function requires, the emulated one requires or takes too.

The Frontend imports without a GPU or libcudnn, so the test extra installs it (the newest version pyproject.toml
allows); these tests skip, saying why, where it is not importable.
"""
import enum
import importlib.util
import inspect
import pathlib
import re
import sys

import pytest

EMULATOR = pathlib.Path(__file__).resolve().parent / "emulated_gpu" / "cudnn" / "__init__.py"
# The emulator's own helpers, public names the real Frontend does not have and cupynet never calls.
EMULATOR_ONLY = {"knob.takes"}
POSITION_ONLY = re.compile(r"arg\d+$")


@pytest.fixture(scope="module")
def real():
    try:
        import cudnn
    except Exception as error:       # ImportError, or OSError where a library it loads at import is missing
        pytest.skip(f"the cuDNN Frontend is not importable here ({type(error).__name__}: {error}); "
                    f"pip install -e '.[test]' installs it")
    if "emulated" in getattr(cudnn, "__version__", ""):
        pytest.skip("`cudnn` is the emulated Frontend here (tests/emulated_gpu on the path)")
    return cudnn


@pytest.fixture(scope="module")
def emulated():
    spec = importlib.util.spec_from_file_location("emulated_cudnn_frontend", EMULATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _split_top_level(text):
    """'a: list[int] = [], b: X = <e.A: 1>' -> ['a: list[int] = []', ' b: X = <e.A: 1>']."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "([<{"
        depth -= char in ")]>}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + ([current] if current.strip() else [])


def real_signatures(function, name):
    """[(parameters, required)] of each overload of a real Frontend function, without self: from inspect where it is
    Python, else parsed from pybind11's docstring ('name(self: T, a: T = default, ...) -> R', one line each)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        signature = None
    if signature is not None and not any(p.kind == p.VAR_POSITIONAL for p in signature.parameters.values()):
        params = [p for p in signature.parameters.values() if p.name != "self"]
        return [([p.name for p in params], {p.name for p in params if p.default is p.empty})]
    overloads = []
    for line in (function.__doc__ or "").splitlines():
        match = re.match(r"\s*(?:\d+\.\s*)?" + re.escape(name) + r"\((.*)\)\s*->", line)
        if not match or "*args" in match.group(1):
            continue
        params = [(p.split(":")[0].strip(), "=" in p) for p in _split_top_level(match.group(1))]
        params = [(n, has_default) for n, has_default in params if n and n != "self"]
        overloads.append(([n for n, _ in params], {n for n, has_default in params if not has_default}))
    return overloads


def mismatch(emulated_function, real_function, name):
    """Why the emulated function would take a call the real one refuses, or None."""
    params = [p for p in inspect.signature(emulated_function).parameters.values() if p.name != "self"]
    overloads = real_signatures(real_function, name)
    if not overloads:
        return f"{name}: no signature found in the real Frontend"
    reasons = []
    for real_names, real_required in overloads:
        problems = []
        for position, param in enumerate(params):
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if param.name in real_names:
                continue
            position_only_there = position < len(real_names) and POSITION_ONLY.match(real_names[position])
            if not position_only_there:
                problems.append(f"no parameter {param.name!r}")
            elif param.kind != param.POSITIONAL_ONLY:
                problems.append(f"{param.name!r} is position-only there ({real_names[position]}): declare it before /")
        if len(params) > len(real_names) and not any(p.kind == p.VAR_KEYWORD for p in params):
            problems.append(f"{len(params)} parameters, {len(real_names)} there")
        covered = {p.name for p in params} | {n for i, n in enumerate(real_names) if i < len(params)}
        problems += [f"requires {n!r}" for n in sorted(real_required - covered)]
        if not problems:
            return None
        reasons.append("; ".join(problems))
    return f"{name}: " + " | ".join(reasons)


def public_callables(cls):
    return {name: value for name, value in vars(cls).items()
            if callable(value) and (not name.startswith("_") or name == "__init__")}


def test_the_installed_frontend_is_one_pyproject_allows(real):
    major, minor = (int(part) for part in real.__version__.split(".")[:2])
    assert (1, 22) <= (major, minor) < (1, 27), real.__version__


def test_every_module_function_of_the_emulator_takes_what_the_real_one_takes(real, emulated):
    functions = {name: value for name, value in vars(emulated).items()
                 if inspect.isfunction(value) and not name.startswith("_")}
    assert {"backend_version", "create_handle", "destroy_handle", "set_stream"} <= set(functions)
    problems = [mismatch(function, getattr(real, name, None), name) if hasattr(real, name) else f"no {name}"
                for name, function in functions.items()]
    assert [p for p in problems if p] == []


@pytest.mark.parametrize("emulated_class,real_class", [("pygraph", "pygraph"), ("_Tensor", "tensor"),
                                                       ("knob", "knob")])
def test_every_method_of_the_emulator_takes_what_the_real_one_takes(real, emulated, emulated_class, real_class):
    real_type = getattr(real, real_class)
    problems = []
    for name, method in public_callables(getattr(emulated, emulated_class)).items():
        if f"{real_class}.{name}" in EMULATOR_ONLY:
            continue
        if name == "__init__" and real_class in ("tensor", "knob"):
            continue        # made by pygraph.tensor and get_knobs_for_engine, never constructed by cupynet
        if not hasattr(real_type, name):
            problems.append(f"{real_class} has no {name}")
            continue
        problems.append(mismatch(method, getattr(real_type, name), name))
    assert [p for p in problems if p] == []


def test_the_emulated_knob_has_the_real_knobs_attributes(real, emulated):
    made = emulated.knob(emulated.knob_type.SPLIT_K_SLC, 64, 1, 1)
    attributes = {name for name in vars(made) if not name.startswith("_")}
    assert attributes <= set(dir(real.knob)), attributes - set(dir(real.knob))


def test_every_enum_member_of_the_emulator_is_the_real_ones(real, emulated):
    enums = {name: value for name, value in vars(emulated).items()
             if inspect.isclass(value) and issubclass(value, enum.Enum)}
    assert {"data_type", "heur_mode", "numerical_note", "behavior_note", "knob_type"} <= set(enums)
    missing = {name: sorted(set(members.__members__) - set(getattr(real, name).__members__))
               for name, members in enums.items()}
    assert {name: names for name, names in missing.items() if names} == {}


def test_the_emulated_error_is_the_real_ones_name(real, emulated):
    assert issubclass(real.cudnnGraphNotSupportedError, Exception)
    assert emulated.cudnnGraphNotSupportedError.__name__ == real.cudnnGraphNotSupportedError.__name__


def test_a_keyword_given_where_the_real_frontend_takes_position_only_is_caught(real):
    """The check can fail: a function taking `modes` by keyword, where the real create_execution_plans takes its
    argument by position only, and one with a keyword the real conv_fprop does not have."""
    def create_execution_plans(self, modes):
        pass

    def conv_fprop(self, image, weight, padding_mode=None):
        pass
    assert "position-only there" in mismatch(create_execution_plans, real.pygraph.create_execution_plans,
                                             "create_execution_plans")
    assert "no parameter 'padding_mode'" in mismatch(conv_fprop, real.pygraph.conv_fprop, "conv_fprop")
    assert sys.modules.get("cudnn") is real
