"""Transports across two Ray nodes (``ray.cluster_utils.Cluster``): gloo between CPU stages equals the
single process bit for bit; forced gloo makes ``codec='auto'`` raw between the stages (the caller's
links, across nodes, stay coded); ``auto`` measures gloo against the object store once and takes
the faster; with ``codec='auto'`` the link between nodes is coded and goes through the object store."""

from __future__ import annotations

import re

import torch

from mesh_ray.mesh import connect
from mesh_ray.split.sampler import generate, random_conditioning

from helpers import local_cluster, local_model

GEN = dict(width=32, height=32, steps=2, seed=3, progress=False)


def test_transports_between_two_nodes(tiny_ckpts, tmp_path):
    with local_cluster(2) as cluster:  # this test needs its own two-node cluster
        mesh = connect(cluster.address)
        path = str(tiny_ckpts["flux1"])
        model = local_model(path)
        txt, y = random_conditioning(model.config, seed=1)
        want = generate(model, txt, y, **GEN)
        common = dict(stages=2, placement="strict_spread", dtype="float32", cache_dir=str(tmp_path / "shards"),
                      transfer_timeout_s=20, start_timeout_s=60, step_timeout_s=120)
        with mesh.split(path, transport="gloo", codec="raw", **common) as split:
            assert len({i["node_id"] for i in split.stage_info()}) == 2
            assert torch.equal(generate(split, txt, y, **GEN), want)
            assert [h.transport for h in split.last.transfers] == ["object", "gloo", "object"]
        with mesh.split(path, transport="gloo", **common) as split:  # forced gloo: codec auto is raw between stages
            modes = {ln["link"]: (ln["mode"], ln["transport"]) for ln in split.links}
            assert modes["stage0->stage1"] == ("raw", "gloo")
            assert modes["caller->stage0"][0] != "raw" and modes["caller->stage0"][1] == "object"  # coded across nodes
        with mesh.split(path, codec="raw", **common) as split:  # transport="auto"
            link = next(ln for ln in split.links if ln["link"] == "stage0->stage1")
            assert link["reason"].startswith("measured faster: gloo")
            gloo_ms, object_ms = map(float, re.search(r"gloo ([\d.]+) ms, object store ([\d.]+) ms", link["reason"]).groups())
            assert link["transport"] == ("gloo" if gloo_ms < object_ms else "object")
            assert torch.equal(generate(split, txt, y, **GEN), want)
        with mesh.split(path, **common) as split:  # codec="auto": coded between nodes, so the object store
            link = next(ln for ln in split.links if ln["link"] == "stage0->stage1")
            assert link["mode"] != "raw" and link["transport"] == "object" and "codec" in link["reason"]
            generate(split, txt, y, **GEN)
            assert [h.transport for h in split.last.transfers] == ["object"] * 3
