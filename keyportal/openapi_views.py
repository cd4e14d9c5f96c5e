"""/api/schema (the OpenAPI document) and /api/docs (the same, as a page). Both are public:
they describe the API, not anyone's data, and scripts read the schema before signing in."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import get_script_prefix
from django.views.decorators.http import require_GET

from keyportal.openapi import (
    OPENAPI_MEDIA,
    TAGS,
    document,
    endpoints,
    example_json,
    segments,
)


def _server_url(request: HttpRequest) -> str:
    # The address the caller used (host, scheme behind the proxy, script prefix).
    return request.build_absolute_uri(get_script_prefix()).rstrip("/")


@require_GET
def api_schema(request: HttpRequest) -> HttpResponse:
    return JsonResponse(document(server_url=_server_url(request)), content_type=OPENAPI_MEDIA)


@require_GET
def api_docs(request: HttpRequest) -> HttpResponse:
    doc = document(server_url=_server_url(request))
    groups = [(TAGS[tag], items) for tag, items in endpoints(doc).items() if items]
    return render(request, "api_docs.html", {
        "info": doc["info"], "intro": segments(doc["info"]["description"]), "server": doc["servers"][0]["url"], "groups": groups,
        "schemes": doc["components"]["securitySchemes"],
        "error_example": example_json({"$ref": "#/components/schemas/Error"},
                                      doc["components"]["schemas"]),
    })
