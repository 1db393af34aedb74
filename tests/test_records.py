"""The in-memory table of servers and a start's event log (outpost_server/records.py)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from outpost_client.v1 import outpost_pb2 as pb
from outpost_server.records import EventLog, Records

pytestmark = pytest.mark.rpc


@dataclass(eq=False)
class Stub:
    """Stands in for a Record: what the table reads of one."""

    hub: str
    name: str
    value: int
    flavor: str = ""
    user_name: str = "u"
    state: int = pb.SERVER_STATE_RUNNING

    @property
    def key(self):
        return (self.hub, self.name)


def test_records_index_per_hub_follows_every_put_and_remove():
    records, truth = Records(), {}
    rnd = random.Random(7)
    for i in range(2000):
        key = (rnd.choice(["a", "b", "c"]), f"s{rnd.randrange(300)}")
        if key in truth and rnd.random() < 0.5:
            assert records.remove(truth.pop(key))
        else:
            truth[key] = Stub(*key, i, flavor=rnd.choice(["", "f", "g"]), user_name=rnd.choice("xy"))
            records.put(truth[key])
    assert dict(records) == truth and len(records) == len(truth)
    # flavor admission's indexes (manager.py) follow too
    for flavor in ("", "f", "g"):
        assert set(records.active_of_flavor(flavor)) == {r for r in truth.values() if r.flavor == flavor}
    for (hub, user) in [(h, u) for h in "abc" for u in "xy"]:
        mine = {r for r in truth.values() if r.hub == hub and r.user_name == user}
        assert set(records.active_of_user(hub, user)) == mine
    for hub in ("a", "b", "c"):
        mine = {name: rec for (h, name), rec in truth.items() if h == hub}
        assert dict(records.of_hub(hub)) == mine
        page, more = records.page(hub, "", len(mine) + 1)
        assert [r.name for r in page] == sorted(mine) and not more
    assert records.of_hub("nobody") == {}


def test_records_remove_only_the_current_record():
    records = Records()
    old, new = Stub("h", "x", 1), Stub("h", "x", 2)
    records.put(old)
    records.put(new)  # replaces: one name in the index, not two
    assert not records.remove(old) and records.current(new)
    assert records.page("h", "", 10) == ([new], False)
    assert records.remove(new) and records == {} and records.page("h", "", 10) == ([], False)


def test_records_pages_in_name_order():
    records = Records()
    for name in ("d", "a", "c", "b", "e"):
        records.put(Stub("h", name, 0))
    records.put(Stub("other", "a", 0))
    first, more = records.page("h", "", 2)
    assert [r.name for r in first] == ["a", "b"] and more
    second, more = records.page("h", "b", 2)
    assert [r.name for r in second] == ["c", "d"] and more
    last, more = records.page("h", "d", 2)
    assert [r.name for r in last] == ["e"] and not more


def test_records_are_read_only_as_a_mapping():
    records = Records()
    with pytest.raises(TypeError):
        records[("h", "x")] = Stub("h", "x", 0)


@pytest.mark.parametrize("limit", [0, 1, 2, 5])
def test_event_log_keeps_the_terminal_event_at_any_limit(limit):
    """The last event (a start's terminal event is its last) is never trimmed: with
    max_events_per_server = 0 an Events stream used to wait forever for it."""
    log = EventLog(limit)
    for _ in range(7):
        log.append(log.next_sequence(), {"kind": pb.EVENT_KIND_PROGRESS, "message": "step"})
    sequence = log.next_sequence()
    log.append(sequence, {"kind": pb.EVENT_KIND_READY, "message": "ready"})
    assert log.terminal and log.last_sequence == 8
    assert log.after(0)[-1] == (8, {"kind": pb.EVENT_KIND_READY, "message": "ready"})
    assert len(log) == max(1, limit)
    assert [s for s, _ in log.after(5)] == [s for s in range(6, 9) if s > 8 - max(1, limit)]


async def test_events_end_with_the_smallest_event_log(tmp_path):
    """With one event kept per server (the least the trait allows) the stream still ends
    with the terminal event, live and from the database after a restart."""
    from .harness.outpost import outpost_config, running_outpost

    db_url = f"sqlite:///{tmp_path}/one-event.sqlite"
    config = outpost_config(
        tmp_path, "outpost_server.testing.SlowSpawner", db_url=db_url,
        max_events_per_server=1, **{"SlowSpawner.delay": 0.2},
    )  # fmt: skip
    async with running_outpost(config) as op:
        await op.client.start("one", "s1", user_name="u", wait_until_ready=True)
        seen = [e async for e in op.client.events("one")]
        assert [e.kind for e in seen] == [pb.EVENT_KIND_READY]
    async with running_outpost(config) as op:
        seen = [e async for e in op.client.events("one")]
        assert [e.kind for e in seen] == [pb.EVENT_KIND_READY] and seen[0].sequence > 1
