"""`python -m services.gateway`: serve the mesh as one MCP server (streamable HTTP at `/mcp`)."""

from services.gateway.app import GatewayService, GatewaySettings
from shared.service import common_args, common_parser, run_service


def main() -> None:
    defaults = GatewaySettings(nats_url="")
    parser = common_parser("gateway", "Serve every tool of the mesh to MCP clients, with each caller's own key.")
    parser.add_argument("--host", default=defaults.host, help="MCP listen address (loopback turns on Origin checks)")
    parser.add_argument("--port", type=int, default=defaults.port, help="MCP listen port (0: any free port)")
    parser.add_argument("--max-request-body-bytes", type=int, default=defaults.max_request_body_bytes,
                        help="larger bodies get 413")
    parser.add_argument("--call-timeout-s", type=float, default=defaults.call_timeout_s,
                        help="deadline of calls that set none")
    namespace = parser.parse_args()
    args = common_args(namespace)
    settings = GatewaySettings(args.nats_url, args.prefix, args.instance, namespace.host, namespace.port,
                               namespace.call_timeout_s, namespace.max_request_body_bytes)
    run_service(GatewayService(settings), args.http)


main()
