"""The option parser: dashed aliases of every option (and the preset logic seeing them as given), a front
end's own flags next to tunelab's (parse_with), the shared --host/--port options, the prompt-option group."""

from __future__ import annotations

import dataclasses

import pytest

from tunelab.errors import TunelabError
from tunelab.hparams import DataArguments, listen_arguments, parse_args, parse_with
from tunelab.names import PROMPT_OPTIONS


def test_dashed_flags_are_aliases_of_the_underscored_ones():
    dashed = parse_args(["--learning-rate", "1e-4", "--lora-target=mlp", "--source-prefix", "You are Yui."])
    plain = parse_args(["--learning_rate", "1e-4", "--lora_target=mlp", "--source_prefix", "You are Yui."])
    assert dashed.to_dict() == plain.to_dict()
    assert dashed.explicit == plain.explicit == {"learning_rate", "lora_target", "source_prefix"}


def test_a_dashed_flag_counts_as_given_for_a_generation_preset():
    # the preset fills only what the user did not set: --top-p must win over seed2023's top_p 0.7
    args = parse_args(["--generation_preset", "seed2023", "--top-p", "0.5"])
    assert (args.generation.top_p, args.generation.temperature) == (0.5, 0.95)


def test_unknown_option_names_the_closest():
    with pytest.raises(TunelabError, match="did you mean learning_rate"):
        parse_args(["--learning_rat", "1e-4"])


@dataclasses.dataclass
class _Front(listen_arguments(1234)):
    api_key: str | None = dataclasses.field(default=None, metadata={"help": "a key"})


def test_parse_with_splits_front_end_flags_from_tunelab_options():
    args, opts = parse_with(["--port", "99", "--api-key", "k", "--max-new-tokens", "7", "--template", "plain"],
                            _Front, prog="tunelab front")
    assert (opts.host, opts.port, opts.api_key) == ("127.0.0.1", 99, "k")
    assert (args.generation.max_new_tokens, args.data.template) == (7, "plain")
    assert parse_with([], _Front)[1].port == 1234
    with pytest.raises(TunelabError, match="did you mean"):
        parse_with(["--api_keys", "k"], _Front)


def test_serve_and_webui_share_the_host_and_port_options():
    from tunelab.serve import ServeArguments
    from tunelab.webui import WebUIArguments

    serve, webui = ServeArguments(), WebUIArguments()
    assert (serve.host, serve.port) == ("127.0.0.1", 8000)
    assert (webui.host, webui.port) == ("127.0.0.1", 7860)
    fields = {cls: {f.name: f.metadata["help"] for f in dataclasses.fields(cls)} for cls in (ServeArguments,
                                                                                         WebUIArguments)}
    assert fields[ServeArguments]["host"] == fields[WebUIArguments]["host"]


def test_prompt_options_are_data_options():
    # eval/chat/export inherit these from a checkpoint's run; a rename here must not silently drop one
    assert set(PROMPT_OPTIONS) <= {f.name for f in dataclasses.fields(DataArguments)}


@pytest.mark.parametrize("name, text, message", [
    ("cfg.json", '{\n  "lora_rank": 8,\n}', r"cfg.json:3: malformed JSON"),
    ("cfg.yaml", "lora_rank: 8\n\tlora_alpha: 16\n", r"cfg.yaml:2: malformed YAML \(found character '\\t'"),
    ("cfg.yaml", "lora_rank: [8\n", r"cfg.yaml:2: malformed YAML"),
])
def test_a_malformed_config_file_names_its_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(TunelabError, match=message):
        parse_args([str(path)])
