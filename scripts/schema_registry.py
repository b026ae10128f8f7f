#!/usr/bin/env python3
"""A small Confluent-compatible schema registry for Sluice's tests (in memory, stdlib only).

    python3 scripts/schema_registry.py --port 8081

The subset of the Confluent Schema Registry REST API that Avro clients use:

    POST /subjects/{subject}/versions          {"schema": "<Avro JSON>"} -> {"id": N}
    POST /subjects/{subject}                   lookup: {"subject", "version", "id", "schema"}
    GET  /schemas/ids/{id}                     {"schema": "<Avro JSON>"}
    GET  /subjects                             ["orders-value", ...]
    GET  /subjects/{subject}/versions          [1, 2, ...]
    GET  /subjects/{subject}/versions/{v}      v a number or "latest"

Ids are global and the same schema (compared after JSON normalisation) keeps its id across
subjects, as in Confluent's registry. Only AVRO schemas; no compatibility checks. Errors use
Confluent's shape: {"error_code": 40401, "message": "..."} with the HTTP status.
"""

import argparse
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class Registry:
    def __init__(self):
        self.lock = threading.Lock()
        self.by_id = {}  # id -> schema string
        self.id_by_canonical = {}  # normalised schema -> id
        self.subjects = {}  # subject -> [id, ...] (version = index + 1)

    @staticmethod
    def canonical(schema):
        return json.dumps(json.loads(schema), sort_keys=True, separators=(",", ":"))

    def register(self, subject, schema):
        canonical = self.canonical(schema)
        with self.lock:
            schema_id = self.id_by_canonical.get(canonical)
            if schema_id is None:
                schema_id = len(self.by_id) + 1
                self.by_id[schema_id] = schema
                self.id_by_canonical[canonical] = schema_id
            versions = self.subjects.setdefault(subject, [])
            if schema_id not in versions:
                versions.append(schema_id)
            return schema_id

    def lookup(self, subject, schema):
        canonical = self.canonical(schema)
        with self.lock:
            schema_id = self.id_by_canonical.get(canonical)
            versions = self.subjects.get(subject)
            if versions is None:
                raise RegistryError(404, 40401, f"Subject '{subject}' not found.")
            if schema_id not in versions:
                raise RegistryError(404, 40403, "Schema not found")
            return self.version_of(subject, versions.index(schema_id) + 1)

    def version_of(self, subject, version):
        versions = self.subjects.get(subject)
        if versions is None:
            raise RegistryError(404, 40401, f"Subject '{subject}' not found.")
        if version == "latest":
            version = len(versions)
        try:
            version = int(version)
        except ValueError:
            raise RegistryError(422, 42202, "The specified version is not a valid version id.")
        if not 1 <= version <= len(versions):
            raise RegistryError(404, 40402, f"Version {version} not found.")
        schema_id = versions[version - 1]
        return {
            "subject": subject,
            "version": version,
            "id": schema_id,
            "schema": self.by_id[schema_id],
        }


class RegistryError(Exception):
    def __init__(self, status, code, message):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


REGISTRY = Registry()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet: the tests read the log only on failure
        pass

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        length = int(self.headers.get("Content-Length") or 0)
        try:
            request = json.loads(self.rfile.read(length) or b"{}")
            schema = request["schema"]
            json.loads(schema)
        except (ValueError, KeyError, TypeError):
            raise RegistryError(422, 42201, "Invalid schema: expected {\"schema\": \"<Avro JSON>\"}")
        if request.get("schemaType", "AVRO") != "AVRO":
            raise RegistryError(422, 42201, "Only AVRO schemas are supported by this registry")
        return schema

    def handle_any(self, method):
        try:
            path = self.path.split("?", 1)[0].rstrip("/")
            if method == "GET" and (m := re.fullmatch(r"/schemas/ids/(\d+)", path)):
                schema = REGISTRY.by_id.get(int(m.group(1)))
                if schema is None:
                    raise RegistryError(404, 40403, "Schema not found")
                return self.reply(200, {"schema": schema})
            if method == "GET" and path == "/subjects":
                return self.reply(200, sorted(REGISTRY.subjects))
            if m := re.fullmatch(r"/subjects/([^/]+)/versions", path):
                subject = m.group(1)
                if method == "POST":
                    return self.reply(200, {"id": REGISTRY.register(subject, self.body())})
                if subject not in REGISTRY.subjects:
                    raise RegistryError(404, 40401, f"Subject '{subject}' not found.")
                return self.reply(200, list(range(1, len(REGISTRY.subjects[subject]) + 1)))
            if method == "GET" and (m := re.fullmatch(r"/subjects/([^/]+)/versions/([^/]+)", path)):
                return self.reply(200, REGISTRY.version_of(m.group(1), m.group(2)))
            if method == "POST" and (m := re.fullmatch(r"/subjects/([^/]+)", path)):
                return self.reply(200, REGISTRY.lookup(m.group(1), self.body()))
            raise RegistryError(404, 404, f"{method} {path}: no such endpoint")
        except RegistryError as e:
            self.reply(e.status, {"error_code": e.code, "message": e.message})

    def do_GET(self):
        self.handle_any("GET")

    def do_POST(self):
        self.handle_any("POST")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args()
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
