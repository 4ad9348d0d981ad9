"""Command help: every option of every command says what it does and shows its default; booleans are plain flags;
`download --only` lists what it accepts; `check --models` names the environment fallbacks in the order used; encode
offers only what it uses (old options still run, hidden, with a warning)."""

from __future__ import annotations

import argparse
import logging

import pytest

from lambda_eclipse.core import cli
from lambda_eclipse.core.download import GROUPS, load_manifest

COMMANDS = ("generate", "interpolate", "encode", "check", "download")
# Accepted for old scripts and docs, not shown in --help.
HIDDEN = {
    "generate": {"--allow-download"},
    "interpolate": {"--allow-download"},
    "encode": {"--prior", "--decoder", "--decoder-unet", "--decoder-movq"},
}
BOOLEAN_WORDS = {"true", "false", "yes", "no", "on", "off", "0", "1"}


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices


def _rendered(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help text exactly as --help prints it for this option (default expanded, before line wrapping)."""
    return parser._get_formatter()._expand_help(action)


def _options(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help_that_shows_its_default(name):
    parser = _commands()[name]
    hidden = set()
    for action in _options(parser):
        flag = action.option_strings[0]
        if action.help == argparse.SUPPRESS:
            hidden.add(flag)
            continue
        assert action.help and action.help.strip(), f"{name} {flag} has no help"
        text = _rendered(parser, action)
        if action.nargs != 0 and action.default is not None:
            assert str(action.default) in text and "default" in text.lower(), f"{name} {flag}: {text!r}"
        if action.nargs != 0 and action.default is None and not action.required:
            assert "default" in text.lower(), f"{name} {flag} does not say what happens without it: {text!r}"
    assert hidden == HIDDEN.get(name, set())


@pytest.mark.parametrize("name", COMMANDS)
def test_booleans_are_plain_flags(name):
    for action in _options(_commands()[name]):
        if action.help == argparse.SUPPRESS:
            continue
        flag = action.option_strings[0]
        if action.nargs == 0:
            assert isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)), flag
            assert action.metavar is None, flag
        else:  # no `--flag true`, `--flag FLAG` of type bool, or `--flag [FLAG]`
            assert action.type is not bool and action.nargs != "?", f"{name} {flag}"
            assert not (action.choices and {str(c).lower() for c in action.choices} <= BOOLEAN_WORDS), f"{name} {flag}"


def test_the_full_help_pages_show_defaults():
    commands = _commands()
    page = {name: " ".join(commands[name].format_help().split()) for name in COMMANDS}  # unwrapped
    assert "--out OUT output image (.png, .jpg, .webp) (default: lambda_eclipse.png)" in page["generate"]
    assert "(default: 7.5)" in page["interpolate"]
    encode = page["encode"]
    assert "(default: fp32)" in encode and "--prior" not in encode and "--decoder" not in encode
    assert "--download" not in encode and "CLIP precision" in encode


def test_download_only_lists_every_group_and_key():
    action = next(a for a in _options(_commands()["download"]) if a.option_strings[0] == "--only")
    text = _rendered(_commands()["download"], action)
    for word in [*GROUPS, *(e.key for e in load_manifest())]:
        assert word in text, (word, text)
    assert "Default: all five files" in text


def test_check_models_names_the_environment_fallbacks_in_the_order_used(monkeypatch, tmp_path):
    from lambda_eclipse.core.paths import MODELS_ENV_HELP, default_models_dir

    for name in ("check", "download"):
        action = next(a for a in _options(_commands()[name]) if a.option_strings[0] == "--models")
        text = _rendered(_commands()[name], action)
        assert MODELS_ENV_HELP in text
        assert text.index("$COMFYUI_MODELS") < text.index("$COMFYUI_PATH/models")
    monkeypatch.setenv("COMFYUI_MODELS", str(tmp_path / "a"))
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "comfy"))
    assert default_models_dir() == (str(tmp_path / "a"), "$COMFYUI_MODELS")
    monkeypatch.delenv("COMFYUI_MODELS")
    assert default_models_dir() == (str(tmp_path / "comfy" / "models"), "$COMFYUI_PATH/models")
    monkeypatch.delenv("COMFYUI_PATH")
    assert default_models_dir() == (None, "")


def test_check_uses_the_environment_and_names_a_missing_folder(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("COMFYUI_MODELS", raising=False)
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "nowhere"))
    assert cli.main(["check"]) == 2
    err = capsys.readouterr().err
    assert f"$COMFYUI_PATH/models {tmp_path / 'nowhere' / 'models'} does not exist" in err
    assert not (tmp_path / "nowhere").exists()


def test_old_spellings_still_parse():
    parser = cli.build_parser()
    assert parser.parse_args(["generate", "--prompt", "a dog", "--allow-download"]).download is True
    args = parser.parse_args(["encode", "--prompt", "a dog", "--out", "f.safetensors", "--prior", "p.safetensors",
                              "--decoder", "d", "--decoder-unet", "u", "--decoder-movq", "m"])
    assert args.ignored_prior == "p.safetensors" and not hasattr(args, "prior")


def test_encode_ignores_prior_and_decoder_options_with_a_warning(tiny_models, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="lambda_eclipse")
    out = tmp_path / "f.safetensors"
    assert cli.main(["encode", "--clip-text", str(tiny_models["clip_text"]), "--prompt", "a dog", "--out", str(out),
                     "--prior", str(tmp_path / "no_such_prior.safetensors"), "--decoder", str(tmp_path / "nope")]) == 0
    assert out.is_file()
    assert "encode uses only the CLIP towers: --prior is ignored." in caplog.text
    assert "encode uses only the CLIP towers: --decoder is ignored." in caplog.text
