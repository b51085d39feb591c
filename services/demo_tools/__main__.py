"""`python -m services.demo_tools [--http PORT]`: serve the demo tools over stdio or streamable HTTP."""

import argparse

from services.demo_tools.server import app

parser = argparse.ArgumentParser(prog="python -m services.demo_tools", description=__doc__)
parser.add_argument("--http", type=int, metavar="PORT", help="serve streamable HTTP at http://HOST:PORT/mcp")
parser.add_argument("--host", default="127.0.0.1")
args = parser.parse_args()
if args.http is None:
    app.run()
else:
    app.run("streamable-http", host=args.host, port=args.http)
