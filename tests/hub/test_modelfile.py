"""Ollama's Modelfile: what is taken, and what is refused by name (never dropped)."""

from __future__ import annotations

from pathlib import Path

import pytest

from souverain.hub.modelfile import ModelfileError, merge, parse, render
from souverain.hub.sources import create_model, default_name, import_path
from souverain.hub.store import Store

TEXT = '''# comments and blank lines are skipped

FROM smollm2
SYSTEM """You are a pirate.
Answer in one line."""
PARAMETER temperature 0.3
parameter num_predict 42
PARAMETER stop "<|im_end|>"
PARAMETER stop Captain
PARAMETER num_ctx 1024
MESSAGE user Who are you?
MESSAGE assistant "Arr, a pirate."
TEMPLATE """{% for m in messages %}{{ m.role }}: {{ m.content }}
{% endfor %}assistant:"""
LICENSE """MIT"""
'''


def test_parse_takes_ollama_syntax() -> None:
    found = parse(TEXT)
    assert found.base == "smollm2"
    assert found.system == "You are a pirate.\nAnswer in one line."
    assert found.parameters == {"temperature": 0.3, "max_tokens": 42, "stop": ["<|im_end|>", "Captain"],
                                "context": 1024}
    assert found.messages == [{"role": "user", "content": "Who are you?"},
                              {"role": "assistant", "content": "Arr, a pirate."}]
    assert found.template is not None and found.template.startswith("{% for m in messages %}")
    assert found.license == "MIT"
    again = parse(render("x", "smollm2", found.defaults(), found.license))  # show --modelfile round-trips
    assert again.defaults() == found.defaults() and again.license == "MIT"


@pytest.mark.parametrize(("text", "says"), [
    ("SYSTEM hi", "no FROM line"),
    ("FROM x\nPARAMETER mirostat 1", "PARAMETER mirostat is not supported"),
    ("FROM x\nPARAMETER temperature hot", "takes a number"),
    ("FROM x\nPARAMETER top_k 2.5", "takes an integer"),
    ("FROM x\nPARAMETER temperature", "needs a value"),
    ('FROM x\nTEMPLATE """{{ .System }} {{ .Prompt }}"""', "Go template"),
    ("FROM x\nMESSAGE robot hi", "MESSAGE role"),
    ("FROM x\nQUANTIZE q4", "unknown instruction QUANTIZE"),
    ('FROM x\nSYSTEM """never closed', "never closed"),
])
def test_what_cannot_be_honoured_is_refused_by_name(text: str, says: str) -> None:
    with pytest.raises(ModelfileError, match=says):
        parse(text)


def test_a_model_made_from_a_made_model_keeps_its_defaults() -> None:
    base = {"system": "a", "parameters": {"temperature": 0.1, "top_k": 5}}
    assert merge(base, {"parameters": {"temperature": 0.9}}) == {"system": "a",
                                                                "parameters": {"temperature": 0.9, "top_k": 5}}


def test_create_from_a_file_and_from_an_installed_model(tmp_path: Path, smollm2_path: Path) -> None:
    store = Store(tmp_path / "home")
    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "sub" / "tiny.gguf").symlink_to(smollm2_path)
    (tmp_path / "m" / "Modelfile").write_text("FROM ./sub/tiny.gguf\nSYSTEM Be brief.\nPARAMETER temperature 0\n")
    made = create_model(store, "brief", tmp_path / "m" / "Modelfile")  # FROM is read from the Modelfile's folder
    assert made.defaults == {"system": "Be brief.", "parameters": {"temperature": 0.0}}
    (tmp_path / "m" / "Second").write_text("FROM brief\nPARAMETER top_k 4\n")
    second = create_model(store, "brief2", tmp_path / "m" / "Second")
    assert second.defaults == {"system": "Be brief.", "parameters": {"temperature": 0.0, "top_k": 4}}
    assert second.files == made.files  # the same bytes, hard-linked
    folder = store.path("brief2")
    assert folder.stat().st_nlink >= 2
    (tmp_path / "m" / "Bad").write_text('FROM brief\nTEMPLATE """{% for m in messages %}"""\n')
    with pytest.raises(ModelfileError, match="TEMPLATE"):
        create_model(store, "bad", tmp_path / "m" / "Bad")
    (tmp_path / "m" / "Missing").write_text("FROM nothing-installed\n")
    with pytest.raises(ModelfileError, match="no installed model"):
        create_model(store, "bad", tmp_path / "m" / "Missing")
    assert store.get("bad") is None


def test_import_names_and_errors_speak_of_the_users_file(tmp_path: Path) -> None:
    bad = tmp_path / "Broken-Model.Q4.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(Exception, match=str(bad)) as caught:
        import_path(Store(tmp_path / "home"), bad)
    assert "tmp/" not in str(caught.value).replace(str(tmp_path), "")  # not the staging copy
    assert default_name(bad) == "Broken-Model.Q4"  # as written, not lower-cased
    assert default_name(tmp_path / "my model (v2).gguf") == "my-model-v2"


def test_an_adapter_for_another_model_is_refused_at_create(tmp_path: Path, smollm2_path: Path) -> None:
    import json

    import torch
    from safetensors.torch import save_file

    store = Store(tmp_path / "home")
    import_path(store, smollm2_path, "smollm2")
    lora = tmp_path / "lora"
    lora.mkdir()
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 10),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(10, 2)},
              str(lora / "adapter_model.safetensors"))
    (lora / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    (tmp_path / "Modelfile").write_text("FROM smollm2\nADAPTER ./lora\n")
    with pytest.raises(ValueError, match="base model"):
        create_model(store, "tuned", tmp_path / "Modelfile")
    (tmp_path / "Missing").write_text("FROM smollm2\nADAPTER ./nowhere\n")
    with pytest.raises(ModelfileError, match=r"ADAPTER \./nowhere: no such file"):
        create_model(store, "tuned", tmp_path / "Missing")
    assert store.get("tuned") is None
