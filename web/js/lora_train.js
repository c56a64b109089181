// Live loss chart for SpeedKit_TrainLoRA.
//
// The Python adapter (nodes/lora_train.py) sends "speedkit.lora_train.loss" events through
// PromptServer.send_sync: {node, step, total, loss} (at most ~10 per second, always the last
// step), and {node, step, total, loss: null, validation_loss} when a validation loss on held-out
// images is measured. This extension adds a canvas to the node and redraws the raw loss (light),
// its moving average (dark) and the validation loss (orange dots and line) against the step as
// they arrive. A new run (step going down) clears it.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const EVENT = "speedkit.lora_train.loss";
const NODE_TYPE = "SpeedKit_TrainLoRA";
const MAX_POINTS = 5000;

function makeChart() {
  const root = document.createElement("div");
  root.style.cssText = "display:flex;flex-direction:column;gap:2px;width:100%;height:100%;";
  const label = document.createElement("div");
  label.style.cssText = "font:12px monospace;color:#9cc3ff;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;";
  label.textContent = "loss: waiting for training";
  const canvas = document.createElement("canvas");
  canvas.style.cssText = "flex:1;width:100%;min-height:120px;background:#111;border-radius:4px;";
  root.append(label, canvas);
  return { root, label, canvas, points: [], validation: [], total: 0 };
}

function movingAverage(values, window) {
  const out = [];
  let sum = 0;
  values.forEach((v, i) => {
    sum += v;
    if (i >= window) sum -= values[i - window];
    out.push(sum / Math.min(i + 1, window));
  });
  return out;
}

function draw(chart) {
  const { canvas, points } = chart;
  const ratio = window.devicePixelRatio || 1;
  const w = Math.max(50, canvas.clientWidth), h = Math.max(50, canvas.clientHeight);
  canvas.width = w * ratio;
  canvas.height = h * ratio;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  if (points.length < 2) return;
  const losses = points.concat(chart.validation).map((p) => p.loss).filter(Number.isFinite);
  let lo = Math.min(...losses), hi = Math.max(...losses);
  if (hi - lo < 1e-12) { lo -= 0.5; hi += 0.5; }
  const lastStep = Math.max(chart.total, points[points.length - 1].step);
  const pad = 6;
  const x = (step) => pad + ((w - 2 * pad) * (step - 1)) / Math.max(1, lastStep - 1);
  const y = (v) => h - pad - ((h - 2 * pad) * (v - lo)) / (hi - lo);
  const line = (values, color, width) => {
    ctx.strokeStyle = color;
    ctx.lineWidth = width;
    ctx.beginPath();
    values.forEach((v, i) => (i ? ctx.lineTo(x(points[i].step), y(v)) : ctx.moveTo(x(points[i].step), y(v))));
    ctx.stroke();
  };
  line(points.map((p) => p.loss), "#35506e", 1);
  line(movingAverage(points.map((p) => p.loss), Math.max(1, Math.floor(points.length / 20))), "#9cc3ff", 2);
  if (chart.validation.length) {
    ctx.strokeStyle = ctx.fillStyle = "#f0a040";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    chart.validation.forEach((p, i) => (i ? ctx.lineTo(x(p.step), y(p.loss)) : ctx.moveTo(x(p.step), y(p.loss))));
    ctx.stroke();
    chart.validation.forEach((p) => ctx.fillRect(x(p.step) - 2, y(p.loss) - 2, 4, 4));
  }
  ctx.fillStyle = "#888";
  ctx.font = "10px monospace";
  ctx.fillText(hi.toPrecision(4), pad, 12);
  ctx.fillText(lo.toPrecision(4), pad, h - pad - 2);
}

function findNode(id) {
  const graph = app.graph;
  if (!graph) return null;
  return graph.getNodeById?.(Number(id)) ?? graph.getNodeById?.(id) ?? null;
}

function update(chart, msg) {
  if (msg.loss === null || msg.loss === undefined) {
    if (!Number.isFinite(msg.validation_loss)) return;
    chart.validation.push({ step: msg.step, loss: msg.validation_loss });
    const train = chart.points.length ? ` loss ${Number(chart.points[chart.points.length - 1].loss).toPrecision(4)}` : "";
    chart.label.textContent = `validation ${msg.validation_loss.toPrecision(4)}${train}  step ${msg.step}/${msg.total}`;
    draw(chart);
    return;
  }
  const last = chart.points[chart.points.length - 1];
  if (last && msg.step <= last.step) {
    chart.points = []; // a new run
    chart.validation = [];
  }
  chart.points.push({ step: msg.step, loss: msg.loss });
  if (chart.points.length > MAX_POINTS) chart.points.splice(0, chart.points.length - MAX_POINTS);
  chart.total = msg.total || 0;
  chart.label.textContent = `loss ${Number(msg.loss).toPrecision(4)}  step ${msg.step}/${msg.total}`;
  draw(chart);
}

app.registerExtension({
  name: "SpeedKit.TrainLoRA.LossChart",
  setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      if (!detail || detail.node === undefined || !Number.isFinite(detail.step)) return;
      const node = findNode(detail.node);
      if (node?.speedkitLossChart) update(node.speedkitLossChart, detail);
    });
  },
  nodeCreated(node) {
    if (node.comfyClass !== NODE_TYPE) return;
    const chart = makeChart();
    node.speedkitLossChart = chart;
    if (typeof node.addDOMWidget === "function") {
      const widget = node.addDOMWidget("loss_chart", "speedkit_loss_chart", chart.root, {
        serialize: false,
        hideOnZoom: false,
      });
      if (widget) widget.serialize = false; // never part of widgets_values in saved workflows
      const [w, h] = node.size;
      node.setSize([Math.max(w, 400), h + 180]);
    }
  },
});
