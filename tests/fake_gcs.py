"""A local, in-memory fake of Google Cloud Storage's JSON API, for the tests: the part of it that this
project's two GCS clients use, gcsfs (through etils.epath) and tensorstore (orbax's checkpoint arrays).

    python tests/fake_gcs.py --port PORT --bucket NAME

What it keeps of the real service, because the clients depend on it: object generations (increasing
integers, in the JSON metadata and the `x-goog-generation` header), the preconditions ifGenerationMatch
(0: the object must not exist), ifGenerationNotMatch and ifMetagenerationMatch (412 Precondition Failed, or
304 Not Modified on reads), an object that appears only when its upload completes (media, multipart and
resumable uploads), byte-range reads, listings with prefix and delimiter, deletes (single and gcsfs's
batches), rewrites (copies). Everything else is left out. Written for the tests after the
gcp-storage-emulator package turned out to send no generation with downloads, which tensorstore needs.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import re
import threading
import time
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import google_crc32c


class Store:
    def __init__(self, buckets):
        self.lock = threading.Lock()
        self.buckets = {b: {} for b in buckets}  # bucket -> name -> (data, metadata)
        self.generations = itertools.count(int(time.time() * 1e6))
        self.uploads = {}  # upload id -> (bucket, name, preconditions, received bytes)


def _metadata(bucket: str, name: str, data: bytes, generation: int, content_type: str) -> dict:
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    crc = google_crc32c.value(data).to_bytes(4, "big")
    return {"kind": "storage#object", "id": f"{bucket}/{name}/{generation}", "name": name, "bucket": bucket,
            "generation": str(generation), "metageneration": "1", "contentType": content_type,
            "size": str(len(data)), "md5Hash": base64.b64encode(hashlib.md5(data).digest()).decode(),
            "crc32c": base64.b64encode(crc).decode(), "etag": f"e{generation}", "timeCreated": now, "updated": now,
            "storageClass": "STANDARD"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue for curl's uploads
    store: Store

    def log_message(self, *args):  # quiet
        pass

    # --- plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if status not in (204, 304):
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if status not in (204, 304) and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, message: str = "") -> None:
        self._json(status, {"error": {"code": status, "message": message or HTTPStatus(status).phrase}})

    def _parse(self):
        url = urllib.parse.urlsplit(self.path)
        return url.path, {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}

    @staticmethod
    def _failed(meta: dict | None, q: dict) -> int | None:
        """The status a request's preconditions give against the object's metadata (None: they hold)."""
        gen = int(meta["generation"]) if meta else 0
        if "ifGenerationMatch" in q and int(q["ifGenerationMatch"]) != gen:
            return 412
        if "ifMetagenerationMatch" in q and (meta is None or q["ifMetagenerationMatch"] != meta["metageneration"]):
            return 412
        if "ifGenerationNotMatch" in q and meta is not None and int(q["ifGenerationNotMatch"]) == gen:
            return 304
        return None

    def _put(self, bucket: str, name: str, data: bytes, q: dict, content_type: str, rewrite: bool = False) -> None:
        with self.store.lock:
            objects = self.store.buckets[bucket]
            current = objects.get(name)
            failed = self._failed(current[1] if current else None, q)
            if failed:
                return self._error(412 if failed == 304 else failed)
            meta = _metadata(bucket, name, data, next(self.store.generations), content_type)
            objects[name] = (data, meta)
        size = meta["size"]
        self._json(200, {"kind": "storage#rewriteResponse", "done": True, "totalBytesRewritten": size,
                         "objectSize": size, "resource": meta} if rewrite else meta)

    # --- verbs
    def do_GET(self):
        path, q = self._parse()
        if m := re.fullmatch(r"(?:/download)?/storage/v1/b/([^/]+)/o/(.+)", path):
            bucket, name = m.group(1), urllib.parse.unquote(m.group(2))
            return self._object(bucket, name, q, media=q.get("alt") == "media")
        if m := re.fullmatch(r"/storage/v1/b/([^/]+)/o/?", path):
            return self._list(m.group(1), q)
        if m := re.fullmatch(r"/storage/v1/b/([^/]+)/?", path):
            if m.group(1) not in self.store.buckets:
                return self._error(404)
            return self._json(200, {"kind": "storage#bucket", "name": m.group(1), "id": m.group(1)})
        self._error(404, f"not implemented: GET {path}")

    do_HEAD = do_GET

    def _object(self, bucket: str, name: str, q: dict, media: bool) -> None:
        with self.store.lock:
            found = self.store.buckets.get(bucket, {}).get(name)
        if found is None:
            return self._error(404, f"No such object: {bucket}/{name}")
        data, meta = found
        failed = self._failed(meta, q)
        if failed:
            return self._error(failed) if failed != 304 else self._send(304, headers=self._gen(meta))
        if not media:
            return self._json(200, meta)
        headers = self._gen(meta)
        status = 200
        rng = self.headers.get("Range")
        if rng and (m := re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())):
            size = len(data)
            start, end = m.group(1), m.group(2)
            if start == "":  # the last N bytes
                start, end = max(0, size - int(end)), size - 1
            else:
                start, end = int(start), min(int(end) if end else size - 1, size - 1)
            if start >= size and size > 0:
                return self._send(416, headers={"Content-Range": f"bytes */{size}"})
            if size:
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                data, status = data[start:end + 1], 206
        else:
            headers["x-goog-hash"] = f"crc32c={meta['crc32c']},md5={meta['md5Hash']}"
        self._send(status, data, headers, meta["contentType"])

    @staticmethod
    def _gen(meta: dict) -> dict:
        return {"x-goog-generation": meta["generation"], "x-goog-metageneration": meta["metageneration"],
                "x-goog-stored-content-length": meta["size"], "ETag": meta["etag"]}

    def _list(self, bucket: str, q: dict) -> None:
        if bucket not in self.store.buckets:
            return self._error(404)
        prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
        start, end = q.get("startOffset", ""), q.get("endOffset")
        with self.store.lock:
            names = sorted(self.store.buckets[bucket])
            metas = {n: self.store.buckets[bucket][n][1] for n in names}
        items, prefixes = [], set()
        for n in names:
            if not n.startswith(prefix) or n < start or (end and n >= end):
                continue
            rest = n[len(prefix):]
            if delimiter and delimiter in rest:
                prefixes.add(prefix + rest.split(delimiter)[0] + delimiter)
            else:
                items.append(metas[n])
        out = {"kind": "storage#objects", "items": items}
        if prefixes:
            out["prefixes"] = sorted(prefixes)
        self._json(200, out)

    def do_POST(self):
        path, q = self._parse()
        body = self._body()
        if m := re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o/?", path):
            return self._upload(m.group(1), q, body)
        if path.rstrip("/") == "/batch/storage/v1":
            return self._batch(body)
        if m := re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)/(rewriteTo|copyTo)/b/([^/]+)/o/(.+)", path):
            unquote = urllib.parse.unquote
            src_bucket, src, verb, dst_bucket, dst = m.group(1), unquote(m.group(2)), m.group(3), m.group(4), \
                unquote(m.group(5))
            with self.store.lock:
                found = self.store.buckets.get(src_bucket, {}).get(src)
            if found is None:
                return self._error(404)
            return self._put(dst_bucket, dst, found[0], {k: v for k, v in q.items() if k.startswith("ifGeneration")},
                             found[1]["contentType"], rewrite=verb == "rewriteTo")
        if re.fullmatch(r"/storage/v1/b/?", path):
            name = json.loads(body or b"{}").get("name")
            with self.store.lock:
                self.store.buckets.setdefault(name, {})
            return self._json(200, {"kind": "storage#bucket", "name": name})
        self._error(404, f"not implemented: POST {path}")

    def _upload(self, bucket: str, q: dict, body: bytes) -> None:
        if bucket not in self.store.buckets:
            return self._error(404)
        if "upload_id" in q:  # a chunk of a resumable upload (gcsfs POSTs them, others PUT)
            return self._chunk(q, body)
        kind = q.get("uploadType", "media")
        content_type = self.headers.get("Content-Type", "application/octet-stream")
        if kind == "media":
            return self._put(bucket, q["name"], body, q, content_type)
        if kind == "multipart":
            boundary = content_type.split("boundary=")[1].strip('"').encode()
            parts = [p for p in body.split(b"--" + boundary) if p.strip() not in (b"", b"--")]
            meta_part, data_part = parts[0], parts[1]
            meta = json.loads(meta_part.split(b"\r\n\r\n", 1)[1].strip() if b"\r\n\r\n" in meta_part
                              else meta_part.split(b"\n\n", 1)[1].strip())
            head, data = data_part.split(b"\r\n\r\n", 1) if b"\r\n\r\n" in data_part else data_part.split(b"\n\n", 1)
            data = data[:-2] if data.endswith(b"\r\n") else data
            return self._put(bucket, meta.get("name") or q["name"], data, q,
                             meta.get("contentType", "application/octet-stream"))
        if kind == "resumable":
            meta = json.loads(body or b"{}")
            upload_id = f"{time.time_ns()}"
            content_type = self.headers.get("X-Upload-Content-Type") or meta.get("contentType") or \
                "application/octet-stream"
            with self.store.lock:
                self.store.uploads[upload_id] = [bucket, meta.get("name") or q["name"], q, content_type, b""]
            host = self.headers.get("Host")
            location = f"http://{host}/upload/storage/v1/b/{bucket}/o?uploadType=resumable&upload_id={upload_id}"
            return self._send(200, b"", {"Location": location})
        self._error(400, f"uploadType {kind}")

    def do_PUT(self):
        path, q = self._parse()
        body = self._body()
        if "upload_id" not in q:
            return self._error(404, f"not implemented: PUT {path}")
        self._chunk(q, body)

    def _chunk(self, q: dict, body: bytes) -> None:
        """The object is created only with the last chunk: until then nothing is visible."""
        upload = self.store.uploads.get(q["upload_id"])
        if upload is None:
            return self._error(404, "no such upload")
        bucket, name, preconditions, content_type, received = upload
        received += body
        upload[4] = received
        total = None
        if m := re.fullmatch(r"bytes (?:\d+-\d+|\*)/(\d+|\*)", self.headers.get("Content-Range", "").strip()):
            total = None if m.group(1) == "*" else int(m.group(1))
        elif "Content-Range" not in self.headers:
            total = len(received)
        if total is None or len(received) < total:
            headers = {"Range": f"bytes=0-{len(received) - 1}"} if received else {}
            return self._send(308, b"", headers)
        del self.store.uploads[q["upload_id"]]
        self._put(bucket, name, received, preconditions, content_type)

    def do_DELETE(self):
        path, q = self._parse()
        if not (m := re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)", path)):
            return self._error(404, f"not implemented: DELETE {path}")
        status = self._delete(m.group(1), urllib.parse.unquote(m.group(2)), q)
        self._send(status) if status == 204 else self._error(status)

    def _delete(self, bucket: str, name: str, q: dict) -> int:
        with self.store.lock:
            objects = self.store.buckets.get(bucket, {})
            if name not in objects:
                return 404
            if self._failed(objects[name][1], q):
                return 412
            del objects[name]
        return 204

    def _batch(self, body: bytes) -> None:
        """gcsfs's batched deletes: one `DELETE /storage/v1/b/B/o/KEY HTTP/1.1` per part."""
        boundary = "batch_fake_gcs"
        parts = []
        for i, m in enumerate(re.finditer(rb"DELETE (/storage/v1/b/([^/]+)/o/([^ ?]+)\S*) HTTP", body), 1):
            status = self._delete(m.group(2).decode(), urllib.parse.unquote(m.group(3).decode()), {})
            parts.append(f"--{boundary}\r\nContent-Type: application/http\r\nContent-ID: <response-{i}>\r\n\r\n"
                         f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Length: 0\r\n\r\n")
        out = ("".join(parts) + f"--{boundary}--\r\n").encode()
        self._send(200, out, content_type=f"multipart/mixed; boundary={boundary}")


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):  # a client that stopped
            super().handle_error(request, client_address)                              # reading: not an error


def serve(port: int, buckets: list[str]) -> Server:
    return Server(("127.0.0.1", port), type("BoundHandler", (Handler,), {"store": Store(buckets)}))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bucket", action="append", required=True)
    args = p.parse_args()
    serve(args.port, args.bucket).serve_forever()
