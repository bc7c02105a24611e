"""What a cluster is made of: GPU types, links, nodes. Named defaults carry their source.

A :class:`Cluster` is ``nodes x gpus_per_node`` GPUs of one :class:`Gpu` type, an ``intra``
:class:`Link` between the GPUs of a node and an ``inter`` link between nodes. A collective
whose group spans more than one node pays the inter-node link for all of its bytes (the
slower link bounds a lock-step collective; see :func:`Cluster.link_for`).

Presets (:func:`cluster`): ``"8xh100-nvlink"`` (one DGX/HGX H100 node), ``"16x8xh100-ib"``
(16 such nodes over 400 Gb/s NDR InfiniBand, one NIC per GPU), any ``"<nodes>x<gpus>xh100-ib"``
or ``"<gpus>xh100-nvlink"``, or a JSON file with the fields of :class:`Cluster`
(``{"nodes": 4, "gpus_per_node": 8, "gpu": "h100" | {...}, "intra": "nvlink" | {...},
"inter": "ib" | {...}}``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Union

__all__ = ["Gpu", "Link", "Cluster", "GPUS", "LINKS", "cluster"]


@dataclass(frozen=True)
class Gpu:
    """One accelerator.

    Attributes:
        name: short key.
        peak_flops: dense throughput at the training dtype (FLOP/s, no sparsity).
        mfu: the fraction of ``peak_flops`` a training or sampling step achieves.
        memory: bytes of device memory.
        source: where the numbers come from.
    """

    name: str
    peak_flops: float
    mfu: float
    memory: float
    source: str

    @property
    def flops(self) -> float:
        """Achieved FLOP/s (``peak_flops * mfu``)."""
        return self.peak_flops * self.mfu


@dataclass(frozen=True)
class Link:
    """One interconnect, per GPU and per direction.

    Attributes:
        name: short key.
        bandwidth: bytes/s one GPU sends while it also receives.
        latency: seconds per collective call (start-up, synchronisation).
        a2a_efficiency: the fraction of ``bandwidth`` an all-to-all (and all-gather /
            reduce-scatter) achieves; point-to-point ring steps get the full bandwidth.
        source: where the numbers come from.
        pair_efficiency: the fraction of ``bandwidth`` a ring step achieves when a rank sends
            to and receives from the same peer (a ring of two: ring attention on 2 ranks,
            USP's ring across 2 rows). 1 on full-duplex links (NVLink, InfiniBand with NCCL);
            about 0.5 on the emulated CPU link, where gloo's exchange between two ranks is
            half-duplex (``benchmarks/simulate_p2p.py`` measures it).
    """

    name: str
    bandwidth: float
    latency: float
    a2a_efficiency: float
    source: str
    pair_efficiency: float = 1.0


#: Named GPU types. MFU 0.40 is an assumption (the issue's "~40% of peak" for STDiT-XL/2
#: training with FlashAttention and activation checkpointing); override it per run.
GPUS = {
    "h100": Gpu(
        "h100",
        989e12,
        0.40,
        80 * 2**30,
        "NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense BF16 (without sparsity), 80 GB HBM3; "
        "MFU 0.40 assumed",
    ),
    "a100": Gpu(
        "a100",
        312e12,
        0.45,
        80 * 2**30,
        "NVIDIA A100 SXM4 80GB datasheet: 312 TFLOP/s dense BF16; MFU 0.45 assumed",
    ),
}

#: Named links. Efficiencies and latencies are assumptions (typical NCCL all-to-all).
LINKS = {
    "nvlink": Link(
        "nvlink",
        450e9,
        10e-6,
        0.80,
        "NVLink 4 on H100 SXM5: 18 links x 50 GB/s = 900 GB/s bidirectional, 450 GB/s per "
        "direction (NVIDIA H100 datasheet); all-to-all efficiency 0.8, 10 us per call assumed",
    ),
    "ib": Link(
        "ib",
        50e9,
        20e-6,
        0.80,
        "NDR InfiniBand 400 Gb/s = 50 GB/s per GPU per direction, one ConnectX-7 per GPU as in "
        "DGX H100; all-to-all efficiency 0.8, 20 us per call assumed",
    ),
}


@dataclass(frozen=True)
class Cluster:
    """``nodes x gpus_per_node`` GPUs; ``intra`` inside a node, ``inter`` across nodes.

    ``overlap``: the fraction of the shorter of a collective and the compute beside it that
    running both at once hides (1: the collective has its own engine, NCCL on a side stream;
    0: ranks share cores, so a rank's wait is already another rank's compute);
    ``slice_overhead``: seconds one more overlapped slice costs (launch, slicing copies,
    smaller kernels; 20 us assumed on a GPU). Both only price ``Stage.chunks``
    (:mod:`dsp.parallelize.timing`).
    """

    nodes: int
    gpus_per_node: int
    gpu: Gpu
    intra: Link
    inter: Link
    name: str = ""
    overlap: float = 1.0
    slice_overhead: float = 20e-6

    def __post_init__(self):
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(
                f"cluster needs >= 1 node and GPU, got {self.nodes}x{self.gpus_per_node}"
            )
        if not 0.0 <= self.overlap <= 1.0 or self.slice_overhead < 0:
            raise ValueError(
                f"cluster overlap must be in [0, 1] and slice_overhead >= 0, got "
                f"{self.overlap} and {self.slice_overhead}"
            )

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def link_for(self, span: int) -> Link:
        """The link a collective over ``span`` consecutive ranks pays: intra if it fits a node."""
        return self.intra if span <= self.gpus_per_node else self.inter

    def with_gpus(self, gpus: int) -> Cluster:
        """The same hardware with ``gpus`` GPUs (whole nodes, or part of one)."""
        if gpus <= self.gpus_per_node:
            return dataclasses.replace(self, nodes=1, gpus_per_node=gpus)
        if gpus % self.gpus_per_node:
            raise ValueError(f"{gpus} GPUs is not a whole number of {self.gpus_per_node}-GPU nodes")
        return dataclasses.replace(self, nodes=gpus // self.gpus_per_node)

    def describe(self) -> str:
        return (
            f"{self.nodes} x {self.gpus_per_node} {self.gpu.name} ({self.gpu.flops / 1e12:.0f} "
            f"TFLOP/s achieved, {self.gpu.memory / 2**30:.0f} GiB); intra {self.intra.name} "
            f"{self.intra.bandwidth / 1e9:.0f} GB/s, inter {self.inter.name} "
            f"{self.inter.bandwidth / 1e9:.0f} GB/s per GPU"
        )


def _pick(table: dict, value, kind):
    if isinstance(value, kind):
        return value
    if isinstance(value, str):
        if value not in table:
            raise ValueError(f"unknown {kind.__name__.lower()} {value!r}; known: {sorted(table)}")
        return table[value]
    base = table.get(value.get("name", ""), None)
    fields = dataclasses.asdict(base) if base else {"source": "user-given"}
    fields.update(value)
    return kind(**fields)


_PRESET = re.compile(r"^(?:(\d+)x)?(\d+)x([a-z0-9]+)-(nvlink|ib)$")


def cluster(spec: Union[str, dict, Cluster], *, mfu: float = None, gpus: int = None) -> Cluster:
    """A :class:`Cluster` from a preset name, a JSON file path or a dict (see module doc).

    ``mfu`` overrides the GPU's achieved fraction of peak; ``gpus`` resizes the cluster.
    """
    if isinstance(spec, Cluster):
        c = spec
    elif isinstance(spec, str) and os.path.exists(spec):
        with open(spec) as f:
            return cluster(json.load(f), mfu=mfu, gpus=gpus)
    elif isinstance(spec, str):
        m = _PRESET.match(spec.lower())
        if not m:
            raise ValueError(
                f"unknown cluster {spec!r}: use e.g. 8xh100-nvlink, 16x8xh100-ib or a JSON file"
            )
        nodes, per, gpu, link = int(m.group(1) or 1), int(m.group(2)), m.group(3), m.group(4)
        if link == "ib" and m.group(1) is None:  # "4xh100-ib": 4 nodes of one GPU each
            nodes, per = per, 1
        c = Cluster(nodes, per, _pick(GPUS, gpu, Gpu), LINKS["nvlink"], LINKS["ib"], spec)
    else:
        c = Cluster(
            int(spec.get("nodes", 1)),
            int(spec.get("gpus_per_node", 8)),
            _pick(GPUS, spec.get("gpu", "h100"), Gpu),
            _pick(LINKS, spec.get("intra", "nvlink"), Link),
            _pick(LINKS, spec.get("inter", "ib"), Link),
            spec.get("name", "custom"),
            float(spec.get("overlap", 1.0)),
            float(spec.get("slice_overhead", 20e-6)),
        )
    if mfu is not None:
        c = dataclasses.replace(c, gpu=dataclasses.replace(c.gpu, mfu=mfu))
    if gpus is not None:
        c = c.with_gpus(gpus)
    return c
