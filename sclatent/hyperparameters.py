"""Hyperparameters declared once per model family, read by the model, its module and the CLI.

A family declares a frozen dataclass of :func:`setting` fields, e.g.::

    @dataclass(frozen=True)
    class VAEHyperparameters(Hyperparameters):
        n_latent: int = setting(10, "Latent dimension.", minimum=1)
        gene_likelihood: Literal["zinb", "nb", "poisson"] = setting("zinb", "Count distribution.")

Each field states its name, type, default, allowed values (a ``Literal`` type or ``minimum``) and
help text in one place. From it:

- the model class gets its signature (``inspect.signature(VAE)``, ``help(VAE)``, IDEs, Sphinx) and
  the ``Parameters`` entries of its docstring (:func:`describe_hyperparameters`);
- ``Model(adata, **hyperparameters)`` validates the values (:meth:`Hyperparameters.from_dict`: an
  unknown name or a value out of range is an error naming the valid ones);
- the module takes the same keyword arguments (validated the same way);
- the CLI adds one option per field (:meth:`Hyperparameters.add_arguments`: ``--n-latent``,
  ``--gene-likelihood {zinb,nb,poisson}``, ...) and reads them back (:meth:`Hyperparameters.from_arguments`).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args, get_origin


def setting(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    cli: bool = True,
    module: bool = True,
) -> Any:
    """A hyperparameter field: default, one-line help, optional bounds.

    Parameters
    ----------
    default
        Default value (immutable: use tuples for sequences, None for an optional dict).
    help
        What it is, in one sentence (shown in the model's docstring and ``--help``).
    minimum, maximum
        Inclusive bounds of a number (checked on construction).
    cli
        Whether the command line offers it as an option.
    module
        Whether it is passed to the module (False: used by the model class only).
    """
    metadata = {"help": help, "minimum": minimum, "maximum": maximum, "cli": cli, "module": module}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Hyperparameters:
    """Base of a family's hyperparameters (a frozen dataclass of :func:`setting` fields)."""

    #: Name used in error messages (the model family), e.g. ``"VAE"``.
    family: ClassVar[str] = "model"

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            choices = _choices(hints[item.name])
            # (an optional choice, ``Literal[...] | None``, also takes None)
            optional = _strip_optional(hints[item.name]) is not hints[item.name]
            if choices is not None and value not in choices and not (value is None and optional):
                raise ValueError(f"{item.name} must be one of {choices}, got {value!r}.")
            low, high = item.metadata.get("minimum"), item.metadata.get("maximum")
            if value is not None and not isinstance(value, bool) and isinstance(value, int | float):
                if low is not None and value < low:
                    raise ValueError(f"{item.name} must be >= {low}, got {value!r}.")
                if high is not None and value > high:
                    raise ValueError(f"{item.name} must be <= {high}, got {value!r}.")
        self.validate()

    def validate(self) -> None:
        """Checks across fields (e.g. "n_flows >= 1 for a flow prior"); raise ``ValueError``. None by default."""

    # ----------------------------------------------------------------- dicts

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Hyperparameters:
        """Validated hyperparameters from ``values`` (missing names take their defaults).

        Raises ``TypeError`` naming the unknown names and the valid ones, ``ValueError`` for a
        value out of range.
        """
        names = [item.name for item in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise TypeError(f"{cls.family} got unexpected hyperparameter(s) {unknown}; valid ones are {names}.")
        return cls(**{k: _frozen(v) for k, v in values.items()})

    def to_dict(self, module_only: bool = False) -> dict[str, Any]:
        """Plain, JSON-friendly values (tuples as lists); ``module_only`` keeps what the module takes."""
        return {
            item.name: _plain(getattr(self, item.name))
            for item in dataclasses.fields(self)
            if not module_only or item.metadata.get("module", True)
        }

    # ----------------------------------------------------------------- command line

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, defaults: Mapping[str, Any] | None = None) -> None:
        """One ``--option`` per CLI field, with its type, choices, default and help.

        ``defaults`` overrides a field's default for this command (e.g. ``fit-flow``'s
        ``prior="realnvp"``); a field named in ``defaults`` with value None is left out.
        """
        defaults = dict(defaults or {})
        hints = _hints(cls)
        for item in dataclasses.fields(cls):
            if not item.metadata.get("cli", True) or (item.name in defaults and defaults[item.name] is None):
                continue
            default = defaults.get(item.name, item.default)
            option = "--" + item.name.replace("_", "-")
            kind, choices = _base_type(hints[item.name]), _choices(hints[item.name])
            text = item.metadata.get("help", "")
            if kind is bool:
                parser.add_argument(option, action=argparse.BooleanOptionalAction, default=default, help=text)
            elif kind is tuple:
                inner = get_args(_strip_optional(hints[item.name]))[0]
                parser.add_argument(option, type=inner, nargs="+", default=default, help=text)
            else:
                parser.add_argument(option, type=kind, choices=choices, default=default, help=text)

    @classmethod
    def argument_values(cls, args: argparse.Namespace) -> dict[str, Any]:
        """The values :meth:`add_arguments` parsed, by field name (fields without an option left out),
        unvalidated: for a model class whose constructor resolves them first (then validates)."""
        return {item.name: getattr(args, item.name) for item in dataclasses.fields(cls) if item.name in vars(args)}

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> Hyperparameters:
        """The hyperparameters parsed by :meth:`add_arguments`, validated (fields without an option keep
        their default)."""
        return cls.from_dict(cls.argument_values(args))

    # ----------------------------------------------------------------- signatures and docs

    @classmethod
    def signature_parameters(cls) -> list[inspect.Parameter]:
        """Keyword-only parameters with defaults and annotations, for a model's signature."""
        hints = _hints(cls)
        return [
            inspect.Parameter(
                item.name, inspect.Parameter.KEYWORD_ONLY, default=item.default, annotation=hints[item.name]
            )
            for item in dataclasses.fields(cls)
        ]

    @classmethod
    def describe(cls, indent: str = "    ") -> str:
        """numpydoc ``Parameters`` entries (``name : type, default ...`` and the help), one per field.

        Types are written the numpydoc way (``{'zinb', 'nb'}``, ``tuple of int``, ``float or None``);
        the plain-text help is escaped where reStructuredText would read markup into it
        (``|z1|``, ``||J||_F^2``).
        """
        hints = _hints(cls)
        lines = []
        for item in dataclasses.fields(cls):
            lines.append(f"{indent}{item.name} : {_type_text(hints[item.name])}, default {item.default!r}")
            lines.append(f"{indent}    {_rst_text(item.metadata.get('help', ''))}")
        return "\n".join(lines)


def describe_hyperparameters(model_class: type, hyperparameters_class: type[Hyperparameters]) -> None:
    """Give ``model_class`` the signature ``(<its data arguments>, *, <hyperparameters>, seed=0)`` and
    fill the ``{hyperparameters}`` marker of its docstring with their numpydoc entries."""
    init = inspect.signature(model_class.__init__)
    leading = [
        p for name, p in init.parameters.items() if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    seed = [p for p in leading if p.name == "seed"]
    leading = [p for p in leading if p.name != "seed"]
    keyword_seed = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in seed]
    model_class.__signature__ = inspect.Signature(
        [*leading, *hyperparameters_class.signature_parameters(), *keyword_seed]
    )
    if model_class.__doc__ and "{hyperparameters}" in model_class.__doc__:
        marker = next(line for line in model_class.__doc__.splitlines() if "{hyperparameters}" in line)
        indent = marker[: len(marker) - len(marker.lstrip())]
        model_class.__doc__ = model_class.__doc__.replace(marker, hyperparameters_class.describe(indent))


# ----------------------------------------------------------------------------- type helpers


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(hint: Any) -> Any:
    args = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) in (typing.Union, _union_type()) and len(args) == 1:
        return args[0]
    return hint


