import pytest

from pikeclient.core.types import ChatResult, SamplingParams, Usage


def test_overrides_merge_over_defaults():
    base = SamplingParams(temperature=0.2, max_tokens=10)
    merged = base.merged({"temperature": 0.9, "stop": "END"})
    assert (merged.temperature, merged.max_tokens, merged.stop) == (0.9, 10, ("END",))
    assert base.temperature == 0.2


def test_unknown_override_is_an_error():
    with pytest.raises(TypeError, match="temprature"):
        SamplingParams().merged({"temprature": 1})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"temperature": 2.5}, r"temperature=2.5 is out of range: allowed \[0, 2\]"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, r"top_p=0 is out of range: allowed \(0, 1\]"),
        ({"max_tokens": 0}, "max_tokens=0 is out of range: allowed >= 1"),
    ],
)
def test_ranges(values, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**values)


def test_result_is_frozen_and_serialises_usage_total():
    result = ChatResult("hi", "stop", Usage(3, 4, "server"), latency_s=0.1)
    assert result.to_dict()["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "source": "server",
                                         "total_tokens": 7}
    with pytest.raises(AttributeError):
        result.text = "changed"
    assert Usage().total_tokens is None
