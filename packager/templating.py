"""The one Jinja environment for every template in packager/templates/ (Triton configs, Kubernetes manifests).

StrictUndefined: a name a template uses and the context lacks is an error, never an empty string. Values reach a
config or manifest only through a quoting filter: `pbstr` (a protobuf text-format string) and `yaml` (a JSON value,
which YAML reads as the same value: strings quoted and escaped, numbers and lists as such).
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
from google.protobuf import text_encoding

# Package data (pyproject.toml ships templates/*.j2, templates/k8s/*.j2 and templates/python/*.py in the wheel).
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["pbstr"] = lambda value: '"' + text_encoding.CEscape(str(value), as_utf8=True) + '"'
    env.filters["yaml"] = lambda value: json.dumps(value, ensure_ascii=False)
    return env
