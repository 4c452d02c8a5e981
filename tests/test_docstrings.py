"""Every public name has a docstring, and so has each public method and property of a
public class: the API reference (docs/api.md) is generated from them."""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Iterator
from types import ModuleType

import pytest

# the public modules (those docs/api.md documents); each one's __all__ is its public face,
# or, without one, the public names it defines (the pytest plugin's fixtures)
PUBLIC_MODULES = [
    "kongtask",
    "kongtask.aio",
    "kongtask.testing",
    "kongtask.testing.lifecycle",
    "kongtask.testing.pytest_plugin",
]


def _own_doc(obj: object) -> str | None:
    doc = getattr(obj, "__doc__", None)
    return doc.strip() if isinstance(doc, str) and doc.strip() else None


def _documented_attributes(cls: type) -> set[str]:
    """The names the class docstring's Google-style ``Attributes:`` section describes."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    section = re.search(r"^Attributes:\n((?:[ \t]+.*\n?|\n)+)", doc, re.MULTILINE)
    if section is None:
        return set()
    names = re.findall(r"^[ \t]+([\w, ]+):", section[1], re.MULTILINE)
    return {name.strip() for entry in names for name in entry.split(",")}


def _members(cls: type) -> Iterator[tuple[str, object]]:
    """Public functions, properties and class/static methods defined by ``cls`` itself,
    except properties its ``Attributes:`` section documents."""
    described = _documented_attributes(cls)
    for name, value in vars(cls).items():
        if name.startswith("_") or (isinstance(value, property) and name in described):
            continue
        if isinstance(value, classmethod | staticmethod):
            yield name, value.__func__
        elif isinstance(value, property) or inspect.isfunction(value):
            yield name, value


def public_names(module: ModuleType) -> list[str]:
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__
    ]


def undocumented(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    missing = []
    if not _own_doc(module):
        missing.append(module_name)
    for name in public_names(module):
        value = getattr(module, name)
        if isinstance(value, str | int | float | tuple | frozenset | dict | list):
            continue  # constants: described by the module and the reference pages
        if not _own_doc(value):
            missing.append(f"{module_name}.{name}")
        if inspect.isclass(value):
            missing += [
                f"{module_name}.{name}.{member}"
                for member, attr in _members(value)
                if not _own_doc(attr)
            ]
    return missing


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_public_name_has_a_docstring(module_name: str) -> None:
    assert undocumented(module_name) == []


def test_the_check_sees_a_missing_docstring() -> None:
    import kongtask

    original = kongtask.Job.__doc__
    kongtask.Job.__doc__ = None
    try:
        assert "kongtask.Job" in undocumented("kongtask")
    finally:
        kongtask.Job.__doc__ = original


def test_the_check_sees_an_undocumented_property() -> None:
    import kongtask

    original = kongtask.Job.__doc__
    assert original is not None
    kongtask.Job.__doc__ = original.replace("      run_at:", "      not_run_at:")
    try:
        assert undocumented("kongtask") == ["kongtask.Job.run_at"]
    finally:
        kongtask.Job.__doc__ = original


def test_every_module_the_reference_documents_is_checked() -> None:
    from docs_examples import DOCS

    api = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"^\.\. automodule:: ([\w.]+)", api, re.MULTILINE))
    assert documented == set(PUBLIC_MODULES)


def test_the_check_sees_a_fixture_without_a_docstring() -> None:
    from kongtask.testing import pytest_plugin

    fixture = pytest_plugin.kongtask_dsn
    original = fixture.__doc__
    fixture.__doc__ = None
    try:
        assert "kongtask.testing.pytest_plugin.kongtask_dsn" in undocumented(
            "kongtask.testing.pytest_plugin"
        )
    finally:
        fixture.__doc__ = original
