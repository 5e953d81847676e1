"""``python -m mesh_ray.cli``: the same as the ``mesh-ray`` command."""

from mesh_ray.cli import main

main()
