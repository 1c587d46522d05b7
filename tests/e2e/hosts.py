"""The one place the e2e suite knows about WebUIs: where they are, how to start one, which LoRA
modes and models they have. A host plugs in by adding a `HostSpec` to `HOSTS`.

A host is used when its environment variable points at the folder with its `launch.py`
(`AUTOLORA_A1111`, `AUTOLORA_FORGE`, `AUTOLORA_FORGE_NEO`, ...). Where one variable can point at
trees with different launch flags (Forge Neo: release 2.x or the October-2025 tree), the spec is
picked by what is installed there (`HostSpec.for_tree`). Its Python is `AUTOLORA_<HOST>_PYTHON`,
else `venv/bin/python` in that folder, else `../venv/bin/python`. `AUTOLORA_WEBUI_ARGS` adds launch
flags; the environment is passed through (for the offline installs here: source `a1111-env.sh` first).

Models: each arch's checkpoint and LoRAs are taken from the WebUI's model folders when files of the
expected names exist there (the offline installs ship `random-sd15.safetensors`,
`random-sdxl.safetensors`, `Lora/random_lora.safetensors`, `Lora/random_lora_xl.safetensors`);
missing ones, and the suite's second LoRA, are made with the random-weight makers in
`AUTOLORA_MODEL_MAKERS` (default: `../shared/webui` next to this repository) into
`models/Stable-diffusion/autolora-e2e/` and `models/Lora/autolora-e2e/`, which are kept for the next run.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[2]
EXTENSION_LINK = "sd-webui-autolora"
MAKERS = Path(os.environ.get("AUTOLORA_MODEL_MAKERS", REPO.parent / "shared" / "webui"))
PERSISTED_FILES = ("config.json", "ui-config.json")  # restored byte for byte after the session


@dataclass(frozen=True)
class ArchSpec:
    """One model family on one host: checkpoint, the LoRA every test uses, a second LoRA."""

    arch: str  # sd15 | sdxl
    checkpoint: str  # file name looked up in models/Stable-diffusion (then autolora-e2e/)
    lora: str  # LoRA name (file stem) looked up in models/Lora (then autolora-e2e/)
    lora_b: Optional[str] = None  # a second LoRA, made with another seed when missing
    options: dict = field(default_factory=dict)  # options this arch needs while the suite runs
    args: tuple = ()  # launch flags this arch needs on this host (Forge SDXL: bf16/fp16 storage for RAM)
    # What the UI sends for this arch when the user changes nothing (read in each host's UI code):
    # the e2e suite's first case of every identity, with an empty negative prompt.
    ui_defaults: dict = field(default_factory=dict)
    lora_maker: str = "make_random_lora.py"  # the maker in AUTOLORA_MODEL_MAKERS for a missing LoRA
    lora_args: tuple = ()  # its arguments besides --ckpt, --out and --seed
    variation: dict = field(default_factory=dict)  # what this host needs in the suite's variation requests


@dataclass(frozen=True)
class HostSpec:
    name: str
    env_var: str
    base_args: tuple  # always passed; {port} and {ckpt} are filled in
    cpu_args: tuple  # added when no NVIDIA GPU is visible
    lora_modes: dict  # mode name -> options that select it (e.g. A1111's lora_functional)
    sdxl_mode: str  # the LoRA mode SDXL runs in (24 GB machines need A1111's functional mode)
    archs: dict  # arch -> ArchSpec
    make_checkpoint: Callable  # (host, arch, out path) -> argv, run with the host's Python
    hires_fields: dict = field(default_factory=dict)  # fields a txt2img request with hires fix or infotext needs
    hr_upscaler: str = "Latent"  # the hires upscaler the suite asks for (Forge Neo 2.x has no latent modes)
    family: str = ""  # "forge": Forge's built-in guidance extensions and conditioning cache are there
    gradio: str = "4.40"  # the UI's gradio version (tests/e2e/test_browser.py)
    xyz_title: str = "X/Y/Z plot"  # the X/Y/Z script's title in the Script dropdown (Forge Classic: "X/Y/Z Plot")
    supported: bool = True  # False: the suite proves AutoLoRA refuses honestly (test_unsupported_host.py)
    # Options that the host applies only when a checkpoint is selected (Forge Neo 2.x reads its UNet
    # storage dtype, and so its LoRA mode, in refresh_model_loading_parameters()): after setting one,
    # the suite selects another checkpoint and then its own again (Server.reselect_checkpoint).
    reselect_after: tuple = ()
    # (root) -> keys config.json must hold for the host to start unattended (Forge Neo 2.x: VERSION_UID,
    # else launch blocks on "Press Enter to Continue..."); added before the server starts, so the
    # config.json the suite puts back afterwards holds them too.
    config_keys: Optional[Callable] = None
    # LoRA file types the host's LoRA loader reads (tests/e2e/test_network_types.py, makers/network_types.py)
    network_types: tuple = ()
    # (LoRA mode, type) -> why the WebUI itself fails at the plain LoRA image of that type (run and seen)
    network_type_failures: dict = field(default_factory=dict)
    # (spec, root) -> the spec for the tree installed at root (one env var, trees with different flags)
    for_tree: Optional[Callable] = None
    label: str = ""  # what the tree is, for messages (e.g. "Forge Neo 2.26")
    # Whether the host's patcher tells which LoRA file each patch comes from (Forge Classic's clones
    # record no parent): where not, naming only some LoRAs in "Guided LoRAs" gets a notice and the plain image.
    tells_loras_apart: bool = True


def _forge_checkpoint_cmd(host, arch, out):
    # sd3: a depth-2 MMDiT with the real CLIP-L/G, T5-XXL (float8) and VAE, in Forge's layout; the
    # others: the shared Forge maker, written tensor by tensor (its own writer holds an SDXL file three times)
    maker, arch_args = ("forge_sd3_checkpoint.py", []) if arch == "sd3" else ("streamed_checkpoint.py", ["--arch", arch])
    return [str(host.python), str(REPO / "tests" / "e2e" / "makers" / maker), "--forge", str(host.root), *arch_args,
            "--out", str(out)]


def _a1111_checkpoint_cmd(host, arch, out):
    if arch == "sd3":  # a depth-2 MMDiT with the real CLIP-L/G and VAE; A1111 needs the T5 tokenizer too
        return [str(host.python), str(MAKERS / "make_random_sd3.py"), "--webui-dir", str(host.root), "--out", str(out)]
    return [str(host.python), str(MAKERS / "make_random_checkpoint.py"), "--webui-dir", str(host.root),
            "--arch", arch, "--out", str(out)]


def _ui(sampler: str, scheduler: str, cfg: float) -> dict:
    return {"negative_prompt": "", "sampler_name": sampler, "scheduler": scheduler, "cfg_scale": cfg}


A1111_UI = _ui("DPM++ 2M", "Automatic", 7)
# Neither Forge Neo tree has --ckpt: argparse takes it for --ckpt-dirs and lists the file as a folder of
# its own, under a title with no name (" [3cba21b97a]"), which neither the options API nor the page's
# checkpoint dropdown selects; the checkpoint is selected through the options API alone.
FORGE_NEO_ARGS = ("--skip-prepare-environment", "--skip-version-check", "--skip-python-version-check", "--api",
                  "--server-name", "127.0.0.1", "--port", "{port}")
FORGE_FAMILY_ARGS = (*FORGE_NEO_ARGS, "--ckpt", "{ckpt}")
# "online" is Forge's on-the-fly LoRA ("... (fp16 LoRA)" storage; Forge applies LoRAs online only to
# low-bit weights, so fp8 here). Forge re-reads its model-loading options only when a memory option
# changes too, hence the 1024/1025 MB pair.
FORGE_LORA_MODES = {"merged": {"forge_unet_storage_dtype": "Automatic", "forge_inference_memory": 1024},
                    "online": {"forge_unet_storage_dtype": "float8-e4m3fn (fp16 LoRA)", "forge_inference_memory": 1025}}
# Forge's txt2img API needs hr_additional_modules set with hires fix (FORGE.md), and with `infotext`
# also styles: apply_infotext fails on fields typed list[str] that the request does not set (its
# paste functions return ['Use same choices'] / a gradio 4 update), with or without AutoLoRA.
FORGE_HIRES_FIELDS = {"hr_additional_modules": ["Use same choices"], "styles": []}

# Forge main's and the October-2025 Neo tree's backend/patcher/lora.py merge lora (LoCon's mid and
# DoRA's dora_scale included), loha, lokr and glora patches; no OFT (Neo 2.x: comfy's weight_adapter has it).
FORGE_NETWORK_TYPES = ("locon", "loha", "lokr", "dora")


def neo_tree(root: Path) -> str:
    """Which Forge Neo tree is installed at root: "2.x" (backend/args.py is ComfyUI's, with --cpu and no
    --always-cpu; modules_forge/forge_version.py has a `release`) or "2025-10" (Forge's own args)."""
    try:
        args = (Path(root) / "backend" / "args.py").read_text(errors="replace")
    except OSError:
        return "2.x"  # not installed yet: the default tree of tests/e2e/install/forge-neo.sh
    return "2025-10" if '"--always-cpu"' in args else "2.x"


def neo_release(root: Path) -> str:
    """modules_forge/forge_version.py's `release` ("2.26"), "" when the tree has none (October 2025)."""
    try:
        text = (Path(root) / "modules_forge" / "forge_version.py").read_text(errors="replace")
    except OSError:
        return ""
    m = re.search(r'^release\s*=\s*["\']([^"\']+)["\']', text, re.M)
    return m.group(1) if m else ""


def _forge_neo_for_tree(spec, root):
    if neo_tree(root) == "2025-10":
        return FORGE_NEO_2025_10
    release = neo_release(root)
    return dataclasses.replace(spec, label=f"Forge Neo {release}" if release else spec.label)


def _neo_config_keys(root) -> dict:
    """{"VERSION_UID": ...} as modules/launch_utils.py declares it: verify_version() writes it only into a
    config.json it creates; a config.json without it blocks launch on input("Press Enter to Continue...")."""
    text = (Path(root) / "modules" / "launch_utils.py").read_text(errors="replace")
    m = re.search(r'^VERSION_UID\b[^=]*=\s*["\']([^"\']+)["\']', text, re.M)
    return {"VERSION_UID": m.group(1)} if m else {}


# Seen on A1111 v1.10.1 on the CPU (full precision, --no-half), without AutoLoRA in the request: with
# lora_functional on, the generic NetworkModule.forward applies a LoHa/LoKr delta computed in the file's
# float16 to float32 activations (extensions-builtin/Lora/network.py, `self.ops(x, weight=updown)`).
A1111_FUNCTIONAL_FP16_DELTA = ("the WebUI's own lora_functional forward fails on float16 LoHa/LoKr files in full "
                               "precision, in a request without AutoLoRA (RuntimeError: expected m1 and m2 to "
                               "have the same dtype)")


HOSTS = {
    "a1111": HostSpec(
        name="a1111", env_var="AUTOLORA_A1111",
        base_args=("--skip-prepare-environment", "--skip-version-check", "--no-download-sd-model", "--api",
                   "--server-name", "127.0.0.1", "--port", "{port}", "--ckpt", "{ckpt}"),
        cpu_args=("--skip-torch-cuda-test", "--use-cpu", "all", "--no-half"),
        lora_modes={"merged": {"lora_functional": False}, "functional": {"lora_functional": True}},
        sdxl_mode="functional",
        # modules/processing_scripts/sampler.py: the first visible sampler, schedule type Automatic; CFG 7
        archs={"sd15": ArchSpec("sd15", "random-sd15.safetensors", "random_lora", "autolora_e2e_lora_b",
                                ui_defaults=A1111_UI),
               "sdxl": ArchSpec("sdxl", "random-sdxl.safetensors", "random_lora_xl",
                                options={"show_progress_type": "Approx cheap"}, ui_defaults=A1111_UI),
               # SD3: merged LoRAs only (lora_functional skips split q/k/v on its fused layers);
               # the T5 tokenizer is seeded into the offline HF cache by ../shared/webui/seed_t5_tokenizer.sh
               "sd3": ArchSpec("sd3", "random-sd3.safetensors", "random_sd3_lora", "autolora_e2e_sd3_lora_b",
                               options={"show_progress_type": "Approx cheap", "lora_functional": False},
                               ui_defaults=A1111_UI, lora_maker="make_random_sd3_lora.py")},
        make_checkpoint=_a1111_checkpoint_cmd, gradio="3.41",
        # extensions-builtin/Lora: network_lora (LoCon's 3x3 convs), network_hada, network_lokr, network_oft,
        # and network.py's dora_scale
        network_types=("locon", "loha", "lokr", "dora", "oft"),
        network_type_failures={("functional", kind): A1111_FUNCTIONAL_FP16_DELTA for kind in ("loha", "lokr")}),
    # Forge (main): the UI is built (the UI test reads /config).
    "forge": HostSpec(
        name="forge", env_var="AUTOLORA_FORGE",
        base_args=FORGE_FAMILY_ARGS,
        cpu_args=("--skip-torch-cuda-test", "--always-cpu"),
        lora_modes=FORGE_LORA_MODES,
        sdxl_mode="merged",
        # modules_forge/main_entry.py, the "sd" and "xl" presets (sd_t2i_sampler, xl_t2i_cfg, ...)
        archs={"sd15": ArchSpec("sd15", "rand_sd15.safetensors", "rand_lora_sd15", "autolora_e2e_lora_b",
                                ui_defaults=_ui("Euler a", "Automatic", 7)),
               "sdxl": ArchSpec("sdxl", "rand_sdxl.safetensors", "rand_lora_sdxl",
                                args=("--unet-in-bf16", "--clip-in-fp16"), ui_defaults=_ui("Euler a", "Automatic", 5)),
               # SD3 family through Forge's SD3.5 engine; it has no preset of its own, so the "all" preset:
               # the UI's own defaults (the first sampler, DPM++ 2M; Automatic; CFG 7)
               # Forge main maps SD3 LoRAs by the MMDiT's own module names only (its diffusers SD3 key map
               # is commented out): kohya sd-scripts names, with their .alpha
               "sd3": ArchSpec("sd3", "rand_sd3.safetensors", "rand_lora_sd3", "autolora_e2e_sd3_lora_b",
                               options={"show_progress_type": "Approx cheap"}, ui_defaults=_ui("DPM++ 2M", "Automatic", 7),
                               lora_maker="make_random_sd3_lora.py", lora_args=("--format", "kohya", "--alpha", "4"),
                               # Forge's Euler / Euler a / Heun on the Automatic (uniform) schedule draw SD3
                               # black (NaN), with or without AutoLoRA; Karras, Simple, SGM Uniform are fine
                               variation={"scheduler": "Simple"})},
        make_checkpoint=_forge_checkpoint_cmd, hires_fields=FORGE_HIRES_FIELDS, family="forge",
        network_types=FORGE_NETWORK_TYPES),
    # Forge Neo release 2.x (2.26: the folder webui/ of exo101/sd-webui-forge-neo-v3 that
    # tests/e2e/install/forge-neo.sh installs by default; ../shared/webui/FORGE-NEO-226.md). Its backend
    # is ComfyUI's port: backend/args.py is ComfyUI's cli_args (--cpu, --use-pytorch-cross-attention;
    # --always-cpu and --attention-pytorch make it exit), no --ckpt (FORGE_NEO_ARGS). No
    # forge_inference_memory option (setting it is an error); the UNet storage dtype, and with it
    # on-the-fly ("fp16 LoRA") LoRAs, is read when a checkpoint is selected: reselect_after. UI
    # defaults: modules_forge/presets.py, the "sd" preset (the default forge_preset,
    # modules_forge/shared_options.py): Euler a, Automatic, CFG 6 (modules/ui.py's CFG slider
    # starts at 6 too); "xl": Euler a, Automatic, CFG 4.5 (its Shift 9 applies to rectified-flow SDXL
    # models only). Clip skip 2 (modules/shared_options.py), the same for every request.
    # An October-2025 tree at AUTOLORA_FORGE_NEO gets FORGE_NEO_2025_10 below (for_tree).
    "forge-neo": HostSpec(
        name="forge-neo", env_var="AUTOLORA_FORGE_NEO",
        base_args=FORGE_NEO_ARGS,
        cpu_args=("--skip-torch-cuda-test", "--cpu", "--use-pytorch-cross-attention"),
        # "online": LoRAs patched on the fly (LowVramPatch per layer); 2.26 applies them to weights of
        # any dtype, so the fp32 UNet of "Automatic" with the "(fp16 LoRA)" switch.
        lora_modes={"merged": {"forge_unet_storage_dtype": "Automatic"},
                    "online": {"forge_unet_storage_dtype": "Automatic (fp16 LoRA)"}},
        sdxl_mode="merged",
        archs={"sd15": ArchSpec("sd15", "rand_sd15.safetensors", "rand_lora_sd15", "autolora_e2e_lora_b",
                                ui_defaults=_ui("Euler a", "Automatic", 6)),
               "sdxl": ArchSpec("sdxl", "rand_sdxl.safetensors", "rand_lora_sdxl",
                                args=("--bf16-unet", "--fp16-text-enc"), ui_defaults=_ui("Euler a", "Automatic", 4.5))},
        make_checkpoint=_forge_checkpoint_cmd, hires_fields=FORGE_HIRES_FIELDS, family="forge",
        reselect_after=("forge_unet_storage_dtype",), config_keys=_neo_config_keys,
        network_types=("locon", "loha", "lokr", "dora", "oft"), for_tree=_forge_neo_for_tree, label="Forge Neo 2.x",
        # 2.26 lists no latent modes and no Lanczos upscaler (modules/modelloader.py: None + ESRGAN models);
        # "None" resizes the image (modules/images.py resize_image), as its UI's default does.
        hr_upscaler="None"),
    # The ldm_patched WebUIs (lib_autolora/hosts/forge/api.py: LdmPatchedAPI): reForge main and Forge Classic
    # (branch `classic`), A1111's checkpoints and kohya LoRAs; merged LoRAs only (neither applies LoRAs per call).
    "reforge": HostSpec(
        name="reforge", env_var="AUTOLORA_REFORGE",
        base_args=FORGE_FAMILY_ARGS,
        cpu_args=("--skip-torch-cuda-test", "--always-cpu"),
        lora_modes={"merged": {}}, sdxl_mode="merged",
        # no presets: the UI's defaults are one for every model (modules/ui.py: CFG 7)
        archs={"sd15": ArchSpec("sd15", "rand_sd15.safetensors", "rand_lora_sd15", "autolora_e2e_lora_b",
                                ui_defaults=_ui("Euler a", "Automatic", 7)),
               # SDXL: made by the installer with MAKE_SDXL=1; in fp32 on the CPU it takes more than
               # the test machine's 24 GB once a LoRA is merged (reForge was killed), so bf16/fp16 storage
               "sdxl": ArchSpec("sdxl", "rand_sdxl.safetensors", "rand_lora_sdxl", args=("--unet-in-bf16", "--clip-in-fp16"),
                                ui_defaults=_ui("Euler a", "Automatic", 7))},
        # No SD3: started with the SD3 file A1111 runs (no extension linked), its loader fails before any
        # sampler runs ("loading stable diffusion model: AttributeError: 'Module' object has no attribute
        # 'model'", modules_forge/forge_loader.py load_model_for_a1111 builds a bare nn.Module for SD3),
        # and txt2img answers that error; its ldm_patched backend alone builds that model.
        make_checkpoint=_a1111_checkpoint_cmd, family="forge",
        network_types=("locon", "loha", "lokr", "dora", "oft"), label="reForge"),
    "forge-classic": HostSpec(
        name="forge-classic", env_var="AUTOLORA_FORGE_CLASSIC",
        base_args=FORGE_FAMILY_ARGS,
        cpu_args=("--skip-torch-cuda-test", "--always-cpu"),
        lora_modes={"merged": {}}, sdxl_mode="merged",
        # no presets: the UI's defaults are one for every model (modules/ui.py: CFG 7)
        archs={"sd15": ArchSpec("sd15", "rand_sd15.safetensors", "rand_lora_sd15", "autolora_e2e_lora_b",
                                ui_defaults=_ui("Euler a", "Automatic", 7)),
               # SDXL: made by the installer with MAKE_SDXL=1; in fp32 on the CPU it takes more than
               # the test machine's 24 GB once a LoRA is merged (reForge was killed), so bf16/fp16 storage
               "sdxl": ArchSpec("sdxl", "rand_sdxl.safetensors", "rand_lora_sdxl", args=("--unet-in-bf16", "--clip-in-fp16"),
                                ui_defaults=_ui("Euler a", "Automatic", 7))},
        make_checkpoint=_a1111_checkpoint_cmd, family="forge",
        network_types=("locon", "loha", "lokr"), label="Forge Classic", tells_loras_apart=False,
        xyz_title="X/Y/Z Plot"),  # extensions-builtin/xyz/scripts/xyz_grid.py
}

# Forge Neo, the October-2025 tree (the Linux copy papaioannou-themistoklis/WebUI-Neo-Forge @ 7862a96 of
# Haoming02's `neo` branch; NEO_TREE=2025-10 tests/e2e/install/forge-neo.sh): Forge main's backend and
# options; on a CPU it needs PyTorch attention. Its presets (modules_forge/presets.py) differ from Forge main's.
FORGE_NEO_2025_10 = HostSpec(
    name="forge-neo", env_var="AUTOLORA_FORGE_NEO",
    base_args=FORGE_NEO_ARGS,
    cpu_args=("--skip-torch-cuda-test", "--always-cpu", "--attention-pytorch"),
    lora_modes=FORGE_LORA_MODES,
    sdxl_mode="merged",
    archs={"sd15": ArchSpec("sd15", "rand_sd15.safetensors", "rand_lora_sd15", "autolora_e2e_lora_b",
                            ui_defaults=_ui("Euler a", "Automatic", 6)),
           "sdxl": ArchSpec("sdxl", "rand_sdxl.safetensors", "rand_lora_sdxl",
                            args=("--unet-in-bf16", "--clip-in-fp16"), ui_defaults=_ui("DPM++ 2M SDE", "Karras", 4))},
    make_checkpoint=_forge_checkpoint_cmd, hires_fields=FORGE_HIRES_FIELDS, family="forge",
    network_types=FORGE_NETWORK_TYPES, label="Forge Neo (October 2025 tree)")


@dataclass
class Host:
    spec: HostSpec
    root: Path
    python: Path

    @property
    def name(self):
        return self.spec.name


def configured_hosts() -> list:
    hosts = []
    for spec in HOSTS.values():
        root = os.environ.get(spec.env_var)
        if not root:
            continue
        root = Path(root).resolve()
        python = os.environ.get(f"{spec.env_var}_PYTHON")
        candidates = [Path(python)] if python else [root / "venv" / "bin" / "python",
                                                    root.parent / "venv" / "bin" / "python"]
        found = next((c for c in candidates if c.exists()), None)
        if spec.for_tree is not None:
            spec = spec.for_tree(spec, root)
        hosts.append(Host(spec, root, found or candidates[0]))
    return hosts


def other_webui_processes() -> list:
    """`launch.py` processes not started by this suite (to keep SDXL off a shared 24 GB machine)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(b"launch.py") for part in cmd):
            out.append((int(pid), b" ".join(cmd).decode(errors="replace")[:120]))
    return out


# -- models -----------------------------------------------------------------------------------------

def _find(folder: Path, name: str) -> Optional[Path]:
    for candidate in (folder / name, folder / "autolora-e2e" / name):
        if candidate.exists():
            return candidate
    return None


def ensure_models(host: Host, arch: str) -> dict:
    """Paths of the arch's checkpoint and LoRAs, made when missing. Returns {'ckpt', 'lora', 'lora_b'}.

    The checkpoint the suite loads is a copy of the maker's whose text encoders' final LayerNorm
    has a bias, as a real CLIP's has (makers/text_norm_bias.py: without it the hosts' own emphasis
    normalisation divides 0 by 0 for some prompts and draws black images, AutoLoRA or not)."""
    spec = host.spec.archs[arch]
    sd_dir, lora_dir = host.root / "models" / "Stable-diffusion", host.root / "models" / "Lora"
    source = _find(sd_dir, spec.checkpoint)
    if source is None:
        source = sd_dir / "autolora-e2e" / spec.checkpoint
        _make(host, host.spec.make_checkpoint(host, arch, source), source)
    # In the top folder: Forge Neo lists no subfolders, and its API selects checkpoints from the list.
    ckpt = sd_dir / f"autolora_e2e_{Path(spec.checkpoint).stem}.safetensors"
    if not ckpt.exists():
        _make(host, [str(host.python), str(REPO / "tests" / "e2e" / "makers" / "text_norm_bias.py"), str(source),
                     str(ckpt)], ckpt)
    out = {"ckpt": ckpt, "source": source}
    for key, name, seed in (("lora", spec.lora, 1), ("lora_b", spec.lora_b, 2)):
        if name is None:
            continue
        path = _find(lora_dir, name + ".safetensors")
        if path is None:
            path = lora_dir / "autolora-e2e" / (name + ".safetensors")
            _make(host, [str(host.python), str(MAKERS / spec.lora_maker), "--ckpt", str(source),
                         "--out", str(path), "--seed", str(seed), *spec.lora_args], path)
        out[key] = path
    return out


def ensure_network_type_lora(host: Host, kind: str, checkpoint: Path) -> Path:
    """The SD1.5 LoRA file of network type `kind` (makers/network_types.py: locon, loha, lokr, dora,
    oft), taken from models/Lora when a file of its name is there, else made into models/Lora/autolora-e2e/
    and kept. `checkpoint`: the random SD1.5 checkpoint (DoRA's magnitudes are its row norms)."""
    lora_dir = host.root / "models" / "Lora"
    name = f"autolora_e2e_{kind}.safetensors"
    path = _find(lora_dir, name)
    if path is None:
        path = lora_dir / "autolora-e2e" / name
        _make(host, [str(host.python), str(REPO / "tests" / "e2e" / "makers" / "network_types.py"),
                     "--type", kind, "--ckpt", str(checkpoint), "--out", str(path),
                     "--seed", "1"], path)
    return path


def _make(host: Host, argv: list, out: Path):
    """Run a maker whose argv names `out`; the file appears only whole. A maker that fails (a full
    disk half way through a 7 GB SDXL file) leaves nothing, where `_find` would take a partial file
    for the model in every later run."""
    if not Path(argv[1]).exists():  # argv[1]: the maker script
        raise FileNotFoundError(f"{out.name} is missing and the maker {argv[1]} is not there "
                                f"(set AUTOLORA_MODEL_MAKERS)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # The same file name in a folder beside it: makers read the format from the suffix and write the
    # stem into the metadata (a LoRA's `ss_output_name`, A1111's alias for it).
    partial = out.parent / ".autolora-e2e-partial" / out.name
    partial.parent.mkdir(exist_ok=True)
    try:
        subprocess.run([str(partial) if a == str(out) else a for a in argv], check=True, cwd=str(host.root),
                       stdout=subprocess.DEVNULL)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)


# -- the server ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One WebUI process with the extension linked in; stops only the process it started."""

    def __init__(self, host: Host, ckpt: Path, log_dir: Path, extra_args: tuple = (), env: Optional[dict] = None,
                 auth: Optional[tuple] = None, extensions: Optional[dict] = None):
        self.host, self.ckpt, self.extra_args = host, ckpt, tuple(extra_args)
        # other extensions this server runs beside AutoLoRA: {folder name in extensions/: checkout}; each one
        # not installed there is linked in for this server only and unlinked at stop()
        self.extensions = dict(extensions or {})
        self._other_links = []
        self.env = {"AUTOLORA_DIAGNOSTICS": "1", **(env or {})}  # the soak's memory probes (/autolora/v1/residue)
        self.auth = auth  # (user, password) when the server runs with --api-auth
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{host.name}-{ckpt.stem}-{self.port}.log"
        self.proc = None
        self._link_created = False
        self._saved = {}

    def _link_extension(self):
        link = self.host.root / "extensions" / EXTENSION_LINK
        for other in (self.host.root / "extensions").iterdir():
            if other.name != EXTENSION_LINK and (other / "scripts" / "autolora.py").exists():
                raise RuntimeError(f"another copy of AutoLoRA is installed at {other}; move it aside")
        if link.is_symlink() or link.exists():
            if link.resolve() != REPO:
                raise RuntimeError(f"{link} exists and is not this repository; move it aside")
            return
        link.symlink_to(REPO, target_is_directory=True)
        self._link_created = True

    def _link_other_extensions(self):
        for name, source in self.extensions.items():
            link = self.host.root / "extensions" / name
            if link.is_symlink() or link.exists():
                if link.resolve() != Path(source).resolve():
                    raise RuntimeError(f"{link} exists and is not {source}; move it aside")
                continue
            link.symlink_to(Path(source).resolve(), target_is_directory=True)
            self._other_links.append(link)

    def _ensure_config_keys(self):
        """Keys the host needs in config.json to start unattended (HostSpec.config_keys), added to an
        existing config.json before it is saved for stop(): what is put back holds them too."""
        if self.host.spec.config_keys is None:
            return
        path = self.host.root / "config.json"
        if not path.exists():
            return  # the host writes a fresh one itself (Forge Neo 2.x: with VERSION_UID)
        keys = self.host.spec.config_keys(self.host.root)
        config = json.loads(path.read_text(encoding="utf8") or "{}")
        if any(config.get(k) != v for k, v in keys.items()):
            config.update(keys)
            path.write_text(json.dumps(config, indent=4), encoding="utf8")

    def start(self, timeout: float = 600):
        self._ensure_config_keys()
        for name in PERSISTED_FILES:
            path = self.host.root / name
            self._saved[name] = path.read_bytes() if path.exists() else None
        self._link_extension()
        self._link_other_extensions()
        return self._launch(timeout, "w")

    def restart(self, timeout: float = 600):
        """Start the WebUI again after its process ended (killed for memory, crashed), with the same
        flags and port; the log goes on in the same file, and stop() still puts back the config files
        as they were before the first start."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        if getattr(self, "log", None):
            self.log.close()
        self._link_extension()
        self._link_other_extensions()
        return self._launch(timeout, "a")

    def _launch(self, timeout: float, log_mode: str):
        args = [a.format(port=self.port, ckpt=self.ckpt) for a in self.host.spec.base_args]
        if shutil.which("nvidia-smi") is None:
            args += list(self.host.spec.cpu_args)
        args += list(self.extra_args)
        args += shlex.split(os.environ.get("AUTOLORA_WEBUI_ARGS", ""))
        self.log = open(self.log_path, log_mode)
        self.log_start = self.log.tell()  # where this launch's lines begin (a restart appends)
        env = dict(os.environ, **self.env)
        # stdin: a console prompt at launch fails at once instead of waiting for a key; unbuffered: the log
        # has each line when it is printed (test_network_types.py reads the LoRA loader's lines)
        # and wide: rich-formatted log lines (Forge Neo 2.x's loggers) are not wrapped at 80 columns
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("COLUMNS", "250")
        self.proc = subprocess.Popen([str(self.host.python), "launch.py", *args], cwd=str(self.host.root), env=env,
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            return self._wait_until_ready(time.time() + timeout)
        except BaseException:
            self.stop()  # a server that never became ready must not outlive the test (nor hold 6 GB)
            raise

    def _started(self) -> bool:
        """The WebUI printed its startup time: its API, middleware and app_started callbacks are in.
        A request before that line can break the host: A1111-style webui.py serves the app while it
        still adds the API's middleware, and Starlette refuses middleware once a request has built the
        stack (Forge Classic's API was never created: "Cannot add middleware after an application has
        started")."""
        with open(self.log_path, errors="replace") as log:
            log.seek(self.log_start)
            return "Startup time:" in log.read()

    def _wait_until_ready(self, deadline: float):
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the WebUI exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")
            if not self._started():
                time.sleep(2)
                continue
            try:
                get_json(f"{self.url}/sdapi/v1/options", timeout=5, auth=self.auth)
                return self._wait_for_extension_routes(deadline)
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(2)
        raise TimeoutError(f"the WebUI did not answer in time; log tail:\n{self.log_tail()}")

    def _wait_for_extension_routes(self, deadline: float):
        """The host answers before its on_app_started callbacks ran, which add AutoLoRA's routes.
        Then the checkpoint is selected by its listed title: --ckpt is not enough everywhere (Forge
        Neo has none), and the same title goes into the UI preset's own checkpoint option where the
        host has presets (Forge Neo: each page load selects `forge_checkpoint_<preset>`, saved
        whenever a user picked a checkpoint on the page, before `sd_model_checkpoint`;
        modules_forge/main_entry.py on_preset_change); config.json is put back at stop()."""
        while time.time() < deadline:
            if get_status(f"{self.url}/autolora/v1/params", self.auth) != 404:
                title = self._checkpoint_title()
                selection = {"sd_model_checkpoint": title}
                options = get_json(f"{self.url}/sdapi/v1/options", timeout=60, auth=self.auth)
                preset_checkpoint = f"forge_checkpoint_{options.get('forge_preset')}"
                if preset_checkpoint in options:
                    selection[preset_checkpoint] = title
                status, body = post_json(f"{self.url}/sdapi/v1/options", selection, auth=self.auth)
                if status != 200:
                    raise RuntimeError(f"selecting {title} failed: HTTP {status} {body}")
                return self
            time.sleep(1)
        raise TimeoutError(f"AutoLoRA's routes did not appear; log tail:\n{self.log_tail()}")

    def reselect_checkpoint(self):
        """Select another listed checkpoint, then ours again: a host that reads some options only when a
        checkpoint is selected (HostSpec.reselect_after) takes them up. Nothing is loaded in between
        (Forge loads the selected checkpoint at the next generation)."""
        title = self._checkpoint_title()
        others = [m["title"] for m in get_json(f"{self.url}/sdapi/v1/sd-models", timeout=60, auth=self.auth)
                  if m.get("title") and m["title"] != title and m.get("filename")
                  and Path(m["filename"]).is_file()]
        if not others:
            raise RuntimeError(f"no second checkpoint listed to reselect {title} with")
        for target in (others[0], title):
            status, body = post_json(f"{self.url}/sdapi/v1/options", {"sd_model_checkpoint": target}, auth=self.auth)
            if status != 200:
                raise RuntimeError(f"selecting {target} failed: HTTP {status} {body}")

    def _checkpoint_title(self) -> str:
        """The title the host lists our checkpoint under (what its checkpoint option accepts on every
        host; Forge Neo accepts only its known aliases), after a refresh when it is not listed yet
        (Forge Neo loads a --ckpt file without listing it)."""
        for attempt in range(2):
            for model in get_json(f"{self.url}/sdapi/v1/sd-models", timeout=60, auth=self.auth):
                if Path(model.get("filename", "")).resolve() == self.ckpt.resolve():
                    return model["title"]
            if attempt == 0:
                post_json(f"{self.url}/sdapi/v1/refresh-checkpoints", {}, auth=self.auth)
        raise RuntimeError(f"the WebUI does not list {self.ckpt}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # this process only (its own session)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        if getattr(self, "log", None):
            self.log.close()
        if self._link_created:
            (self.host.root / "extensions" / EXTENSION_LINK).unlink(missing_ok=True)
        for link in self._other_links:
            link.unlink(missing_ok=True)
        self._other_links = []
        for name, data in self._saved.items():
            path = self.host.root / name
            current = path.read_bytes() if path.exists() else None
            if current != data:
                if data is None:
                    path.unlink(missing_ok=True)
                else:
                    path.write_bytes(data)


def basic_auth(auth: Optional[tuple]) -> dict:
    if not auth:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()}


def get_json(url: str, timeout: float = 600, auth: Optional[tuple] = None):
    with urllib.request.urlopen(urllib.request.Request(url, headers=basic_auth(auth)), timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def get_status(url: str, auth: Optional[tuple] = None, method: str = "GET") -> int:
    req = urllib.request.Request(url, headers=basic_auth(auth), method=method, data=b"{}" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def post_json(url: str, payload, timeout: float = 1800, auth: Optional[tuple] = None):
    """(status, parsed body) without raising on HTTP errors."""
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **basic_auth(auth)})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, body.decode(errors="replace")
