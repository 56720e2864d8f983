"""The HTTP form of each job kind, made from its request's fields (`cinemo_rt.request`): the same names,
types, defaults and help as the CLI's flags and the Python API's keywords, plus the output's format and
scale. FastAPI reads a form model's fields as form fields and lists them in the OpenAPI schema."""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any

from fastapi import Request as HttpRequest
from pydantic import BaseModel, BeforeValidator, Field, create_model

from ..request import FIELD_HELP, EditRequest, Request, check_names, parse_text
from ..scale import FILTER_HELP, HELP, OutputScale
from .limits import RequestError

OUTPUT_FIELDS = {
    "format": (str, Field("mp4", description="mp4 or gif")),
    "scale": (int, Field(1, description=HELP)),
    "scale_filter": (str, Field(OutputScale.filter, description=FILTER_HELP)),
}


def form_model(kind: type[Request] | type[EditRequest], name: str) -> type[BaseModel]:
    """A pydantic model with one field per request field (an animation's prompt required; an edit's bucket
    may be "auto", meaning None, its default) and the output fields. Form text is decoded by the CLI's decoder
    (`request.parse_text`), so both read the same text as the same value; the schema keeps the types."""
    hints = typing.get_type_hints(kind)
    fields: dict[str, Any] = {}
    for item in dataclasses.fields(kind):
        hint, default = hints[item.name], item.default
        if item.name == "prompt" and kind is Request:
            default = ...  # required, as the CLI's --prompt
        decode = BeforeValidator(functools.partial(_decode, kind, item.name))
        fields[item.name] = (typing.Annotated[hint, decode], Field(default, description=FIELD_HELP[item.name]))
    return create_model(name, **fields, **OUTPUT_FIELDS)


def _decode(kind, name: str, value: Any) -> Any:
    return parse_text(kind, name, value) if isinstance(value, str) else value


AnimationForm = form_model(Request, "AnimationForm")
EditForm = form_model(EditRequest, "EditForm")


def split_form(form: BaseModel) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the request's fields, the output's fields) of a submitted form."""
    values = form.model_dump()
    output = {name: values.pop(name) for name in OUTPUT_FIELDS}
    return values, output


class KnownFieldsOnly:
    """A route dependency refusing form fields that are not the request's, the output's or the route's files
    (422 naming the nearest field): FastAPI would drop them, and a misspelt option would be ignored. A class at
    module level, not a closure: Ray Serve pickles the app, and a closure's pickled globals would lose the
    names its annotations use."""

    def __init__(self, kind: type[Request] | type[EditRequest], files: tuple[str, ...]):
        self.kind, self.also = kind, (*OUTPUT_FIELDS, *files)

    async def __call__(self, request: HttpRequest) -> None:
        try:
            check_names(self.kind, (await request.form()).keys(), also=self.also)
        except ValueError as err:
            raise RequestError(422, str(err)) from err
