"""Export a user's model out of FedPGen: the base in Hugging Face format, each adapter in PEFT's.

Runs where the device's state is (its folder, its sealed state-dir, its key), like
``fedpgen generate``: the personal part is unsealed with the device key and written, in
plaintext, to the export folder only. The export folder::

    base/        the frozen base: ``save_pretrained`` of the causal LM (text, behavior) with
                 the task's side files (byte-level tokenizer map, item catalog and layout), or,
                 for images, the diffusers UNet (``base/unet``), its noise scheduler
                 (``base/scheduler``) and the conditioning tables (``base/context.safetensors``)
    shared/      the shared adapter of the checkpoint's round (PEFT: ``adapter_config.json`` +
                 ``adapter_model.safetensors``; images: in ``shared/unet``)
    personal/    the device's personal adapter, the same way; plaintext, not DP-protected
    export.json  what each folder is, the adapters each variant activates, how inputs are built
    README.txt   the loading code, runnable as written

How FedPGen combines the parts, and so the export: both are LoRA adapters of one
``PeftModel``, and shared+personal is both active at once
(``model.base_model.set_adapter(["shared", "personal"])``), never merged. A preset whose
personal part is a slice of the shared adapter itself (fedsa-lora: its LoRA B) gets, in
``personal/``, that whole adapter with the device's slice in place, activated alone.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import save_file

from fedpgen.client.device import Device
from fedpgen.generate import load_user_model
from fedpgen.shared.adapters import set_arrays, set_tensors
from fedpgen.shared.data.user_folder import read_profile
from fedpgen.shared.presets import PERSONAL, SHARED
from fedpgen.shared.tasks.cache import MARKER
from fedpgen.shared.tasks.text import context_budget, profile_prefix
from fedpgen.shared.tasks.text_tokenizer import BYTE_TOKENIZER_FILE, load_tokenizer

FORMAT = 1
VARIANTS = ("personal", "shared")  # shared+personal (the product), or the shared part alone
EXPORT_JSON, README = "export.json", "README.txt"
# Every load in the recipe is a local path (never a name a library could look up on a model hub).
FOLDER_LINE = 'folder = Path(".").resolve()  # this export folder: run from it, or put its path here'
BASE, UNET, SCHEDULER, CONTEXT = "base", "unet", "scheduler", "context.safetensors"
# The tasks' generation defaults (TextTask.generate, BehaviorTask.generate), repeated in the
# export's recipe; tests/test_export.py holds the recipe's output equal to `fedpgen generate`'s.
TEXT_SAMPLING = {"max_new_tokens": 64, "top_k": 20}
BEHAVIOR_SAMPLING = {"max_new_items": 5}
PLAINTEXT_WARNING = ("the exported personal adapter is plaintext and NOT DP-protected: it was fitted to this "
                     "user's data without differential privacy and is no longer sealed with the device key; "
                     "keep the export folder private")
_WEIGHT_FILE = re.compile(r"\.(safetensors|bin|pt|pth|ckpt|h5|msgpack)$|\.index\.json$")


@dataclasses.dataclass(frozen=True)
class Exported:
    """What :func:`export` wrote.

    Attributes
    ----------
    out
        The export folder.
    variant
        ``personal`` (shared+personal) or ``shared``.
    round
        The server round of the shared adapter.
    activate
        The adapter folders the variant loads and activates together, in order.
    """

    out: Path
    variant: str
    round: int
    activate: tuple[str, ...]


def export(run_dir: Path, user: str, *, out: Path, variant: str = "personal", user_dir: Path | None = None,
           device_state: Path | None = None, key_file: Path | None = None) -> Exported:
    """Write ``user``'s model (the run's latest shared adapter, the device's personal one) to ``out``.

    Parameters
    ----------
    run_dir
        The run folder: its ``config.json`` and ``checkpoints/`` (the latest round is exported).
    user
        The user's device folder name.
    out
        The export folder; it must not exist yet. Written under a temporary name and renamed
        into place last, so a failure (a wrong key, a missing part) leaves nothing behind.
    variant
        ``personal``: base, shared and personal adapters; ``shared``: base and shared adapter
        only (the personal part is not read).
    user_dir, device_state, key_file
        As for ``fedpgen generate``: the user's device folder (default: the run's population),
        the device's state-dir (default ``<run-dir>/devices/<user>``) and its key (default
        ``<state-dir>/device.key``, or ``$FEDPGEN_DEVICE_PASSPHRASE``).

    Returns
    -------
    Exported
        Where it was written and what the variant activates.

    Raises
    ------
    ValueError
        A bad variant or user name, or ``out`` exists already.
    FileNotFoundError
        No run, device state, key, checkpoint or stored personal part.
    fedpgen.shared.sealing.TamperedStateError
        The state-dir does not open with this key (another key, or modified on disk).
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise ValueError(f"export folder {out} already exists; give a new one")
    run_dir = Path(run_dir)
    # need_state: opening the sealed meta checks the key, before anything is written
    loaded = load_user_model(run_dir, user, variant=variant, user_dir=user_dir, device_state=device_state,
                             key_file=key_file, variants=VARIANTS, need_state=True)
    d, ckpt, stored, user_dir = loaded.device, loaded.checkpoint, loaded.personal, loaded.user_dir
    if ckpt is None:  # load_user_model refuses it already for these variants; kept for the type
        raise FileNotFoundError(f"{run_dir}/checkpoints: no shared base yet (no finished round)")
    holder = _keep_adapter(d)
    activate = {SHARED: [SHARED]}
    if stored is not None:
        activate[PERSONAL] = [SHARED, PERSONAL] if holder == PERSONAL else [PERSONAL]

    parts_of = _ImageParts if d.task.name == "image" else _CausalLMParts
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        parts = parts_of(d, stage=stage, out=out, user_dir=Path(user_dir))
        parts.base()
        set_arrays(d.model, d.sets.send, ckpt.theta)
        set_tensors(d.model, d.init_keep)  # the shared variant: the personal part at its (no-op) init
        parts.adapter(SHARED, source=SHARED)
        if stored is not None:
            set_tensors(d.model, stored)
            parts.adapter(PERSONAL, source=holder)
        manifest = {"format": FORMAT, "task": d.task.name, "preset": d.preset.name, "user": user,
                    "round": ckpt.round, "variant": variant, "base": f"{BASE}/", "activate": activate,
                    "personal-plaintext": stored is not None, **parts.inputs()}
        (stage / EXPORT_JSON).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        (stage / README).write_text(_readme(manifest, parts), encoding="utf-8")
        os.rename(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return Exported(out=out, variant=variant, round=ckpt.round, activate=tuple(activate[variant]))


def _keep_adapter(d: Device) -> str:
    """The adapter holding the parameters the preset keeps on the device: ``personal``, or
    ``shared`` for a preset that keeps a slice of the shared adapter (fedsa-lora)."""
    names = {m.group(1) for n in d.sets.keep if (m := re.search(r"\.lora_[AB]\.([^.]+)\.", n))}
    if len(names) != 1:
        raise ValueError(f"preset {d.preset.name}: the personal part spans adapters {sorted(names)}; "
                         "no single PEFT adapter holds it")
    return names.pop()


def _peft_state(model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    """``adapter``'s tensors as PEFT saves them (keys without the adapter name)."""
    state = get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=False)
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _write_adapter(dest: Path, config: Any, tensors: dict[str, torch.Tensor], base: Path) -> None:
    """One adapter in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``."""
    config = copy.deepcopy(config)
    config.base_model_name_or_path = str(base.resolve())
    config.inference_mode = True
    dest.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(dest))
    save_file(tensors, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})


