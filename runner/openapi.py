"""The OpenAPI 3.0 document of the HTTP API, served at /openapi.json.

Kept next to, not generated from, the handlers in runner/api.py: the fuzz test
(tests/test_api_fuzz.py) walks every operation listed here and checks that no
input gets a 5xx, and tests/test_api.py checks that the routes and this document
name the same operations.
"""

from __future__ import annotations

from typing import Any

from runner import __version__


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _errors(*codes: int) -> dict[str, Any]:
    reasons = {
        400: "Malformed JSON or a bad field (POST /jobs: also a key, URL or metadata "
        "holding NUL or a lone surrogate, which no database can store).",
        401: "Missing or wrong bearer token.",
        403: "URL refused: loopback, private or link-local address.",
        404: "No such job.",
        413: "Request body over the size limit (/encode_audio has a smaller one).",
        415: "POST bodies must be sent as Content-Type: application/json.",
        421: "Host header does not name this server (bound to loopback: DNS rebinding).",
        422: "The source is not decodable media (or has no audio), or the embedding is not finite.",
        429: "Too many /encode_audio requests at once; retry after Retry-After seconds.",
        502: "The source could not be fetched (connection, HTTP error, not media).",
        503: "The daemon is stopping.",
        504: "The source or the whole request timed out.",
    }
    return {str(code): _json(_ref("Error"), reasons[code]) for code in codes}


SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string"},
            "error_class": {"type": "string"},
            "http_status": {"type": "integer", "nullable": True},
        },
    },
    "EncodeRequest": {
        "type": "object",
        "required": ["video_url"],
        "properties": {
            "video_url": {"type": "string", "format": "uri", "description": "http or https"},
            "timeout_s": {
                "type": "number",
                "exclusiveMinimum": True,
                "minimum": 0,
                "description": "Give up after this long (capped by the server's limit).",
            },
        },
    },
    "EncodeResponse": {
        "type": "object",
        "required": ["features", "processing_audio_time", "video_duration", "channels_count"],
        "properties": {
            "features": {
                "type": "array",
                "description": "One vector: the mean of L2-normalised frames.",
                "items": {"type": "array", "items": {"type": "number"}},
            },
            "processing_audio_time": {"type": "number"},
            "video_duration": {"type": "number"},
            "channels_count": {"type": "integer"},
        },
    },
    "JobRecord": {
        "type": "object",
        "required": ["key", "url"],
        "properties": {"key": {"type": "string"}, "url": {"type": "string"}},
        "additionalProperties": True,
    },
    "JobsRequest": {
        "description": "One record, an array of records, or {key: {url, ...}} like "
        "`runner import`.",
        "oneOf": [
            _ref("JobRecord"),
            {"type": "array", "items": _ref("JobRecord")},
            {"type": "object", "additionalProperties": {"type": "object"}},
        ],
    },
    "ImportCounts": {
        "type": "object",
        "properties": {
            name: {"type": "integer"}
            for name in ("inserted", "updated", "unchanged", "invalid", "rejected")
        }
        | {"first_rejection": {"type": "string", "nullable": True}},
    },
    "Job": {
        "type": "object",
        "required": ["key", "state"],
        "properties": {
            "key": {"type": "string"},
            "url": {"type": "string", "nullable": True},
            "state": {"type": "string", "enum": ["pending", "running", "done", "failed"]},
            "attempts": {"type": "integer"},
            "error": {"type": "string", "nullable": True},
            "error_class": {"type": "string", "nullable": True},
            "http_status": {"type": "integer", "nullable": True},
            "finished_at": {"type": "number", "nullable": True},
            "result_error": {
                "type": "string",
                "nullable": True,
                "description": "Why a done job's result is null: the stored numbers are "
                "not finite (NaN or Infinity), which JSON cannot carry.",
            },
            "result": {
                "type": "object",
                "nullable": True,
                "properties": {
                    "vector": {"type": "array", "items": {"type": "number"}},
                    "video_duration": {"type": "number"},
                    "channels_count": {"type": "integer"},
                    "processing_audio_time": {"type": "number"},
                    "model_id": {"type": "string"},
                },
            },
        },
    },
    "Status": {
        "type": "object",
        "description": "What `runner status --json` prints: counts, rates, ETA.",
        "additionalProperties": True,
    },
}


def document(*, secured: bool) -> dict[str, Any]:
    """The OpenAPI document; `secured`: the routes need a bearer token."""
    # 421: on loopback, every route checks the Host header
    auth = _errors(401, 421) if secured else _errors(421)
    paths: dict[str, Any] = {
        "/healthz": {
            "get": {
                "summary": "Liveness; never needs a token.",
                "security": [],
                "responses": {"200": _json({"type": "object"}, "Alive.")} | _errors(421),
            }
        },
        "/status": {
            "get": {
                "summary": "Counts per state, recent rates and the ETA.",
                "parameters": [
                    {
                        "name": "top",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "maximum": 1000},
                        "description": "How many failure reasons.",
                    }
                ],
                "responses": {"200": _json(_ref("Status"), "Status.")} | _errors(400) | auth,
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus text format.",
                "responses": {
                    "200": {
                        "description": "Metrics.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                }
                | auth,
            }
        },
        "/jobs": {
            "post": {
                "summary": "Enqueue records; idempotent, exactly like `runner import`.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("JobsRequest")}},
                },
                "responses": {"200": _json(_ref("ImportCounts"), "Counts.")}
                | _errors(400, 403, 413, 415)
                | auth,
            }
        },
        "/jobs/{key}": {
            "get": {
                "summary": "A job's state, error and result.",
                "parameters": [
                    {"name": "key", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {"200": _json(_ref("Job"), "The job.")} | _errors(404) | auth,
            }
        },
        "/encode_audio": {
            "post": {
                "summary": "Embed one video now, outside the queue (the old endpoint).",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("EncodeRequest")}},
                },
                "responses": {"200": _json(_ref("EncodeResponse"), "The embedding.")}
                | _errors(400, 403, 413, 415, 422, 429, 502, 503, 504)
                | auth,
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document.",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.0.")} | auth,
            }
        },
    }
    doc: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": "runner", "version": __version__},
        "paths": paths,
        "components": {"schemas": SCHEMAS},
    }
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
