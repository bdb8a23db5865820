"""`fedpgen export`: a user's model leaves FedPGen in standard formats and loads, with plain
transformers + PEFT (diffusers + PEFT for images), into exactly what `fedpgen generate` runs.

The runs are tiny and built from the project's own pieces (a device's real round, the
server's checkpoint writer, the run recorder), without a federation: seconds, not a minute.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, device
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fedpgen.client.device import Device
from fedpgen.export import PLAINTEXT_WARNING, export, readme_code
from fedpgen.generate import generate, run_config
from fedpgen.server import checkpoint
from fedpgen.server.results import RunRecorder
from fedpgen.shared.adapters import active, set_arrays, set_tensors
from fedpgen.shared.config import RunConfig
from fedpgen.shared.presets import PERSONAL, SHARED
from fedpgen.shared.sealing import TamperedStateError

pytestmark = pytest.mark.slow

PROMPT, SEED = "To be", 3
PROFILE = {"style": "pirate"}  # its line fits the prefix budget (seq-len / 4) uncut


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: these tiny models on a busy shared CPU take seconds, not a minute."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_run(run_dir: Path, **overrides: object) -> Path:
    """A finished one-round run folder: user 0's device trained a real round, its shared
    result is the round-1 checkpoint (one device: the server's mean is its delta)."""
    cfg = RunConfig.from_mapping({**TINY, "run-dir": str(run_dir), "num-users": 2, "dp": "off",
                                  **{k.replace("_", "-"): v for k, v in overrides.items()}})
    RunRecorder(run_dir, cfg)  # config.json, as a simulation writes it
    d = device(cfg, 0)  # state-dir <run-dir>/devices/<user>, key beside it
    delta, _, _ = d.fit(d.init_send, server_round=1)
    theta = [a + b for a, b in zip(d.init_send, delta, strict=True)]
    checkpoint.save(run_dir / "checkpoints", server_round=1, config_hash=cfg.model_hash(), names=d.sets.send,
                    theta=theta, opt_state={})
    return run_dir


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export-text")
    for name in ("ada", "bo"):
        docs = root / "users" / name / "documents"
        docs.mkdir(parents=True)
        for i in range(30):
            (docs / f"{i:03d}.txt").write_text(f"{name} keeps a log, entry {i}: the tide was high and the wind "
                                               f"came from the west; {name} mended the nets again. " * 2)
        (root / "users" / name / "profile.json").write_text(json.dumps(PROFILE))
    # A shared and a personal learning rate high enough that each part visibly moves the logits
    return build_run(root / "run", data="dir", data_dir=str(root / "users"), lr=0.02, personal_lr=0.05,
                     val_fraction=0.0)


def fedpgen_model(run: Path, user: str, *, personal: bool) -> Device:
    """FedPGen's own model for ``user``, loaded as `fedpgen generate` loads it: the latest
    shared checkpoint and (``personal``) the device's unsealed personal part."""
    cfg = run_config(run)
    d = Device(cfg, user_dir=run.parent / "users" / user, state_dir=run / "devices" / user, create_key=False)
    ckpt = checkpoint.latest(run / "checkpoints", config_hash=cfg.model_hash(), names=d.sets.send)
    set_arrays(d.model, d.sets.send, ckpt.theta)
    set_tensors(d.model, d.store.load_personal() if personal else d.init_keep)
    return d


def load_export(out: Path, variant: str) -> PeftModel:
    """The exported model, built from transformers + PEFT only, as export.json says."""
    act = json.loads((out / "export.json").read_text())["activate"][variant]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base", local_files_only=True), str(out / act[0]),
                                      adapter_name=act[0])
    for name in act[1:]:
        model.load_adapter(str(out / name), adapter_name=name)
    model.base_model.set_adapter(act)
    return model.eval()


def run_readme(out: Path, monkeypatch: pytest.MonkeyPatch, **values: object) -> dict[str, object]:
    """Run the Python recipe of the export's README.txt as written, from the export folder,
    with its first line (``prompt, seed[, count] = ...``) set to ``values``."""
    code = readme_code((out / "README.txt").read_text())
    assignment = f"{', '.join(values)} = {', '.join(repr(v) for v in values.values())}"
    code, replaced = re.subn(r"^prompt, seed.*$", assignment, code, count=1, flags=re.MULTILINE)
    assert replaced == 1, "the recipe sets prompt and seed on one line"
    monkeypatch.chdir(out)
    namespace: dict[str, object] = {}
    exec(compile(code, str(out / "README.txt"), "exec"), namespace)  # noqa: S102 (our own export's recipe)
    return namespace


