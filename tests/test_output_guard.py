"""Issue 23, data loss: every command that writes refuses an existing output without --force, never writes over its
own inputs, a key or a model card, and checks every output path before any slow work (a path under /proc fails in
well under a second, before a model is loaded). The inputs here are placeholders: the check comes first, so a
command that got past it would fail on them with another message (which the tests would see)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from seal_diffusion.cli import main as cli_main
from seal_diffusion.errors import UserError
from seal_diffusion.outpaths import Output, check_outputs, probe_writable

IMPOSSIBLE = "/proc/x/out"  # /proc refuses new folders, even to root (os.access says yes to root)


@pytest.fixture()
def ws(tmp_path):
    """A key (a key's header, no key inside: the check comes first), a suspect, a challenge, an image and a model card."""
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "k.sealkey"), metadata={"format": "sealkey"})  # header of a key
    (tmp_path / "s.safetensors").write_bytes(b"placeholder lora")
    (tmp_path / "c.json").write_text("{}")
    (tmp_path / "i.png").write_bytes(b"png")
    (tmp_path / "README.md").write_text("---\nbase_model: tiny\n---\n# card\n")
    return tmp_path


def _commands(ws: Path, out: str) -> dict[str, list[str]]:
    """Every writing command with ``out`` as its (file or folder) output."""
    k, s = str(ws / "k.sealkey"), str(ws / "s.safetensors")
    return {
        "verify --json": ["verify", "--key", k, s, "--json", out],
        "verify --functional --json": ["verify", "--key", k, s, "--functional", "--base", "tiny", "--json", out],
        "scan --json": ["scan", "--key", k, s, "--json", out],
        "challenge --out": ["challenge", "--key", k, "--out", out],
        "verify-images --json": ["verify-images", "--key", k, "--challenge", str(ws / "c.json"), str(ws / "i.png"),
                                 "--json", out],
        "dispute --json": ["dispute", s, "--claim", k, "--json", out],
        "dispute --out": ["dispute", s, "--claim", k, "--out", out],
        "export kohya --out": ["export", "--key", k, "--format", "kohya", "--out", out],
        "attack prune OUT": ["attack", "prune", s, out],
        "attack distill OUT": ["attack", "distill", s, out],
        "attack finetune OUT": ["attack", "finetune", s, out],
        "attack ambiguity OUT": ["attack", "ambiguity", k, out],
        "attack merge-checkpoint OUT.safetensors": ["attack", "merge-checkpoint", s, out, "--base", "tiny"],
    }


def _folder_commands(ws: Path, out: str) -> dict[str, list[str]]:
    k, s = str(ws / "k.sealkey"), str(ws / "s.safetensors")
    return {
        "compare --out": ["compare", "--key", k, "--prompt", "a cat", "--out", out],
        "robustness --out": ["robustness", "--key", k, "--lora", s, "--out", out],
        "sigma-sweep --out": ["sigma-sweep", "--out", out, "--sigmas", "1"],
        "demo --out": ["demo", "--out", out],
        "tiny-model --out": ["tiny-model", "--out", out],
        "attack merge-checkpoint OUT/": ["attack", "merge-checkpoint", s, out, "--base", "tiny"],
        "export diffusers --out": ["export", "--key", k, "--format", "diffusers", "--out", out],
    }


# what an earlier run left in the folder, for each folder command
_EARLIER = {"compare --out": "compare.json", "robustness --out": "report.md", "sigma-sweep --out": "sigma_sweep.md",
            "demo --out": "summary.md", "tiny-model --out": "model_index.json",
            "attack merge-checkpoint OUT/": "model_index.json", "export diffusers --out": "pytorch_lora_weights.safetensors"}


def _run(argv, capsys) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    rc = cli_main(argv)
    return rc, capsys.readouterr().err, time.perf_counter() - t0


@pytest.mark.parametrize("name", list(_commands(Path("."), "x")))
def test_existing_file_output_is_refused_without_force(ws, capsys, name):
    out = ws / "earlier.safetensors"  # a file name every command accepts (merge-checkpoint: a single file)
    out.write_bytes(b"the earlier result")
    rc, err, _ = _run(_commands(ws, str(out))[name], capsys)
    assert rc == 2
    assert "already exists; refusing to overwrite it (pass --force" in err, err
    assert out.read_bytes() == b"the earlier result"


@pytest.mark.parametrize("name", list(_folder_commands(Path("."), "x")))
def test_folder_output_holding_an_earlier_run_is_refused_without_force(ws, capsys, name):
    out = ws / "earlier"
    out.mkdir()
    (out / _EARLIER[name]).write_text("earlier run")
    rc, err, _ = _run(_folder_commands(ws, str(out))[name], capsys)
    assert rc == 2
    assert "refusing to" in err and "--force" in err, err
    assert (out / _EARLIER[name]).read_text() == "earlier run"


