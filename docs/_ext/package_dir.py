"""A griffe extension for mkdocstrings: subpackages mapped by setuptools ``package-dir``.

negguide installs the top-level ``plugins/`` and ``adapters/`` folders as ``negguide.plugins`` and
``negguide.adapters``. griffe reads packages from the file tree, where those folders are not inside
``negguide/``, so this extension loads them as submodules when the parent package is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import griffe


class PackageDir(griffe.Extension):
    """Attach ``{"negguide.plugins": "plugins", ...}`` folders as submodules of their parent package."""

    def __init__(self, mapping: dict[str, str]) -> None:
        super().__init__()
        self.mapping = mapping

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        for dotted, folder in self.mapping.items():
            parent_name, _, name = dotted.rpartition(".")
            if parent_name != pkg.path or name in pkg.members:
                continue
            directory = Path(folder).resolve()
            package = self._visit(name, directory / "__init__.py", pkg, loader)
            for path in sorted(directory.glob("*.py")):
                if path.stem != "__init__":
                    package.set_member(path.stem, self._visit(path.stem, path, package, loader))
            pkg.set_member(name, package)

    @staticmethod
    def _visit(name: str, path: Path, parent: griffe.Module, loader: griffe.GriffeLoader) -> griffe.Module:
        code = path.read_text(encoding="utf-8")
        loader.lines_collection[path] = code.splitlines()
        return griffe.visit(
            name,
            filepath=path,
            code=code,
            extensions=loader.extensions,
            parent=parent,
            docstring_parser=loader.docstring_parser,
            docstring_options=loader.docstring_options,
            lines_collection=loader.lines_collection,
            modules_collection=loader.modules_collection,
        )
