"""``dsp simulate``: a cost model of one training or sampling step on a described cluster.

Layers (imports go downwards): ``shapes`` (a model's widths, read from the model) and
``hardware`` (GPUs, links, clusters) -> ``workload`` -> ``flops``, ``volume``, ``memory`` ->
``step`` (step time, throughput, fits) -> ``search`` (the best mesh) and ``frombench``
(predict a ``dsp bench`` run). Nothing runs at import.
"""
