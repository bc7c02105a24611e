"""``dsp simulate``: a cost model of one training or sampling step on a described cluster.

Layers (imports go downwards): ``shapes`` (a model's widths, read from the model) and
``hardware`` (GPUs, links, clusters) -> ``workload`` -> ``flops``, ``volume``, ``memory`` ->
``step`` (step time, throughput, fits; ``comm_seconds`` / ``compute_seconds`` for planners)
-> ``search`` (the best mesh), ``frombench`` (predict a ``dsp bench`` run), ``report``.
Nothing runs at import; ``from dsp.sim.step import simulate`` etc. See docs/simulate.md.
"""
