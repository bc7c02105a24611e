"""Clusters, step times, the mesh search and predictions of bench runs."""

import dataclasses
import json

import pytest

from dsp.sim.frombench import comparison, predict_bench
from dsp.sim.hardware import LINKS, cluster
from dsp.sim.search import hierarchical_transfers, search
from dsp.sim.step import simulate
from dsp.sim.workload import Workload


def test_cluster_presets_and_links():
    c = cluster("16x8xh100-ib")
    assert (c.nodes, c.gpus_per_node, c.gpus) == (16, 8, 128)
    assert c.link_for(8) is c.intra and c.link_for(16) is c.inter
    one = cluster("8xh100-nvlink")
    assert (one.nodes, one.gpus) == (1, 8)
    assert cluster("4xh100-ib").link_for(2) is LINKS["ib"]  # one GPU per node
    assert cluster("16x8xh100-ib", gpus=32).nodes == 4
    assert (
        cluster({"nodes": 2, "gpus_per_node": 4, "gpu": {"name": "h100", "mfu": 0.5}}).gpu.mfu
        == 0.5
    )
    with pytest.raises(ValueError, match="unknown cluster"):
        cluster("8xh100-ethernet")


def test_step_record_adds_up():
    w = Workload(strategy="dsp", frames=64, sp=8, activation_checkpointing=True)
    r = simulate(w, cluster("8xh100-nvlink"))
    assert r["step_time_s"]["median"] == pytest.approx(r["compute_s"] + r["exposed_comm_s"])
    assert r["samples_per_s"] == pytest.approx(1 / r["step_time_s"]["median"])
    assert r["tokens"] == 64 * 64 * 64 and r["fits"]
    # the same bytes over IB take longer
    slow = simulate(w, cluster("8x1xh100-ib"))
    assert slow["exposed_comm_s"] > 5 * r["exposed_comm_s"]


def test_dsp_beats_the_embedded_strategies_and_memory_limits():
    c = cluster("8xh100-nvlink")
    times = {
        s: simulate(Workload(strategy=s, frames=128, sp=8), c)["step_time_s"]["median"]
        for s in ("dsp", "ulysses", "ring", "megatron_sp")
    }
    assert times["dsp"] == min(times.values())
    big = Workload(strategy="dsp", frames=1024, sp=8, activation_checkpointing=False)
    assert not simulate(big, c)["fits"]


def test_search_prefers_fitting_fast_meshes():
    base = Workload(frames=256, activation_checkpointing=True)
    ranked = search(base, cluster("2x8xh100-ib"), strategies=["dsp", "ulysses"])
    assert ranked[0]["fits"]
    fits = [r for r in ranked if r["fits"]]
    assert ranked[0]["time_per_sample_s"] == min(r["time_per_sample_s"] for r in fits)
    assert {"flat", "2-stage switch", "ring over T"} <= {r["placement"] for r in ranked}
    # sp over 2 nodes: the hierarchical placement keeps the switches on NVLink
    w = dataclasses.replace(base, strategy="dsp", sp=16)
    intra = [t for t in hierarchical_transfers(w, 8, "T") if "intra" in t.what]
    assert intra and all(t.span == 8 for t in intra)


def _fake_bench(tmp_path):
    row = {
        "model": "stdit-tiny",
        "world_size": 1,
        "frames": 8,
        "height": 16,
        "width": 16,
        "batch": 1,
        "mode": "train",
        "depth": None,
        "hidden": None,
        "heads": None,
        "text_len": 16,
        "grad_sync": True,
        "options": {},
        "step_time_s": {"median": 0.1},
        "bytes_sent_forward": 0,
        "bytes_sent_backward": 0,
        "strategy": "none",
    }
    dsp_row = {**row, "strategy": "dsp", "world_size": 2, "step_time_s": {"median": 0.07}}
    meta = {
        "command": "dsp bench ...",
        "config": {"no_grad_sync": True},
        "link": {
            "description": "loopback",
            "per_world_size": {
                "1": {"cpu_flops_per_rank": 50e9},
                "2": {"cpu_flops_per_rank": 50e9, "achieved_bytes_per_s": 5e8, "emulated": False},
            },
        },
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"meta": meta, "results": [row, dsp_row]}))
    return path


