"""Ray actors: stage (a block range of a DiT), vae (a decoder) and probe (times a device), with what
they run on a worker (device choice, wire format, shard cache, front, profiling); placement is set at creation."""
