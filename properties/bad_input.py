"""Bad-input tables: each row is a call that must raise a given exception naming the argument."""
import re

from properties.compare import _fail


def check_bad_calls(fn, rows) -> None:
    """rows: (what, make() -> (args, kwargs), exception type, regex the message must match).
    A different exception type, a message that does not name the argument, or no exception fails."""
    for what, make, exc, pattern in rows:
        args, kwargs = make()
        try:
            fn(*args, **kwargs)
        except exc as e:
            if not re.search(pattern, str(e)):
                _fail(f"bad call '{what}': {type(e).__name__} does not name the argument ({pattern}): {e}")
        except Exception as e:  # a different exception type is a contract violation too
            _fail(f"bad call '{what}': expected {exc.__name__}, got {type(e).__name__}: {e}")
        else:
            _fail(f"bad call '{what}': no error raised")


def editors(args, kwargs):
    """(with_arg, with_kw) for building a table from a good call: with_arg(i, value) replaces one
    positional argument, with_kw(**changes) keyword arguments; each returns the row's make()."""
    args, kwargs = list(args), dict(kwargs)

    def with_arg(i, value):
        edited = list(args)
        edited[i] = value
        return lambda: (edited, kwargs)

    def with_kw(**changes):
        return lambda: (args, {**kwargs, **changes})

    return with_arg, with_kw