def test_from_bench_predicts_every_configuration(tmp_path):
    path = _fake_bench(tmp_path)
    rows, note = predict_bench(json.loads(path.read_text()))
    assert [r["strategy"] for r in rows] == ["none", "dsp"]
    assert rows[0]["ratio"] == pytest.approx(1.0)  # the efficiency comes from this step
    assert 0.5 < rows[1]["predicted_step_s"] / 0.05 < 1.5 and "single-process" in note
    assert "| dsp | 2 |" in comparison(str(path))


def test_from_bench_takes_compute_from_the_proxy(tmp_path):
    data = json.loads(_fake_bench(tmp_path).read_text())
    single, dsp_row = data["results"]
    proxy = {**single, "world_size": 2, "frames": 4, "proxy_for_frames": 8}
    proxy["step_time_s"] = {"median": 0.06}
    data["results"].append(proxy)
    rows, _ = predict_bench(data)
    assert [r["strategy"] for r in rows] == ["none", "dsp"]  # the proxy is not predicted
    assert rows[1]["compute_rate_from"] == "proxy"
    # DSP's rank computes about what the proxy did (T/N frames), plus its communication
    assert 0.9 * 0.06 < rows[1]["compute_s"] < 1.2 * 0.06


def test_from_bench_sliced_rows_hide_part_of_the_communication(tmp_path):
    """A --chunks row: the blocking prediction minus what its slices hide (the planner's
    pipeline model); more ranks than cores hide nothing and pay the slices' cost."""
    data = json.loads(_fake_bench(tmp_path).read_text())
    data["meta"]["link"]["per_world_size"]["2"]["achieved_bytes_per_s"] = 2e6  # slow link
    data["meta"]["cpu_count"] = 2
    dsp_row = data["results"][1]
    dsp_row.update(frames=16, height=32, width=32)  # enough compute to hide a transfer under
    data["results"].append({**dsp_row, "options": {"chunks": 2}})
    rows, _ = predict_bench(data)
    blocking, chunked = rows[1], rows[2]
    assert blocking["hidden_comm_s"] == 0 and chunked["label"] == "dsp (2 chunks)"
    assert 0 < chunked["hidden_comm_s"] < blocking["exposed_comm_s"]
    assert chunked["predicted_step_s"] == pytest.approx(
        blocking["predicted_step_s"] - chunked["hidden_comm_s"]
    )
    assert "| dsp (2 chunks) | 2 |" in comparison("bench.json", data)
    data["meta"]["cpu_count"] = 1  # 2 ranks on 1 core
    assert predict_bench(data)[0][2]["hidden_comm_s"] < 0


def test_a_ring_of_two_pays_the_pair_rate():
    """Ring attention on 2 ranks (and USP's ring across 2 rows) sends to and receives from one
    peer: priced at the link's pair efficiency; a ring of 4 distinct peers is not."""
    from dsp.sim.frombench import bench_cluster
    from dsp.sim.step import comm_seconds
    from dsp.sim.volume import transfers

    meta = {
        "link": {
            "per_world_size": {
                "2": {
                    "emulated": True,
                    "cpu_flops_per_rank": 5e10,
                    "configured_bytes_per_s": 8e7,
                    "achieved_bytes_per_s": 4e7,
                },
                "4": {
                    "emulated": True,
                    "cpu_flops_per_rank": 5e10,
                    "configured_bytes_per_s": 4e7,
                    "achieved_bytes_per_s": 2.8e7,
                    "ring_bytes_per_s": 3.8e7,
                    "pair_bytes_per_s": 1.9e7,
                },
            }
        }
    }
    two, four = bench_cluster(meta, 2, 1.0), bench_cluster(meta, 4, 1.0)
    assert two.intra.pair_efficiency == pytest.approx(0.5)  # the 2-rank all-to-all's share
    assert four.intra.bandwidth == 3.8e7 and four.intra.pair_efficiency == pytest.approx(0.5)
    ring = comm_seconds(four, "p2p", 1e6, span=4, calls=0, ring=4)
    pair = comm_seconds(four, "p2p", 1e6, span=4, calls=0, ring=2)
    assert pair == pytest.approx(2 * ring)
    usp = Workload(model="stdit-tiny", strategy="usp", sp=4, ulysses_degree=2, frames=8)
    assert {t.ring for t in transfers(usp) if t.kind == "p2p"} == {2}
    assert cluster("8xh100-nvlink").intra.pair_efficiency == 1.0  # NCCL links: full duplex
