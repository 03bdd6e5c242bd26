r"""The one YAML reader of every recipe: PyYAML's safe loader, bounded and strict.

Recipes, ``--set`` values and the ``recipe.yaml`` recorded in run folders are all
read with :class:`BoundedSafeLoader`, which keeps ``yaml.SafeLoader``'s refusal of
Python tags and adds what it lacks:

- a key written twice in one mapping is refused (PyYAML keeps the last one: a second
  ``mcp:`` section would silently replace the first whole);
- anchors and aliases may repeat only small parts: a document whose values, with
  every alias expanded, exceed ``MAX_NODES`` is refused (a "billion laughs" alias
  bomb would otherwise take gigabytes when printed or copied), as is an alias inside
  the node it names (a recursive structure);
- nesting deeper than ``MAX_DEPTH`` is refused (PyYAML's composer recurses once per
  level and fails with ``RecursionError`` near 1,000).

:func:`load_yaml` reads a whole file's bytes (at most ``MAX_BYTES``, UTF-8) and turns
every failure into a one-line :class:`~lightly_mcp.errors.RecipeError` naming the
source, the line and the fix.

Examples:
    >>> load_yaml(b"mcp:\n  rho: 0.01\n", "recipe.yaml")
    {'mcp': {'rho': 0.01}}
    >>> try:
    ...     load_yaml(b"mcp: {rho: 1}\nmcp: {frq: 2}\n", "r.yaml")
    ... except RecipeError as error:
    ...     print(str(error)[:69])
    r.yaml: refused YAML at line 2: key 'mcp' appears twice (line 1 and l
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

from lightly_mcp.errors import RecipeError, UnsafeYAMLError

#: Most values (scalars, lists, mappings) in one document, aliases expanded. The
#: recipes in ``recipes/`` have about 100.
MAX_NODES = 10_000
#: Deepest nesting of lists and mappings, aliases expanded (a recipe has 2 levels).
MAX_DEPTH = 50
#: Largest YAML file read, in bytes (the recipes in ``recipes/`` are about 2 KB).
MAX_BYTES = 1_000_000

_MERGE_TAG = "tag:yaml.org,2002:merge"


class BoundedSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` refusing duplicate keys, large or recursive alias
    expansions, and deep nesting (see the module's docstring).
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        #: ``id(node) -> (values, height)`` of every finished node, aliases expanded.
        self._sizes: dict[int, tuple[int, int]] = {}

    def fetch_flow_collection_start(self, token_class: Any) -> None:
        """Refuses ``[`` or ``{`` nested past ``MAX_DEPTH`` as it is scanned (the
        scanner's work per token grows with the nesting: 5,000 levels take seconds).
        """
        if self.flow_level >= MAX_DEPTH:
            raise UnsafeYAMLError(problem=_too_deep(), problem_mark=self.get_mark())
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        """Composes one node, counting its expanded values and nesting."""
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            node: Node = super().compose_node(parent, index)
            if id(node) not in self._sizes:
                raise UnsafeYAMLError(
                    problem=f"the alias *{self._anchor_of(node)} is inside the node "
                    "it names (a recursive structure); write the values out",
                    problem_mark=mark,
                )
            return node
        mark = self.peek_event().start_mark
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise UnsafeYAMLError(problem=_too_deep(), problem_mark=mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, ScalarNode):
            self._sizes[id(node)] = (1, 0)
            return node
        children = (
            [n for pair in node.value for n in pair]
            if isinstance(node, MappingNode)
            else list(node.value)
        )
        measured = [self._sizes[id(child)] for child in children]
        values = 1 + sum(size for size, _ in measured)
        height = 1 + max((h for _, h in measured), default=0)
        if values > MAX_NODES or height > MAX_DEPTH:
            anchored = {id(n) for n in self.anchors.values()}
            if any(id(child) in anchored for child in children):
                what = f"{MAX_NODES} values"
                if values <= MAX_NODES:
                    what = f"{MAX_DEPTH} levels"
                problem = (
                    f"over {what} once its aliases are expanded; write the values "
                    "out instead of repeating large anchors"
                )
            else:
                problem = f"over {MAX_NODES} values; a recipe has about 100"
            raise UnsafeYAMLError(problem=problem, problem_mark=mark)
        self._sizes[id(node)] = (values, height)
        return node

    def _anchor_of(self, node: Node) -> str:
        return next((a for a, n in self.anchors.items() if n is node), "?")

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> Any:
        """``SafeLoader``'s mapping, refusing a key written twice (merged ``<<``
        keys may still be overridden, as YAML allows).
        """
        seen: dict[Any, Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # unhashable: SafeLoader refuses it itself
                continue
            if first is not key_node:
                raise UnsafeYAMLError(
                    problem=f"key {repr(key)[:40]} appears twice (line "
                    f"{first.start_mark.line + 1} and line "
                    f"{key_node.start_mark.line + 1}); keep one and merge the two",
                    problem_mark=key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def _too_deep() -> str:
    return (
        f"nested more than {MAX_DEPTH} levels deep; a recipe has sections of keys "
        "and values"
    )


def parse_yaml(text: str | bytes) -> Any:
    """One YAML document parsed with :class:`BoundedSafeLoader`.

    Raises:
        yaml.YAMLError: Invalid YAML; :class:`UnsafeYAMLError` for what the bounded
            loader refuses.
    """
    loader = BoundedSafeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_yaml(data: bytes, source: str) -> Any:
    """Parses a YAML file's bytes with :class:`BoundedSafeLoader`.

    Args:
        data: The file's contents (UTF-8, at most ``MAX_BYTES``).
        source: How messages name the file (e.g. ``"recipe 'r.yaml'"``).

    Returns:
        The document (None for an empty one).

    Raises:
        RecipeError: One line naming ``source``, the line and the problem: not
            UTF-8, too large, invalid YAML, or refused by the bounded loader.
    """
    if len(data) > MAX_BYTES:
        raise RecipeError(
            f"{source}: {len(data)} bytes, more than the {MAX_BYTES} a YAML recipe "
            "may have; is it the right file?"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise RecipeError(
            f"{source}: not UTF-8 text (byte 0x{data[error.start]:02x} at line "
            f"{line}); save the file as UTF-8."
        ) from None
    try:
        return parse_yaml(text)
    except yaml.YAMLError as error:
        raise RecipeError(f"{source}: {describe_yaml_error(error)}.") from None


def describe_yaml_error(error: yaml.YAMLError) -> str:
    """``"not valid YAML at line N: problem"``, or what the bounded loader refused."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or ""
    if isinstance(error, UnsafeYAMLError):
        return f"refused YAML{where}: {problem}"
    return f"not valid YAML{where}" + (f": {problem}" if problem else "")
