"""Names of a package imported when first touched: `import emo_stream.livekit` (or `.pipecat`) costs nothing and
works without the optional extra; touching one of its names imports the module behind it, and a missing
extra is one ImportError that says what to pip install."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str], extra: str, needs: str) -> Callable[[str], Any]:
    """The module `__getattr__` of `package`: name -> that name in the module `exports[name]`; a missing
    top-level `extra` package becomes "<package>.<name> needs <needs>: pip install "emo-stream[<extra>]"."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            return getattr(importlib.import_module(module), name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] == extra:
                raise ImportError(f'{package}.{name} needs {needs}: pip install "emo-stream[{extra}]"') from exc
            raise

    return __getattr__
