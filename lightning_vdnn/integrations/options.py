"""Which :class:`~lightning_vdnn.VDNNConfig` options each entry point takes, under which names and defaults.

Every option is declared once, in ``config.py``, with its type, default and the ``scope`` it belongs to
(``"offload"``, ``"streaming"``, ...). An :class:`Entry` says which scopes an entry point takes and the few
defaults it differs in (the table at the bottom); from it come the entry point's keyword arguments, its
``inspect.signature`` (what IDEs, LightningCLI and ``help()`` show), the check of unknown keywords, and the Hydra
schema (``conf/schema.py``). A field added to ``VDNNConfig`` reaches every entry point of its scope.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import types
import typing
from collections.abc import Mapping
from typing import Any, Callable, Optional, TypeVar

from lightning_vdnn.config import VDNNConfig

F = TypeVar("F", bound=Callable[..., Any])
_EMPTY: Mapping[str, Any] = types.MappingProxyType({})


@functools.lru_cache(maxsize=None)
def config_hints() -> dict[str, Any]:
    """The annotations of ``VDNNConfig``'s fields, evaluated."""
    return typing.get_type_hints(VDNNConfig)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashable, by identity
class Entry:
    """One entry point's view of the options.

    Attributes:
        name: how messages call it (``"VDNNStrategy"``, ``"offload_activations"``).
        scopes: the ``scope`` metadata of the ``VDNNConfig`` fields it takes.
        defaults: where its default differs from the field's, by field name (with the reason beside it).
        fixed: fields it sets itself, which are not arguments (``L2LZeroStrategy``: ``layer_streaming=True``).
        renamed: field name -> argument name (``activation_offload`` is ``policy`` outside the strategies).
        positional: argument names that may also be given by position, first.
    """

    name: str
    scopes: frozenset[str]
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    renamed: Mapping[str, str] = dataclasses.field(default_factory=dict)
    positional: tuple[str, ...] = ()

    @functools.cached_property
    def fields(self) -> dict[str, dataclasses.Field]:
        """Argument name -> the ``VDNNConfig`` field it sets, in the dataclass's order."""
        taken = [f for f in dataclasses.fields(VDNNConfig) if f.metadata["scope"] in self.scopes
                 and f.name not in self.fixed]
        return {self.renamed.get(f.name, f.name): f for f in taken}

    def default(self, field: dataclasses.Field) -> Any:
        return self.defaults.get(field.name, field.default)

    def takes(self, options: Mapping[str, Any]) -> bool:
        """Whether every key of ``options`` is an argument of this entry point."""
        return set(options) <= set(self.fields)

    def given(self, args: tuple[Any, ...], options: Mapping[str, Any]) -> dict[str, Any]:
        """The options given, ``args`` by position and ``options`` by keyword, by field name.

        Raises:
            TypeError: too many positional arguments, one given twice, or a keyword it does not take (naming
                the closest argument, or the entry points that take a ``VDNNConfig`` option it does not).
        """
        if len(args) > len(self.positional):
            raise TypeError(f"{self.name}() takes {len(self.positional)} positional option(s) "
                            f"({', '.join(self.positional) or 'none'}) but {len(args)} were given; pass the rest by "
                            "keyword.")
        given = dict(zip(self.positional, args))
        for key, value in options.items():
            if key in given:
                raise TypeError(f"{self.name}() got multiple values for argument {key!r}.")
            if key not in self.fields:
                raise TypeError(self._unknown(key))
            given[key] = value
        return {self.fields[arg].name: value for arg, value in given.items()}

    def values(self, args: tuple[Any, ...], options: Mapping[str, Any]) -> dict[str, Any]:
        """Every field this entry point sets, by field name: the options given over its defaults, and its fixed
        values (raises as :meth:`given`)."""
        given = self.given(args, options)
        values = {f.name: given.get(f.name, self.default(f)) for f in self.fields.values()}
        return {**values, **self.fixed}

    def config(self, args: tuple[Any, ...] = (), options: Mapping[str, Any] = _EMPTY, **resolved: Any) -> VDNNConfig:
        """The validated ``VDNNConfig`` of these arguments; ``resolved`` replaces values the entry point worked
        out itself (a ``None`` default that means "decide")."""
        return self.build({**self.values(args, options), **resolved})

    def build(self, values: Mapping[str, Any]) -> VDNNConfig:
        """``VDNNConfig(**values)``, its errors naming the arguments as this entry point calls them.

        Raises:
            ValueError, TypeError, NotImplementedError: what ``VDNNConfig`` raises, naming the bad value.
        """
        try:
            return VDNNConfig(**values)
        except (ValueError, TypeError) as err:
            message = str(err)
            for field, arg in self.renamed.items():
                message = message.replace(f"{field}=", f"{arg}=")
            if message == str(err):
                raise
            raise type(err)(message) from None

    def _unknown(self, key: str) -> str:
        message = f"{self.name}() got an unexpected keyword argument {key!r}"
        if key in self.renamed:
            return f"{message}; here it is called {self.renamed[key]!r}."
        if key in self.fixed:
            return f"{message}: {self.name} always runs with {key}={self.fixed[key]!r}; drop it."
        if key in _FIELD_NAMES:
            takers = [e.name for e in ENTRIES if key in e.fields]
            return (f"{message}: {key} is a VDNNConfig option of {', '.join(takers)}, which {self.name} does not "
                    f"implement. Drop it, or use one of those.")
        close = difflib.get_close_matches(key, list(self.fields), n=1)
        if close:
            return f"{message}; did you mean {close[0]!r}?"
        return f"{message}. It takes: {', '.join(self.fields)}."

    def parameters(self) -> list[inspect.Parameter]:
        """The options as ``inspect.Parameter``s, typed from the fields; ``positional`` ones first."""
        hints, params, P = config_hints(), [], inspect.Parameter
        for arg, f in self.fields.items():
            default, hint = self.default(f), hints[f.name]
            if default is None and not _allows_none(hint):
                hint = Optional[hint]  # None here means "the entry point decides" (see its docstring)
            kind = P.POSITIONAL_OR_KEYWORD if arg in self.positional else P.KEYWORD_ONLY
            params.append(P(arg, kind, default=default, annotation=hint))
        return sorted(params, key=lambda p: p.kind)  # stable: positional ones first, in their order

    def signed(self, func: F) -> F:
        """Give ``func`` (written ``def f(fixed, *args, extra=..., **options)``) the signature it accepts: its
        own parameters with the options in place of ``*args`` (when options go by position) and ``**options``
        (another ``**kwargs`` stays: ``L2LZeroStrategy``'s go to DDP)."""
        own = inspect.signature(func).parameters.values()
        head = [p for p in own if p.kind == p.POSITIONAL_OR_KEYWORD]
        star = [p for p in own if p.kind == p.VAR_POSITIONAL and not self.positional]
        tail = [p for p in own if p.kind == p.KEYWORD_ONLY or (p.kind == p.VAR_KEYWORD and p.name != "options")]
        options = self.parameters()
        first = [p for p in options if p.kind == p.POSITIONAL_OR_KEYWORD]
        rest = [p for p in options if p.kind == p.KEYWORD_ONLY]
        hints = typing.get_type_hints(func)
        head, star, tail = ([p.replace(annotation=hints.get(p.name, p.annotation)) for p in ps]
                            for ps in (head, star, tail))
        func.__signature__ = inspect.Signature([*head, *first, *star, *rest, *tail],  # type: ignore[attr-defined]
                                               return_annotation=hints.get("return", inspect.Signature.empty))
        func.__annotations__ = {**{p.name: p.annotation for p in func.__signature__.parameters.values()},
                                **({"return": hints["return"]} if "return" in hints else {})}
        return func


