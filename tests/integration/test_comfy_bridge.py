"""``nodes/comfy_bridge.py`` against ComfyUI's real ``PromptServer`` and ``ProgressBar``.

The bridge swallows send errors (a UI hiccup must never stop a run), so a renamed or reshaped
server method would otherwise go unnoticed: here the messages are read back from the server's
own queue, in a ComfyUI process that never starts listening.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from comfy_server import REPO_ROOT

pytestmark = pytest.mark.integration

BRIDGE_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, struct, sys
    from comfy.cli_args import args
    args.cpu = True
    import utils.extra_config  # noqa: F401  (before `nodes`, see the integration notes)
    import nodes
    import server

    assert asyncio.run(nodes.load_custom_node(sys.argv[1]))
    bridge = next(m for n, m in list(sys.modules.items()) if n.endswith(".nodes.comfy_bridge"))
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    srv = server.PromptServer(loop)  # becomes PromptServer.instance
    bridge.send_event("speedkit.test", {"step": 3})
    bridge.send_progress_text("computed 5 / 8", "12")
    loop.run_until_complete(asyncio.sleep(0.05))  # the server queues messages from its loop
    got = []
    while not srv.messages.empty():
        event, data, sid = srv.messages.get_nowait()
        if isinstance(data, (bytes, bytearray)):  # progress text: node id length, node id, text
            (n,) = struct.unpack(">I", data[:4])
            data = {"node": data[4 : 4 + n].decode(), "text": data[4 + n :].decode()}
        got.append([event if isinstance(event, str) else int(event), data, sid])
    bar = bridge.progress_bar(4, "12")
    bar.update_absolute(2, 4)
    print("RESULT" + json.dumps({"messages": got, "text_event": int(server.BinaryEventTypes.TEXT)}))
    """
)


def test_events_and_progress_text_reach_the_prompt_server(tmp_path):
    root = os.environ.get("COMFYUI_ROOT")
    if not root or not (Path(root) / "main.py").is_file():
        pytest.skip("needs COMFYUI_ROOT pointing at a ComfyUI v0.19.3 checkout")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    pack = tmp_path / "ComfyUI-SpeedKit"
    pack.symlink_to(REPO_ROOT, target_is_directory=True)
    proc = subprocess.run(
        [python, "-c", BRIDGE_SCRIPT, str(pack)], cwd=root, capture_output=True, text=True, timeout=300
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT") :])
    assert result["messages"] == [
        ["speedkit.test", {"step": 3}, None],
        [result["text_event"], {"node": "12", "text": "computed 5 / 8"}, None],
    ]
