"""AutoLoRA guidance, host-free core.

guidance     - the blend (four and two evaluations), CFG, the guidance interval
factors      - what the LoRAs add to a module: low-rank terms and dense deltas
kohya        - kohya-format LoRA safetensors -> factors (standalone path, demo, tests)
base_branch  - strategies that evaluate the model with the guided LoRAs removed
guider       - a k-diffusion-style denoiser that runs both branches and blends them
params       - the parameter table behind the UI, API, infotext and XYZ axes
hosts/       - the only modules that touch a WebUI (imported by scripts/autolora.py)
"""
