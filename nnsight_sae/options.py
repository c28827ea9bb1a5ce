"""Declared options: the one way a dictionary type, an analysis or a circuit method says
which settings it takes.

A class lists its options as ``Option`` attributes; the CLI flags and their help
(``nnsight_sae.cli``), the API's defaults and the validation all come from that one
declaration::

    class TopKConfig(DictionaryConfig):
        k = Option(int, 32, "active features per row", min=1)

Values are checked when an instance is made (``TopKConfig(d_in=576, d_sae=4608,
site="resid_post.6", k=0)`` raises :class:`OptionError`), and ``check()`` adds checks
across options. Plain Python with no imports, not ``dataclasses``: dictionary configs
travel inside remote (NDIF) requests, whose unpickling may import only a short list of
modules (``nnsight_sae.remote_check``).
"""

from .errors import OptionError

REQUIRED = object()  # the default of an option that has none


class Option:
    """One declared option: its type (int, float, str or bool), default (``REQUIRED``
    for none; ``None`` makes it optional), help line, and checks: ``min`` (numbers),
    ``choices``, ``many`` (a list of values; comma-separated on the command line,
    ``repeat=True`` for a repeated flag instead). ``flags`` adds command-line
    spellings (e.g. ``("--l1",)``); ``cli=False`` keeps it off the command line."""

    def __init__(self, kind, default=REQUIRED, help="", *, min=None, choices=None, many=False, repeat=False,
                 flags=(), cli=True, metavar=None):
        self.kind = kind
        self.default = default
        self.help = help
        self.min = min
        self.choices = tuple(choices) if choices else None
        self.many = many or repeat
        self.repeat = repeat
        self.flags = tuple(flags)
        self.cli = cli
        self.metavar = metavar
        self.name = ""

    def __set_name__(self, owner, name):
        self.name = name

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, value):
        """The value as this option's type, or OptionError saying what is wrong with it."""
        if value is None and (self.default is None or self.required):
            if self.required:
                raise OptionError(f"{self.name} is required")
            return None
        if self.many:
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise OptionError(f"{self.name} takes a list of {self.kind.__name__}, not {value!r}")
            return [self._one(v) for v in value]
        return self._one(value)

    def _one(self, value):
        kind = self.kind
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise OptionError(f"{self.name} must be {_a(kind)}, not {value!r}")
        if self.min is not None and value < self.min:
            raise OptionError(f"{self.name} must be at least {self.min}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise OptionError(f"{self.name} must be one of {', '.join(map(str, self.choices))}; got {value!r}")
        return value


def _a(kind) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(kind, kind.__name__)


class Options:
    """A set of declared options (subclasses add ``Option`` attributes; inherited ones
    come first). Made with keyword arguments; unknown names and bad values raise
    :class:`OptionError` naming the option."""

    def __init__(self, **values):
        declared = self.declared()
        unknown = sorted(set(values) - set(declared))
        if unknown:
            raise OptionError(f"unknown option{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                              f"{type(self).__name__} takes {', '.join(declared) or 'none'}")
        for name, option in declared.items():
            value = values.get(name, None if option.required else option.default)
            setattr(self, name, option.check(value))
        self.check()

    @classmethod
    def declared(cls) -> dict:
        """name -> Option, in declaration order (base classes first)."""
        out = {}
        for klass in reversed(cls.__mro__):
            for name, value in vars(klass).items():
                if isinstance(value, Option):
                    out[name] = value
        return out

    def check(self) -> None:
        """Checks across options; raise OptionError. Single options are checked already."""

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.declared()}

    def replace(self, **changes):
        """A checked copy with some options changed."""
        return type(self)(**{**self.as_dict(), **changes})

    def __eq__(self, other):
        return type(other) is type(self) and other.as_dict() == self.as_dict()

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"


class NoOptions(Options):
    """For what takes no options."""
