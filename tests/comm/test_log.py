"""dsp.comm_log: records, phases, nesting, and no library collective bypasses it."""

import pathlib
import re

import pytest

import dsp
from dsp.comm.log import CommLog, CommRecord
from tests.comm import _cases

SRC = pathlib.Path(dsp.__file__).parent


def test_log_arithmetic():
    log = CommLog(
        [
            CommRecord("all_to_all", 4, 30, 20, "forward"),
            CommRecord("all_to_all", 4, 7, 9, "backward"),
            CommRecord("exchange_ints", 4, 24, 24, "forward", meta=True),
        ]
    )
    assert log.bytes_sent == 37 and log.bytes_recv == 29 and log.meta_bytes_sent == 24
    assert log.sent("forward") == 30 and log.sent("backward", op="all_to_all") == 7
    assert log.count("all_to_all") == 2 and log.count(phase="forward") == 1
    assert log.by_op() == {("all_to_all", "forward"): 30, ("all_to_all", "backward"): 7}


def test_logs_nest_and_close():
    from dsp.comm.log import _active, record

    with dsp.comm_log() as outer:
        with dsp.comm_log() as inner:
            record("all_to_all", 2, 5, 5)
        record("all_to_all", 2, 1, 1)
    record("all_to_all", 2, 100, 100)  # outside any block: dropped
    assert inner.bytes_sent == 5 and outer.bytes_sent == 6 and not _active


COMM_CALLS = re.compile(
    r"\bdist\.(all_to_all\w*|all_gather\w*|all_reduce\w*|reduce_scatter\w*|broadcast\w*|"
    r"send|recv|isend|irecv|batch_isend_irecv|P2POp|gather\w*|scatter\w*|reduce\b)"
    r"|_functional_collectives|funcol\."
)


def test_no_collective_bypasses_the_accounting_layer():
    """Only dsp/comm/collectives.py may call torch.distributed communication."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "collectives.py" and path.parent.name == "comm":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if COMM_CALLS.search(line):
                offenders.append(f"{path.relative_to(SRC)}:{i}: {line.strip()}")
    assert not offenders, "collectives outside dsp/comm/collectives.py:\n" + "\n".join(offenders)


@pytest.mark.parametrize("n", [2, 3])
def test_phases_recorded(pools, n):
    assert all(pools.run(n, _cases.switch_grad, (4, 5, 3), 0, 2))
