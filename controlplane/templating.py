"""Finds and loads the nginx templates: the user's directory first, then the shipped ones.

In a wheel the templates live inside the package (`controlplane/templates`); in a source
checkout they are the top-level `templates/` folder next to the package. The shipped ones are
also reachable as `builtin/NAME`, so a custom template can extend or include the original.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import jinja2

from controlplane.core.render import make_environment
from controlplane.errors import TemplateError

MAIN_TEMPLATE = "controlplane.conf.j2"


def builtin_templates_dir() -> Path:
    packaged = Path(str(resources.files("controlplane"))) / "templates"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "templates"


def load_template(templates_dir: Path | None = None) -> jinja2.Template:
    """A user directory overrides any shipped template file of the same name."""
    builtin = str(builtin_templates_dir())
    searchpath = [builtin]
    if templates_dir is not None:
        if not templates_dir.is_dir():
            raise TemplateError(
                f"templates directory {templates_dir} does not exist: create it or drop the flag"
            )
        searchpath.insert(0, str(templates_dir))
    loader = jinja2.ChoiceLoader(
        [
            jinja2.FileSystemLoader(searchpath),
            jinja2.PrefixLoader({"builtin": jinja2.FileSystemLoader(builtin)}),
        ]
    )
    env = make_environment(loader)
    try:
        return env.get_template(MAIN_TEMPLATE)
    except jinja2.TemplateSyntaxError as error:
        raise TemplateError(
            f"template {error.filename}:{error.lineno} has a syntax error: {error.message}"
        ) from error
    except jinja2.TemplateNotFound as error:
        raise TemplateError(
            f"template {MAIN_TEMPLATE} not found in {', '.join(searchpath)}: reinstall "
            "controlplane or put the file in your templates directory"
        ) from error
