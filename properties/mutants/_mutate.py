"""Build a mutant from a production module by source replacement.

`mutate(module, [(old, new), ...])` copies the module's source, replaces each `old` (which must
occur exactly once, so a kernel refactor breaks the mutant loudly rather than turning it into a
no-op), writes it to a file (Triton reads kernel source through inspect) and imports it as a new
module. The production module itself is never changed.
"""
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import tempfile

_cache = {}


def mutate(module_name: str, replacements, *, tag: str):
    key = (module_name, tag)
    if key in _cache:
        return _cache[key]
    module = importlib.import_module(module_name)
    source = inspect.getsource(module)
    for old, new in replacements:
        count = source.count(old)
        if count != 1:
            raise RuntimeError(f"mutant {tag}: expected exactly one {old!r} in {module_name}, found {count}")
        source = source.replace(old, new)
    digest = hashlib.sha1(source.encode()).hexdigest()[:10]
    folder = os.path.join(tempfile.gettempdir(), "kernelfuzz_mutants")
    os.makedirs(folder, exist_ok=True)
    name = f"kernelfuzz_mutant_{tag}_{digest}"
    path = os.path.join(folder, name + ".py")
    if not os.path.exists(path):
        with open(path + ".tmp", "w") as f:
            f.write(source)
        os.replace(path + ".tmp", path)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    _cache[key] = mod
    return mod


def entry(module_name: str, function: str, tag: str, *replacements):
    """A callable with the production function's contract that runs `function` of the mutated
    module (built on first call)."""
    def fn(*args, **kwargs):
        return getattr(mutate(module_name, replacements, tag=tag), function)(*args, **kwargs)
    fn.__name__ = tag
    return fn
