// mesh-ray: "Queue on mesh", a button next to ComfyUI's Run/Queue button (ComfyUI frontend >= 1.43:
// the extension's actionBarButtons), and a setting that sends every queued prompt to the cluster.
// Both keep ComfyUI's own queue path (graph to prompt, widgets' beforeQueued, the job's progress):
// only the POST /prompt is sent to POST /mesh/queue (comfy_integration/queue_routes.py), which answers
// the same way; while the cluster is down that answer is a 503 whose one-line message ComfyUI shows.
// The button's tooltip follows GET /mesh/queue/status.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const SETTING = "MeshRay.QueueOnMesh";
const POLL_MS = 5000;
let once = false;
let status = { state: "idle", message: "not connected yet" };

const fetchApi = api.fetchApi.bind(api);
api.fetchApi = (route, options) => {
  const mesh = once || app.extensionManager?.setting?.get(SETTING);
  if (mesh && route === "/prompt" && options?.method === "POST") {
    once = false;
    return fetchApi("/mesh/queue", options);
  }
  return fetchApi(route, options);
};

const button = {
  icon: "icon-[lucide--network]",
  label: "Queue on mesh",
  tooltip: "Queue this workflow on the mesh-ray cluster's ComfyUI workers",
  onClick: async () => {
    if (status.state === "down") {
      app.extensionManager?.toast?.add({ severity: "warn", summary: "mesh-ray", detail: status.message, life: 6000 });
    }
    once = true;
    try {
      await app.queuePrompt(0, 1);
    } finally {
      once = false;
    }
  },
};

async function poll() {
  try {
    const res = await fetchApi("/mesh/queue/status");
    if (res.ok) {
      const was = status.state;
      status = await res.json();
      button.tooltip = `Queue on the mesh-ray cluster: ${status.message}`;
      if (was !== status.state && status.state === "down") {
        app.extensionManager?.toast?.add({ severity: "warn", summary: "mesh-ray", detail: status.message, life: 6000 });
      }
    }
  } catch (err) {
    // the server restarting: ask again later
  }
}

app.registerExtension({
  name: "mesh_ray.queue_on_mesh",
  settings: [
    { id: SETTING, name: "Queue every prompt on the mesh-ray cluster", type: "boolean", defaultValue: false },
  ],
  actionBarButtons: [button],
  async setup() {
    await poll();
    setInterval(poll, POLL_MS);
  },
});
