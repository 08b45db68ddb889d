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


_NUMBER = {"type": "number"}
_INTEGER = {"type": "integer"}
_NULLABLE_NUMBER = {"type": "number", "nullable": True}

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
            "embed_spec": {
                "type": ["string", "null"],
                "description": "Id of the embedding spec (model and a hash of its files, "
                "layer, pooling, dtype) that made the vector, as stored with done jobs.",
            },
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
    "Rate": {
        "type": "object",
        "description": "Jobs finished in a window, over the part of it that work covers "
        "(from the earliest claim among them, if later than the window's start).",
        "properties": {
            "window_s": _NUMBER,
            "covered_s": _NUMBER,
            "finished": _INTEGER,
            "audio_s": _NUMBER,
            "per_s": _NUMBER,
            "per_min": _NUMBER,
            "audio_h_per_h": _NUMBER,
        },
    },
    "Bucket": {
        "type": "object",
        "description": "Jobs a daemon finished in [start, end), from finished_at.",
        "properties": {
            "start": _NUMBER,
            "end": _NUMBER,
            "done": _INTEGER,
            "failed": _INTEGER,
            "audio_s": _NUMBER,
            "videos_per_min": _NUMBER,
            "audio_h_per_h": _NUMBER,
            "failed_by_class": {"type": "object", "additionalProperties": _INTEGER},
        },
    },
    "Worker": {
        "type": "object",
        "description": "A daemon holding jobs or finishing some in the last hour, as the "
        "database knows it; the one answering also has the fields of `daemon`.",
        "properties": {
            "worker_id": {"type": "string"},
            "host": {"type": "string"},
            "this": {"type": "boolean"},
            "running": _INTEGER,
            "oldest_claimed_at": _NULLABLE_NUMBER,
            "oldest_claim_age_s": _NULLABLE_NUMBER,
            "lease_expires_at": _NULLABLE_NUMBER,
            "finished_1h": _INTEGER,
            "audio_s_1h": _NUMBER,
            "last_finished_at": _NULLABLE_NUMBER,
        },
        "additionalProperties": True,
    },
    "Status": {
        "type": "object",
        "description": "What `runner status --json` prints (all daemons' work, from the "
        "database), plus `daemon`: the process answering.  Unix seconds throughout.",
        "required": ["now", "total", "counts", "rates", "remaining", "eta_s", "top_failures"],
        "properties": {
            "now": {
                "type": "number",
                "description": "The database's clock when the report was made (it stamps "
                "`finished_at` and `claimed_at` too, so rates do not depend on any "
                "host's clock).",
            },
            "counts_as_of": {
                "type": "number",
                "description": "When the counts and rates were read, by the database's "
                "clock (a daemon re-reads them only as often as their cost allows: every "
                "20-60 s at a million jobs).",
            },
            "total": _INTEGER,
            "counts": {
                "type": "object",
                "properties": {s: _INTEGER for s in ("pending", "running", "done", "failed")},
            },
            "rates": {"type": "object", "additionalProperties": _ref("Rate")},
            "remaining": _INTEGER,
            "eta_s": {
                "type": "number",
                "nullable": True,
                "description": "null: unknown, nothing finished in the last hour.",
            },
            "eta_basis": {"type": "string", "nullable": True},
            "oldest_running": {"type": "object", "nullable": True},
            "top_failures": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "error_class": {"type": "string", "nullable": True},
                        "error": {
                            "type": "string",
                            "nullable": True,
                            "description": "The message's first 200 characters: failures "
                            "alike in those are counted as one reason.",
                        },
                        "count": _INTEGER,
                        "examples": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "Keys of the latest jobs that failed so.",
                        },
                    },
                },
            },
            "throughput": {
                "type": "object",
                "description": "The last hours in clock-aligned buckets; the last one ends "
                "at `now` and its rates are over the part it covers.",
                "properties": {
                    "since": _NUMBER,
                    "bucket_s": _NUMBER,
                    "buckets": {"type": "array", "items": _ref("Bucket")},
                    "error_classes": {"type": "array", "items": {"type": "string"}},
                    "models": {"type": "array", "items": {"type": "object"}},
                },
            },
            "workers": {"type": "array", "items": _ref("Worker")},
            "daemon": {
                "type": "object",
                "description": "The daemon answering: worker_id, host, model_id, "
                "in_hand, queues, embed_busy_ratio, rate_5m (its own), uptime_s.",
                "additionalProperties": True,
            },
            "specs": {
                "type": "array",
                "description": "The embedding specs daemons have started with "
                "(runner/spec.py), oldest first: id, description, spec (model, "
                "fingerprint, layer, layers, pooling, dtype, dim, family).  Not counted: "
                "that would read every done row; `runner export` prints the counts.",
                "items": {"type": "object"},
            },
        },
        "additionalProperties": True,
    },
}


def _page_file(summary: str, content_type: str) -> dict[str, Any]:
    """The page and its files hold no data: they ask for the token, and send it in the
    Authorization header of their requests to /status (never in a URL)."""
    return {
        "get": {
            "summary": summary,
            "security": [],
            "responses": {
                "200": {
                    "description": "The file, from the runner package.",
                    "content": {content_type: {"schema": {"type": "string"}}},
                }
            }
            | _errors(421),
        }
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
                "summary": "Counts, rates, ETA, throughput, failures, daemons: the page's data.",
                "parameters": [
                    {
                        "name": "top",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0, "maximum": 1000},
                        "description": "How many failure reasons (default 5).  "
                        "Reports are made for 10, 100 or 1000 and cut to `top`.",
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
        "/": _page_file("The status page (HTML): never needs a token.", "text/html"),
        "/ui/app.js": _page_file("The status page's script.", "text/javascript"),
        "/ui/style.css": _page_file("The status page's style sheet.", "text/css"),
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