def test_the_exported_text_model_reproduces_fedpgen_generate_exactly(text_run: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    out = tmp_path / "ada-model"
    d = fedpgen_model(text_run, "ada", personal=True)
    # Execute
    exported = export(text_run, "ada", out=out)
    recipe = run_readme(out, monkeypatch, prompt=PROMPT, seed=SEED)
    reference = generate(text_run, "ada", PROMPT, seed=SEED)
    model = load_export(out, "personal")
    # Assert: standard files only, nothing sealed, the activation FedPGen uses
    assert exported.activate == (SHARED, PERSONAL) and exported.round == 1
    for part in (SHARED, PERSONAL):
        assert sorted(p.name for p in (out / part).iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (out / "base" / "config.json").is_file() and (out / "base" / "model.safetensors").is_file()
    assert not list(out.rglob("*.sealed")) and not list(out.rglob("*.key"))
    prefix = json.loads((out / "export.json").read_text())["prompt-prefix-ids"]
    assert bytes(prefix).decode() == "style=pirate\n", "the profile line generation starts with"
    assert PLAINTEXT_WARNING in (out / "README.txt").read_text()
    # The README's recipe, as written, samples exactly `fedpgen generate`'s text
    assert recipe["text"] == reference and len(reference) > 0
    # Logits and greedy tokens of the fresh model equal FedPGen's own shared+personal forward pass
    ids = torch.tensor([prefix + list(PROMPT.encode())])
    with torch.no_grad(), active(d.model, [SHARED, PERSONAL], ()):
        want = d.model(input_ids=ids).logits
        want_greedy = d.model.generate(input_ids=ids, do_sample=False, max_new_tokens=32, pad_token_id=257)
    with torch.no_grad(), active(d.model, [SHARED], ()):
        shared_only = d.model(input_ids=ids).logits
    with torch.no_grad():
        got = model(input_ids=ids).logits
        got_greedy = model.generate(input_ids=ids, do_sample=False, max_new_tokens=32, pad_token_id=257)
    assert torch.allclose(got, want, rtol=0, atol=1e-6), f"max |Δlogit| {(got - want).abs().max():.3g}"
    assert got_greedy.tolist() == want_greedy.tolist()
    assert (want - shared_only).abs().max() > 1e-3, "the personal part must matter for this test to mean anything"


def test_the_shared_variant_needs_no_personal_part_and_a_personal_export_without_one_is_refused(
        text_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a copy of the device's state-dir without its personal part
    state = tmp_path / "state"
    state.mkdir()
    for f in (text_run / "devices" / "ada").iterdir():
        if f.name != "personal.safetensors.sealed":
            (state / f.name).write_bytes(f.read_bytes())
    os.chmod(state / "device.key", 0o600)
    d = fedpgen_model(text_run, "ada", personal=False)
    # Execute
    exported = export(text_run, "ada", out=tmp_path / "shared", variant="shared", device_state=state)
    recipe = run_readme(tmp_path / "shared", monkeypatch, prompt=PROMPT, seed=SEED)
    with pytest.raises(FileNotFoundError, match="no personal part stored"):
        export(text_run, "ada", out=tmp_path / "refused", device_state=state)
    # Assert: base + shared only; the fresh model is FedPGen's with the shared adapter alone active
    out = tmp_path / "shared"
    assert exported.activate == (SHARED,) and not (out / PERSONAL).exists() and not (tmp_path / "refused").exists()
    assert json.loads((out / "export.json").read_text())["activate"] == {SHARED: [SHARED]}
    assert "NOT DP-protected" not in (out / "README.txt").read_text()
    ids = torch.tensor([json.loads((out / "export.json").read_text())["prompt-prefix-ids"] + list(PROMPT.encode())])
    with torch.no_grad(), active(d.model, [SHARED], ()):
        want = d.model(input_ids=ids).logits
        torch.manual_seed(SEED)
        want_text = d.task.generate(d.model, d.base_path, PROMPT, profile=PROFILE)
    with torch.no_grad(), d.model.disable_adapter():
        base = d.model(input_ids=ids).logits
    with torch.no_grad():
        got = load_export(out, "shared")(input_ids=ids).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-6), f"max |Δlogit| {(got - want).abs().max():.3g}"
    assert (want - base).abs().max() > 1e-3, "the shared adapter must matter for this test to mean anything"
    assert recipe["text"] == want_text
    # ... and it is what `fedpgen generate --variant shared` writes (which once generated with the bare base)
    assert generate(text_run, "ada", PROMPT, seed=SEED, variant="shared") == want_text


def test_a_wrong_key_fails_clearly_and_writes_nothing(text_run: Path, tmp_path: Path) -> None:
    # Prepare
    wrong = tmp_path / "keys" / "other.key"
    wrong.parent.mkdir()
    wrong.write_bytes(os.urandom(32))
    os.chmod(wrong, 0o600)
    out = tmp_path / "exports" / "ada"
    # Execute / Assert
    with pytest.raises(TamperedStateError, match="authentication failed"):
        export(text_run, "ada", out=out, key_file=wrong)
    assert not out.parent.exists() or not list(out.parent.iterdir()), "nothing written, no half export left"
    out.mkdir(parents=True)
    with pytest.raises(ValueError, match="already exists"):
        export(text_run, "ada", out=out)
    assert not list(out.iterdir()), "an existing folder is left alone"


def test_the_cli_exports_and_warns_that_the_personal_adapter_is_plaintext(text_run: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedpgen.cli import cli

    # Execute
    ran = CliRunner().invoke(cli, ["export", str(text_run), "ada", "--out", str(tmp_path / "exp")])
    again = CliRunner().invoke(cli, ["export", str(text_run), "ada", "--out", str(tmp_path / "exp")])
    # Assert
    assert ran.exit_code == 0, ran.output
    assert "NOT DP-protected" in ran.output and "plaintext" in ran.output
    assert (tmp_path / "exp" / "personal" / "adapter_model.safetensors").is_file()
    assert again.exit_code != 0 and "already exists" in str(again.exception)


def test_the_exported_image_model_reproduces_fedpgen_generate_with_diffusers_and_peft(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a tiny image run (the image task's test settings, fewer steps)
    run = build_run(tmp_path / "run", task="image", min_records=12, heldout_fraction=0.25, val_fraction=0.0,
                    local_steps=1, personal_max_steps=2, personal_lr=0.05)
    user = min((run / "devices").iterdir()).name
    # Execute
    export(run, user, out=tmp_path / "exp")
    recipe = run_readme(tmp_path / "exp", monkeypatch, prompt="hair=red", seed=5, count=2)
    png = Path(generate(run, user, "hair=red", seed=5, count=2, out=tmp_path / "generated"))
    # Assert: the UNet LoRA is a PEFT adapter of the plain diffusers UNet; the pixels are FedPGen's
    personal = tmp_path / "exp" / "personal"
    assert (personal / "unet" / "adapter_config.json").is_file()
    assert (tmp_path / "exp" / "base" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    trained = [t for f in (personal / "unet" / "adapter_model.safetensors", personal / "slot_proj.safetensors")
               for k, t in load_file(str(f)).items() if "lora_B" in k]
    assert trained and all(t.abs().max() > 0 for t in trained), "LoRA B starts at 0: the personal part trained"
    pixels = np.stack([np.asarray(Image.open(p)) for p in sorted(png.glob("*.png"))])
    images = recipe["images"].numpy()
    assert images.shape == pixels.shape == (2, 32, 32, 3)
    assert np.array_equal(images, pixels), f"max |Δpixel| {np.abs(images.astype(int) - pixels).max()}"


def test_a_behavior_export_with_history_mix_says_so_and_holds_none_of_the_users_history(tmp_path: Path) -> None:
    """The user's item frequencies (``history-mix``) stay on the device, like retrieved
    documents: the export states the weight and that its recommendations are the model's alone,
    and, when the personal part was fitted through the mixture, what that part alone leaves out."""
    from conftest import task_kwargs

    # Prepare
    for fit in (False, True):
        run = build_run(tmp_path / f"run-{fit}", **task_kwargs("behavior"), history_mix=0.3, history_mix_fit=fit)
        # Execute
        export(run, "user0000", out=tmp_path / f"out-{fit}")
        # Assert
        written = json.loads((tmp_path / f"out-{fit}" / "export.json").read_text())
        assert written["history-mix"]["weight"] == 0.3 and written["history-mix"]["fit"] is fit
        assert "holds none" in written["history-mix"]["note"]
        assert ("fitted through that mixture" in written["history-mix"]["note"]) is fit  # what the part alone misses
        assert set(written["history-mix"]) == {"weight", "fit", "note"}  # no frequencies, no counts
