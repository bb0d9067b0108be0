"""Tool-call formats without a server: prompts per format, the streaming reader, ids, choices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from souverain.server.errors import APIError
from souverain.server.prompt import prompt_ids
from souverain.server.protocol.chat import ChatCompletionRequest
from souverain.server.tool_stream import CallArguments, CallStart, Content, ToolCallReader
from souverain.server.tools import ToolFormat, call_id, choose, mistral_id, parse_tools, tool_format
from souverain.tokenizer import load_tokenizer
from tests.tokenizer.mistral_files import mistral_file

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
LOOP = [{"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_8f3a9c0d1e2b4a5f6a7b8c9d", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_8f3a9c0d1e2b4a5f6a7b8c9d", "content": "21 C, clear"}]
QWEN_LIKE = ("{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>"
             "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}"
             "{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}{% else %}"
             "{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")


def request(messages: list, **kw: object) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=messages, tools=TOOLS, **kw)


def test_mistral_prompt_has_available_tools_and_results() -> None:
    tok = load_tokenizer(mistral_file("v3"))
    fmt = tool_format(tok)
    assert fmt.kind == "mistral" and fmt.call_token == tok.special_id("[TOOL_CALLS]") and fmt.args_token is None  # type: ignore[attr-defined]
    fns = parse_tools(TOOLS)
    text = tok.decode(prompt_ids(tok, request(LOOP), fmt, fns, "auto")[0], skip_special=False)
    assert "[AVAILABLE_TOOLS]" in text and '"get_weather"' in text
    # The OpenAI-style id is mapped to the 9-character form mistral-common wants, the same in call and result.
    short = mistral_id("call_8f3a9c0d1e2b4a5f6a7b8c9d")
    assert len(short) == 9 and short.isalnum() and text.count(short) == 2 and "[TOOL_RESULTS]" in text
    # tool_choice none: the model is not shown the tools.
    plain = tok.decode(prompt_ids(tok, request(LOOP[:1]), fmt, fns, "none")[0], skip_special=False)
    assert "[AVAILABLE_TOOLS]" not in plain


def test_mistral_v11_format(tmp_path: Path) -> None:
    from souverain.engine.grammar import GrammarCompiler
    from souverain.server.tools import call_grammar
    from tests.tokenizer.mistral_files import v11_tekken

    tok = load_tokenizer(v11_tekken(tmp_path))
    fmt = tool_format(tok)
    assert fmt.kind == "mistral" and fmt.args_token == tok.special_id("[ARGS]") is not None  # type: ignore[attr-defined]
    fns = parse_tools(TOOLS)
    text = tok.decode(prompt_ids(tok, request(LOOP), fmt, fns, "auto")[0], skip_special=False)
    assert "[AVAILABLE_TOOLS]" in text and "[TOOL_CALLS]get_weather" in text and "[TOOL_RESULTS]" in text
    grammar = GrammarCompiler(tok, tok.vocab_size).lark(call_grammar(fmt, fns, "required", True))
    assert fmt.call_token is not None and fmt.args_token is not None
    ids = [fmt.call_token, *tok.encode("get_weather", add_special=False), fmt.args_token,
           *tok.encode('{"city": "Lyon"}', add_special=False)]
    twice = ids + ids
    m = grammar.matcher()
    assert m.consume_tokens(twice) and m.is_accepting()
    m = grammar.matcher()
    assert not m.consume_tokens(tok.encode('[{"name": "get_weather"', add_special=False))  # the v3 form is not
    decoded = tok.decode(twice[1:], skip_special=True)  # control tokens decode to nothing
    pieces = [("", [fmt.call_token]), *[(c, [1000]) for c in decoded]]
    assert events_of(ToolCallReader(fmt), pieces) == ("", [("get_weather", '{"city": "Lyon"}')] * 2)


def test_generic_prompt_for_smollm2(smollm2_path: Path) -> None:
    tok = load_tokenizer(smollm2_path)
    fmt = tool_format(tok)
    assert fmt.kind == "generic"
    text = tok.decode(prompt_ids(tok, request(LOOP), fmt, parse_tools(TOOLS), "auto")[0], skip_special=False)
    assert "<tools>" in text and '"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<tool_response>\n{"name": "get_weather", "content": "21 C, clear"}\n</tool_response>' in text


def test_hermes_templates_render_tools_themselves() -> None:
    from souverain.tokenizer.hf import HFTokenizer

    tok = load_tokenizer(mistral_file("tekken"))
    assert tool_format(tok).kind == "mistral"
    hermes = HFTokenizer.__new__(HFTokenizer)
    hermes.chat_template = QWEN_LIKE
    assert tool_format(hermes) == ToolFormat("hermes")


LLAMA31_LIKE = ("{% if tools %}<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions, please "
                "respond with a JSON for a function call with its proper arguments.\n\nRespond in the format "
                '{"name": function name, "parameters": dictionary of argument name and its value}.\n'
                "{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|eot_id|>{% endif %}{% for m in messages %}"
                "<|start_header_id|>{{ 'ipython' if m.role == 'tool' else m.role }}<|end_header_id|>\n\n"
                "{% if m.tool_calls %}{{ {'name': m.tool_calls[0].function.name, 'parameters': "
                "m.tool_calls[0].function.arguments} | tojson }}{% else %}{{ m.content }}{% endif %}<|eot_id|>"
                "{% endfor %}<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_llama3_format_through_its_template(smollm2_path: Path) -> None:
    from souverain.engine.grammar import GrammarCompiler
    from souverain.server.tools import call_grammar

    tok = load_tokenizer(smollm2_path)  # a byte-level BPE vocabulary, with a Llama 3.1-like template
    tok.chat_template = LLAMA31_LIKE  # type: ignore[attr-defined]
    fmt = tool_format(tok)
    assert fmt == ToolFormat("llama3") and fmt.template_takes_tools
    fns = parse_tools(TOOLS)
    text = tok.decode(prompt_ids(tok, request(LOOP), fmt, fns, "auto")[0], skip_special=False)
    assert '"name": "get_weather"' in text and "Respond in the format" in text and "ipython" in text
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}' in text
    grammar = GrammarCompiler(tok, tok.vocab_size).lark(call_grammar(fmt, fns, "auto", True))
    for answer, ok in (('{"name": "get_weather", "parameters": {"city": "Lyon"}}', True), ("Sunny.", True),
                       ('{"name": "get_weather", "arguments": {}}', False), (' {"oops": 1}', False)):
        m = grammar.matcher()
        assert (m.consume_tokens(tok.encode(answer, add_special=False)) and m.is_accepting()) == ok, answer
    content, calls = events_of(ToolCallReader(fmt), [('{"name": "get_weather", "parameters": {"city": "Lyon"}}',
                                                      [0])])
    assert content == "" and calls == [("get_weather", '{"city": "Lyon"}')]


def test_choices_and_errors() -> None:
    fns = parse_tools(TOOLS)
    assert choose(fns, None) == ("auto", fns) and choose([], None) == ("none", [])
    assert choose(fns, "any")[0] == "required" == choose(fns, "required")[0]
    assert choose(fns, {"type": "function", "function": {"name": "get_weather"}}) == ("required", fns)
    for bad in ("sometimes", {"type": "function", "function": {"name": "nope"}}):
        with pytest.raises(APIError):
            choose(fns, bad)
    with pytest.raises(APIError):
        choose([], "required")
    for tools in ([{"type": "function", "function": {"name": "bad name!"}}], [TOOLS[0], TOOLS[0]],
                  [{"type": "code_interpreter"}]):
        with pytest.raises(APIError):
            parse_tools(tools)


def test_ids() -> None:
    generic, mistral = ToolFormat("generic"), ToolFormat("mistral", 5)
    a, b = call_id(generic, "r:0", 0), call_id(generic, "r:0", 1)
    assert a.startswith("call_") and len(a) == 29 and a != b
    m = call_id(mistral, "r:0", 0)
    assert len(m) == 9 and m.isalnum() and mistral_id(m) == m


def events_of(reader: ToolCallReader, pieces: list[tuple[str, list[int]]]) -> tuple[str, list[tuple[str, str]]]:
    content, calls = "", []
    events = [e for text, ids in pieces for e in reader.feed(text, ids)] + reader.finish()
    for e in events:
        if isinstance(e, Content):
            content += e.text
        elif isinstance(e, CallStart):
            assert e.index == len(calls)
            calls.append((e.name, ""))
        elif isinstance(e, CallArguments):
            name, args = calls[e.index]
            calls[e.index] = (name, args + e.text)
    return content, calls


HERMES = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", "n": [1, {"x": 2}]}}\n'
          '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {}}\n</tool_call>')


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(HERMES)])
def test_reader_streams_the_same_calls_in_any_pieces(size: int) -> None:
    pieces = [(HERMES[i : i + size], [0]) for i in range(0, len(HERMES), size)]
    content, calls = events_of(ToolCallReader(ToolFormat("generic")), pieces)
    assert content == ""
    assert [(n, json.loads(a)) for n, a in calls] == [("get_weather", {"city": 'Pa"ris}', "n": [1, {"x": 2}]}),
                                                      ("add", {})]


def test_reader_text_and_mistral_first_token() -> None:
    for text in ("<b>bold</b> answer", "Hello <tool", "  plain"):
        pieces = [(text[i : i + 2], [0]) for i in range(0, len(text), 2)]
        assert events_of(ToolCallReader(ToolFormat("generic")), pieces) == (text, [])
    fmt = ToolFormat("mistral", 5)
    body = ' [{"name": "add", "arguments": {"a": 1}}, {"name": "add", "arguments": {"a": 2}}]'
    content, calls = events_of(ToolCallReader(fmt), [("", [5]), *[(c, [100]) for c in body]])
    assert content == "" and calls == [("add", '{"a": 1}'), ("add", '{"a": 2}')]
    # The same text without the control token is an answer, not a call; and tool_choice none reads nothing.
    assert events_of(ToolCallReader(fmt), [(body, [100])]) == (body, [])
    assert events_of(ToolCallReader(ToolFormat("generic"), enabled=False), [(HERMES, [0])]) == (HERMES, [])
