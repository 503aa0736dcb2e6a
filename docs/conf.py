"""Sphinx configuration of the sclatent documentation.

Build (from the repository root, with the ``docs`` extra installed)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

Nothing here needs the network. Two things happen at build time, both into ignored folders:

- the tutorials (``tutorials/*.md`` and ``tutorials/figures/``, kept beside their scripts at the
  top of the repository) are copied into ``docs/tutorials/``;
- autosummary writes one page per public module and per documented object into
  ``docs/generated/``. Which module documents which object is decided here
  (:func:`_api_pages`): an object gets one page, under the shortest public import path of its
  package (``sclatent.model.VAE``, not ``sclatent.model.vae.VAE``); a module that merely
  re-exports it links there.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import pkgutil
import re
import shutil
import sys
from pathlib import Path
from types import GenericAlias, ModuleType

from sphinx import addnodes

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")

import sclatent  # noqa: E402

# -- project ------------------------------------------------------------------------------------

project = "sclatent"
author = "sclatent developers"
copyright = "sclatent developers"
version = release = sclatent.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
html_theme = "alabaster"
smartquotes = False  # (``{'zinb', 'nb'}`` in a type must stay Python)
html_static_path: list[str] = []
html_copy_source = False
html_show_sourcelink = False

# -- autodoc / autosummary / numpydoc -------------------------------------------------------------

autosummary_generate = True
autosummary_generate_overwrite = True
autodoc_member_order = "bysource"
autodoc_class_signature = "mixed"
autodoc_typehints = "signature"
autodoc_inherit_docstrings = False  # torch's docstrings are not ours (forward, train, ...)
python_maximum_signature_line_length = 100
add_module_names = False

# numpydoc: the docstrings are numpydoc throughout. Types stay text (no cross-references made from
# ``name : type`` lines); the class pages list members through autodoc, not numpydoc's tables.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_attributes_as_param_list = True

myst_heading_anchors = 3

# Every cross-reference must resolve (a broken one is a warning, and the docs test builds with -W),
# except to the third-party and standard-library types that signatures, base classes and docstrings
# name (``torch.Tensor``, ``numpy.ndarray``, ``anndata.AnnData``, ``os.PathLike``, ...): there is no
# intersphinx (it would need the network), so Sphinx has nothing to link them to.
nitpicky = True
_THIRD_PARTY = "torch|numpy|scipy|pandas|anndata|ad|pyro|matplotlib"  # (``ad.AnnData``: a string annotation)
_STANDARD_LIBRARY = "os|pathlib|argparse|collections|ctypes|inspect|abc"
nitpick_ignore_regex = [(r"py:.*", rf"({_THIRD_PARTY}|{_STANDARD_LIBRARY})\..+")]
# type aliases of allowed values (``Literal[...]``) as dataclass signatures show them; their values
# are listed in each field's description
nitpick_ignore = [
    ("py:class", "Dispersion"),
    ("py:class", "GeneLikelihood"),
    ("py:class", "Prior"),
    ("py:class", "Posterior"),
]

# -- tutorials: copied from ../tutorials at build time (docs/tutorials/ is ignored by git) --------


def _copy_tutorials() -> None:
    source, target = ROOT / "tutorials", DOCS / "tutorials"
    target.mkdir(exist_ok=True)
    wanted = {path.name for path in source.glob("*.md")}
    for stale in target.glob("*.md"):
        if stale.name not in wanted:
            stale.unlink()
    for path in sorted(source.glob("*.md")):
        _copy_if_changed(path, target / path.name)
    figures = source / "figures"
    if figures.is_dir():
        (target / "figures").mkdir(exist_ok=True)
        for path in sorted(figures.iterdir()):
            if path.is_file():
                _copy_if_changed(path, target / "figures" / path.name)


def _copy_if_changed(source: Path, target: Path) -> None:
    # (an unchanged copy keeps its mtime, so an incremental build does not re-read it)
    if not target.exists() or target.read_bytes() != source.read_bytes():
        shutil.copyfile(source, target)


_copy_tutorials()

# -- the API pages: which public module documents which object ----------------------------------


#: Private modules that public docstrings point at: documented too (under their package).
POINTED_AT = ("sclatent._native", "sclatent.data._counts", "sclatent.cli._common")


def _public_modules(package: ModuleType) -> list[ModuleType]:
    """``package`` and every module under it with no ``_``-prefixed part in its name (or in
    :data:`POINTED_AT`)."""
    modules = [package]
    for info in pkgutil.iter_modules(package.__path__):
        name = f"{package.__name__}.{info.name}"
        if info.name.startswith("_") and name not in POINTED_AT:
            continue
        module = importlib.import_module(name)
        modules.extend(_public_modules(module) if info.ispkg else [module])
    return modules


def _kind(value: object) -> str | None:
    if isinstance(value, ModuleType):
        return None
    if inspect.isclass(value) and not isinstance(value, GenericAlias):  # (``list[int]`` passes isclass)
        return "exceptions" if issubclass(value, BaseException) else "classes"
    if inspect.isfunction(inspect.unwrap(value)) or inspect.isbuiltin(value):  # (functools wrappers too)
        return "functions"
    return "data"


def _exports(module: ModuleType) -> dict[str, object]:
    """What ``module`` offers: its ``__all__``, or else the classes and functions defined in it
    and the module-level data documented with a ``#:`` comment."""
    if hasattr(module, "__all__"):
        return {name: getattr(module, name) for name in module.__all__}
    from sphinx.pycode import ModuleAnalyzer

    documented = {name for (_, name) in ModuleAnalyzer.for_module(module.__name__).find_attr_docs()}
    return {
        name: value
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (
            (_kind(value) in ("classes", "exceptions", "functions") and value.__module__ == module.__name__)
            or (name in documented and _kind(value) == "data")
        )
    }


