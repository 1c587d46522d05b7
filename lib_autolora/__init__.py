"""AutoLoRA guidance, host-free core.

guidance     - the blend (four and two evaluations), CFG, the guidance interval, schedule and cap
step         - the one step protocol every host calls
generation   - one generation's lifecycle: settings, interval, strategy, notices
factors      - what the LoRAs add to a module: low-rank terms and dense deltas
base_branch  - strategies that evaluate the model with the guided LoRAs removed
params       - the parameter table behind the UI, API, infotext and XYZ axes
stats        - what a generation did (GET /autolora/v1/stats)
diagnostics  - the soak test's and the benchmark's probes (AUTOLORA_DIAGNOSTICS=1 only)
hosts/       - the only modules that touch a WebUI (imported by scripts/autolora.py)
"""

# Written into the infotext of every guided image: what the settings meant when it was made.
# 2: the infotext holds only what differs from the defaults, and the strategy that ran.
# 3: the strategy that ran is marked "(auto)" when `auto` picked it (it pastes as `auto`).
VERSION = "3"
