// mesh-ray status light: a dot on every MeshSplitFlux node (green = stages alive, red = unreachable
// or a stage died, grey = idle / nothing built) with the Ray address and the stage plan.
// Polls GET /mesh/status (comfy_integration/registry.py); entries are keyed by the node's id.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const POLL_MS = 3000;
const COLORS = { green: "#2ecc40", red: "#ff4136", grey: "#8a8a8a" };
const NODE_TYPE = "MeshSplitFlux";

let latest = { address: "", splits: [] };

function entryFor(node) {
  return latest.splits.find((s) => String(s.key) === String(node.id)) || null;
}

function lightOf(node) {
  const e = entryFor(node);
  const state = e ? e.state : "grey";
  const where = e ? (e.address || latest.address || "embedded Ray") : (latest.address || "not connected yet");
  const plan = e ? e.plan : "queue the workflow to build the stages";
  return { state, where, plan, error: e && e.error };
}

async function poll() {
  try {
    const res = await api.fetchApi("/mesh/status");
    if (res.ok) {
      latest = await res.json();
      app.graph?.setDirtyCanvas(true, false);
    }
  } catch (err) {
    // the server restarting: keep the last answer and try again
  }
}

app.registerExtension({
  name: "mesh_ray.status_light",
  async setup() {
    await poll();
    setInterval(poll, POLL_MS);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    const draw = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const r = draw?.apply(this, arguments);
      if (this.flags?.collapsed) return r;
      const { state, where, plan, error } = lightOf(this);
      const title = LiteGraph.NODE_TITLE_HEIGHT;
      ctx.save();
      ctx.beginPath();
      ctx.arc(this.size[0] - 14, -title / 2, 6, 0, Math.PI * 2);
      ctx.fillStyle = COLORS[state] || COLORS.grey;
      ctx.fill();
      ctx.strokeStyle = "#000";
      ctx.lineWidth = 1;
      ctx.stroke();
      ctx.font = "11px sans-serif";
      ctx.fillStyle = "#ccc";
      ctx.textAlign = "left";
      const lines = [`${state} · ${where}`, `plan: ${plan}`];
      if (error) lines.push(`error: ${error}`.slice(0, 90));
      lines.forEach((line, i) => ctx.fillText(line, 8, this.size[1] + 14 + i * 13));
      ctx.restore();
      return r;
    };
  },
});