def _owner(name: str, value: object, module: str, exports: dict[str, dict[str, object]]) -> str:
    """The module whose page documents ``value``: the shallowest public package on the way to
    where it is defined (or, for data, to ``module``) that exports the same object."""
    data = _kind(value) == "data"

    def offers(candidate: str) -> bool:
        offered = exports.get(candidate, {})
        if data:  # (by name too: equal small numbers or strings are often the same object)
            return name in offered and offered[name] is value
        return any(item is value for item in offered.values())

    home = module if data else getattr(value, "__module__", None)
    parts = (home if isinstance(home, str) else module).split(".")
    for depth in range(1, len(parts) + 1):
        if offers(".".join(parts[:depth])):
            return ".".join(parts[:depth])
    # defined in no public module on its own way up (a re-export from elsewhere): shallowest exporter
    return min((mod for mod in exports if offers(mod)), key=lambda mod: (mod.count("."), mod))


def _api_pages(modules: list[ModuleType], exports: dict[str, dict[str, object]]) -> dict[str, dict[str, list]]:
    names = {module.__name__ for module in modules}
    pages = {}
    for module in modules:
        page: dict[str, list] = {"classes": [], "exceptions": [], "functions": [], "data": [], "elsewhere": []}
        for name, value in exports[module.__name__].items():
            kind = _kind(value)
            if kind is None:
                continue
            owner = _owner(name, value, module.__name__, exports)
            if owner == module.__name__:
                page[kind].append(name)
            else:
                role = {"classes": "class", "exceptions": "exc", "functions": "func"}.get(kind, "data")
                page["elsewhere"].append((name, role, _documented_name(name, value, module.__name__, exports)))
        prefix = module.__name__ + "."
        page["modules"] = sorted(name for name in names if name.startswith(prefix) and "." not in name[len(prefix) :])
        pages[module.__name__] = page
    pages[sclatent.__name__]["modules"] = []  # api.rst lists the top-level modules, by topic
    return pages


def _documented_name(name: str, value: object, module: str, exports: dict[str, dict[str, object]]) -> str:
    """The full name under which ``value`` (offered by ``module`` as ``name``) is documented."""
    owner = _owner(name, value, module, exports)
    if _kind(value) == "data":
        return f"{owner}.{name}"
    return f"{owner}.{next(n for n, v in exports[owner].items() if v is value)}"


def _remove_stale_pages(pages: dict[str, dict[str, list]]) -> None:
    """Delete generated pages of objects no longer documented (autosummary only adds and overwrites)."""
    wanted = {f"{module}.rst" for module in pages}
    for module, page in pages.items():
        for kind in ("classes", "exceptions", "functions"):
            wanted.update(f"{module}.{name}.rst" for name in page[kind])
    for path in (DOCS / "generated").glob("*.rst"):
        if path.name not in wanted:
            path.unlink()


_MODULES = _public_modules(sclatent)
_EXPORTS = {module.__name__: _exports(module) for module in _MODULES}
autosummary_context = {"api": _api_pages(_MODULES, _EXPORTS)}
_remove_stale_pages(autosummary_context["api"])

# -- cross-references: a name resolves the way Python resolves it -------------------------------
#
# A docstring names an object the way its own module sees it (``:class:`CellData``` in
# ``sclatent.data.neighbours``, ``:func:`sclatent.data.registry.count_source```); the API documents
# it once, under its public path (``sclatent.data.CellData``). On a reference Sphinx cannot
# resolve, import the name from the docstring's module (or as written) and link to where that
# object is documented; an inherited method links to the documented class that defines it.