def _union_type() -> Any:
    import types

    return types.UnionType


def _choices(hint: Any) -> tuple | None:
    hint = _strip_optional(hint)
    return get_args(hint) if get_origin(hint) is Literal else None


def _base_type(hint: Any) -> type:
    hint = _strip_optional(hint)
    if get_origin(hint) is Literal:
        return type(get_args(hint)[0])
    origin = get_origin(hint)
    if origin in (tuple, list):
        return tuple
    return hint if isinstance(hint, type) else str


def _type_text(hint: Any) -> str:
    """numpydoc type of a field: ``int``, ``{'a', 'b'}``, ``tuple of int``, ``dict or None``."""
    inner = _strip_optional(hint)
    optional = " or None" if inner is not hint else ""
    choices = _choices(hint)
    if choices is not None:
        return "{" + ", ".join(repr(c) for c in choices) + "}" + optional
    origin, args = get_origin(inner), get_args(inner)
    if origin in (tuple, list) and args:
        text = f"{origin.__name__} of {_type_text(args[0])}"
    elif isinstance(origin, type):
        text = origin.__name__
    else:
        text = getattr(inner, "__name__", None) or str(inner).replace("typing.", "")
    return text + optional


def _rst_text(text: str) -> str:
    """Plain help text safe in a docstring: backslash, backquote and ``|`` escaped, and ``*`` where it
    touches a word (it could open or close emphasis); nothing else changes."""
    text = re.sub(r"([\\`|])", r"\\\1", text)
    return re.sub(r"(?<=\S)\*|\*(?=\S)", r"\\*", text)


def _frozen(value: Any) -> Any:
    """Lists (from JSON or the CLI) as tuples: the dataclass is frozen and hashable."""
    return tuple(value) if isinstance(value, list) else value


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
