"""A small MCP client of ``polymodal mcp`` over the official SDK (``mcp.ClientSession``): list the tools, or call
one and write the media it returns.

    python examples/mcp_client.py --stdio ".venv/bin/polymodal mcp --preset toy"             # list the tools
    python examples/mcp_client.py --stdio ".venv/bin/polymodal mcp --preset toy" generate_image '{"prompt": "a red circle"}'
    python examples/mcp_client.py --url http://127.0.0.1:8765/mcp detect '{"target": "face"}' --image photo.png

Prints the text blocks and the structured content; writes images, sounds and videos to ``--out`` (``00.png``, ...).
Exit status 1 when the tool answers with an error (``isError``).
"""

from __future__ import annotations

import argparse
import base64
import json
import shlex
import sys
from pathlib import Path

import anyio
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

EXT = {"image/png": "png", "audio/wav": "wav", "video/mp4": "mp4"}


async def run(args: argparse.Namespace) -> int:
    if args.stdio:
        cmd = shlex.split(args.stdio)
        transport = stdio_client(StdioServerParameters(command=cmd[0], args=cmd[1:]))
    else:
        transport = streamable_http_client(args.url)
    async with transport as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        if not args.tool:
            for t in (await session.list_tools()).tools:
                print(f"{t.name:16s} {', '.join(t.input_schema.get('properties', {}))}")
            return 0
        arguments = json.loads(args.arguments)
        if args.image:
            arguments["image"] = base64.b64encode(Path(args.image).read_bytes()).decode()

        async def progress(done, total, message):
            print(f"  progress: {message or done}", file=sys.stderr)

        result = await session.call_tool(args.tool, arguments, progress_callback=progress)
        out = Path(args.out)
        for k, block in enumerate(result.content):
            if block.type == "text":
                print(block.text)
                continue
            mime, data = (block.resource.mime_type, block.resource.blob) if block.type == "resource" else \
                (block.mime_type, block.data)
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"{k:02d}.{EXT.get(mime, 'bin')}"
            path.write_bytes(base64.b64decode(data))
            print(f"wrote {path} ({mime})")
        if result.structured_content is not None:
            print(json.dumps(result.structured_content, indent=1)[:2000])
        return 1 if result.is_error else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--stdio", help="the server command, e.g. '.venv/bin/polymodal mcp --preset toy'")
    where.add_argument("--url", help="a streamable HTTP endpoint, e.g. http://127.0.0.1:8765/mcp")
    p.add_argument("tool", nargs="?", help="the tool to call (none: list the tools)")
    p.add_argument("arguments", nargs="?", default="{}", help="its arguments as a JSON object")
    p.add_argument("--image", help="an image file passed as the `image` argument (base64)")
    p.add_argument("--out", default="out/mcp", help="folder for the media (default out/mcp)")
    sys.exit(anyio.run(run, p.parse_args()))


if __name__ == "__main__":
    main()