_DOCUMENTED = {
    id(value): _documented_name(name, value, module, _EXPORTS)
    for module, offered in _EXPORTS.items()
    for name, value in offered.items()
    if _kind(value) in ("classes", "exceptions", "functions")
}
_PUBLIC_MODULES = {module.__name__ for module in _MODULES}


def _documented_target(dotted: str) -> str | None:
    parts = dotted.split(".")
    if parts[0] != sclatent.__name__:
        return None
    for split in range(len(parts), 0, -1):
        try:
            value: object = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        break
    else:
        return None
    where, rest = ".".join(parts[:split]), parts[split:]
    if not rest:
        return where if where in _PUBLIC_MODULES else None
    name, *attributes = rest
    if not hasattr(value, name):
        return None
    value = getattr(value, name)
    if _kind(value) == "data":
        offered = _EXPORTS.get(where, {})
        return _documented_name(name, value, where, _EXPORTS) if offered.get(name) is value and not attributes else None
    documented = _DOCUMENTED.get(id(value))
    if documented is None:
        return None
    for attribute in attributes:
        if not inspect.isclass(value):
            return None
        definer = next((cls for cls in value.__mro__ if attribute in vars(cls)), None)
        if definer is None or id(definer) not in _DOCUMENTED:
            return None
        documented, value = f"{_DOCUMENTED[id(definer)]}.{attribute}", vars(definer)[attribute]
    return documented


def _private(target: str) -> bool:
    parts = target.split(".")
    return parts[0] == sclatent.__name__ and any(p.startswith("_") and not p.startswith("__") for p in parts)


def _in_signature(node) -> bool:
    while node is not None:
        if isinstance(node, addnodes.desc_signature):
            return True
        node = node.parent
    return False


def _resolve_as_python_does(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target, module, cls = node["reftarget"], node.get("py:module"), node.get("py:class")
    if _private(target) and _in_signature(node):
        return contnode  # a private type in a signature: named, not documented (opaque by design)
    candidates = [f"{module}.{cls}.{target}"] if module and cls else []
    if module:  # the page's module, then its packages
        parts = module.split(".")
        candidates += [".".join([*parts[:depth], target]) for depth in range(len(parts), 0, -1)]
    # the scopes of the docstring's own object, where Python defines it ("docstring of a.b.Class.method")
    defined = re.search(r"docstring of ([\w.]+)", node.source or "")
    if defined:
        parts = defined.group(1).split(".")
        candidates += [".".join([*parts[:depth], target]) for depth in range(len(parts), 0, -1)]
    candidates.append(target)
    domain = env.get_domain("py")
    for candidate in candidates:
        documented = _documented_target(candidate)
        if documented is not None and documented != target:
            resolved = domain.resolve_xref(
                env, node["refdoc"], app.builder, node["reftype"], documented, node, contnode
            )
            if resolved is not None:
                return resolved
    return None


def _signature(app, what, name, obj, options, signature, return_annotation):
    """Runs before numpydoc's handler. An object without a signature (data, attributes) keeps none:
    ``(None, None)`` ends the event unchanged (numpydoc would give a ``list[...]`` alias one, and
    Sphinx 9 fails to set a signature where it found none). A dataclass field's ``default_factory``
    shows as ``dict()``, not ``<factory>`` (not Python: Sphinx would split that signature at commas)."""
    if signature is None:
        return None, None
    if signature and "<factory>" in signature and dataclasses.is_dataclass(obj):
        for item in dataclasses.fields(obj):
            if item.init and item.default_factory is not dataclasses.MISSING:
                call = f"{getattr(item.default_factory, '__name__', 'factory')}()"
                signature = signature.replace("<factory>", call, 1)
        return signature, return_annotation
    return None


def _no_borrowed_docstring(app, what, name, obj, options, lines):
    """Data documented without a ``#:`` comment get no text, rather than the docstring of their
    type (``tuple``'s, ``int``'s). Runs before numpydoc's handler."""
    borrowed = getattr(type(obj), "__doc__", None)
    if (
        what in ("data", "attribute")
        and isinstance(borrowed, str)
        and "\n".join(lines).strip() == inspect.cleandoc(borrowed)
    ):
        lines.clear()


def setup(app):
    app.connect("autodoc-process-docstring", _no_borrowed_docstring, priority=400)
    app.connect("autodoc-process-signature", _signature, priority=400)
    app.connect("missing-reference", _resolve_as_python_does)
