"""The front-end extensions load in ComfyUI's real frontend and react to the pack's events.

Drives headless Chromium over the DevTools protocol against the test server: the page must
register both SpeedKit extensions, creating the nodes must add their live widgets, and a
custom event of the shape the Python adapters send must update them. Skipped when Chromium
is not installed (Debian package ``chromium``).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile

import pytest

from comfy_server import free_port

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

SETUP_JS = """(() => {
  const a = window.comfyAPI?.app?.app;
  if (!a || !a.graph || !window.LiteGraph || !window.LiteGraph.registered_node_types["SpeedKit_TrainLoRA"]) return null;
  return "ok";
})()"""

# Adds the nodes (again, if the startup workflow replaced the graph meanwhile), sends the events
# the adapters send (nodes/lora_train_run.py, nodes/musubi/) and reads the widgets. Repeated until
# the page has settled and the extensions' handlers answer.
EVENTS_JS = """(async () => {
  const a = window.comfyAPI.app.app;
  let t = window.__speedkitTest;
  if (!t || a.graph.getNodeById(t.lora.id) !== t.lora || a.graph.getNodeById(t.musubi.id) !== t.musubi) {
    t = window.__speedkitTest = {
      lora: window.LiteGraph.createNode("SpeedKit_TrainLoRA"),
      musubi: window.LiteGraph.createNode("MusubiTuner_TrainLoRA_Wan"),
    };
    a.graph.add(t.lora);
    a.graph.add(t.musubi);
  }
  const { lora, musubi } = t;
  const { api } = await import("/scripts/api.js");
  for (let step = 1; step <= 3; step++)
    api.dispatchCustomEvent("speedkit.lora_train.loss", { node: String(lora.id), step, total: 10, loss: 1 / step });
  api.dispatchCustomEvent("speedkit.musubi.log", {
    node: String(musubi.id), reset: true, summary: "steps 5/50", lines: ["epoch 1/2", "steps: 10%"],
  });
  return JSON.stringify({
    names: a.extensions.map((e) => e.name).filter((n) => n.startsWith("SpeedKit.")),
    loraWidgets: (lora.widgets || []).map((w) => w.name),
    musubiWidgets: (musubi.widgets || []).map((w) => w.name),
    lossLabel: lora.speedkitLossChart?.label.textContent,
    musubiSummary: musubi.speedkitMusubiPanel?.summary.textContent,
    musubiLog: musubi.speedkitMusubiPanel?.log.textContent,
  });
})()"""


async def drive_page(page_url: str, debug_port: int) -> tuple[dict | None, list[str]]:
    import aiohttp  # a ComfyUI requirement, present wherever the integration tier runs

    async with aiohttp.ClientSession() as session:
        targets: list = []
        for _ in range(100):
            try:
                async with session.get(f"http://127.0.0.1:{debug_port}/json") as r:
                    targets = [t for t in await r.json() if t["type"] == "page"]
                if targets:
                    break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        async with session.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            errors: list[str] = []
            next_id = 0

            async def call(method: str, params: dict | None = None) -> dict:
                nonlocal next_id
                next_id += 1
                await ws.send_json({"id": next_id, "method": method, "params": params or {}})
                while True:
                    msg = await ws.receive_json()
                    if msg.get("method") in ("Runtime.exceptionThrown", "Log.entryAdded", "Runtime.consoleAPICalled"):
                        errors.append(json.dumps(msg))
                    if msg.get("id") == next_id:
                        return msg

            await call("Runtime.enable")
            await call("Log.enable")
            await call("Page.navigate", {"url": page_url})

            async def evaluate(expression: str):
                answer = await call(
                    "Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True}
                )
                return answer.get("result", {}).get("result", {}).get("value")

            for _ in range(240):
                if await evaluate(SETUP_JS):
                    break
                await asyncio.sleep(0.5)
            else:
                return None, errors
            state = None
            for _ in range(40):
                state = json.loads(await evaluate(EVENTS_JS))
                if state["lossLabel"] != "loss: waiting for training":
                    break
                await asyncio.sleep(0.5)
            return state, errors


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package 'chromium') for the browser test")
def test_extensions_register_and_show_live_events(comfy_server):
    debug_port = free_port()
    profile = tempfile.mkdtemp()
    browser = subprocess.Popen(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", f"--remote-debugging-port={debug_port}", "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        state, log = asyncio.run(asyncio.wait_for(drive_page(comfy_server.url, debug_port), 180))
    finally:
        browser.kill()
        browser.wait(10)
        shutil.rmtree(profile, ignore_errors=True)
    ours = [line for line in log if "ComfyUI-SpeedKit" in line]
    assert state is not None, "the frontend never finished loading:\n" + "\n".join(log[-20:])
    assert not ours, "errors from the pack's web files:\n" + "\n".join(ours)
    assert sorted(state["names"]) == ["SpeedKit.MusubiTuner.LiveLog", "SpeedKit.TrainLoRA.LossChart"]
    assert "loss_chart" in state["loraWidgets"] and "musubi_log" in state["musubiWidgets"]
    assert state["lossLabel"] == "loss 0.3333  step 3/10"
    assert state["musubiSummary"] == "steps 5/50"
    assert state["musubiLog"] == "epoch 1/2\nsteps: 10%"
