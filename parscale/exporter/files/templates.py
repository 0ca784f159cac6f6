"""The model card's text and code snippets, kept as files in `card_templates/` (package data).

They are filled with `string.Template` (`$name` placeholders), so the C-like braces of Python
dicts, f-strings and JavaScript objects need no escaping. A placeholder without a value is an
error, not a silent blank.
"""

from __future__ import annotations

from importlib import resources
from string import Template

TEMPLATE_DIR = "card_templates"


def read_template(name: str) -> str:
    """The raw text of `card_templates/<name>`, as shipped inside the package."""
    return (resources.files("parscale.exporter.files") / TEMPLATE_DIR / name).read_text(encoding="utf-8")


def fill(template: str, /, **values: object) -> str:
    """`card_templates/<template>` with every `$placeholder` replaced (KeyError names a missing one)."""
    return Template(read_template(template)).substitute({k: str(v) for k, v in values.items()})
