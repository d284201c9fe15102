#!/usr/bin/env python3
"""python3's http.server as many people run it: HTTP/1.1 keep-alive, the
head and the body in two writes, no TCP_NODELAY. Nagle then holds the body
until the peer acknowledges the head, so a proxy that delays its ACK adds
its delayed-ACK timer (40 ms on Linux) to every request on a reused
connection. Usage: nagle_backend.py PORT DIR"""
import functools
import http.server
import sys


class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(
    ("127.0.0.1", int(sys.argv[1])),
    functools.partial(Handler, directory=sys.argv[2]))
server.serve_forever()
