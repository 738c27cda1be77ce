"""Request validation as clients send it: chat content as parts, roles, parameters refused by name."""

import pytest

from semipd_engine.serving.protocol import UNSUPPORTED, ApiError, check_keys, parse_messages


def msgs(*messages):
    return parse_messages({"messages": list(messages)}, True, 10**6, 4096)


def test_content_as_text_parts_is_joined_like_vllm():
    out = msgs({"role": "system", "content": "be brief"},
               {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]})
    assert out == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]


def test_developer_is_rendered_as_system_and_names_are_allowed():
    assert msgs({"role": "developer", "content": "x", "name": "ops"}) == [{"role": "system", "content": "x"}]


@pytest.mark.parametrize("message,param,fragment", [
    ({"role": "wizard", "content": "x"}, "messages[0].role", "must be one of"),
    ({"content": "x"}, "messages[0].role", "must be one of"),
    ({"role": "user"}, "messages[0].content", "required"),
    ({"role": "user", "content": None}, "messages[0].content", "null"),
    ({"role": "user", "content": []}, "messages[0].content", "empty"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "messages[0].content[0].type",
     "text only"),
    ({"role": "user", "content": [{"type": "hologram"}]}, "messages[0].content[0].type", "unknown content part"),
    ({"role": "user", "content": [{"type": "text", "text": 3}]}, "messages[0].content[0].text", "string"),
    ({"role": "user", "content": ["plain"]}, "messages[0].content[0]", "'type'"),
    ({"role": "tool", "content": "42", "tool_call_id": "c1"}, "messages[0].role", "tool calls"),
    ({"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}, "messages[0].tool_calls", "not supported"),
    ({"role": "user", "content": "x", "name": 5}, "messages[0].name", "string"),
])
def test_bad_messages_are_refused_naming_the_field(message, param, fragment):
    with pytest.raises(ApiError) as e:
        msgs(message)
    assert e.value.status == 400 and e.value.param == param and fragment in e.value.message


# A value per unsupported parameter that asks for the feature (each must be refused by name).
ASKING = {"logprobs": True, "top_logprobs": 3, "echo": True, "best_of": 2, "suffix": "end", "tools": [{"type": "x"}],
          "tool_choice": "required", "functions": [{"name": "f"}], "function_call": {"name": "f"},
          "response_format": {"type": "json_object"}, "logit_bias": {"5": 1}, "presence_penalty": 0.5,
          "frequency_penalty": 0.5, "repetition_penalty": 1.1, "min_tokens": 4, "min_p": 0.1, "modalities": ["audio"],
          "audio": {"voice": "x"}, "prediction": {"type": "content", "content": "x"}}
# And the values clients send by default, which ask for nothing.
NEUTRAL = {"logprobs": False, "top_logprobs": 0, "echo": False, "best_of": 1, "suffix": None, "tools": [],
           "tool_choice": "none", "functions": None, "function_call": "auto", "response_format": {"type": "text"},
           "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
           "min_tokens": 0, "min_p": 0, "modalities": ["text"], "audio": None, "prediction": None}


def test_every_unsupported_parameter_has_a_test_value():
    assert set(ASKING) == set(UNSUPPORTED) == set(NEUTRAL)


@pytest.mark.parametrize("key", sorted(ASKING))
def test_unsupported_parameters_are_a_400_naming_them(key):
    with pytest.raises(ApiError) as e:
        check_keys({"prompt": "x", key: ASKING[key]}, "completions")
    assert e.value.status == 400 and e.value.param == key and key in e.value.message
    assert e.value.code == "unsupported_parameter"


def test_default_values_of_unsupported_parameters_are_accepted():
    assert check_keys({"messages": [], **NEUTRAL}, "chat") == []


def test_unknown_keys_are_tolerated_and_returned():
    assert check_keys({"prompt": "x", "zeta": 1, "alpha": 2, "user": "u", "store": False}, "completions") == [
        "alpha", "zeta"]
    # A key of the other endpoint is unknown here.
    assert check_keys({"prompt": "x", "messages": []}, "completions") == ["messages"]
