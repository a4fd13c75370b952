import pytest

from pikeclient.core.types import MAX_CALL_TOKENS, ChatResult, SamplingParams, Usage


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
                                         "total_tokens": 7, "server_error": None}
    with pytest.raises(AttributeError):
        result.text = "changed"
    assert Usage().total_tokens is None


@pytest.mark.parametrize(
    ("report", "error"),
    [
        ({"prompt_tokens": -150, "completion_tokens": -21}, "prompt_tokens=-150, completion_tokens=-21"),
        ({"prompt_tokens": 10**15, "completion_tokens": 3}, "prompt_tokens=1000000000000000"),
        ({"prompt_tokens": "many", "completion_tokens": 21}, "prompt_tokens='many'"),
        ({"prompt_tokens": "-150", "completion_tokens": 21}, "prompt_tokens='-150'"),
        ({"prompt_tokens": 1.5, "completion_tokens": 2}, "prompt_tokens=1.5"),
        ({"prompt_tokens": True, "completion_tokens": 2}, "prompt_tokens=True"),
        ({"prompt_tokens": 2, "completion_tokens": float("nan")}, "completion_tokens=nan"),
        ("lots", "usage is not an object: 'lots'"),
        ([1, 2], "usage is not an object: [1, 2]"),
    ],
)
def test_server_usage_that_is_not_a_count_is_refused_and_named(report, error):
    usage = Usage.from_server(report)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.source) == (None, None, "none")
    assert error in usage.server_error


@pytest.mark.parametrize("report", [None, {}, {"prompt_tokens": 3}, {"completion_tokens": None, "prompt_tokens": 1}])
def test_no_usage_or_half_of_one_is_not_reported_and_no_error(report):
    assert Usage.from_server(report) == Usage()


def test_sane_server_usage_is_kept():
    assert Usage.from_server({"prompt_tokens": 0, "completion_tokens": MAX_CALL_TOKENS}) == Usage(
        0, MAX_CALL_TOKENS, "server")
    assert Usage.from_server({"prompt_tokens": "150", "completion_tokens": 21}) == Usage(150, 21, "server")
