// Live log panel for the MusubiTuner nodes that run musubi-tuner scripts.
//
// The Python adapter (nodes/musubi/) sends "speedkit.musubi.log" events through
// PromptServer.send_sync: {node, reset?, summary?, lines?}. This extension adds a read-only
// log box to those nodes and appends the lines as they arrive (last MAX_LINES kept).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const EVENT = "speedkit.musubi.log";
const MAX_LINES = 400;
const LOG_NODES = new Set([
  "MusubiTuner_CacheLatents",
  "MusubiTuner_CacheTextEncoder",
  "MusubiTuner_TrainLoRA_HunyuanVideo",
  "MusubiTuner_TrainLoRA_Wan",
  "MusubiTuner_TrainLoRA_FramePack",
  "MusubiTuner_GenerateVideo_HunyuanVideo",
  "MusubiTuner_GenerateVideo_Wan",
  "MusubiTuner_GenerateVideo_FramePack",
  "MusubiTuner_ConvertLoRA",
  "MusubiTuner_MergeLoRA",
  "MusubiTuner_PostHocEMA",
]);

function makePanel() {
  const root = document.createElement("div");
  root.style.cssText = "display:flex;flex-direction:column;gap:2px;width:100%;height:100%;";
  const summary = document.createElement("div");
  summary.style.cssText = "font:12px monospace;color:#8fd18f;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;";
  summary.textContent = "idle";
  const log = document.createElement("pre");
  log.style.cssText =
    "flex:1;margin:0;min-height:80px;overflow:auto;font:11px/1.3 monospace;background:#111;color:#ddd;" +
    "padding:4px;border-radius:4px;white-space:pre-wrap;word-break:break-all;";
  root.append(summary, log);
  return { root, summary, log, lines: [] };
}

function findNode(id) {
  const graph = app.graph;
  if (!graph) return null;
  return graph.getNodeById?.(Number(id)) ?? graph.getNodeById?.(id) ?? null;
}

function show(panel, msg) {
  if (msg.reset) panel.lines = [];
  if (msg.summary) panel.summary.textContent = msg.summary;
  if (Array.isArray(msg.lines) && msg.lines.length) {
    panel.lines.push(...msg.lines);
    if (panel.lines.length > MAX_LINES) panel.lines.splice(0, panel.lines.length - MAX_LINES);
    const atBottom = panel.log.scrollTop + panel.log.clientHeight >= panel.log.scrollHeight - 8;
    panel.log.textContent = panel.lines.join("\n");
    if (atBottom) panel.log.scrollTop = panel.log.scrollHeight;
  }
}

app.registerExtension({
  name: "SpeedKit.MusubiTuner.LiveLog",
  setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      if (!detail || detail.node === undefined) return;
      const node = findNode(detail.node);
      if (node?.speedkitMusubiPanel) show(node.speedkitMusubiPanel, detail);
    });
  },
  nodeCreated(node) {
    if (!LOG_NODES.has(node.comfyClass)) return;
    const panel = makePanel();
    node.speedkitMusubiPanel = panel;
    if (typeof node.addDOMWidget === "function") {
      const widget = node.addDOMWidget("musubi_log", "speedkit_log", panel.root, { serialize: false, hideOnZoom: false });
      if (widget) widget.serialize = false; // never part of widgets_values in saved workflows
      const [w, h] = node.size;
      node.setSize([Math.max(w, 420), h + 160]);
    }
  },
});