class _CausalLMParts:
    """A ``transformers`` causal LM base (text, behavior): ``base/`` is its ``save_pretrained``."""

    def __init__(self, d: Device, *, stage: Path, out: Path, user_dir: Path) -> None:
        self.d, self.stage, self.out, self.user_dir = d, stage, out, user_dir

    def base(self) -> None:
        dest = self.stage / BASE
        self.d.task.load_base(self.d.base_path).save_pretrained(str(dest))
        for src in sorted(Path(self.d.base_path).iterdir()):  # tokenizer files or map, catalog, layout
            if src.is_file() and src.name != MARKER and not _WEIGHT_FILE.search(src.name) \
                    and not (dest / src.name).exists():
                shutil.copy2(src, dest / src.name)

    def adapter(self, folder: str, *, source: str) -> None:
        _write_adapter(self.stage / folder, self.d.model.peft_config[source], _peft_state(self.d.model, source),
                       self.out / BASE)

    def inputs(self) -> dict[str, Any]:
        """How a prompt becomes input ids, as FedPGen's generation builds them for this user."""
        d, profile = self.d, read_profile(self.user_dir)[0]
        if d.task.name == "text":
            tok = load_tokenizer(d.base_path)
            prefix, _ = profile_prefix(tok, profile, d.cfg.seq_len)
            byte_level = (Path(d.base_path) / BYTE_TOKENIZER_FILE).is_file()
            out = {"tokenizer": "bytes" if byte_level else "transformers", "prompt-prefix-ids": prefix,
                   "pad-token-id": tok.pad_id, "sampling": {**TEXT_SAMPLING, "do_sample": True}}
            if d.cfg.retrieval_k:  # the user's documents stay on the device: the export never holds them
                out["retrieval"] = {"k": d.cfg.retrieval_k, "context-tokens": context_budget(d.cfg.seq_len,
                                                                                             d.cfg.retrieval_k),
                                    "note": "trained with the user's most similar other documents between the "
                                            "prefix and the text; this export holds none: prompts get the "
                                            "profile prefix only (fedpgen generate retrieves on the device)"}
            return out
        from fedpgen.shared.tasks.behavior import TOP_K

        layout = d.task._layout(d.base_path)
        out = {"prompt-prefix-ids": layout.prefix(profile), "item-base": layout.item_base, "window": layout.length,
               "sampling": {**BEHAVIOR_SAMPLING, "top_k": TOP_K}}
        if d.cfg.history_mix:  # the user's item frequencies stay on the device: the export never holds them
            out["history-mix"] = {"weight": d.cfg.history_mix, "fit": d.cfg.history_mix_fit,
                                  "note": "fedpgen generate mixes the user's item frequencies (their own training "
                                          "events) into the personal variant's distribution with this weight; "
                                          "this export holds none: its recommendations are the model's alone"
                                          + ("; the personal part was fitted through that mixture (fit), so alone "
                                             "it leaves out what the frequencies held, e.g. the user's "
                                             "favourites" if d.cfg.history_mix_fit else "")}
        return out

    def recipe(self, manifest: dict[str, Any], act: list[str]) -> tuple[str, str]:
        """The notes and the Python code of README.txt."""
        load = ["import json", "from pathlib import Path", "", "import torch", "from peft import PeftModel",
                "from transformers import AutoModelForCausalLM"
                + (", AutoTokenizer" if manifest.get("tokenizer") == "transformers" else ""), "",
                'prompt, seed = "", 0  # as given to `fedpgen generate` (PROMPT, --seed)',
                FOLDER_LINE,
                'export = json.loads((folder / "export.json").read_text())',
                'base = AutoModelForCausalLM.from_pretrained(folder / "base", local_files_only=True)',
                f'model = PeftModel.from_pretrained(base, str(folder / "{act[0]}"), adapter_name="{act[0]}")',
                *[f'model.load_adapter(str(folder / "{a}"), adapter_name="{a}")' for a in act[1:]],
                f"model.base_model.set_adapter({act!r})  # all active at once", "model.eval()"]
        if manifest["task"] == "behavior":
            notes = ("Inputs: line i (from 0) of base/catalog.jsonl is token item-base + i; the user's\n"
                     "profile is the prefix prompt-prefix-ids (export.json). PROMPT: space-separated item ids.")
            use = ['lines = (folder / "base" / "catalog.jsonl").read_text().splitlines()',
                   'catalog = [json.loads(line)["item"] for line in lines if line.strip()]',
                   'item_base, window, sampling = export["item-base"], export["window"], export["sampling"]',
                   'ids = export["prompt-prefix-ids"] + [item_base + catalog.index(w) for w in prompt.split()]',
                   "torch.manual_seed(seed)", "picks = []", "with torch.no_grad():",
                   '    for _ in range(sampling["max_new_items"]):',
                   "        logits = model(input_ids=torch.tensor([ids[-window:]])).logits[0, -1, item_base:]",
                   '        top = logits.topk(sampling["top_k"])',
                   "        pick = int(top.indices[torch.multinomial(torch.softmax(top.values, -1), 1)])",
                   "        ids.append(item_base + pick)", "        picks.append(catalog[pick])",
                   'items = " ".join(picks)', "print(items)"]
            return notes, "\n".join(load + use)
        if manifest["tokenizer"] == "bytes":
            notes = ("Tokens: FedPGen's byte-level map (base/fedpgen_tokenizer.json): token i < 256 is the\n"
                     f"UTF-8 byte i, 256 is BOS, {manifest['pad-token-id']} is PAD; no tokenizer object is needed.")
            encode, decode = ('list(prompt.encode("utf-8"))',
                              'bytes(i for i in new if i < 256).decode("utf-8", errors="replace")')
        else:
            notes = "Tokens: the base's own tokenizer, saved with it in base/."
            load.insert(load.index("model.eval()") + 1,
                        'tok = AutoTokenizer.from_pretrained(folder / "base", local_files_only=True)')
            encode, decode = ('tok(prompt, add_special_tokens=False)["input_ids"]',
                              "tok.decode(new, skip_special_tokens=True)")
        notes += ("\nEvery prompt starts with this user's profile line, as in training: prompt-prefix-ids.")
        use = [f'ids = torch.tensor([export["prompt-prefix-ids"] + {encode}])',
               "torch.manual_seed(seed)",
               'out = model.generate(input_ids=ids, **export["sampling"], pad_token_id=export["pad-token-id"])',
               "new = out[0, ids.shape[1]:].tolist()", f"text = {decode}", "print(text)"]
        return notes, "\n".join(load + use)


