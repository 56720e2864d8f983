"""The HTTP form of each job kind, made from its request's fields (`cinemo_rt.request`): the same names,
types, defaults and help as the CLI's flags and the Python API's keywords, plus the output's format and
scale. FastAPI reads a form model's fields as form fields and lists them in the OpenAPI schema."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from pydantic import BaseModel, Field, create_model

from ..request import AUTO, FIELD_HELP, EditRequest, Request, parse_bucket
from ..scale import FILTER_HELP, HELP, OutputScale

OUTPUT_FIELDS = {
    "format": (str, Field("mp4", description="mp4 or gif")),
    "scale": (int, Field(1, description=HELP)),
    "scale_filter": (str, Field(OutputScale.filter, description=FILTER_HELP)),
}


def form_model(kind: type[Request] | type[EditRequest], name: str) -> type[BaseModel]:
    """A pydantic model with one field per request field (an animation's prompt required; an edit's bucket
    may be "auto", its default) and the output fields."""
    hints = typing.get_type_hints(kind)
    fields: dict[str, Any] = {}
    for item in dataclasses.fields(kind):
        hint, default = hints[item.name], item.default
        if item.name == "bucket" and kind.measures_motion:
            hint, default = str | None, AUTO  # a number or "auto", parsed as the CLI's flag (`parse_bucket`)
        if item.name == "prompt" and kind is Request:
            default = ...  # required, as the CLI's --prompt
        fields[item.name] = (hint, Field(default, description=FIELD_HELP[item.name]))
    return create_model(name, **fields, **OUTPUT_FIELDS)


AnimationForm = form_model(Request, "AnimationForm")
EditForm = form_model(EditRequest, "EditForm")


def split_form(form: BaseModel) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the request's fields, the output's fields) of a submitted form; an edit's bucket "auto" is None."""
    values = form.model_dump()
    output = {name: values.pop(name) for name in OUTPUT_FIELDS}
    if "bucket" in values:
        values["bucket"] = parse_bucket(values["bucket"])
    return values, output
