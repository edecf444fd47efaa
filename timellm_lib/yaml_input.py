"""YAML that people write (configs, study and batch plans), read strictly.

PyYAML keeps the last of two equal keys of a mapping without a word, so a second ``train:``
section silently drops the first one's settings. :class:`StrictLoader` refuses that instead.
"""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one mapping."""


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated within one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in first_line
            except TypeError:  # an unhashable key: the base class explains that one
                break
            if repeated:
                raise DuplicateKeyError(
                    f"the key {key!r} appears twice (lines {first_line[key] + 1} and "
                    f"{key_node.start_mark.line + 1}); YAML would keep only the last one, so "
                    "merge the two into one"
                )
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with repeated keys refused (raises ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=StrictLoader)