class _ImageParts:
    """The image task: the diffusers UNet inside FedPGen's ``FaceUNet``, and its conditioning.

    FaceUNet's cross-attention context is ``[attr_embed(attribute tokens), slot_proj(one-hot
    slot)]``. The UNet's LoRA is a PEFT adapter of the plain ``diffusers.UNet2DConditionModel``
    (``<folder>/unet``); the two small conditioning layers are plain tensors:
    ``base/context.safetensors`` (``attr_embed`` ``[vocab + 1, dim]``, ``slot_proj`` ``[dim,
    slots]``) and, for an adapter that adapts ``slot_proj``, its LoRA factors
    (``<folder>/slot_proj.safetensors``: ``lora_A``, ``lora_B``; scaling in export.json),
    applied in the recipe with the very operations of PEFT's LoRA layer, so the subject
    token is bit-identical.
    """

    def __init__(self, d: Device, *, stage: Path, out: Path, user_dir: Path) -> None:
        self.d, self.stage, self.out, self.user_dir = d, stage, out, user_dir
        self.slot_lora: dict[str, float] = {}

    def base(self) -> None:
        from fedpgen.shared.tasks.image_base import scheduler

        fresh = self.d.task.load_base(self.d.base_path)
        fresh.unet.save_pretrained(str(self.stage / BASE / UNET))
        scheduler().save_pretrained(str(self.stage / BASE / SCHEDULER))
        save_file({"attr_embed": fresh.attr_embed.weight.detach().clone().contiguous(),
                   "slot_proj": fresh.slot_proj.weight.detach().clone().contiguous()},
                  str(self.stage / BASE / CONTEXT))

    def adapter(self, folder: str, *, source: str) -> None:
        model = self.d.model
        inner, prefix = model.base_model.model, "base_model.model.unet."
        tensors = {f"base_model.model.{k[len(prefix):]}": v for k, v in _peft_state(model, source).items()
                   if k.startswith(prefix)}
        config = copy.deepcopy(model.peft_config[source])
        config.target_modules = sorted(t for t in config.target_modules if not hasattr(inner, t))  # the UNet's
        _write_adapter(self.stage / folder / UNET, config, tensors, self.out / BASE / UNET)
        slot = inner.slot_proj
        if source in getattr(slot, "lora_A", {}):
            save_file({"lora_A": slot.lora_A[source].weight.detach().clone().contiguous(),
                       "lora_B": slot.lora_B[source].weight.detach().clone().contiguous()},
                      str(self.stage / folder / "slot_proj.safetensors"))
            self.slot_lora[folder] = float(slot.scaling[source])

    def inputs(self) -> dict[str, Any]:
        from fedpgen.shared.tasks import image_model
        from fedpgen.shared.tasks.image import SAMPLE_STEPS

        profile = read_profile(self.user_dir)[0]
        return {"attribute-vocab": image_model.ATTR_VOCAB, "attribute-keys": list(image_model.ATTR_KEYS),
                "profile-attribute-tokens": image_model.attribute_tokens(profile),
                "subject-slots": dict(self.d.data.bindings.get("subject-slots", {})),
                "slot-proj-lora": self.slot_lora, "sampler": {"scheduler": "DDIMScheduler", "steps": SAMPLE_STEPS}}

    def recipe(self, manifest: dict[str, Any], act: list[str]) -> tuple[str, str]:
        """The notes and the Python code of README.txt."""
        notes = ("Conditioning: one attribute token per key of attribute-keys (export.json): 1 + the index of\n"
                 "'key=value' in attribute-vocab, 0 when not given; the user's own are profile-attribute-tokens,\n"
                 "PROMPT words (hair=red glasses=yes) replace them. Slot 0 is the user's face; for a subject,\n"
                 "use slot = export['subject-slots'][name] and attribute tokens [0, 0, 0]. The context is\n"
                 "[attribute embeddings, subject token]: base/context.safetensors holds the attribute\n"
                 "embedding and the subject-token projection, <adapter>/slot_proj.safetensors its LoRA\n"
                 "(scaling: slot-proj-lora in export.json), added as PEFT's LoRA layer adds it.")
        code = ["import json", "from pathlib import Path", "", "import torch", "import torch.nn.functional as F",
                "from diffusers import DDIMScheduler, UNet2DConditionModel",
                "from peft import PeftModel", "from safetensors.torch import load_file", "",
                'prompt, seed, count = "", 0, 4  # as given to `fedpgen generate` (PROMPT, --seed, --count)',
                FOLDER_LINE,
                'export = json.loads((folder / "export.json").read_text())',
                'unet = UNet2DConditionModel.from_pretrained(folder / "base" / "unet", local_files_only=True)',
                f'unet = PeftModel.from_pretrained(unet, str(folder / "{act[0]}" / "unet"), adapter_name="{act[0]}")',
                *[f'unet.load_adapter(str(folder / "{a}" / "unet"), adapter_name="{a}")' for a in act[1:]],
                f"unet.base_model.set_adapter({act!r})  # all active at once", "unet.eval()",
                'keys, vocab = export["attribute-keys"], export["attribute-vocab"]',
                'tokens = dict(zip(keys, export["profile-attribute-tokens"]))',
                'tokens.update({word.split("=")[0]: vocab.index(word) + 1 for word in prompt.split()})',
                "attrs, slot = torch.tensor([tokens[k] for k in keys]), 0",
                'ctx = load_file(folder / "base" / "context.safetensors")',
                'one_hot = F.one_hot(torch.full((count,), slot), ctx["slot_proj"].shape[1]).float()',
                'token = F.linear(one_hot, ctx["slot_proj"])',
                f'for name in [a for a in {act!r} if a in export["slot-proj-lora"]]:',
                '    lora = load_file(folder / name / "slot_proj.safetensors")',
                ('    token = token + F.linear(F.linear(one_hot, lora["lora_A"]), lora["lora_B"]) '
                 '* export["slot-proj-lora"][name]'),
                'context = torch.cat([ctx["attr_embed"][attrs][None].expand(count, -1, -1), token[:, None]], dim=1)',
                'ddim = DDIMScheduler.from_pretrained(folder / "base" / "scheduler", local_files_only=True)',
                'ddim.set_timesteps(export["sampler"]["steps"])', "size = unet.config.sample_size",
                "x = torch.randn((count, 3, size, size), generator=torch.Generator().manual_seed(seed))",
                "with torch.no_grad():", "    for t in ddim.timesteps:",
                "        eps = unet(x, t.expand(count), encoder_hidden_states=context).sample",
                "        x = ddim.step(eps, t, x).prev_sample",
                "images = ((x.clamp(-1, 1).permute(0, 2, 3, 1) + 1) * 127.5).clamp(0, 255).byte()  # [count, H, W, 3]"]
        return notes, "\n".join(code)


