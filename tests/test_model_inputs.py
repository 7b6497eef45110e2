"""What a newcomer hits when a model folder or file is wrong: one line that says what is wrong and what to
do (which backend runs the folder, which file is truncated, which set a checkpoint holds), found in a QA
pass over the EchoMimic / Hallo / EMO model backends and the CLI's help."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from emo_stream.errors import ConfigError, EmoStreamError, WeightsError


# ---- unreadable weight files ---------------------------------------------------------------------------
class _Code:
    def __reduce__(self):          # a pickle that would run code when loaded without weights_only
        return (print, ("pwned",))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("bad")
    torch.save({"w": torch.zeros(64)}, d / "ok.pth")
    good = (d / "ok.pth").read_bytes()
    (d / "truncated.pth").write_bytes(good[: len(good) // 2])
    torch.save({"w": torch.zeros(100_000)}, d / "big.pth")
    (d / "cut_early.pth").write_bytes((d / "big.pth").read_bytes()[:50_000])   # torch: OSError EINVAL
    (d / "empty.pth").write_bytes(b"")
    (d / "junk.pth").write_bytes(b"not weights at all " * 8)
    torch.save({"w": _Code()}, d / "code.pth")
    save_file({"w": torch.zeros(64)}, str(d / "ok.safetensors"))
    good = (d / "ok.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    return d


@pytest.mark.parametrize("name, says", [
    ("truncated.pth", "truncated or corrupt"), ("empty.pth", "truncated or corrupt"),
    ("cut_early.pth", "truncated or corrupt"),
    ("truncated.safetensors", "truncated or corrupt"), ("junk.pth", "not a torch weights file"),
    ("code.pth", "pickled Python objects"),
])
def test_unreadable_weight_files_are_one_short_line(bad_files, name, says, capsys):
    from emo_stream.blocks.weights import read_state_dict

    with pytest.raises(WeightsError) as info:
        read_state_dict(bad_files / name)
    msg = str(info.value)
    assert says in msg and str(bad_files / name) in msg
    assert "\n" not in msg and len(msg) < 300, msg          # torch's own text runs to a paragraph
    assert "miniz" not in msg and "two options" not in msg  # nor does it advise loading unsafely
    assert "pwned" not in capsys.readouterr().out            # and no code ran


@pytest.mark.parametrize("name, says", [("cut_early.pth", "truncated or corrupt"), ("junk.pth", "not a torch weights"),
                                        ("code.pth", "pickled Python objects")])
def test_hallo_net_pth_reads_with_the_same_messages(bad_files, name, says):
    from emo_stream.families.hallo.loader import load_net_file

    with pytest.raises(WeightsError, match=says) as info:
        load_net_file(bad_files / name)
    assert str(bad_files / name) in str(info.value) and "Errno" not in str(info.value)


# ---- which backend runs which folder ---------------------------------------------------------------------
@pytest.fixture
def hallo_folder(tmp_path) -> Path:
    (tmp_path / "hallo").mkdir()
    (tmp_path / "hallo" / "net.pth").write_bytes(b"")      # detection goes by the download's layout
    return tmp_path


def test_a_folder_that_is_no_model_says_so(tmp_path):
    from emo_stream.registry import create_backend, default_backend

    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(WeightsError, match="not a download folder of a known model"):
        default_backend(str(tmp_path))
    with pytest.raises(WeightsError, match="not a download folder of a known model"):
        create_backend(None, str(tmp_path))
    assert default_backend("tiny") == "emo" and default_backend(None) == "preview"
    from server.config import load_config   # serve / worker: --model alone goes through the same check

    with pytest.raises(WeightsError, match="not a download folder of a known model"):
        load_config(None, model=str(tmp_path))


@pytest.mark.parametrize("backend", ["emo", "echomimic"])
def test_the_wrong_backend_for_a_folder_names_the_right_one(hallo_folder, backend):
    from emo_stream.registry import create_backend

    with pytest.raises(ConfigError) as info:
        create_backend(backend, str(hallo_folder), size=64, device="cpu")
    msg = str(info.value)
    assert "use --backend hallo" in msg and f"--backend {backend} does not run" in msg, msg
    assert "hallo-" not in msg and "echomimic-v1" not in msg   # backend names, not architecture keys


def test_bad_devices_are_config_errors():
    from emo_stream.blocks.device import torch_device

    assert torch_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        torch_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            torch_device("cuda")


def test_hallo_steps_zero_is_an_error_not_the_default():
    from emo_stream.families.hallo.backend import HalloBackend

    model = SimpleNamespace(config=SimpleNamespace(fps=25, steps=40, guidance=3.5, clip_length=16),
                            vae=object(), denoising_unet=torch.nn.Linear(1, 1))
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        HalloBackend(model, size=64, steps=0)


# ---- EchoMimic: a folder without the VAE, a converted checkpoint asked for the other set -------------
@pytest.fixture(scope="module")
def echo_no_vae(tmp_path_factory) -> Path:
    from emo_stream.families.echomimic.testing import write_tiny_echomimic_folder

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("EchoMimic")
    write_tiny_echomimic_folder(d, channels=32, vae=False)
    return d


def test_echomimic_without_its_vae_names_the_folder_it_needs(echo_no_vae):
    from emo_stream.registry import create_backend

    with pytest.raises(ConfigError, match="sd-vae-ft-mse"):
        create_backend(None, str(echo_no_vae), size=64, device="cpu")


def test_a_converted_checkpoint_refuses_the_other_weights_set(echo_no_vae, tmp_path):
    from emo_stream.convert import convert
    from emo_stream.registry import load_model

    ckpt = convert(echo_no_vae, tmp_path / "ckpt")
    assert load_model(ckpt, weights_set="acc").config.weights_set == "acc"
    with pytest.raises(WeightsError, match="holds the acc set"):
        load_model(ckpt, weights_set="normal")


# ---- the CLI's help: every model kind named, the two spellings of the weights set --------------------
@pytest.mark.parametrize("command", ["serve", "generate", "worker"])
def test_model_help_names_every_backend_and_model_kind(command, capsys):
    from emo_stream.registry import family_names
    from server.cli import main as cli_main

    with pytest.raises(SystemExit):
        cli_main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{" + ",".join(family_names()) + "}" in text
    assert "EchoMimic" in text and "Hallo" in text and "preset" in text


def test_weights_set_spelled_alike_in_generate_and_convert():
    import argparse

    from emo_stream import convert, generate

    for module, dest in ((generate, "weights"), (convert, "weights_set")):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        base = ["--out", "x"] + (["--image", "a", "--audio", "b"] if module is generate else ["DIR"])
        for flag in ("--weights", "--weights-set"):
            assert getattr(parser.parse_args(base + [flag, "normal"]), dest) == "normal"


def test_errors_stay_emo_stream_errors():
    # the CLI turns EmoStreamError into one line and exit 2; the new helpers raise nothing else
    assert issubclass(WeightsError, EmoStreamError) and issubclass(ConfigError, EmoStreamError)


def test_generate_weights_flag_only_for_echomimic(tmp_path, portrait_path, capsys):
    """--weights on another backend is one line in the flag's words (was: 'unknown option(s) ... weights_set')."""
    from emo_stream.timeline import SAMPLE_RATE
    from server.cli import main as cli_main
    import numpy as np
    import wave

    audio = tmp_path / "a.wav"
    with wave.open(str(audio), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(SAMPLE_RATE)
        w.writeframes(np.zeros(SAMPLE_RATE // 2, "<i2").tobytes())
    rc = cli_main(["generate", "--image", str(portrait_path), "--audio", str(audio), "--out", str(tmp_path / "o.mp4"),
                   "--weights", "normal"])
    err = capsys.readouterr().err
    assert rc == 2 and "--weights applies to EchoMimic models, not the preview backend" in err, err


def test_a_missing_model_path_lists_the_download_folders_too(tmp_path):
    from emo_stream.registry import create_backend

    with pytest.raises(WeightsError, match="model not found") as info:
        create_backend(None, str(tmp_path / "absent"), size=64, device="cpu")
    assert "EchoMimic or Hallo download folder" in str(info.value) and "preset" in str(info.value)


def test_help_shows_defaults(capsys):
    """Options with a default say it in --help (prepare's --size, generate's --seed, bot's --chunk-ms)."""
    from server.cli import main as cli_main

    for command, flag in (("prepare", "--size SIZE"), ("generate", "--seed SEED"), ("bot", "--chunk-ms")):
        with pytest.raises(SystemExit):
            cli_main([command, "--help"])
        text = capsys.readouterr().out.split("options:", 1)[1]   # past the usage lines
        line = " ".join(text.split(flag, 1)[1].split("--", 1)[0].split())
        assert "(default: " in line, (command, line)
