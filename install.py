"""AutoLoRA needs nothing beyond what AUTOMATIC1111 / Forge ship (torch, gradio, safetensors).

The WebUI runs this file when it installs or updates the extension. It installs nothing and
never fails, so an offline machine (or `--skip-prepare-environment`) changes nothing.
"""
try:
    import torch  # noqa: F401  (only a check; the WebUI provides torch)
except Exception as exc:  # never fail the WebUI's startup
    print(f"[AutoLoRA] note: torch is not importable yet ({exc}); the WebUI installs it")
