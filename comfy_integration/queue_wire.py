"""The messages between a frontend's ComfyUI process (``queue_bridge``) and its Ray child
(``queue_child``): tuples over an AF_UNIX socket with an authentication key (both processes are
ours), ``(KIND, ...)``.  Named once here; this module imports nothing.

Parent to child:
  (SUBMIT, prompt_id, payload, model_paths, resume)  resume: {"run_id", "since"} or None
  (INTERRUPT, prompt_id)
Child to parent:
  (READY, address, workers)               connected to the cluster and the dispatcher
  (WORKERS, workers)                      the ComfyUI workers now (every few seconds)
  (ACCEPTED, prompt_id, run_id, fresh)    fresh: a new run (the earlier attempt's files go)
  (EVENT, prompt_id, run_id, index, event)
  (FILE, prompt_id, run_id, index, meta, data, worker)
  (REJECTED, prompt_id, message)          a one-line error: the prompt will not run
  (DOWN, message)                         the cluster went away; the child exits after this
"""

SUBMIT, INTERRUPT = "submit", "interrupt"
READY, WORKERS, ACCEPTED, EVENT, FILE, REJECTED, DOWN = "ready", "workers", "accepted", "event", "file", "rejected", "down"
SOCKET_ENV, KEY_ENV = "MESH_RAY_QUEUE_SOCKET", "MESH_RAY_QUEUE_KEY"