def readme_code(text: str) -> str:
    """The Python recipe of an export's README.txt (its lines indented by four spaces)."""
    return "\n".join(line[4:] if line.strip() else "" for line in text.split("\nPython")[1].splitlines()[1:]
                     if line.startswith("    ") or not line.strip()).strip() + "\n"


def _readme(manifest: dict[str, Any], parts: _CausalLMParts | _ImageParts) -> str:
    personal = manifest["personal-plaintext"]
    act = manifest["activate"][PERSONAL if personal else SHARED]
    notes, code = parts.recipe(manifest, act)
    base = "the diffusers UNet, its scheduler, conditioning" if manifest["task"] == "image" else "Hugging Face"
    folders = [f"  {BASE}/        the frozen base model ({base})",
               f"  shared/      the shared adapter of round {manifest['round']} (PEFT)"]
    if personal:
        folders.append("  personal/    this device's personal adapter (PEFT)" if act == [SHARED, PERSONAL] else
                       "  personal/    the shared adapter with this device's personal slice in place (PEFT)")
    if not personal:
        what = "FedPGen's shared-only model: the base with the shared adapter alone active."
    elif act == [SHARED, PERSONAL]:
        what = ("FedPGen's shared+personal model (`fedpgen generate`): the base with the adapters shared and "
                "personal,\nboth active at once (not merged).")
    else:
        what = ("FedPGen's shared+personal model (`fedpgen generate`): the base with personal/ alone active\n"
                "(the shared adapter with this device's slice in place).")
    return "\n".join([
        (f"FedPGen export: user {manifest['user']}, task {manifest['task']}, preset {manifest['preset']}, "
         f"variant {manifest['variant']}, round {manifest['round']}"), "",
        *([f"WARNING: {PLAINTEXT_WARNING}.", ""] if personal else []),
        "Folders:", *folders, f"  {EXPORT_JSON}  what each folder is, the adapters of each variant, the inputs",
        "", notes, "",
        what,
        *(["The shared part alone: load only the shared adapter and activate ['shared']."] if personal else []), "",
        "Python, run from this folder (it needs torch, transformers, peft"
        + (", diffusers" if manifest["task"] == "image" else "") + "):", "",
        *[f"    {line}" if line else "" for line in code.splitlines()], ""])