@pytest.mark.parametrize("name", list(_commands(Path("."), "x")) + list(_folder_commands(Path("."), "x")))
def test_impossible_output_path_fails_at_once(ws, capsys, name):
    argv = {**_commands(ws, IMPOSSIBLE + "/r.json"), **_folder_commands(ws, IMPOSSIBLE)}[name]
    rc, err, seconds = _run(argv, capsys)
    assert rc == 2
    assert "cannot write there" in err and "/proc/x" in err, err
    assert seconds < 3.0, f"{name}: {seconds:.1f} s before the path was refused"  # no model loaded, nothing rendered


@pytest.mark.parametrize("name", ["verify --json", "scan --json", "dispute --out", "verify-images --json",
                                  "challenge --out", "export kohya --out", "attack prune OUT"])
def test_key_and_model_card_are_never_replaced_even_with_force(ws, capsys, name):
    for target, why in [(ws / "k.sealkey", ("is the key this command reads", "is a SEAL key file")),
                        (ws / "README.md", ("is a model card",))]:
        before = target.read_bytes()
        rc, err, _ = _run(_commands(ws, str(target))[name] + ["--force"], capsys)
        assert rc == 2 and any(w in err for w in why), (name, err)
        assert target.read_bytes() == before


def test_another_key_is_never_replaced_by_a_report_but_a_forged_key_may_replace_one(ws, capsys):
    other = ws / "other.sealkey"
    other.write_bytes((ws / "k.sealkey").read_bytes())
    rc, err, _ = _run(_commands(ws, str(other))["verify --json"] + ["--force"], capsys)
    assert rc == 2 and "is a SEAL key file" in err
    # attack ambiguity writes a (forged) key: with --force it passes the output check and fails later on the junk key
    rc, err, _ = _run(_commands(ws, str(other))["attack ambiguity OUT"] + ["--force"], capsys)
    assert rc == 2 and "SEAL key file" not in err and "refusing" not in err, err


def test_suspect_is_never_replaced(ws, capsys):
    s = ws / "s.safetensors"
    rc, err, _ = _run(_commands(ws, str(s))["attack prune OUT"] + ["--force"], capsys)
    assert rc == 2 and "is the input this command reads" in err, err
    assert s.read_bytes() == b"placeholder lora"


def test_two_outputs_of_one_command_must_differ(ws, capsys):
    out = str(ws / "r.txt")
    rc, err, _ = _run(["dispute", str(ws / "s.safetensors"), "--claim", str(ws / "k.sealkey"), "--json", out,
                       "--out", out], capsys)
    assert rc == 2 and "give each output its own path" in err, err


def test_folder_output_that_is_a_file_and_file_output_that_is_a_folder(ws, capsys):
    rc, err, _ = _run(_folder_commands(ws, str(ws / "c.json"))["compare --out"], capsys)
    assert rc == 2 and "is a file; expected a folder" in err
    rc, err, _ = _run(_commands(ws, str(ws))["verify --json"], capsys)
    assert rc == 2 and "is a folder; expected a file path" in err


def test_tiny_model_force_replaces_only_a_model_folder(ws, capsys):
    notes = ws / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    rc, err, _ = _run(["tiny-model", "--out", str(notes), "--force"], capsys)
    assert rc == 2 and "not a folder this tool wrote" in err, err
    assert (notes / "todo.txt").read_text() == "mine"
    rc, err, _ = _run(["tiny-model", "--out", str(ws), "--force"], capsys)  # holds a key-named file and README
    assert rc == 2
    assert (ws / "k.sealkey").exists()


def test_probe_leaves_nothing_behind(tmp_path):
    deep = tmp_path / "a" / "b" / "c"
    probe_writable(deep, "--out")
    assert list(tmp_path.iterdir()) == []  # the folders made for the probe are gone again
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        probe_writable(tmp_path / "file" / "sub", "--out")
    assert check_outputs(Output(None, "--json"), Output(str(tmp_path / "new.json"), "--json")) == \
        [None, tmp_path / "new.json"]


def test_force_replaces_a_report(tmp_path, capsys):
    """The one path the guard lets through: --force over an earlier report, with a real key and LoRA."""
    from small_owner import small_owner

    owner = small_owner(tmp_path, "guard")
    out = tmp_path / "r.json"
    out.write_text("earlier")
    rc, err, _ = _run(["verify", "--key", str(owner["key_path"]), str(owner["kohya"]), "--json", str(out), "--force"],
                      capsys)
    assert rc == 0, err
    assert '"detected": true' in out.read_text()


def test_train_output_dir_that_cannot_be_made_fails_before_loading_the_model(subject_dir, capsys):
    """os.access says yes to root on /proc; the probe file does not."""
    rc = cli_main(["train", "--instance_data_dir", str(subject_dir), "--instance_prompt", "a photo of sks cat",
                   "--output_dir", IMPOSSIBLE, "--max_train_steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--output_dir /proc/x/out: cannot write there" in err, err
    assert "Running training" not in err
