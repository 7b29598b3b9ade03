import pytest

from ha_ingestor.sources.mqtt import RetainedReplays, TopicFilters


@pytest.mark.parametrize(
    ("filters", "topic", "expected"),
    [
        (["#"], "a/b/c", True),
        (["a/#"], "a", True),
        (["a/#"], "a/b/c", True),
        (["a/#"], "ab/c", False),
        (["a/+/c"], "a/b/c", True),
        (["a/+/c"], "a/b/d", False),
        (["a/+"], "a/b/c", False),
        (["+/b"], "$SYS/b", False),
        (["$share/group/z2m/#"], "z2m/kitchen", True),
        (["a.b/[x]"], "a.b/[x]", True),
        (["a.b/[x]"], "aab/[x]", False),
        ([], "a", False),
    ],
)
def test_topic_filters(filters: list[str], topic: str, expected: bool) -> None:
    assert TopicFilters(filters).matches(topic) is expected


def test_retained_replay_is_recognised_until_the_payload_changes() -> None:
    replays = RetainedReplays()
    assert not replays.is_replay("t", b"1", retained=True)
    assert replays.is_replay("t", b"1", retained=True)
    assert not replays.is_replay("t", b"2", retained=False)  # a live update
    assert not replays.is_replay("t", b"2" * 100, retained=True)
    assert replays.is_replay("t", b"2" * 100, retained=True)
    assert not replays.is_replay("other", b"1", retained=False)