def _allows_none(hint: Any) -> bool:
    return hint is Any or type(None) in typing.get_args(hint)


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(VDNNConfig))
_ALL = frozenset({"common", "offload", "streaming", "chunks", "zero", "report"})
for _field in dataclasses.fields(VDNNConfig):  # a field without a scope would reach no entry point
    if _field.metadata.get("scope") not in _ALL:
        raise TypeError(f"VDNNConfig.{_field.name} declares no scope of {sorted(_ALL)}: declare it with "
                        "option(default, scope) (config.py), so that the entry points of that scope take it.")
_POLICY = {"activation_offload": "policy"}

#: The entry points. Only what differs from ``VDNNConfig`` is written here, each with its reason. Resident blocks
#: chosen from a budget switch blocks between steps on one device, which only VDNNStrategy does: the others
#: start from ``resident_blocks=0`` (a ``memory_budget`` then plans the activations alone).
_FIXED_RESIDENT = {"resident_blocks": 0}
VDNN_STRATEGY = Entry("VDNNStrategy", _ALL, positional=("activation_offload",))
VDNN_ZERO = Entry(
    "VDNNZeroStrategy", _ALL - {"chunks"}, positional=("activation_offload",),
    defaults={**_FIXED_RESIDENT, "zero_stage": None})  # None: the DeepSpeed config's stage, else 2
L2L_ZERO = Entry(
    "L2LZeroStrategy", _ALL - {"chunks"}, positional=("activation_offload",),
    defaults={**_FIXED_RESIDENT, "activation_offload": "none",  # as "l2l": streamed blocks recompute
              "zero_stage": 2},
    fixed={"layer_streaming": True})
FABRIC = Entry("VDNNFabricStrategy", frozenset({"common", "offload", "streaming"}), positional=("activation_offload",),
               defaults=_FIXED_RESIDENT)
ACCELERATE = Entry("accelerate.prepare", frozenset({"common", "offload", "streaming"}), renamed=_POLICY,
                   defaults=_FIXED_RESIDENT)
OFFLOAD_ACTIVATIONS = Entry(
    "offload_activations", frozenset({"common", "offload"}), renamed=_POLICY, positional=("policy",),
    defaults={"activation_offload": None})  # None: "auto" with a model, "all" without one
STREAM_LAYERS = Entry(
    "stream_layers", frozenset({"common", "streaming"}),
    defaults={**_FIXED_RESIDENT, "saved_blocks": 0},  # 0: every streamed block recomputes (no hooks known)
    fixed={"layer_streaming": True, "activation_offload": "none"})
ENTRIES = (VDNN_STRATEGY, VDNN_ZERO, L2L_ZERO, FABRIC, ACCELERATE, OFFLOAD_ACTIVATIONS, STREAM_LAYERS)


def config_from(config: Optional[VDNNConfig], entry: Entry, args: tuple[Any, ...], options: Mapping[str, Any],
           **resolved: Any) -> VDNNConfig:
    """The config the arguments describe: ``config`` (a ready one) with the options given replacing its values,
    else the options over the entry point's defaults, ``resolved`` replacing values the entry point worked out
    itself (a ``None`` default that means "decide")."""
    if config is None:
        return entry.config(args, options, **resolved)
    given = entry.given(args, options)
    if not given:
        return config
    return entry.build({**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)}, **given})
