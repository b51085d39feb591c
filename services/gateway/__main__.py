"""`python -m services.gateway`: serve the mesh as one MCP server (streamable HTTP at `/mcp`)."""

from services.gateway.app import GatewayService, GatewaySettings
from shared.service import common_args, common_parser, run_service


def main() -> None:
    parser = common_parser("gateway", "Serve every tool of the mesh to MCP clients, with each caller's own key.")
    parser.add_argument("--host", default="127.0.0.1", help="MCP listen address (loopback turns on Origin checks)")
    parser.add_argument("--port", type=int, default=8765, help="MCP listen port (0: any free port)")
    parser.add_argument("--max-request-body-bytes", type=int, default=1024 * 1024, help="larger bodies get 413")
    parser.add_argument("--call-timeout-s", type=float, default=300.0, help="deadline of calls that set none")
    namespace = parser.parse_args()
    args = common_args(namespace)
    settings = GatewaySettings(args.nats_url, args.prefix, args.instance, namespace.host, namespace.port,
                               namespace.call_timeout_s, namespace.max_request_body_bytes)
    run_service(GatewayService(settings), args.http)


main()
