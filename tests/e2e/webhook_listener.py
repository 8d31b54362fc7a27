#!/usr/bin/env python3
"""A webhook receiver for the e2e tests: appends each POSTed JSON body as one line to
OUT and answers 204. Prints its port to READY once it listens on 127.0.0.1."""
import http.server
import json
import sys

out, ready = sys.argv[1], sys.argv[2]


class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(n))
        with open(out, "a") as f:
            f.write(json.dumps(body) + "\n")
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


s = http.server.HTTPServer(("127.0.0.1", 0), H)
with open(ready + ".tmp", "w") as f:
    f.write(str(s.server_address[1]))
import os
os.rename(ready + ".tmp", ready)
s.serve_forever()
