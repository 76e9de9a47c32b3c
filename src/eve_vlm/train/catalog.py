"""The recipes shipped inside the package, found by name (`eve_v1/1_prealign`) or by file path.

Recipes are package data, so `eve train tiny/eve_v2/1_vision` works the same from a checkout, an
editable install or a wheel, from any working directory.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

RECIPE_SUFFIXES = (".yaml", ".yml")


def recipes_root() -> Path:
    """The folder of the shipped recipes (inside the installed package)."""
    return Path(str(resources.files("eve_vlm") / "recipes"))


def shipped_recipes() -> list[str]:
    """Every shipped recipe by name ("eve_v1/1_prealign", "tiny/eve_v2/1_vision", ...), sorted."""
    root = recipes_root()
    names = [p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*") if p.suffix in RECIPE_SUFFIXES]
    return sorted(names)


def resolve_recipe(ref: str | Path) -> Path:
    """A recipe file for `ref`: an existing file path, or the name of a shipped recipe.

    A path wins over a name, so a user's own `eve_v1/1_prealign.yaml` in the working directory is
    never shadowed by the shipped one.
    """
    path = Path(ref)
    if path.is_file():
        return path
    name = str(ref).removesuffix(".yaml").removesuffix(".yml").strip("/")
    for suffix in RECIPE_SUFFIXES:
        shipped = recipes_root() / f"{name}{suffix}"
        if shipped.is_file():
            return shipped
    close = [n for n in shipped_recipes() if name.split("/")[-1] in n][:5]
    hint = f"; did you mean {', '.join(close)}?" if close else "; `eve recipes` lists the shipped ones"
    raise FileNotFoundError(f"no recipe file or shipped recipe named {str(ref)!r}{hint}")
